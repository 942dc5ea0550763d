// DTM and CCViT objective pieces (mapet.objectives, mapet.ops): argument checking and GIL
// release around the kernels of MaPeTKernels/Objectives.
import CPythonBridge
import MaPeTKernels

/// Every id in `ids` must lie in 0..<bound (a bad id would index out of bounds in Swift).
func checkIds(_ ids: ArrayView<Int32>, _ name: String, below bound: Int, what: String) throws {
    for k in 0..<ids.count {
        let v = Int(ids.pointer[k])
        if v < 0 || v >= bound {
            throw PyError.value("\(name): expected \(what) in [0, \(bound)), got \(v) at flat index \(k)")
        }
    }
}

/// Bytes the morphing's per-sample working state takes across the worker threads: the
/// (N+1)/2 × N/2 score matrix and four copies of the [N, D] tokens (MorphingState).
func morphingBytes(B: Int, N: Int, D: Int) -> Int? {
    guard let scores = product([(N + 1) / 2, N / 2]), let tokens = product([N, D, 4]),
          let perSample = sum([scores, tokens, product([N, 8]) ?? -1]), perSample >= 0 else { return nil }
    return product([perSample, Swift.min(Swift.max(B, 1), Parallel.threadCount), 4])
}

private func seedArg(_ args: Args, _ i: Int) throws -> UInt64 {
    UInt64(try args.int(i, "seed", min: 0))
}

