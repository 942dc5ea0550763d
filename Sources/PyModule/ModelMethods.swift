// The ViT classifier and AdamW behind opaque handles: creation from a config, the parameter
// table, zero-copy views of the parameter/gradient/moment blocks, inference, train steps.
import CPythonBridge
import MaPeTKernels

/// A model's parameter table as [(name, shape, offset)] (every model's `*_table`).
func parameterTable(_ t: ParameterTable) throws -> PyObj {
    try pyList(t.entries.map { e in
        try? pyTuple([pyString(e.name), pyTuple(e.shape.map { pyInt($0) }), pyInt(e.offset)])
    })
}

/// Validates images [B, inChans, S, S] for a model of trunk `k` (ViT or pre-training), naming what
/// differs, and that the batch's activations fit in memory.
func modelImages(_ arena: BufferArena, _ obj: PyObj, _ k: ViTConfig) throws -> ArrayView<Float> {
    let want = "[B, \(k.inChans), \(k.imgSize), \(k.imgSize)]"
    let x = try arena.float32AnyShape(obj, "images")
    guard x.shape.count == 4 else {
        throw PyError.value("images: expected a 4-d array \(want), got a \(x.shape.count)-d array of shape \(x.shape)")
    }
    guard x.shape[1] == k.inChans else {
        throw PyError.value("images: expected \(k.inChans) channels (shape \(want)), got shape \(x.shape)")
    }
    guard x.shape[2] == k.imgSize, x.shape[3] == k.imgSize else {
        throw PyError.value("images: expected \(k.imgSize)×\(k.imgSize) images (shape \(want)), got shape \(x.shape)")
    }
    guard x.shape[0] >= 1 else { throw PyError.value("images: expected at least one image, got shape \(x.shape)") }
    try requireBatchFits(k, B: x.shape[0], outputs: 1)
    return x
}

/// AdamW's hyper-parameters as the engine uses them (float32): each is checked after rounding
/// to float32, so a value finite in float64 cannot become inf, 0 or 1 in the update.
private struct AdamWHyper {
    let lr, beta1, beta2, eps, weightDecay: Float

    /// Parses args[i..<i+5] = (lr, beta1, beta2, eps, weight_decay).
    init(_ args: Args, _ i: Int) throws {
        func f32(_ j: Int, _ name: String) throws -> Float {
            let d = try args.finiteDouble(j, name)
            let f = Float(d)
            guard f.isFinite else { throw PyError.value("\(name): \(d) is not finite in float32 (the engine's precision)") }
            return f
        }
        lr = try f32(i, "lr"); beta1 = try f32(i + 1, "beta1"); beta2 = try f32(i + 2, "beta2")
        eps = try f32(i + 3, "eps"); weightDecay = try f32(i + 4, "weight_decay")
        guard lr >= 0 else { throw PyError.value("lr: expected a value ≥ 0, got \(lr)") }
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] where !(b >= 0 && b < 1) {
            throw PyError.value("\(name): expected a value in [0, 1) in float32 (the engine's precision), got \(try args.double(name == "beta1" ? i + 1 : i + 2, name)) which rounds to \(b)")
        }
        guard eps > 0, eps.isNormal else {
            throw PyError.value("eps: expected a positive value that is a normal float32 (≥ \(Float.leastNormalMagnitude)), got \(try args.double(i + 3, "eps"))")
        }
        guard weightDecay >= 0 else { throw PyError.value("weight_decay: expected a value ≥ 0, got \(weightDecay)") }
        guard lr * weightDecay <= 1 else {
            throw PyError.value("lr·weight_decay: expected at most 1 (decoupled decay multiplies weights by 1 − lr·weight_decay), got \(lr)·\(weightDecay)")
        }
    }
}

extension Args {
    /// A matrix-product precision given by name ("fp32" or "bf16").
    func precision(_ i: Int, _ name: String) throws -> Precision {
        let text = try string(i, name)
        guard let p = Precision(rawValue: text) else {
            throw PyError.value("\(name): expected 'fp32' or 'bf16', got '\(text)'")
        }
        return p
    }
}

/// The keys every model config dict starts with, in the order `trunkConfig` reads them (args 0..<10).
let trunkConfigKeys = ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                       "init_values", "drop_path_rate", "qkv_bias"]

/// The keys of `vit_create`'s config dict, in the order they are read (timm's names).
let vitConfigKeys = trunkConfigKeys + ["num_classes", "global_pool", "seed"]

