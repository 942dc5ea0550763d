// The pre-training models (MaPeT / PIM two-stream, BEiT MIM, CCViT, DTM) behind opaque handles: creation,
// the parameter table, zero-copy parameter/gradient blocks, the drop-path generator state,
// inference and train steps. Every input is validated here (shapes, dtypes, token range,
// batch consistency) so the Swift models never see a bad argument.
import CPythonBridge
import MaPeTKernels

/// tokens int32 [B, n] with every value in 0..<V.
private func visualTokens(_ arena: BufferArena, _ obj: PyObj, B: Int, _ k: PretrainConfig) throws -> ArrayView<Int32> {
    let n = k.vit.numPatches, V = k.vocabSize
    let t = try arena.int32AnyShape(obj, "tokens")
    guard t.shape == [B, n] else {
        throw PyError.value("tokens: expected shape [\(B), \(n)] (the visual token of every patch of the \(B) images), got \(t.shape)")
    }
    for i in 0..<(B * n) where t.pointer[i] < 0 || Int(t.pointer[i]) >= V {
        throw PyError.value("tokens: expected visual tokens in [0, \(V)), got \(t.pointer[i]) at [\(i / n), \(i % n)]")
    }
    return t
}

/// A permutation batch matching B images of `k`.
private func permutationBatch(_ args: Args, _ i: Int, B: Int, _ k: PretrainConfig) throws -> PermutationBatch {
    let batch = try args.handle(i, "batch", PermutationBatch.self)
    guard batch.tokens == k.vit.sequenceLength else {
        throw PyError.value("batch: permutations over \(batch.tokens) tokens, the model has \(k.vit.sequenceLength) (\(k.vit.numPatches) patches + class token)")
    }
    guard batch.batchSize == B else {
        throw PyError.value("batch: holds \(batch.batchSize) permutations for \(B) images")
    }
    return batch
}

private func stepResult(_ r: Result<Double, PretrainModel.StepError>, B: Int) throws -> PyObj? {
    switch r {
    case .success(let loss): return pyFloat(loss)
    case .failure(.outOfMemory): throw PyError.memory("train_step: could not allocate activations for batch \(B)")
    case .failure(.nonFiniteLoss(let v)):
        throw PyError.value("train_step: the loss is not finite (\(v)); gradients were not changed (check the images for NaN/inf and the learning rate)")
    }
}

/// The masked-encoder model of `kind` behind argument 0.
private func maskedModel(_ args: Args, _ kind: PretrainKind) throws -> BEiTModel {
    let m = try args.handle(0, "model", BEiTModel.self)
    guard m.config.kind == kind else {
        throw PyError.type("model: expected a \(kind.rawValue) model, got a \(m.config.kind.rawValue) model")
    }
    return m
}

/// flags int32 [B, n] (non-zero = flagged) under `name`.
private func patchFlags(_ arena: BufferArena, _ obj: PyObj, _ name: String, B: Int, _ k: PretrainConfig) throws -> ArrayView<Int32> {
    let n = k.vit.numPatches
    let m = try arena.int32AnyShape(obj, name)
    guard m.shape == [B, n] else {
        throw PyError.value("\(name): expected shape [\(B), \(n)] (one flag per patch of the \(B) images), got \(m.shape)")
    }
    return m
}

private func word(_ args: Args, _ i: Int, _ name: String) throws -> UInt64 {
    UInt64(bitPattern: Int64(try args.int(i, name)))
}

/// The keys of `pretrain_create`'s config dict, in the order they are read: the trunk's, then the model
/// config's own names (num_tokens: the visual-token vocabulary; output_dim: DTM's teacher dimension,
/// None otherwise; early_layers, head_layers: CCViT's, None otherwise).
let pretrainConfigKeys = trunkConfigKeys + ["seed", "kind", "num_tokens", "output_dim", "least_number",
                                            "early_layers", "head_layers"]

