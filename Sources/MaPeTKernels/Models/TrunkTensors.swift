// The parameters of a model outside its blocks — patch embedding, class token, positions, the final
// norm, the head and a special token — resolved once when the model is built, as `BlockTensors` does
// for the blocks (llm.c `ParameterTensors`): hot code reads typed pointers, never a name, and a
// misspelt name fails at construction instead of in the middle of a step.

/// Pointers into one parameter block (the parameters, or the gradients) of a ViT-shaped model.
public struct TrunkTensors: @unchecked Sendable {
    public let patchWeight, patchBias, clsToken, posEmbed: UnsafeMutablePointer<Float>
    /// `norm` (or `fc_norm`), the head (`head`, `decoder`, `lm_head`) and the special token
    /// (`mask_token`, `mask_positional_token`); nil where the model has none.
    public let normWeight, normBias, headWeight, headBias, special: UnsafeMutablePointer<Float>?

    public init(base: UnsafeMutablePointer<Float>, table: ParameterTable, norm: String?, head: String?,
                special: String?) {
        func at(_ name: String) -> UnsafeMutablePointer<Float> { base + table.offset(name) }
        func maybe(_ name: String?) -> UnsafeMutablePointer<Float>? {
            guard let name else { return nil }
            return at(name)
        }
        patchWeight = at("patch_embed.proj.weight"); patchBias = at("patch_embed.proj.bias")
        clsToken = at("cls_token"); posEmbed = at("pos_embed")
        normWeight = maybe(norm.map { $0 + ".weight" }); normBias = maybe(norm.map { $0 + ".bias" })
        headWeight = maybe(head.map { $0 + ".weight" }); headBias = maybe(head.map { $0 + ".bias" })
        self.special = maybe(special)
    }
}

/// A LayerNorm and the Linear head after it (the token head `norm`/`lm_head`, CCViT's pixel head
/// `cls_pt_norm`/`cls_pt_lm_head`), in one parameter block, resolved once.
public struct HeadTensors: @unchecked Sendable {
    public let normWeight, normBias, weight, bias: UnsafeMutablePointer<Float>

    public init(base: UnsafeMutablePointer<Float>, table: ParameterTable, norm: String, head: String) {
        normWeight = base + table.offset(norm + ".weight"); normBias = base + table.offset(norm + ".bias")
        weight = base + table.offset(head + ".weight"); bias = base + table.offset(head + ".bias")
    }
}