extension Args {
    /// The trunk of a model config (args 0..<10, `trunkConfigKeys`), checked: each value's type and
    /// range, then the fields together (`ViTConfig.problem`).
    func trunkConfig(numClasses: Int, globalPool: GlobalPool) throws -> ViTConfig {
        let embedDim = try int(3, "embed_dim", min: 1, max: 1 << 16)
        let mlpRatio = try finiteDouble(6, "mlp_ratio")
        guard mlpRatio > 0, Double(embedDim) * mlpRatio < 1e7 else {
            throw PyError.value("mlp_ratio: expected a positive ratio, got \(mlpRatio)")
        }
        let k = ViTConfig(imgSize: try int(0, "img_size", min: 1, max: 1 << 16),
                          patchSize: try int(1, "patch_size", min: 1, max: 1 << 16),
                          inChans: try int(2, "in_chans", min: 1, max: 1 << 12), embedDim: embedDim,
                          depth: try int(4, "depth", min: 0, max: 1024), numHeads: try int(5, "num_heads", min: 1, max: 1 << 12),
                          mlpRatio: mlpRatio, numClasses: numClasses, globalPool: globalPool,
                          initValues: isNone(7) ? nil : Float(try finiteDouble(7, "init_values")),
                          dropPathRate: Float(try double(8, "drop_path_rate")), qkvBias: try bool(9, "qkv_bias"))
        if let problem = k.problem { throw PyError.value(problem) }
        return k
    }
}