let objectiveMethods: [Method] = [
    Method("dtm_schedule_new", { args in
        try args.expect(1)
        return makeHandle(DTMSchedule(seed: try seedArg(args, 0)))
    }, doc: "dtm_schedule_new(seed) -> handle of a seeded DTM schedule stream."),

    Method("dtm_schedule_draw", { args in
        // dtm_schedule_draw(handle, max_budget, max_iterations, count) -> [(n̄, k, r), ...]
        try args.expect(4)
        let schedule = try args.handle(0, "schedule", DTMSchedule.self)
        let maxBudget = try args.int(1, "max_tokens", min: 0)
        let maxIterations = try args.int(2, "max_iterations", min: 1)
        let count = try args.int(3, "num_schedules", min: 0, max: 1 << 16)
        let entries = schedule.draw(maxBudget: maxBudget, maxIterations: maxIterations, count: count)
        return try pyList(entries.map { e in
            try? pyTuple([pyInt(e.tokenBudget), pyInt(e.iterations), pyInt(e.mergesPerIteration)])
        })
    }, doc: "dtm_schedule_draw(schedule, max_tokens, max_iterations, num_schedules) -> list of (num_tokens, iterations, r)."),

    Method("dtm_merges_per_iteration", { args in
        try args.expect(3)
        let budget = try args.int(0, "num_tokens", min: 0)
        let iterations = try args.int(1, "iterations", min: 1)
        let maxBudget = try args.int(2, "max_tokens", min: 0)
        return pyInt(dtmMergesPerIteration(tokenBudget: budget, iterations: iterations, maxBudget: maxBudget))
    }, doc: "dtm_merges_per_iteration(num_tokens, iterations, max_tokens) -> r (reference rounding)."),

    Method("token_morphing_group_count", { args in
        try args.expect(4)
        let N = try args.int(0, "num_tokens", min: 0)
        let r = try args.int(1, "r", min: 0)
        let iterations = try args.int(2, "iterations", min: 0)
        return pyInt(tokenMorphingGroupCount(N: N, r: r, iterations: iterations, protectFirst: try args.bool(3, "protect_first")))
    }, doc: "token_morphing_group_count(n, r, iterations, protect_first) -> groups left."),

    Method("token_morphing", { args in
        // token_morphing(features, r, iterations, protect_first, membership, sizes, merged)
        try args.expect(7)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "features", [nil, nil, nil])
        let (B, N, D) = (x.shape[0], x.shape[1], x.shape[2])
        let r = try args.int(1, "r", min: 0)
        let iterations = try args.int(2, "iterations", min: 0, max: 1 << 20)
        let protectFirst = try args.bool(3, "protect_first")
        let G = tokenMorphingGroupCount(N: N, r: r, iterations: iterations, protectFirst: protectFirst)
        try requireMemory(morphingBytes(B: B, N: N, D: D), "token morphing of \(N) tokens of dimension \(D)")
        let m = try arena.int32(args[4], "membership", [B, N], writable: true)
        let s = try arena.int32(args[5], "sizes", [B, G], writable: true)
        let out = try arena.float32(args[6], "merged", [B, G, D], writable: true)
        nonisolated(unsafe) let (px, pm, ps, po) = (x.readOnly, m.pointer, s.pointer, out.pointer)
        withoutGIL {
            tokenMorphing(membership: pm, sizes: ps, merged: po, features: px, B: B, N: N, D: D,
                          r: r, iterations: iterations, protectFirst: protectFirst)
        }
        return none()
    }, doc: "token_morphing(features[B,n,d], r, iterations, protect_first, membership[B,n] i32, sizes[B,G] i32, merged[B,G,d])."),

    Method("dtm_memberships", { args in
        // dtm_memberships(features, rs, iterations, protect_first, out[L, B, n])
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "features", [nil, nil, nil])
        let (B, N, D) = (x.shape[0], x.shape[1], x.shape[2])
        let rs = try args.ints(1, "r"), its = try args.ints(2, "iterations")
        guard rs.count == its.count else {
            throw PyError.value("dtm_memberships: r has \(rs.count) entries, iterations has \(its.count)")
        }
        for (l, (r, k)) in zip(rs, its).enumerated() where r < 0 || k < 0 || k > 1 << 20 {
            throw PyError.value("dtm_memberships: schedule \(l) needs r ≥ 0 and 0 ≤ iterations ≤ 2^20, got r=\(r), iterations=\(k)")
        }
        let protectFirst = try args.bool(3, "protect_first")
        try requireMemory(morphingBytes(B: B, N: N, D: D), "token morphing of \(N) tokens of dimension \(D)")
        let out = try arena.int32(args[4], "out", [rs.count, B, N], writable: true)
        nonisolated(unsafe) let (px, po) = (x.readOnly, out.pointer)
        withoutGIL {
            for l in 0..<rs.count {
                tokenMorphing(membership: po + l * B * N, sizes: nil, merged: nil, features: px,
                              B: B, N: N, D: D, r: rs[l], iterations: its[l], protectFirst: protectFirst)
            }
        }
        return none()
    }, doc: "dtm_memberships(features[B,n,d], rs, iterations, protect_first, out[L,B,n] i32): one morphing per schedule."),

    Method("dtm_loss_forward", { args in
        // dtm_loss_forward(pred, target, memberships, beta) -> float
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let p = try arena.float32(args[0], "pred", [nil, nil, nil])
        let (B, N, D) = (p.shape[0], p.shape[1], p.shape[2])
        let t = try arena.float32(args[1], "target", [B, N, D])
        let m = try arena.int32(args[2], "memberships", [nil, B, N])
        try checkIds(m, "memberships", below: N, what: "group ids")
        let beta = try args.finiteDouble(3, "beta")
        guard beta > 0 else { throw PyError.value("beta: expected a positive number, got \(beta)") }
        nonisolated(unsafe) let (pp, pt, pm) = (p.readOnly, t.readOnly, m.readOnly)
        let L = m.shape[0]
        let loss = withoutGIL { dtmLossForward(pred: pp, target: pt, membership: pm, L: L, B: B, N: N, D: D, beta: beta) }
        return pyFloat(loss)
    }, doc: "dtm_loss_forward(pred[B,n,d], target[B,n,d], memberships[L,B,n] i32, beta) -> loss."),

    Method("dtm_loss_backward", { args in
        // dtm_loss_backward(dloss, pred, target, memberships, beta, dpred): dpred += ∂loss/∂pred · dloss
        try args.expect(6)
        let arena = BufferArena(); defer { arena.release() }
        let dLoss = try args.finiteDouble(0, "dloss")
        let p = try arena.float32(args[1], "pred", [nil, nil, nil])
        let (B, N, D) = (p.shape[0], p.shape[1], p.shape[2])
        let t = try arena.float32(args[2], "target", [B, N, D])
        let m = try arena.int32(args[3], "memberships", [nil, B, N])
        try checkIds(m, "memberships", below: N, what: "group ids")
        let beta = try args.finiteDouble(4, "beta")
        guard beta > 0 else { throw PyError.value("beta: expected a positive number, got \(beta)") }
        let dp = try arena.float32(args[5], "dpred", [B, N, D], writable: true)
        nonisolated(unsafe) let (pp, pt, pm, pd) = (p.readOnly, t.readOnly, m.readOnly, dp.pointer)
        let L = m.shape[0]
        withoutGIL {
            dtmLossBackward(dPred: pd, dLoss: dLoss, pred: pp, target: pt, membership: pm, L: L, B: B, N: N, D: D, beta: beta)
        }
        return none()
    }, doc: "dtm_loss_backward(dloss, pred, target, memberships, beta, dpred): dpred += dloss·∂loss/∂pred."),

    Method("ccvit_corrupt", { args in
        // ccvit_corrupt(images, mask, centroid_ids, centroids, patch_size, num_replace, seed, replaced, first_sample)
        try args.expect(9)
        let arena = BufferArena(); defer { arena.release() }
        let img = try arena.float32(args[0], "images", [nil, nil, nil, nil], writable: true)
        let (B, C, H, W) = (img.shape[0], img.shape[1], img.shape[2], img.shape[3])
        let P = try args.int(4, "patch_size", min: 1, max: 1 << 16)
        guard H % P == 0, W % P == 0 else {
            throw PyError.value("images: expected height and width divisible by patch_size \(P), got \(H)×\(W)")
        }
        let nP = (H / P) * (W / P)
        let mask = try arena.int32(args[1], "mask", [B, nP])
        let ids = try arena.int32(args[2], "centroid_ids", [B, nP])
        let cent = try arena.float32(args[3], "centroids", [nil, try checkedProduct([C, P, P], "centroids")])
        try checkIds(ids, "centroid_ids", below: cent.shape[0], what: "centroid indices")
        let numReplace = try args.int(5, "num_replace", min: 0)
        let seed = try seedArg(args, 6)
        let rep = try arena.int32(args[7], "replaced", [B, nP], writable: true)
        let first = UInt64(try args.int(8, "first_sample", min: 0))
        nonisolated(unsafe) let (pi, pm, pid, pc, pr) = (img.pointer, mask.readOnly, ids.readOnly, cent.readOnly, rep.pointer)
        withoutGIL {
            ccvitCorrupt(images: pi, replaced: pr, mask: pm, centroidIds: pid, centroids: pc,
                         B: B, C: C, H: H, W: W, P: P, numReplace: numReplace, seed: seed, firstStream: first)
        }
        return none()
    }, doc: "ccvit_corrupt(images[B,C,H,W] (in place), mask[B,n] i32, centroid_ids[B,n] i32, centroids[K,C·P·P], patch_size, num_replace, seed, replaced[B,n] i32, first_sample): image b draws from stream first_sample + b."),

    Method("ccvit_pixel_targets", { args in
        // ccvit_pixel_targets(images, patch_size, out)
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let img = try arena.float32(args[0], "images", [nil, nil, nil, nil])
        let (B, C, H, W) = (img.shape[0], img.shape[1], img.shape[2], img.shape[3])
        let P = try args.int(1, "patch_size", min: 1, max: 1 << 16)
        guard H % P == 0, W % P == 0 else {
            throw PyError.value("images: expected height and width divisible by patch_size \(P), got \(H)×\(W)")
        }
        let out = try arena.float32(args[2], "out", [B, (H / P) * (W / P), try checkedProduct([C, P, P], "out")], writable: true)
        nonisolated(unsafe) let (pi, po) = (img.readOnly, out.pointer)
        withoutGIL { ccvitPixelTargets(out: po, images: pi, B: B, C: C, H: H, W: W, P: P) }
        return none()
    }, doc: "ccvit_pixel_targets(images[B,C,H,W], patch_size, out[B,n,C·P·P]): per-patch normalised pixels."),

    Method("masked_mse_forward", { args in
        // masked_mse_forward(pred[R,M], target[R,M], rows[R]) -> float
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let p = try arena.float32(args[0], "pred", [nil, nil])
        let (R, M) = (p.shape[0], p.shape[1])
        let t = try arena.float32(args[1], "target", [R, M])
        let rows = try arena.int32(args[2], "mask", [R])
        nonisolated(unsafe) let (pp, pt, pr) = (p.readOnly, t.readOnly, rows.readOnly)
        return pyFloat(withoutGIL { maskedMSEForward(pred: pp, target: pt, rows: pr, R: R, M: M) })
    }, doc: "masked_mse_forward(pred[R,M], target[R,M], mask[R] i32) -> mean squared error over selected rows."),

    Method("masked_mse_backward", { args in
        // masked_mse_backward(dloss, pred, target, rows, dpred)
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let dLoss = try args.finiteDouble(0, "dloss")
        let p = try arena.float32(args[1], "pred", [nil, nil])
        let (R, M) = (p.shape[0], p.shape[1])
        let t = try arena.float32(args[2], "target", [R, M])
        let rows = try arena.int32(args[3], "mask", [R])
        let dp = try arena.float32(args[4], "dpred", [R, M], writable: true)
        nonisolated(unsafe) let (pp, pt, pr, pd) = (p.readOnly, t.readOnly, rows.readOnly, dp.pointer)
        withoutGIL { maskedMSEBackward(dPred: pd, dLoss: dLoss, pred: pp, target: pt, rows: pr, R: R, M: M) }
        return none()
    }, doc: "masked_mse_backward(dloss, pred, target, mask, dpred): dpred += dloss·∂mse/∂pred."),
]
