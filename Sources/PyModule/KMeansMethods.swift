// k-means and nearest-centroid search (mapet.KMeans, mapet.PixelTokenizer, mapet.FeatureTokenizer).
// The facade converts inputs to C-contiguous float32 once; here shapes, finiteness and sizes are
// checked and the GIL is released around the numerics in Tokenizers/.
import CPythonBridge
import MaPeTKernels

/// Raises if a row of x [n, d] holds NaN or ±Inf (k-means would spread it to a centroid).
private func requireFinite(_ x: ArrayView<Float>, _ name: String) throws {
    let (n, d) = (x.shape[0], x.shape[1])
    nonisolated(unsafe) let p = x.readOnly
    let row = withoutGIL { firstNonFiniteRow(p, n: n, d: d) }
    if row >= 0 { throw PyError.value("\(name): row \(row) holds NaN or Inf; k-means needs finite values") }
}

private func requireRows(_ x: ArrayView<Float>, _ name: String) throws {
    guard x.shape[0] >= 1 else { throw PyError.value("\(name): expected at least one row, got shape \(x.shape)") }
    guard x.shape[1] >= 1 else { throw PyError.value("\(name): expected at least one column, got shape \(x.shape)") }
}

private func storeState(_ rng: Xoshiro256StarStar, _ out: UnsafeMutablePointer<Int64>) {
    let (a, b, c, d) = rng.state
    out[0] = Int64(bitPattern: a); out[1] = Int64(bitPattern: b); out[2] = Int64(bitPattern: c); out[3] = Int64(bitPattern: d)
}