let modelMethods: [Method] = [
    Method("vit_create", { outer in
        // vit_create(config: dict) -> handle; config holds exactly vitConfigKeys
        try outer.expect(1)
        return try withConfig(outer[0], keys: vitConfigKeys, function: "vit_create") { args in
            let pool = try args.string(11, "global_pool")
            guard let gp = GlobalPool(rawValue: pool) else { throw PyError.value("global_pool: expected 'token' or 'avg', got '\(pool)'") }
            let k = try args.trunkConfig(numClasses: try args.int(10, "num_classes", min: 1, max: 1 << 24), globalPool: gp)
            let seed = UInt64(bitPattern: Int64(try args.int(12, "seed")))
            let total = VisionTransformer.makeTable(k).total
            try requireModelFits(k, total: total, outputs: 1)
            guard total < (1 << 34) else { throw PyError.value("model too large: \(total) parameters") }
            guard let model = withoutGIL({ VisionTransformer(config: k, seed: seed) }) else {
                throw PyError.memory("vit_create: could not allocate \(total) parameters")
            }
            guard let h = makeHandle(model) else { throw PythonErrorSet() }
            return h
        }
    }, doc: "vit_create(config: dict) -> handle; config keys: " + vitConfigKeys.joined(separator: ", ")),

    Method("vit_table", { args in
        try args.expect(1)
        return try parameterTable(try args.handle(0, "model", VisionTransformer.self).table)
    }, doc: "vit_table(model) -> [(name, shape, offset)] in reference order."),

    Method("vit_blocks", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", VisionTransformer.self)
        return try pyTuple([makeTensor(m.params, dtype: .float32, shape: [m.table.total]),
                            makeTensor(m.grads, dtype: .float32, shape: [m.table.total])])
    }, doc: "vit_blocks(model) -> (params, grads): 1-d zero-copy views of the two contiguous blocks."),

    Method("vit_reseed", { args in
        try args.expect(3)
        let m = try args.handle(0, "model", VisionTransformer.self)
        let seed = UInt64(bitPattern: Int64(try args.int(1, "seed")))
        let stream = UInt64(try args.int(2, "stream", min: 0))
        exclusive(m) { m.rng = Xoshiro256StarStar(seed: seed, stream: stream) }
        return none()
    }, doc: "vit_reseed(model, seed, stream): restart the drop-path generator on stream `stream` of `seed`."),

    Method("vit_zero_grad", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", VisionTransformer.self)
        exclusive(m) { m.zeroGrad() }
        return none()
    }, doc: "vit_zero_grad(model)"),

    Method("vit_forward", { args in
        // (model, images, out [B, classes] | [B, N, C] | None, features: bool) -> out
        try args.expect(4)
        let m = try args.handle(0, "model", VisionTransformer.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config)
        let B = x.shape[0], k = m.config
        let features = try args.bool(3, "features")
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(2, "out", features ? [B, k.sequenceLength, k.embedDim] : [B, k.numClasses])
        let ok = exclusive(m) {
            features ? m.forwardFeatures(out: out.pointer, images: x.readOnly, B: B) : m.forward(logits: out.pointer, images: x.readOnly, B: B)
        }
        guard ok else { throw PyError.memory("forward: could not allocate activations for batch \(B)") }
        return try outputs.result()
    }, doc: "vit_forward(model, images, out, features) -> out: logits [B, classes] or final tokens [B, N, C] (None: allocated)."),

    Method("vit_train_step", { args in
        // (model, images, labels int32 [B], smoothing, logits_out|None) -> loss
        try args.expect(5)
        let m = try args.handle(0, "model", VisionTransformer.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config)
        let B = x.shape[0], K = m.config.numClasses
        let labels = try arena.int32(args[2], "labels", [B])
        for i in 0..<B where labels.pointer[i] < 0 || labels.pointer[i] >= K {
            throw PyError.value("labels: expected class indices in [0, \(K)), got \(labels.pointer[i]) at position \(i)")
        }
        let eps = try args.double(3, "label_smoothing")
        guard eps >= 0 && eps <= 1 else { throw PyError.value("label_smoothing: expected a value in [0, 1], got \(eps)") }
        let outputs = Outputs(arena, args)
        let logits = try outputs.requested(4, "logits_out", [B, K])
        nonisolated(unsafe) let lo = logits?.pointer
        let r = exclusive(m) { m.trainStep(images: x.readOnly, labels: labels.readOnly, B: B, smoothing: Float(eps), logitsOut: lo) }
        switch r {
        case .success(let loss): return try outputs.result(leading: [pyFloat(loss)])
        case .failure(.outOfMemory): throw PyError.memory("train_step: could not allocate activations for batch \(B)")
        case .failure(.nonFiniteLoss(let v)):
            throw PyError.value("train_step: the loss is not finite (\(v)); gradients were not changed (check the images for NaN/inf and the learning rate)")
        }
    }, doc: "vit_train_step(model, images, labels, label_smoothing, logits_out) -> loss, or (loss, logits) when logits_out is an array or True (allocated); adds gradients."),

    Method("vit_train_step_soft", { args in
        // (model, images, targets float32 [B, classes], logits_out|None) -> loss
        try args.expect(4)
        let m = try args.handle(0, "model", VisionTransformer.self)
        let arena = BufferArena(); defer { arena.release() }
        let x = try modelImages(arena, args[1], m.config)
        let B = x.shape[0], K = m.config.numClasses
        let q = try arena.float32(args[2], "targets", [B, K])
        for i in 0..<B {
            var sum: Double = 0
            for j in 0..<K {
                let v = q.pointer[i * K + j]
                guard v.isFinite, v >= 0 else {
                    throw PyError.value("targets: expected probabilities (finite, ≥ 0), got \(v) at [\(i), \(j)]")
                }
                sum += Double(v)
            }
            guard abs(sum - 1) <= 1e-3 else {
                throw PyError.value("targets: expected each row to sum to 1 (a distribution over the \(K) classes), row \(i) sums to \(sum)")
            }
        }
        let outputs = Outputs(arena, args)
        let logits = try outputs.requested(3, "logits_out", [B, K])
        nonisolated(unsafe) let lo = logits?.pointer
        let r = exclusive(m) { m.trainStep(images: x.readOnly, targets: .soft(q.readOnly), B: B, logitsOut: lo) }
        switch r {
        case .success(let loss): return try outputs.result(leading: [pyFloat(loss)])
        case .failure(.outOfMemory): throw PyError.memory("train_step: could not allocate activations for batch \(B)")
        case .failure(.nonFiniteLoss(let v)):
            throw PyError.value("train_step: the loss is not finite (\(v)); gradients were not changed (check the images for NaN/inf and the learning rate)")
        }
    }, doc: "vit_train_step_soft(model, images, targets, logits_out) -> loss, or (loss, logits) when logits_out is an array or True; soft-target cross-entropy (mixup/cutmix), adds gradients."),

    Method("vit_set_precision", { args in
        try args.expect(2)
        let m = try args.handle(0, "model", VisionTransformer.self)
        let precision = try args.precision(1, "precision")
        exclusive(m) { m.precision = precision }   // not in the middle of another thread's step
        return none()
    }, doc: "vit_set_precision(model, precision): 'fp32' or 'bf16' for every matrix product."),

    Method("vit_precision", { args in
        try args.expect(1)
        return pyString(try args.handle(0, "model", VisionTransformer.self).precision.rawValue)
    }, doc: "vit_precision(model) -> 'fp32' or 'bf16'"),

    Method("vit_release", { args in
        try args.expect(1)
        let m = try args.handle(0, "model", VisionTransformer.self)
        exclusive(m) { m.releaseActivations() }
        return none()
    }, doc: "vit_release(model): frees the cached training activations."),

    Method("adamw_create", { args in
        // (total, segments [(offset, count, decay, lr_scale)], lr, beta1, beta2, eps, weight_decay)
        try args.expect(7)
        let total = try args.int(0, "total", min: 0, max: 1 << 34)
        let o = args[1]
        guard mapet_py_list_check(o) != 0 else { throw PyError.type("segments: expected a list of (offset, count, decay, lr_scale), got \(typeName(o))") }
        var segs: [AdamWSegment] = []
        for i in 0..<PySequence_Size(o) {
            guard let item = PySequence_GetItem(o, i) else { throw PythonErrorSet() }
            defer { mapet_py_decref(item) }
            guard mapet_py_tuple_check(item) != 0, PyTuple_Size(item) == 4 else { throw PyError.type("segments[\(i)]: expected a 4-tuple") }
            let off = PyLong_AsLongLong(PyTuple_GetItem(item, 0)), cnt = PyLong_AsLongLong(PyTuple_GetItem(item, 1))
            let decay = PyObject_IsTrue(PyTuple_GetItem(item, 2)), scale = PyFloat_AsDouble(PyTuple_GetItem(item, 3))
            if PyErr_Occurred() != nil { throw PythonErrorSet() }
            guard off >= 0, cnt >= 0, off <= Int64(total), cnt <= Int64(total) - off, scale.isFinite, scale >= 0 else {
                throw PyError.value("segments[\(i)]: (\(off), \(cnt), _, \(scale)) is outside the block of \(total) or has a bad lr scale")
            }
            segs.append(AdamWSegment(offset: Int(off), count: Int(cnt), decay: decay != 0, lrScale: Float(scale)))
        }
        let h = try AdamWHyper(args, 2)
        try requireMemory(product([total, 8]), "AdamW's moments for \(total) parameters")
        guard let opt = AdamW(total: total, segments: segs, lr: h.lr, beta1: h.beta1, beta2: h.beta2, eps: h.eps, weightDecay: h.weightDecay) else {
            throw PyError.memory("AdamW: could not allocate moments for \(total) parameters")
        }
        guard let h = makeHandle(opt) else { throw PythonErrorSet() }
        return h
    }, doc: "adamw_create(total, segments, lr, beta1, beta2, eps, weight_decay) -> handle"),

    Method("adamw_configure", { args in
        // (opt, lr, beta1, beta2, eps, weight_decay, step)
        try args.expect(7)
        let opt = try args.handle(0, "optimizer", AdamW.self)
        let h = try AdamWHyper(args, 1)
        let step = try args.int(6, "step", min: 0, max: 1 << 53)
        exclusive(opt) {  // all checked above: the optimizer changes completely or not at all
            opt.lr = h.lr; opt.beta1 = h.beta1; opt.beta2 = h.beta2; opt.eps = h.eps
            opt.weightDecay = h.weightDecay; opt.step = step
        }
        return none()
    }, doc: "adamw_configure(opt, lr, beta1, beta2, eps, weight_decay, step)"),

    Method("adamw_moments", { args in
        try args.expect(1)
        let opt = try args.handle(0, "optimizer", AdamW.self)
        return try pyTuple([makeTensor(opt.m, dtype: .float32, shape: [opt.total]), makeTensor(opt.v, dtype: .float32, shape: [opt.total]),
                            pyInt(opt.step)])
    }, doc: "adamw_moments(opt) -> (exp_avg, exp_avg_sq, step): zero-copy 1-d views."),

    Method("adamw_step", { args in
        // (opt, params [total], grads [total], clip|None) -> grad norm before clipping
        try args.expect(4)
        let opt = try args.handle(0, "optimizer", AdamW.self)
        let arena = BufferArena(); defer { arena.release() }
        let p = try arena.float32(args[1], "params", [opt.total], writable: true)
        let g = try arena.float32(args[2], "grads", [opt.total], writable: true)
        var clip: Float? = nil
        if !args.isNone(3) {
            let c = try args.finiteDouble(3, "clip_grad")
            guard c > 0 else { throw PyError.value("clip_grad: expected a positive max norm, got \(c)") }
            clip = Float(c)
        }
        nonisolated(unsafe) let (pp, gp) = (p.pointer, g.pointer)
        let (norm, finite) = exclusive(opt) {
            let norm = opt.gradNorm(grads: UnsafePointer(gp))
            guard norm.isFinite else { return (norm, true) }
            // A dry run first: an update that would leave a parameter or moment non-finite
            // (a learning rate too large for float32) is refused, not applied.
            guard opt.updateStaysFinite(params: pp, grads: gp, clipNorm: clip, knownNorm: norm) else { return (norm, false) }
            _ = opt.update(params: pp, grads: gp, clipNorm: clip, knownNorm: norm)
            return (norm, true)
        }
        guard norm.isFinite else {
            throw PyError.value("AdamW.step: the gradient norm is not finite (\(norm)); parameters were not changed")
        }
        guard finite else {
            throw PyError.value("AdamW.step: this update would make parameters or moments non-finite in float32 (lr=\(opt.lr), weight_decay=\(opt.weightDecay)); parameters were not changed")
        }
        return pyFloat(norm)
    }, doc: "adamw_step(opt, params, grads, clip_grad) -> gradient norm before clipping."),
]
