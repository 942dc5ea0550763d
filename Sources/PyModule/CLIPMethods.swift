// The CLIP ViT image tower behind an opaque handle: creation from a config, the parameter table,
// a zero-copy view of the parameter block, precision, and one inference pass that fills any of
// the final tokens, the projected tokens and the pooled embedding.
import CPythonBridge
import MaPeTKernels

/// The keys of `clip_vit_create`'s config dict, in the order they are read (OpenAI's names).
let clipConfigKeys = ["img_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim", "activation", "seed"]

let clipMethods: [Method] = [
    Method("clip_vit_create", { outer in
        // clip_vit_create(config: dict) -> handle; config holds exactly clipConfigKeys
        try outer.expect(1)
        return try withConfig(outer[0], keys: clipConfigKeys, function: "clip_vit_create") { args in
        let act = try args.string(7, "activation")
        guard let activation = Activation(rawValue: act) else {
            throw PyError.value("activation: expected 'gelu' or 'quick_gelu', got '\(act)'")
        }
        // The published towers: RGB input, no classifier, layer scale or drop path; in_proj has biases.
        let trunk = ViTConfig(imgSize: try args.int(0, "img_size", min: 1, max: 1 << 16),
                              patchSize: try args.int(1, "patch_size", min: 1, max: 1 << 16), inChans: 3,
                              embedDim: try args.int(2, "width", min: 1, max: 1 << 16),
                              depth: try args.int(3, "layers", min: 0, max: 1024),
                              numHeads: try args.int(4, "heads", min: 1, max: 1 << 12),
                              mlpRatio: try args.finiteDouble(5, "mlp_ratio"), numClasses: 1, globalPool: .token,
                              initValues: nil, dropPathRate: 0, qkvBias: true)
        let k = CLIPVisionConfig(trunk: trunk, outputDim: try args.int(6, "output_dim", min: 1, max: 1 << 16),
                                 activation: activation)
        let seed = UInt64(bitPattern: Int64(try args.int(8, "seed")))
        if let problem = k.problem { throw PyError.value(problem) }
        guard k.trunk.mlpRatio > 0, Double(k.trunk.hidden) < 1e7 else {
            throw PyError.value("mlp_ratio: expected a positive ratio, got \(k.trunk.mlpRatio)")
        }
        let total = CLIPVisionTransformer.makeTable(k).total
        guard total < (1 << 34) else { throw PyError.value("model too large: \(total) parameters") }
        try requireMemory(product([total, 4]), "the tower's parameters (\(total))")
        guard let model = withoutGIL({ CLIPVisionTransformer(config: k, seed: seed) }) else {
            throw PyError.memory("clip_vit_create: could not allocate \(total) parameters")
        }
        guard let h = makeHandle(model) else { throw PythonErrorSet() }
        return h
        }
    }, doc: "clip_vit_create(config: dict) -> handle; config keys: " + clipConfigKeys.joined(separator: ", ")),

    Method("clip_vit_table", { args in
        try args.expect(1)
        return try parameterTable(try args.handle(0, "model", CLIPVisionTransformer.self).table)
    }, doc: "clip_vit_table(model) -> [(name, shape, offset)] in reference order (names without 'visual.')."),

    Method("clip_vit_params", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", CLIPVisionTransformer.self)
        return try makeTensor(m.params, dtype: .float32, shape: [m.table.total])
    }, doc: "clip_vit_params(model) -> 1-d zero-copy view of the parameter block."),

    Method("clip_vit_set_precision", { args in
        try args.expect(2)
        let m = try args.handle(0, "model", CLIPVisionTransformer.self)
        let precision = try args.precision(1, "precision")
        exclusive(m) { m.precision = precision }
        return none()
    }, doc: "clip_vit_set_precision(model, precision): 'fp32' or 'bf16' for every matrix product."),

    Method("clip_vit_precision", { args in
        try args.expect(1)
        return pyString(try args.handle(0, "model", CLIPVisionTransformer.self).precision.rawValue)
    }, doc: "clip_vit_precision(model) -> 'fp32' or 'bf16'"),

    Method("clip_vit_forward", { args in
        // (model, images [B, 3, S, S], tokens [B, N, C]|True|None, projected [B, N, E]|True|None,
        //  embedding [B, E]|True|None) -> (tokens, projected, embedding), None for each one not asked for
        try args.expect(5)
        let m = try args.handle(0, "model", CLIPVisionTransformer.self)
        let k = m.config.trunk, E = m.config.outputDim
        let arena = BufferArena(); defer { arena.release() }
        let want = "[B, \(k.inChans), \(k.imgSize), \(k.imgSize)] (CLIP-preprocessed, see mapet.clip.preprocess)"
        let x = try arena.float32AnyShape(args[1], "images")
        guard x.shape.count == 4 else {
            throw PyError.value("images: expected a 4-d array \(want), got a \(x.shape.count)-d array of shape \(x.shape)")
        }
        guard x.shape[1] == k.inChans, x.shape[2] == k.imgSize, x.shape[3] == k.imgSize else {
            throw PyError.value("images: expected shape \(want), got \(x.shape)")
        }
        let B = x.shape[0]
        guard B >= 1 else { throw PyError.value("images: expected at least one image, got shape \(x.shape)") }
        let floats = try checkedProduct([m.arenaFloats(B: 1), B], "activations")
        try requireMemory(product([floats, 4]), "the activations of a batch of \(B) images", probe: false)
        let outputs = Outputs(arena, args)
        func take(_ i: Int, _ name: String, _ shape: [Int]) throws -> ArrayView<Float>? {
            let v = try outputs.requested(i, name, shape)
            if v == nil { outputs.absent() }
            return v
        }
        let tokens = try take(2, "tokens", [B, k.sequenceLength, k.embedDim])
        let projected = try take(3, "projected", [B, k.sequenceLength, E])
        let embedding = try take(4, "embedding", [B, E])
        nonisolated(unsafe) let (t, p, e) = (tokens?.pointer, projected?.pointer, embedding?.pointer)
        nonisolated(unsafe) let images = x.readOnly
        let ok = exclusive(m) { m.forward(tokens: t, projected: p, embedding: e, images: images, B: B) }
        guard ok else { throw PyError.memory("clip_vit_forward: could not allocate activations for batch \(B)") }
        return try outputs.result()
    }, doc: "clip_vit_forward(model, images, tokens, projected, embedding) -> (tokens, projected, embedding): each output an array (filled), True (allocated) or None (not computed, None in the result)."),
]
