// The ViT kernels exposed one by one (mapet.ops). Every shape is checked here; an output or
// gradient argument given as None is allocated here (`Outputs`), and the outputs are returned.
// Backward functions accumulate into the gradient arrays they are given (new ones start at zero).
import CPythonBridge
import MaPeTKernels

/// An optional float32 argument (None → nil).
private func optionalF32(_ arena: BufferArena, _ args: Args, _ i: Int, _ name: String, _ shape: [Int?],
                         writable: Bool = false) throws -> ArrayView<Float>? {
    args.isNone(i) ? nil : try arena.float32(args[i], name, shape, writable: writable)
}

private func rate(_ args: Args, _ i: Int) throws -> Float {
    let r = try args.double(i, "rate")
    guard r >= 0 && r < 1 else { throw PyError.value("rate: expected a probability in [0, 1), got \(r)") }
    return Float(r)
}

/// The operands of scale_rows_forward/backward: args[1] (`name`) and the scales args[2], either one per
/// sample ([B] for x [B, ...], named "keep") or, with args[3] true, one per element (x's shape, "mask").
private func scaleOperands(_ arena: BufferArena, _ args: Args, _ name: String)
    throws -> (ArrayView<Float>, ArrayView<Float>, Bool) {
    let x = try arena.float32AnyShape(args[1], name)
    let perElement = try args.bool(3, "per_element")
    if perElement { return (x, try arena.float32(args[2], "mask", x.shape), true) }
    guard let B = x.shape.first else {
        throw PyError.value("\(name): expected an array [B, ...] with a sample axis, got a 0-d array")
    }
    return (x, try arena.float32(args[2], "keep", [B]), false)
}

/// Elements per sample of x [B, ...] (defined for B = 0 too).
private func rowSize(_ x: ArrayView<Float>) -> Int { x.shape.dropFirst().reduce(1, *) }

