// What the pre-training models share (ALGORITHMS.md §1–2): a ViT trunk without classifier, one
// learned special token and a linear head over the visual-token vocabulary.
//   MaPeT / PIM (two-stream): cls_token, pos_embed, mask_positional_token, patch_embed, blocks,
//                             norm, decoder [V, C]
//   BEiT (MIM):               cls_token, pos_embed, mask_token, patch_embed, blocks, norm, lm_head [V, C]
//   DTM:                      as BEiT, lm_head [D, C] to the teacher dimension D (= vocabSize)
//   CCViT:                    as BEiT, then cls_pt_layers (2 blocks), cls_pt_norm, cls_pt_lm_head [P, C]
//                             with P = in_chans·patch² (Cakeyan/CCViT_Public, shared_lm_head=False)
// The order is the PyTorch state_dict order of the references (a module's own parameters
// first, then its submodules in registration order). Parameters and gradients live in one
// block each, cut by a `ParameterTable`.

public enum PretrainKind: String, Sendable {
    /// Two-stream with auxiliary positional tokens.
    case mapet
    /// Two-stream without auxiliary positional tokens (XLNet-style permuted modeling).
    case pim
    /// BEiT masked image modeling.
    case beit
    /// CCViT: BEiT-style masking plus centroid replacement, token head and pixel head.
    case ccvit
    /// DTM student: BEiT-style masked encoder regressing morphed teacher features.
    case dtm
}

public struct PretrainConfig: Sendable, Equatable {
    /// The trunk (`numClasses` and `globalPool` are unused).
    public var vit: ViTConfig
    public var kind: PretrainKind
    /// V: visual-token vocabulary (`num_tokens` in Python; outputs of decoder / lm_head), or DTM's
    /// teacher dimension (`output_dim`).
    public var vocabSize: Int
    /// Default context size L of the two-stream models (`least_number`); batches carry their own.
    public var leastNumber: Int
    /// CCViT: the pixel head reads the patch tokens after this many blocks (9 of 12; unused by the other kinds).
    public var earlyLayers: Int
    /// CCViT: transformer blocks of the pixel head (unused by the other kinds).
    public var headLayers: Int

    /// Every field is given: the defaults live in Python only (README, developer section).
    public init(vit: ViTConfig, kind: PretrainKind, vocabSize: Int, leastNumber: Int, earlyLayers: Int, headLayers: Int) {
        (self.vit, self.kind, self.vocabSize, self.leastNumber) = (vit, kind, vocabSize, leastNumber)
        (self.earlyLayers, self.headLayers) = (earlyLayers, headLayers)
    }

    public var twoStream: Bool { kind == .mapet || kind == .pim }
    /// The number of pixel-head blocks (0 unless CCViT).
    public var pixelHeadDepth: Int { kind == .ccvit ? headLayers : 0 }
    public var specialToken: String { twoStream ? "mask_positional_token" : "mask_token" }
    public var headName: String { twoStream ? "decoder" : "lm_head" }

    /// A description of the first invalid field, or nil.
    public var problem: String? {
        if let p = vit.problem { return p }
        if vocabSize < 1 { return "num_tokens must be ≥ 1, got \(vocabSize)" }
        if twoStream && !(leastNumber >= 1 && leastNumber < vit.sequenceLength) {
            return "least_number must be in [1, \(vit.sequenceLength - 1)] for \(vit.numPatches) patches, got \(leastNumber)"
        }
        if kind == .ccvit && !(earlyLayers >= 1 && earlyLayers <= vit.depth) {
            return "early_layers must be in [1, depth=\(vit.depth)], got \(earlyLayers)"
        }
        if kind == .ccvit && !(headLayers >= 1 && headLayers <= 64) {
            return "head_layers must be in [1, 64], got \(headLayers)"
        }
        return nil
    }
}