let kmeansMethods: [Method] = [
    Method("kmeans_fit", { args in
        // kmeans_fit(x [n,d], centroids [k,d] (out, or in for init 'given'), labels int32 [n] (out),
        //            n_iter, spherical, init 0|1|2, seed_bits, stream, bounds) -> (inertia, history)
        try args.expect(9)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil, nil])
        try requireRows(x, "x")
        let (N, d) = (x.shape[0], x.shape[1])
        let c = try arena.float32(args[1], "centroids", [nil, d], writable: true)
        let k = c.shape[0]
        guard k >= 1 else { throw PyError.value("n_clusters: expected ≥ 1, got \(k)") }
        guard N >= k else {
            throw PyError.value("x: k-means into \(k) clusters needs at least \(k) points, got \(N)")
        }
        let labels = try arena.int32(args[2], "labels", [N], writable: true)
        let iters = try args.int(3, "n_iter", min: 0)
        let spherical = try args.bool(4, "spherical")
        let kind = try args.int(5, "init", min: 0, max: 2)
        let seed = UInt64(bitPattern: Int64(try args.int(6, "seed")))
        let stream = UInt64(try args.int(7, "stream", min: 0))
        let bounds = try args.bool(8, "bounds")
        try requireFinite(x, "x")
        if kind == 2 { try requireFinite(c, "init centroids") }
        let options = KMeansOptions(k: k, iterations: iters, spherical: spherical,
                                    initialization: KMeansInit(rawValue: kind)!, seed: seed, stream: stream, bounds: bounds)
        nonisolated(unsafe) let (xp, cp, lp) = (x.readOnly, c.pointer, labels.pointer)
        let result = try interruptible { stop in
            kmeansFit(centroids: cp, labels: lp, x: xp, n: N, d: d, options: options, shouldStop: stop)
        }
        let history = try pyList(result.history.map { h in
            try pyTuple([pyFloat(h.objective), pyFloat(h.seconds), pyInt(h.splits), pyInt(h.searched)])
        })
        return try pyTuple([pyFloat(result.inertia), history])
    }, doc: "kmeans_fit(x, centroids, labels, n_iter, spherical, init, seed_bits, stream, bounds) -> (inertia, [(objective, seconds, splits, searched)])"),

    Method("kmeans_assign", { args in
        // kmeans_assign(x [n,d], centroids [k,d], labels int32 [n] out, distances float32 [n] out | None)
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil, nil])
        let (N, d) = (x.shape[0], x.shape[1])
        let c = try arena.float32(args[1], "centroids", [nil, nil])
        guard c.shape[0] >= 1 else { throw PyError.value("centroids: expected at least one centroid, got shape \(c.shape)") }
        guard c.shape[1] == d else {
            throw PyError.value("x: expected rows of dimension \(c.shape[1]) (the centroids' d), got shape \(x.shape)")
        }
        let labels = try arena.int32(args[2], "labels", [N], writable: true)
        let dist = args.isNone(3) ? nil : try arena.float32(args[3], "distances", [N], writable: true)
        if N == 0 { return none() }
        try requireFinite(x, "x")
        nonisolated(unsafe) let (xp, cp, lp, dp) = (x.readOnly, c.readOnly, labels.pointer, dist?.pointer)
        let k = c.shape[0]
        try interruptible { stop in
            kmeansAssign(labels: lp, distances: dp, x: xp, n: N, d: d, centroids: cp, k: k, shouldStop: stop)
        }
        return none()
    }, doc: "kmeans_assign(x, centroids, labels int32 out, distances float32 out|None): nearest centroid (squared L2)"),

    Method("kmeans_assign_naive", { args in
        try args.expect(4)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil, nil])
        let (N, d) = (x.shape[0], x.shape[1])
        let c = try arena.float32(args[1], "centroids", [nil, d])
        let labels = try arena.int32(args[2], "labels", [N], writable: true)
        let dist = try arena.float32(args[3], "distances", [N], writable: true)
        nonisolated(unsafe) let (xp, cp, lp, dp) = (x.readOnly, c.readOnly, labels.pointer, dist.pointer)
        let k = c.shape[0]
        withoutGIL { kmeansAssignNaive(labels: lp, distances: dp, x: xp, n: N, d: d, centroids: cp, k: k) }
        return none()
    }, doc: "kmeans_assign_naive(x, centroids, labels out, distances out): one distance at a time (reference)"),

    Method("kmeans_random_rows", { args in
        // kmeans_random_rows(n, rows int64 [k] out (k = 0: none), seed_bits, stream, state int64 [4] out): the random
        // initialisation's global rows, and the generator state after the draws (for kmeans_finish_step)
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let count = try args.int(0, "n", min: 1)
        let rows = try arena.int64(args[1], "rows", [nil], writable: true)
        let k = rows.shape[0]
        guard k <= count else {
            throw PyError.value("x: k-means into \(k) clusters needs at least \(k) points, got \(count)")
        }
        let seed = UInt64(bitPattern: Int64(try args.int(2, "seed")))
        let stream = UInt64(try args.int(3, "stream", min: 0))
        let state = try arena.int64(args[4], "state", [4], writable: true)
        var rng = Xoshiro256StarStar(seed: seed, stream: stream)
        let picked = UnsafeMutablePointer<Int>.allocate(capacity: k); defer { picked.deallocate() }
        randomInitialRows(picked, n: count, k: k, rng: &rng)
        for i in 0..<k { rows.pointer[i] = Int64(picked[i]) }
        storeState(rng, state.pointer)
        return none()
    }, doc: "kmeans_random_rows(n, rows int64 [k] out, seed_bits, stream, state int64 [4] out): rows of the random init"),

    Method("kmeans_finish_step", { args in
        // kmeans_finish_step(centroids [k,d] inout (the new means), sizes int64 [k] inout, n, spherical,
        //                    state int64 [4] inout) -> splits: empty-cluster splits, then normalisation
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let c = try arena.float32(args[0], "centroids", [nil, nil], writable: true)
        let (k, d) = (c.shape[0], c.shape[1])
        let sizes = try arena.int64(args[1], "sizes", [k], writable: true)
        let count = try args.int(2, "n", min: 1)
        let spherical = try args.bool(3, "spherical")
        let state = try arena.int64(args[4], "state", [4], writable: true)
        var total = 0
        for j in 0..<k {
            guard sizes.pointer[j] >= 0 else { throw PyError.value("sizes: expected counts ≥ 0, got \(sizes.pointer[j]) at \(j)") }
            total += Int(sizes.pointer[j])
        }
        guard total == count else { throw PyError.value("sizes: expected counts summing to n = \(count), got \(total)") }
        let s = state.pointer
        guard s[0] | s[1] | s[2] | s[3] != 0 else { throw PyError.value("state: expected a generator state, got all zeros") }
        var rng = Xoshiro256StarStar(state: (UInt64(bitPattern: s[0]), UInt64(bitPattern: s[1]),
                                             UInt64(bitPattern: s[2]), UInt64(bitPattern: s[3])))
        let own = UnsafeMutablePointer<Int>.allocate(capacity: k); defer { own.deallocate() }
        for j in 0..<k { own[j] = Int(sizes.pointer[j]) }
        let splits = finishLloydStep(c.pointer, sizes: own, n: count, k: k, d: d, spherical: spherical, rng: &rng)
        for j in 0..<k { sizes.pointer[j] = Int64(own[j]) }
        storeState(rng, s)
        return pyInt(splits)
    }, doc: "kmeans_finish_step(centroids inout, sizes int64 inout, n, spherical, state int64 [4] inout) -> splits"),

    Method("kmeans_minibatch_step", { args in
        // kmeans_minibatch_step(x [m,d], centroids [k,d] inout, counts int64 [k] inout, labels int32 [m] out, spherical)
        try args.expect(5)
        let arena = BufferArena(); defer { arena.release() }
        let c = try arena.float32(args[1], "centroids", [nil, nil], writable: true)
        let (k, d) = (c.shape[0], c.shape[1])
        let x = try arena.float32(args[0], "x", [nil, nil])
        guard x.shape[1] == d else {
            throw PyError.value("x: expected rows of dimension \(d) (the centroids' d), got shape \(x.shape)")
        }
        let N = x.shape[0]
        let counts = try arena.int64(args[2], "counts", [k], writable: true)
        let labels = try arena.int32(args[3], "labels", [N], writable: true)
        let spherical = try args.bool(4, "spherical")
        if N == 0 { return pyFloat(0) }
        try requireFinite(x, "x")
        nonisolated(unsafe) let (xp, cp, np, lp) = (x.readOnly, c.pointer, counts.pointer, labels.pointer)
        let objective = withoutGIL {
            kmeansMiniBatchStep(centroids: cp, counts: np, labels: lp, x: xp, n: N, d: d, k: k, spherical: spherical)
        }
        return pyFloat(objective)
    }, doc: "kmeans_minibatch_step(x, centroids inout, counts int64 inout, labels out, spherical) -> chunk objective"),
]