let pretrainModelMethods: [Method] = [
    Method("pretrain_create", { outer in
        // pretrain_create(config: dict) -> handle; config holds exactly pretrainConfigKeys
        try outer.expect(1)
        return try withConfig(outer[0], keys: pretrainConfigKeys, function: "pretrain_create") { args in
        let kind = try args.string(11, "kind")
        guard let kd = PretrainKind(rawValue: kind) else {
            throw PyError.value("kind: expected 'mapet', 'pim', 'beit', 'ccvit' or 'dtm', got '\(kind)'")
        }
        // the classifier fields are unused by the pre-training trunks
        let vit = try args.trunkConfig(numClasses: 1, globalPool: .token)
        let seed = UInt64(bitPattern: Int64(try args.int(10, "seed")))
        // lm_head / decoder outputs: the vocabulary, or DTM's teacher dimension
        let vocabulary = try args.int(12, "num_tokens", min: 1, max: 1 << 24)
        let outputs = kd == .dtm ? try args.int(13, "output_dim", min: 1, max: 1 << 24) : vocabulary
        let pixelHead = kd == .ccvit
        let k = PretrainConfig(vit: vit, kind: kd, vocabSize: outputs,
                               leastNumber: try args.int(14, "least_number", min: 1, max: 1 << 30),
                               earlyLayers: pixelHead ? try args.int(15, "early_layers", min: 1, max: 1024) : 0,
                               headLayers: pixelHead ? try args.int(16, "head_layers", min: 1, max: 64) : 0)
        if let problem = k.problem { throw PyError.value(problem) }
        let total = PretrainModel.makeTable(k).total
        try requireModelFits(k.vit, total: total, outputs: k.vocabSize, streams: k.twoStream ? 2 : 1)
        guard total < (1 << 34) else { throw PyError.value("model too large: \(total) parameters") }
        let model: PretrainModel? = withoutGIL {
            k.twoStream ? MaPeTModel(config: k, seed: seed)
                : k.kind == .ccvit ? CCViTModel(config: k, seed: seed) : BEiTModel(config: k, seed: seed)
        }
        guard let model else { throw PyError.memory("pretrain_create: could not allocate \(total) parameters") }
        guard let h = makeHandle(model) else { throw PythonErrorSet() }
        return h
        }
    }, doc: "pretrain_create(config: dict) -> handle; config keys: " + pretrainConfigKeys.joined(separator: ", ")),

    Method("pretrain_table", { args in
        try args.expect(1)
        return try parameterTable(try args.handle(0, "model", PretrainModel.self).table)
    }, doc: "pretrain_table(model) -> [(name, shape, offset)] in reference order."),

    Method("pretrain_blocks", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", PretrainModel.self)
        return try pyTuple([makeTensor(m.params, dtype: .float32, shape: [m.table.total]),
                            makeTensor(m.grads, dtype: .float32, shape: [m.table.total])])
    }, doc: "pretrain_blocks(model) -> (params, grads): 1-d zero-copy views of the two contiguous blocks."),

    Method("pretrain_zero_grad", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", PretrainModel.self)
        exclusive(m) { m.zeroGrad() }
        return none()
    }, doc: "pretrain_zero_grad(model)"),

    Method("pretrain_rng_state", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", PretrainModel.self)
        let s = exclusive(m) { m.rng.stateWords }
        return try pyTuple([s.0, s.1, s.2, s.3].map { pyInt(Int(Int64(bitPattern: $0))) })
    }, doc: "pretrain_rng_state(model) -> 4 signed 64-bit words of the drop-path xoshiro256** state"),

    Method("pretrain_set_rng_state", { args in
        try args.expect(5)
        let m = try args.handle(0, "model", PretrainModel.self)
        let s = (try word(args, 1, "s0"), try word(args, 2, "s1"), try word(args, 3, "s2"), try word(args, 4, "s3"))
        guard s.0 | s.1 | s.2 | s.3 != 0 else { throw PyError.value("state: a xoshiro256** state must not be all zero") }
        exclusive(m) { m.rng = Xoshiro256StarStar(state: s) }
        return none()
    }, doc: "pretrain_set_rng_state(model, s0, s1, s2, s3)"),

    Method("pretrain_set_seed", { args in
        try args.expect(2)
        let m = try args.handle(0, "model", PretrainModel.self)
        let seed = try word(args, 1, "seed")
        exclusive(m) { m.rng = Xoshiro256StarStar(seed: seed, stream: 1) }
        return none()
    }, doc: "pretrain_set_seed(model, seed_bits): restarts the drop-path generator"),

    Method("pretrain_set_precision", { args in
        try args.expect(2)
        let m = try args.handle(0, "model", PretrainModel.self)
        let precision = try args.precision(1, "precision")
        exclusive(m) { m.precision = precision }   // not in the middle of another thread's step
        return none()
    }, doc: "pretrain_set_precision(model, precision): 'fp32' or 'bf16' for every matrix product."),

    Method("pretrain_precision", { args in
        try args.expect(1)
        return pyString(try args.handle(0, "model", PretrainModel.self).precision.rawValue)
    }, doc: "pretrain_precision(model) -> 'fp32' or 'bf16'"),

    Method("pretrain_release", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", PretrainModel.self)
        exclusive(m) {
            (m as? MaPeTModel)?.releaseActivations()
            (m as? BEiTModel)?.releaseActivations()   // BEiT, DTM and CCViT
        }
        return none()
    }, doc: "pretrain_release(model): frees the cached activations."),

    Method("twostream_forward", { args in
        // (model, images, batch, out [B, P, V]|None) -> out
        try args.expect(4)
        let m = try args.handle(0, "model", MaPeTModel.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0]
        let batch = try permutationBatch(args, 2, B: B, m.config)
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(3, "out", [B, batch.predictedCount, m.config.vocabSize])
        nonisolated(unsafe) let o = out.pointer
        guard exclusive(m, { m.forward(logits: o, images: x.readOnly, batch: batch) }) else {
            throw PyError.memory("forward: could not allocate activations for batch \(B)")
        }
        return try outputs.result()
    }, doc: "twostream_forward(model, images, batch, out) -> out: logits [B, P, num_tokens] at the predicted positions (None: allocated)."),

    Method("twostream_train_step", { args in
        // (model, images, tokens int32 [B, n], batch, logits_out|True|None) -> loss, or (loss, logits)
        try args.expect(5)
        let m = try args.handle(0, "model", MaPeTModel.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0]
        let tokens = try visualTokens(arena, args[2], B: B, m.config)
        let batch = try permutationBatch(args, 3, B: B, m.config)
        let outputs = Outputs(arena, args)
        let logits = try outputs.requested(4, "logits_out", [B, batch.predictedCount, m.config.vocabSize])
        nonisolated(unsafe) let lo = logits?.pointer
        let r = exclusive(m) { m.trainStep(images: x.readOnly, tokens: tokens.readOnly, batch: batch, logitsOut: lo) }
        return try outputs.result(leading: [try stepResult(r, B: B)])
    }, doc: "twostream_train_step(model, images, tokens, batch, logits_out) -> loss, or (loss, logits) when logits_out is an array or True (allocated); adds gradients."),

    Method("mim_forward", { args in
        // (model, images, mask int32 [B, n], out [B, M, V]|None) -> out; every sample masks M patches
        try args.expect(4)
        let m = try maskedModel(args, .beit)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0], np = m.config.vit.numPatches
        let mask = try patchFlags(arena, args[2], "mask", B: B, m.config)
        let counts = (0..<B).map { b in (0..<np).reduce(0) { $0 + (mask.pointer[b * np + $1] != 0 ? 1 : 0) } }
        guard Set(counts).count == 1 else {
            throw PyError.value("mask: every sample must mask the same number of patches for logits [B, M, num_tokens], got counts \(counts)")
        }
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(3, "out", [B, counts[0], m.config.vocabSize])
        nonisolated(unsafe) let o = out.pointer
        guard exclusive(m, { m.forward(logits: o, images: x.readOnly, masked: mask.readOnly, B: B) }) else {
            throw PyError.memory("forward: could not allocate activations for batch \(B)")
        }
        return try outputs.result()
    }, doc: "mim_forward(model, images, mask, out) -> out: logits [B, M, num_tokens] at the masked patches (None: allocated)."),

    Method("mim_train_step", { args in
        // (model, images, tokens int32 [B, n], mask int32 [B, n], logits_out [M_total, V]|True|None) -> loss, or (loss, logits)
        try args.expect(5)
        let m = try maskedModel(args, .beit)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0]
        let tokens = try visualTokens(arena, args[2], B: B, m.config)
        let mask = try patchFlags(arena, args[3], "mask", B: B, m.config)
        let M = m.maskedCount(mask.readOnly, B: B)
        let outputs = Outputs(arena, args)
        let logits = try outputs.requested(4, "logits_out", [M, m.config.vocabSize])
        nonisolated(unsafe) let lo = logits?.pointer
        let r = exclusive(m) { m.trainStep(images: x.readOnly, tokens: tokens.readOnly, masked: mask.readOnly, B: B, logitsOut: lo) }
        return try outputs.result(leading: [try stepResult(r, B: B)])
    }, doc: "mim_train_step(model, images, tokens, mask, logits_out) -> loss, or (loss, logits) when logits_out is an array or True (allocated); adds gradients."),
    Method("dtm_forward", { args in
        // (model, images, mask int32 [B, n]|None (nothing masked), out [B, n, D]|None) -> out
        try args.expect(4)
        let m = try maskedModel(args, .dtm)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0], np = m.config.vit.numPatches
        let mask = args.isNone(2) ? nil : try patchFlags(arena, args[2], "mask", B: B, m.config)
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(3, "out", [B, np, m.config.vocabSize])
        let unmasked = mask == nil ? [Int32](repeating: 0, count: B * np) : []
        let ok = unmasked.withUnsafeBufferPointer { zeros -> Bool in
            nonisolated(unsafe) let (o, pm) = (out.pointer, mask?.readOnly ?? zeros.baseAddress!)
            return exclusive(m, { m.forward(logits: o, images: x.readOnly, masked: pm, select: nil, B: B) })
        }
        guard ok else { throw PyError.memory("forward: could not allocate activations for batch \(B)") }
        return try outputs.result()
    }, doc: "dtm_forward(model, images, mask, out) -> out: predictions [B, n, output_dim] at every patch (mask None: nothing masked; out None: allocated)."),

    Method("dtm_train_step", { args in
        // (model, images, mask int32 [B, n], target [B, n, D], memberships int32 [L, B, n] | (rs, iterations),
        //  beta, pred_out|True|None) -> loss, or (loss, pred)
        try args.expect(7)
        let m = try maskedModel(args, .dtm)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0], np = m.config.vit.numPatches, D = m.config.vocabSize
        let mask = try patchFlags(arena, args[2], "mask", B: B, m.config)
        let target = try arena.float32AnyShape(args[3], "target")
        guard target.shape == [B, np, D] else {
            throw PyError.value("target: expected teacher features of shape [\(B), \(np), \(D)] (batch, patches, output_dim), got \(target.shape)")
        }
        let schedules = mapet_py_tuple_check(args[4]) != 0 ? try dtmSchedules(args[4]) : nil
        let given = schedules == nil ? try arena.int32(args[4], "memberships", [nil, nil, nil]) : nil
        if let mem = given {
            guard mem.shape[0] >= 1, mem.shape[1] == B, mem.shape[2] == np else {
                throw PyError.value("memberships: expected shape [L ≥ 1, \(B), \(np)], got \(mem.shape)")
            }
            try checkIds(mem, "memberships", below: np, what: "group ids")
        }
        let beta = try args.finiteDouble(5, "beta")
        guard beta > 0 else { throw PyError.value("beta: expected a positive number, got \(beta)") }
        let L = given?.shape[0] ?? schedules!.r.count
        var computed: [Int32] = []
        if let s = schedules {
            try requireMemory(morphingBytes(B: B, N: np, D: D), "token morphing of \(np) tokens of dimension \(D)")
            computed = [Int32](repeating: 0, count: L * B * np)
            computed.withUnsafeMutableBufferPointer { out in
                nonisolated(unsafe) let (po, pt) = (out.baseAddress!, target.readOnly)
                withoutGIL {
                    for l in 0..<L {  // as dtm_memberships(target, schedules): token 0 kept out of every merge
                        tokenMorphing(membership: po + l * B * np, sizes: nil, merged: nil, features: pt,
                                      B: B, N: np, D: D, r: s.r[l], iterations: s.iterations[l], protectFirst: true)
                    }
                }
            }
        }
        let outputs = Outputs(arena, args)
        let pred = try outputs.requested(6, "pred_out", [B, np, D])
        let r = computed.withUnsafeBufferPointer { morphed -> Result<Double, PretrainModel.StepError> in
            nonisolated(unsafe) let (px, pm, pt, po) = (x.readOnly, mask.readOnly, target.readOnly, pred?.pointer)
            nonisolated(unsafe) let pmem = given?.readOnly ?? morphed.baseAddress!
            return exclusive(m) {
                m.dtmTrainStep(images: px, masked: pm, target: pt, membership: pmem, L: L, beta: beta, B: B, predOut: po)
            }
        }
        return try outputs.result(leading: [try stepResult(r, B: B)])
    }, doc: "dtm_train_step(model, images, mask, target, memberships, beta, pred_out) -> loss, or (loss, pred) when pred_out is an array or True (allocated); memberships [L, B, n] group ids or a tuple (rs, iterations) of the step's schedules, morphed here from target; adds gradients."),

    Method("ccvit_forward", { args in
        // (model, images, mask int32 [B, n], replaced int32 [B, n], logits_out [M, V]|None, pixels_out [M, P]|None)
        //  -> (logits, pixels)
        try args.expect(6)
        let m = try args.handle(0, "model", CCViTModel.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0]
        let mask = try patchFlags(arena, args[2], "mask", B: B, m.config)
        let replaced = try patchFlags(arena, args[3], "replaced", B: B, m.config)
        let M = (0..<mask.count).reduce(0) { $0 + (mask.pointer[$1] != 0 || replaced.pointer[$1] != 0 ? 1 : 0) }
        let outputs = Outputs(arena, args)
        let logits = try outputs.float32(4, "logits_out", [M, m.config.vocabSize])
        let pixels = try outputs.float32(5, "pixels_out", [M, m.config.vit.patchDim])
        nonisolated(unsafe) let (px, pm, pr, lo, po) = (x.readOnly, mask.readOnly, replaced.readOnly, logits.pointer, pixels.pointer)
        guard exclusive(m, { m.forward(logits: lo, pixels: po, images: px, masked: pm, replaced: pr, B: B) }) else {
            throw PyError.memory("forward: could not allocate activations for batch \(B)")
        }
        return try outputs.result()
    }, doc: "ccvit_forward(model, images, mask, replaced, logits_out[M,V], pixels_out[M,P]) -> (logits, pixels) at the corrupted patches (None: allocated)."),

    Method("ccvit_train_step", { args in
        // (model, images, tokens int32 [B, n], pixel_targets [B, n, P], mask, replaced, token_weight,
        //  pixel_weight, logits_out|True|None, pixels_out|True|None) -> (loss, token_loss, pixel_loss[, logits][, pixels])
        try args.expect(10)
        let m = try args.handle(0, "model", CCViTModel.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config.vit)
        let B = x.shape[0], np = m.config.vit.numPatches, P = m.config.vit.patchDim
        let tokens = try visualTokens(arena, args[2], B: B, m.config)
        let targets = try arena.float32AnyShape(args[3], "pixel_targets")
        guard targets.shape == [B, np, P] else {
            throw PyError.value("pixel_targets: expected shape [\(B), \(np), \(P)] (batch, patches, in_chans·patch²), got \(targets.shape)")
        }
        let mask = try patchFlags(arena, args[4], "mask", B: B, m.config)
        let replaced = try patchFlags(arena, args[5], "replaced", B: B, m.config)
        let tw = try args.finiteDouble(6, "token_weight"), pw = try args.finiteDouble(7, "pixel_weight")
        for (name, w) in [("token_weight", tw), ("pixel_weight", pw)] where !(w >= 0) {
            throw PyError.value("\(name): expected a finite non-negative weight, got \(w)")
        }
        let M = (0..<mask.count).reduce(0) { $0 + (mask.pointer[$1] != 0 || replaced.pointer[$1] != 0 ? 1 : 0) }
        let outputs = Outputs(arena, args)
        let logits = try outputs.requested(8, "logits_out", [M, m.config.vocabSize])
        let pixels = try outputs.requested(9, "pixels_out", [M, P])
        nonisolated(unsafe) let (px, pt, ptg, pm, pr) = (x.readOnly, tokens.readOnly, targets.readOnly, mask.readOnly, replaced.readOnly)
        nonisolated(unsafe) let (lo, po) = (logits?.pointer, pixels?.pointer)
        let r = exclusive(m) {
            m.trainStep(images: px, tokens: pt, pixelTargets: ptg, masked: pm, replaced: pr, B: B,
                        tokenWeight: tw, pixelWeight: pw, logitsOut: lo, pixelsOut: po)
        }
        switch r {
        case .success(let l): return try outputs.result(leading: [pyFloat(l.total), pyFloat(l.tokens), pyFloat(l.pixels)])
        case .failure(let e): return try stepResult(.failure(e), B: B)
        }
    }, doc: "ccvit_train_step(model, images, tokens, pixel_targets, mask, replaced, token_weight, pixel_weight, logits_out, pixels_out) -> (loss, token_loss, pixel_loss), then logits and pixels when requested (an array, or True: allocated); adds gradients."),
]