let layerKernelMethods: [Method] = [
    Method("layer_norm_forward", { args in
        // (out, mean, rstd, x, weight, bias)
        try args.expect(6)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[3], "x", [nil, nil])
        let (R, C) = (x.shape[0], x.shape[1])
        let w = try arena.float32(args[4], "weight", [C]), b = try arena.float32(args[5], "bias", [C])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [R, C])
        let mean = try outputs.float32(1, "mean", [R]), rstd = try outputs.float32(2, "rstd", [R])
        withoutGIL { layerNormForward(out: out.pointer, mean: mean.pointer, rstd: rstd.pointer, input: x.readOnly,
                                      weight: w.readOnly, bias: b.readOnly, rows: R, cols: C) }
        return try outputs.result()
    }, doc: "layer_norm_forward(out, mean, rstd, x, weight, bias) -> (out, mean, rstd): x [R, C] (None outputs are allocated)."),

    Method("layer_norm_backward", { args in
        // (dx, dweight, dbias, dout, x, weight, mean, rstd)
        try args.expect(8)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[4], "x", [nil, nil])
        let (R, C) = (x.shape[0], x.shape[1])
        let dout = try arena.float32(args[3], "dout", [R, C]), w = try arena.float32(args[5], "weight", [C])
        let mean = try arena.float32(args[6], "mean", [R]), rstd = try arena.float32(args[7], "rstd", [R])
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", [R, C])
        let dw = try outputs.float32(1, "dweight", [C]), db = try outputs.float32(2, "dbias", [C])
        withoutGIL { layerNormBackward(dInput: dx.pointer, dWeight: dw.pointer, dBias: db.pointer, dOut: dout.readOnly, input: x.readOnly,
                                       weight: w.readOnly, mean: mean.readOnly, rstd: rstd.readOnly, rows: R, cols: C) }
        return try outputs.result()
    }, doc: "layer_norm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd) -> (dx, dweight, dbias): accumulates (None: new zeros)."),

    Method("softmax_forward", { args in
        try args.expect(2)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", x.shape)
        withoutGIL { softmaxForward(out: out.pointer, input: x.readOnly, rows: x.shape[0], cols: x.shape[1]) }
        return try outputs.result()
    }, doc: "softmax_forward(out, x) -> out: row softmax of x [R, C]."),

    Method("softmax_backward", { args in
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let y = try arena.float32(args[2], "out", [nil, nil])
        let dy = try arena.float32(args[1], "dout", [y.shape[0], y.shape[1]])
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", y.shape)
        withoutGIL { softmaxBackward(dInput: dx.pointer, dOut: dy.readOnly, out: y.readOnly, rows: y.shape[0], cols: y.shape[1]) }
        return try outputs.result()
    }, doc: "softmax_backward(dx, dout, out) -> dx: dx += out ⊙ (dout − rowsum(dout ⊙ out))."),

    Method("linear_forward", { args in
        // (out, x, weight, bias|None)
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil])
        let w = try arena.float32(args[2], "weight", [nil, x.shape[1]])
        let (R, IC, OC) = (x.shape[0], x.shape[1], w.shape[0])
        let b = try optionalF32(arena, args, 3, "bias", [OC])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [R, OC])
        withoutGIL { linearForward(out: out.pointer, input: x.readOnly, weight: w.readOnly, bias: b?.readOnly, rows: R, inFeatures: IC, outFeatures: OC) }
        return try outputs.result()
    }, doc: "linear_forward(out, x, weight, bias) -> out: out = x·weightᵀ + bias (bias may be None)."),

    Method("linear_backward", { args in
        // (dx, dweight, dbias, dout, x, weight)
        try args.expect(6)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[4], "x", [nil, nil])
        let w = try arena.float32(args[5], "weight", [nil, x.shape[1]])
        let (R, IC, OC) = (x.shape[0], x.shape[1], w.shape[0])
        let dout = try arena.float32(args[3], "dout", [R, OC])
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", [R, IC])
        let dw = try outputs.float32(1, "dweight", [OC, IC]), db = try outputs.float32(2, "dbias", [OC])
        withoutGIL { linearBackward(dInput: dx.pointer, dWeight: dw.pointer, dBias: db.pointer, dOut: dout.readOnly, input: x.readOnly,
                                    weight: w.readOnly, rows: R, inFeatures: IC, outFeatures: OC) }
        return try outputs.result()
    }, doc: "linear_backward(dx, dweight, dbias, dout, x, weight) -> (dx, dweight, dbias): accumulates (None: new zeros)."),

    Method("attention_forward", { args in
        // (out [B,M,C], probs [B,H,M,Nk], q [B,M,C], k [B,Nk,C], v [B,Nk,C], heads, mask [B,M,Nk] int32 | None
        //  [, precision])
        if args.count != 8 { try args.expect(7) }
        let precision = args.count == 8 ? try args.precision(7, "precision") : .fp32
        let arena = BufferArena(); defer { arena.release() }
        let q = try arena.float32(args[2], "q", [nil, nil, nil])
        let (B, M, C) = (q.shape[0], q.shape[1], q.shape[2])
        let k = try arena.float32(args[3], "k", [B, nil, C])
        let Nk = k.shape[1]
        let v = try arena.float32(args[4], "v", [B, Nk, C])
        let H = try args.int(5, "heads", min: 1)
        guard C % H == 0 else { throw PyError.value("heads: channel count \(C) is not a multiple of heads=\(H)") }
        let m = args.isNone(6) ? nil : try arena.int32(args[6], "mask", [B, M, Nk])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, M, C])
        let probs = try outputs.float32(1, "probs", [B, H, M, Nk])
        nonisolated(unsafe) let (po, pp, pq, pk, pv) = (out.pointer, probs.pointer, q.readOnly, k.readOnly, v.readOnly)
        if m == nil {
            withoutGIL { attentionForward(out: po, ldOut: C, probs: pp, q: pq, ldQ: C, k: pk, ldK: C, v: pv, ldV: C,
                                          B: B, M: M, Nk: Nk, C: C, H: H, mask: FullAttention(), precision: precision) }
        } else if let m {
            // The rule as additive score biases (0 / −∞), evaluated once for all heads: the form
            // the fused kernels read. B·M·Nk fits: probs [B, H, M, Nk] exists.
            let bytes = B * M * Nk * MemoryLayout<Float>.stride
            guard let raw = malloc(max(bytes, 64)) else {
                throw PyError.memory("mask: could not allocate \(bytes) bytes for the score biases")
            }
            defer { free(raw) }
            nonisolated(unsafe) let bias = raw.assumingMemoryBound(to: Float.self), allowed = m.readOnly
            withoutGIL {
                for i in 0..<(B * M * Nk) { bias[i] = allowed[i] != 0 ? 0 : -.infinity }
                attentionForward(out: po, ldOut: C, probs: pp, q: pq, ldQ: C, k: pk, ldK: C, v: pv, ldV: C,
                                 B: B, M: M, Nk: Nk, C: C, H: H, mask: ScoreBiasMask(bias: bias, M: M, Nk: Nk),
                                 precision: precision)
            }
        }
        return try outputs.result()
    }, doc: "attention_forward(out, probs, q, k, v, heads, mask[, precision]) -> (out, probs): multi-head attention; mask [B,M,Nk] int32 (nonzero = may attend) or None; precision 'fp32' (default) or 'bf16'."),

    Method("attention_backward", { args in
        // (dq, dk, dv, dout, probs, q, k, v, heads[, precision])
        if args.count != 10 { try args.expect(9) }
        let precision = args.count == 10 ? try args.precision(9, "precision") : .fp32
        let arena = BufferArena(); defer { arena.release() }
        let q = try arena.float32(args[5], "q", [nil, nil, nil])
        let (B, M, C) = (q.shape[0], q.shape[1], q.shape[2])
        let k = try arena.float32(args[6], "k", [B, nil, C])
        let Nk = k.shape[1]
        let v = try arena.float32(args[7], "v", [B, Nk, C])
        let H = try args.int(8, "heads", min: 1)
        guard C % H == 0 else { throw PyError.value("heads: channel count \(C) is not a multiple of heads=\(H)") }
        let dout = try arena.float32(args[3], "dout", [B, M, C])
        let probs = try arena.float32(args[4], "probs", [B, H, M, Nk])
        let outputs = Outputs(arena, args)
        let dq = try outputs.float32(0, "dq", [B, M, C])
        let dk = try outputs.float32(1, "dk", [B, Nk, C]), dv = try outputs.float32(2, "dv", [B, Nk, C])
        withoutGIL { attentionBackward(dQ: dq.pointer, dK: dk.pointer, dV: dv.pointer, dOut: dout.readOnly, ldOut: C, probs: probs.readOnly,
                                       q: q.readOnly, ldQ: C, k: k.readOnly, ldK: C, v: v.readOnly, ldV: C, B: B, M: M, Nk: Nk, C: C, H: H,
                                       precision: precision) }
        return try outputs.result()
    }, doc: "attention_backward(dq, dk, dv, dout, probs, q, k, v, heads[, precision]) -> (dq, dk, dv): accumulates (None: new zeros)."),

    Method("residual_forward", { args in
        // (out, x, branch, gamma|None, keep|None)  all [B, T, C]
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil, nil])
        let (B, T, C) = (x.shape[0], x.shape[1], x.shape[2])
        let y = try arena.float32(args[2], "branch", [B, T, C])
        let gamma = try optionalF32(arena, args, 3, "gamma", [C]), keep = try optionalF32(arena, args, 4, "keep", [B])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, T, C])
        withoutGIL { residualForward(out: out.pointer, residual: x.readOnly, branch: y.readOnly, gamma: gamma?.readOnly, keep: keep?.readOnly, B: B, T: T, C: C) }
        return try outputs.result()
    }, doc: "residual_forward(out, x, branch, gamma, keep) -> out: out = x + keep[b]·gamma⊙branch (gamma, keep may be None)."),

    Method("residual_backward", { args in
        // (dx, dbranch, dgamma, dout, branch, gamma|None, keep|None); dgamma is ignored (None in the result) without gamma
        try args.expect(7)
        let arena = BufferArena(); defer { arena.release() }
        let y = try arena.float32(args[4], "branch", [nil, nil, nil])
        let (B, T, C) = (y.shape[0], y.shape[1], y.shape[2])
        let dout = try arena.float32(args[3], "dout", [B, T, C])
        let gamma = try optionalF32(arena, args, 5, "gamma", [C]), keep = try optionalF32(arena, args, 6, "keep", [B])
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", [B, T, C]), dy = try outputs.float32(1, "dbranch", [B, T, C])
        var dg: ArrayView<Float>? = nil
        if gamma != nil { dg = try outputs.float32(2, "dgamma", [C]) } else { outputs.absent() }
        withoutGIL { residualBackward(dResidual: dx.pointer, dBranch: dy.pointer, dGamma: dg?.pointer, dOut: dout.readOnly, branch: y.readOnly,
                                      gamma: gamma?.readOnly, keep: keep?.readOnly, B: B, T: T, C: C) }
        return try outputs.result()
    }, doc: "residual_backward(dx, dbranch, dgamma, dout, branch, gamma, keep) -> (dx, dbranch, dgamma): accumulates (None: new zeros; dgamma None without gamma)."),

    Method("drop_path_keep", { args in
        // (batch, rate, seed) -> keep [batch]
        try args.expect(3)
        let B = try args.int(0, "batch", min: 0), r = try rate(args, 1)
        var rng = Xoshiro256StarStar(seed: UInt64(bitPattern: Int64(try args.int(2, "seed"))), stream: 0)
        let arena = BufferArena(); defer { arena.release() }
        let outputs = Outputs(arena, args)
        let keep = try outputs.new("keep", [B])
        dropPathKeep(keep: keep.pointer, B: B, rate: r, rng: &rng)
        return try outputs.result()
    }, doc: "drop_path_keep(batch, rate, seed) -> keep [batch]: per-sample scales in {0, 1/(1-rate)}."),

    Method("dropout_mask", { args in
        // (shape, rate, seed) -> mask of shape
        try args.expect(3)
        let shape = try args.shape(0, "shape"), r = try rate(args, 1)
        var rng = Xoshiro256StarStar(seed: UInt64(bitPattern: Int64(try args.int(2, "seed"))), stream: 0)
        let arena = BufferArena(); defer { arena.release() }
        let outputs = Outputs(arena, args)
        let mask = try outputs.new("mask", shape)
        nonisolated(unsafe) let p = mask.pointer
        withoutGIL { dropoutMask(mask: p, count: mask.count, rate: r, rng: &rng) }
        return try outputs.result()
    }, doc: "dropout_mask(shape, rate, seed) -> mask: element scales in {0, 1/(1-rate)} (shape: an int or a sequence of ints)."),

    Method("scale_rows_forward", { args in
        // (out, x, keep, per_element): drop path (x [B, ...], keep [B]) or dropout (keep of x's shape)
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let (x, keep, perElement) = try scaleOperands(arena, args, "x")
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", x.shape)
        if perElement {
            withoutGIL { dropoutForward(out: out.pointer, input: x.readOnly, mask: keep.readOnly, count: x.count) }
        } else {
            withoutGIL { dropPathForward(out: out.pointer, input: x.readOnly, keep: keep.readOnly, B: x.shape[0], rowSize: rowSize(x)) }
        }
        return try outputs.result()
    }, doc: "scale_rows_forward(out, x, keep, per_element) -> out: drop path (x [B, ...], keep [B]) or, per_element, dropout (keep of x's shape)."),

    Method("scale_rows_backward", { args in
        // (dx, dout, keep, per_element)
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let (dout, keep, perElement) = try scaleOperands(arena, args, "dout")
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", dout.shape)
        if perElement {
            withoutGIL { dropoutBackward(dInput: dx.pointer, dOut: dout.readOnly, mask: keep.readOnly, count: dout.count) }
        } else {
            withoutGIL { dropPathBackward(dInput: dx.pointer, dOut: dout.readOnly, keep: keep.readOnly, B: dout.shape[0], rowSize: rowSize(dout)) }
        }
        return try outputs.result()
    }, doc: "scale_rows_backward(dx, dout, keep, per_element) -> dx: dx += keep·dout (drop path or dropout)."),

    Method("patch_embed_forward", { args in
        // (out [B,n,C], patches [B,n,Cin·p·p], images [B,Cin,S,S], weight [C,Cin,p,p], bias [C]|None)
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let w = try arena.float32(args[3], "weight", [nil, nil, nil, nil])
        let (C, Cin, p) = (w.shape[0], w.shape[1], w.shape[2])
        guard w.shape[3] == p, p > 0 else { throw PyError.value("weight: expected square kernels [C, Cin, p, p], got \(w.shape)") }
        let img = try arena.float32(args[2], "images", [nil, Cin, nil, nil])
        let (B, S) = (img.shape[0], img.shape[2])
        guard img.shape[3] == S, S % p == 0 else { throw PyError.value("images: expected square images with a side divisible by \(p), got \(img.shape)") }
        let nP = (S / p) * (S / p)
        _ = try checkedProduct([B, nP, Cin, p, p, 4], "patches")
        let b = try optionalF32(arena, args, 4, "bias", [C])
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, nP, C])
        let patches = try outputs.float32(1, "patches", [B, nP, Cin * p * p])
        withoutGIL { patchEmbedForward(out: out.pointer, patches: patches.pointer, images: img.readOnly, weight: w.readOnly, bias: b?.readOnly,
                                       B: B, inChans: Cin, imgSize: S, patch: p, C: C) }
        return try outputs.result()
    }, doc: "patch_embed_forward(out, patches, images, weight, bias) -> (out [B,n,C], patches [B,n,Cin·p·p]): stride-p conv (bias may be None)."),

    Method("patch_embed_backward", { args in
        // (dimages, dweight, dbias, dout, patches, weight, img_size)
        try args.expect(7)
        let arena = BufferArena(); defer { arena.release() }
        let w = try arena.float32(args[5], "weight", [nil, nil, nil, nil])
        let (C, Cin, p) = (w.shape[0], w.shape[1], w.shape[2])
        guard w.shape[3] == p, p > 0 else { throw PyError.value("weight: expected square kernels [C, Cin, p, p] with p ≥ 1, got \(w.shape)") }
        let S = try args.int(6, "img_size", min: 1, max: 1 << 20)
        guard S % p == 0 else { throw PyError.value("img_size: \(S) is not divisible by the patch size \(p)") }
        let nP = (S / p) * (S / p)
        let patches = try arena.float32(args[4], "patches", [nil, nP, try checkedProduct([Cin, p, p], "weight")])
        let B = patches.shape[0]
        let dout = try arena.float32(args[3], "dout", [B, nP, C])
        let outputs = Outputs(arena, args)
        let di = try outputs.float32(0, "dimages", [B, Cin, S, S])
        let dw = try outputs.float32(1, "dweight", [C, Cin, p, p]), db = try outputs.float32(2, "dbias", [C])
        withoutGIL { patchEmbedBackward(dImages: di.pointer, dWeight: dw.pointer, dBias: db.pointer, dOut: dout.readOnly, patches: patches.readOnly,
                                        weight: w.readOnly, B: B, inChans: Cin, imgSize: S, patch: p, C: C) }
        return try outputs.result()
    }, doc: "patch_embed_backward(dimages, dweight, dbias, dout, patches, weight, img_size) -> (dimages, dweight, dbias): accumulates (None: new zeros)."),

    Method("mean_pool_forward", { args in
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil, nil])
        let (B, T, C) = (x.shape[0], x.shape[1], x.shape[2])
        let start = try args.int(2, "start", min: 0, max: T - 1)
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, C])
        withoutGIL { meanPoolForward(out: out.pointer, input: x.readOnly, B: B, T: T, C: C, start: start) }
        return try outputs.result()
    }, doc: "mean_pool_forward(out, x, start) -> out [B, C]: mean over tokens start.. of x [B, T, C]."),

    Method("mean_pool_backward", { args in
        // (dx [B, tokens, C], dout [B, C], start, tokens)
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let dout = try arena.float32(args[1], "dout", [nil, nil])
        let (B, C) = (dout.shape[0], dout.shape[1])
        let T = try args.int(3, "tokens", min: 1)
        let start = try args.int(2, "start", min: 0, max: T - 1)
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(0, "dx", [B, T, C])
        withoutGIL { meanPoolBackward(dInput: dx.pointer, dOut: dout.readOnly, B: B, T: T, C: C, start: start) }
        return try outputs.result()
    }, doc: "mean_pool_backward(dx, dout, start, tokens) -> dx [B, tokens, C]: accumulates (None: new zeros)."),

    Method("cross_entropy_forward", { args in
        // (losses [R], probs [R,K], logits [R,K], targets int32 [R], smoothing) -> mean loss over kept rows
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[2], "logits", [nil, nil])
        let (R, K) = (x.shape[0], x.shape[1])
        let t = try arena.int32(args[3], "targets", [R])
        for i in 0..<R where t.pointer[i] >= K {
            throw PyError.value("targets: expected class indices < \(K) (negative = ignored), got \(t.pointer[i]) at position \(i)")
        }
        let eps = try args.double(4, "smoothing")
        guard eps >= 0 && eps <= 1 else { throw PyError.value("smoothing: expected a value in [0, 1], got \(eps)") }
        let outputs = Outputs(arena, args)
        let losses = try outputs.float32(0, "losses", [R]), probs = try outputs.float32(1, "probs", [R, K])
        let r = withoutGIL { crossEntropyForward(losses: losses.pointer, probs: probs.pointer, logits: x.readOnly, targets: t.readOnly,
                                                 rows: R, K: K, smoothing: Float(eps)) }
        return try outputs.result(leading: [pyFloat(r.count > 0 ? r.sum / Double(r.count) : 0)])
    }, doc: "cross_entropy_forward(losses, probs, logits, targets, smoothing) -> (mean loss over rows with target ≥ 0, losses [R], probs [R, K])."),

    Method("cross_entropy_backward", { args in
        // (dlogits, probs, targets, smoothing, scale|None); scale None: 1 / (rows with target ≥ 0)
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let p = try arena.float32(args[1], "probs", [nil, nil])
        let (R, K) = (p.shape[0], p.shape[1])
        let t = try arena.int32(args[2], "targets", [R])
        for i in 0..<R where t.pointer[i] >= K {
            throw PyError.value("targets: expected class indices < \(K) (negative = ignored), got \(t.pointer[i]) at position \(i)")
        }
        let eps = Float(try args.double(3, "smoothing"))
        let kept = (0..<R).reduce(0) { $0 + (t.pointer[$1] >= 0 ? 1 : 0) }
        let scale = Float(args.isNone(4) ? 1.0 / Double(max(kept, 1)) : try args.double(4, "scale"))
        let outputs = Outputs(arena, args)
        let d = try outputs.float32(0, "dlogits", [R, K])
        withoutGIL { crossEntropyBackward(dLogits: d.pointer, probs: p.readOnly, targets: t.readOnly, rows: R, K: K, smoothing: eps, scale: scale) }
        return try outputs.result()
    }, doc: "cross_entropy_backward(dlogits, probs, targets, smoothing, scale) -> dlogits: dlogits += scale·(p − q); scale None: 1 / (rows with target ≥ 0)."),
]