/// A pre-training model: the trunk (parameters, gradients, blocks, drop path) under the reference
/// names of its kind, its token head and (CCViT) its pixel head.
public class PretrainModel: @unchecked Sendable {
    public let config: PretrainConfig
    /// Embedding, blocks, `norm`, the special token and the token head, in one parameter block
    /// with the pixel head's entries (CCViT).
    public let trunk: Trunk
    public var table: ParameterTable { trunk.table }
    public var params: TensorStorage { trunk.params }
    public var grads: TensorStorage { trunk.grads }
    public var blocks: [TransformerBlock] { trunk.blocks }
    /// `norm` + the token head (`decoder` / `lm_head`), and CCViT's pixel head (nil for the other kinds).
    let tokenHead: HeadTensors, dTokenHead: HeadTensors, pixelHead: HeadTensors?, dPixelHead: HeadTensors?
    /// CCViT's pixel-head blocks (`cls_pt_layers`); empty for the other kinds.
    public private(set) var headBlocks: [TransformerBlock]
    /// Precision of every matrix product, forward and backward (ALGORITHMS.md §7); parameters,
    /// gradients and everything else stay fp32.
    public var precision: Precision {
        get { trunk.precision }
        set {
            trunk.precision = newValue
            for i in headBlocks.indices { headBlocks[i].precision = newValue }
        }
    }
    /// Drop-path generator; advances once per training step (rewound on a non-finite loss).
    public var rng: Xoshiro256StarStar {
        get { trunk.rng }
        set { trunk.rng = newValue }
    }
    /// The parameters outside the blocks, and their gradients, resolved once.
    var w: TrunkTensors { trunk.w }
    var g: TrunkTensors { trunk.g }

    public enum StepError: Error, Equatable {
        case outOfMemory
        case nonFiniteLoss(Double)
    }

    /// Where this kind's entries go around the trunk's (reference state_dict order).
    static func layout(_ k: PretrainConfig) -> TrunkLayout {
        let v = k.vit
        return TrunkLayout(special: k.specialToken, norm: "norm", head: k.headName, headOutputs: k.vocabSize) { t in
            for i in 0..<k.pixelHeadDepth {
                BlockTensors.register(in: &t, prefix: "cls_pt_layers.\(i).", C: v.embedDim, hidden: v.hidden,
                                      qkvBias: v.qkvBias, layerScale: v.initValues != nil)
            }
            if k.kind == .ccvit {
                t.add("cls_pt_norm.weight", [v.embedDim]); t.add("cls_pt_norm.bias", [v.embedDim])
                t.add("cls_pt_lm_head.weight", [v.patchDim, v.embedDim]); t.add("cls_pt_lm_head.bias", [v.patchDim])
            }
        }
    }

    /// The reference parameter table for `config`.
    public static func makeTable(_ k: PretrainConfig) -> ParameterTable { Trunk.makeTable(k.vit, layout(k)) }

    /// Allocates and initialises (ALGORITHMS.md §1); nil when memory runs out.
    init?(config: PretrainConfig, seed: UInt64) {
        precondition(config.problem == nil, config.problem ?? "")
        guard let trunk = Trunk(config: config.vit, layout: PretrainModel.layout(config), seed: seed) else { return nil }
        self.config = config
        self.trunk = trunk
        let p = trunk.params.floats, g = trunk.grads.floats, table = trunk.table
        tokenHead = HeadTensors(base: p, table: table, norm: "norm", head: config.headName)
        dTokenHead = HeadTensors(base: g, table: table, norm: "norm", head: config.headName)
        let pixel = config.kind == .ccvit
        pixelHead = pixel ? HeadTensors(base: p, table: table, norm: "cls_pt_norm", head: "cls_pt_lm_head") : nil
        dPixelHead = pixel ? HeadTensors(base: g, table: table, norm: "cls_pt_norm", head: "cls_pt_lm_head") : nil
        headBlocks = trunk.makeBlocks(prefix: "cls_pt_layers.", count: config.pixelHeadDepth)
        // CCViT reference: the pixel head's block i has rate linspace(0, rate, max(depth, early + head))[early + i].
        let v = config.vit, total = max(v.depth, config.earlyLayers + config.headLayers)
        trunk.appendDropRates((0..<config.pixelHeadDepth).map { i in
            total > 1 ? v.dropPathRate * Float(config.earlyLayers + i) / Float(total - 1) : 0
        })
    }

    public var parameterCount: Int { trunk.parameterCount }

    public func zeroGrad() { trunk.zeroGrad() }
}

extension Xoshiro256StarStar {
    /// The four state words (to save and restore a generator exactly).
    public var stateWords: (UInt64, UInt64, UInt64, UInt64) { (s0, s1, s2, s3) }
}