/// A DTM step's morphing schedules, given as the tuple (rs, iterations): one r and one iteration
/// count per schedule, as `dtm_memberships` takes them.
private struct DTMSchedules { let r: [Int], iterations: [Int] }

private func dtmSchedules(_ o: PyObj) throws -> DTMSchedules {
    guard PySequence_Size(o) == 2 else {
        throw PyError.value("memberships: expected group ids [L, B, n] or the schedules (rs, iterations), got a tuple of \(PySequence_Size(o))")
    }
    guard let rs = PySequence_GetItem(o, 0) else { throw PythonErrorSet() }
    defer { mapet_py_decref(rs) }
    guard let its = PySequence_GetItem(o, 1) else { throw PythonErrorSet() }
    defer { mapet_py_decref(its) }
    let items = UnsafeMutablePointer<PyObj?>.allocate(capacity: 2)
    defer { items.deallocate() }
    items[0] = rs
    items[1] = its
    let pair = Args(base: UnsafePointer(items), count: 2, function: "dtm_train_step")
    let r = try pair.ints(0, "r"), iterations = try pair.ints(1, "iterations")
    guard r.count == iterations.count, !r.isEmpty else {
        throw PyError.value("memberships: expected as many r as iterations (at least one schedule), got \(r.count) and \(iterations.count)")
    }
    for (l, (rl, k)) in zip(r, iterations).enumerated() where rl < 0 || k < 0 || k > 1 << 20 {
        throw PyError.value("memberships: schedule \(l) needs r ≥ 0 and 0 ≤ iterations ≤ 2^20, got r=\(rl), iterations=\(k)")
    }
    return DTMSchedules(r: r, iterations: iterations)
}
