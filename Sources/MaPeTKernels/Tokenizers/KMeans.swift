// k-means (Lloyd 1982) with faiss's semantics, exact, deterministic, and with Yinyang bounds.
//
//   x [n, d] float32 points, centroids [k, d], labels [n]
//
// One iteration (as faiss `Clustering::train`):
//   1. assign every point to its nearest centroid (squared L2); objective_t = Σ ‖x_i − c_{a_i}‖²
//   2. c_j = mean of its points (accumulated in Double, points in index order)
//   3. split empty clusters (below), 4. spherical: c_j ← c_j / ‖c_j‖.
// Spherical k-means needs no separate inner-product search: with ‖c_j‖ = 1,
// ‖x − c_j‖² = ‖x‖² + 1 − 2 x·c_j, so the L2 arg-min is the inner-product arg-max.
//
// Empty clusters (faiss `split_clusters`): for each empty cluster e in index order, walk the
// clusters j = 0, 1, 2, … (cyclically) and stop at the first j for which a uniform draw
// r < (size_j − 1) / (n − k), i.e. a large cluster is picked with probability growing with its
// size. c_e becomes a copy of c_j, and the two are pushed apart symmetrically by a relative
// ε = 1/1024: even coordinates c_e ·= (1 + ε), c_j ·= (1 − ε), odd coordinates the reverse.
// size_e = size_j / 2 (rounded down), size_j −= size_e. The draws come from the run's own
// xoshiro256** stream, so the result depends only on (seed, redo index).
//
// Skipping work (Yinyang bounds, KMeansYinyang.swift): each point keeps an upper bound on the
// distance to its centroid and one lower bound per group of centroids; points whose bounds prove
// their label skip the distance pass, the others search only the groups their bounds cannot
// exclude, and near ties go to the same GEMM search as plain Lloyd. The labels are therefore those
// of plain Lloyd (bounds = false); only the work differs.
#if canImport(Glibc)
import Glibc
#endif

public enum KMeansInit: Int, Sendable {
    /// k distinct points drawn uniformly (faiss: the first k of a random permutation).
    case random = 0
    /// k-means++ (Arthur & Vassilvitskii 2007): D²-weighted sampling.
    case plusPlus = 1
    /// Use the centroids the caller wrote into the output buffer.
    case given = 2
}

public struct KMeansOptions: Sendable {
    public var k: Int
    public var iterations: Int
    public var spherical: Bool
    public var initialization: KMeansInit
    public var seed: UInt64
    /// Stream of the run's generator (the redo index): restarts draw independent numbers.
    public var stream: UInt64
    /// Yinyang bounds on (true) or plain Lloyd (false); the labels are the same.
    public var bounds: Bool

    public init(k: Int, iterations: Int, spherical: Bool = false, initialization: KMeansInit = .random,
                seed: UInt64 = 0, stream: UInt64 = 0, bounds: Bool = true) {
        self.k = k; self.iterations = iterations; self.spherical = spherical
        self.initialization = initialization; self.seed = seed; self.stream = stream; self.bounds = bounds
    }
}

/// What one Lloyd iteration saw.
public struct KMeansIteration: Sendable {
    /// Σ ‖x_i − c_{a_i}‖² at this iteration's assignment (before the update).
    public var objective: Double
    public var seconds: Double
    /// Empty clusters re-seeded by splitting after the update.
    public var splits: Int
    /// Points that went through the full distance pass (n without bounds).
    public var searched: Int
}

public struct KMeansResult: Sendable {
    public var history: [KMeansIteration]
    /// Objective of the final centroids (one more assignment after the last update).
    public var inertia: Double
    /// `shouldStop` answered true: the run ended early and its outputs are incomplete.
    public var stopped = false
}

@inlinable func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Normalises each centroid to unit L2 norm (a zero centroid stays zero).
public func normalizeRows(_ c: UnsafeMutablePointer<Float>, rows: Int, d: Int) {
    for j in 0..<rows {
        let nrm = squaredNorm(c + j * d, d).squareRoot()
        if nrm > 0 { let inv = 1 / nrm; for t in 0..<d { c[j * d + t] *= inv } }
    }
}

/// Points of each cluster in index order: counts [k], offsets [k + 1], order [n] (counting sort).
@usableFromInline
func groupByLabel(counts: UnsafeMutablePointer<Int>, offsets: UnsafeMutablePointer<Int>,
                  order: UnsafeMutablePointer<Int32>, labels: UnsafePointer<Int32>, n: Int, k: Int) {
    for j in 0..<k { counts[j] = 0 }
    for i in 0..<n { counts[Int(labels[i])] += 1 }
    offsets[0] = 0
    for j in 0..<k { offsets[j + 1] = offsets[j] + counts[j] }
    let cursor = UnsafeMutablePointer<Int>.allocate(capacity: k)
    defer { cursor.deallocate() }
    for j in 0..<k { cursor[j] = offsets[j] }
    for i in 0..<n { let a = Int(labels[i]); order[cursor[a]] = Int32(i); cursor[a] += 1 }
}

/// For each cluster j with points: out_j = (prior_j · weight_j + Σ_{i in j} x_i) / (weight_j + size_j),
/// summed in Double in index order, parallel over clusters (so independent of the thread count).
/// weight nil means 0 (plain means). Clusters without points are left untouched.
func clusterMeans(_ c: UnsafeMutablePointer<Float>, weight: UnsafePointer<Int64>?, x: UnsafePointer<Float>, d: Int,
                  counts: UnsafePointer<Int>, offsets: UnsafePointer<Int>, order: UnsafePointer<Int32>, k: Int) {
    nonisolated(unsafe) let (c, weight, x, offsets, order) = (c, weight, x, offsets, order)
    _ = counts
    Parallel.forRanges(k, grain: 8) { range in
        let acc = UnsafeMutablePointer<Double>.allocate(capacity: d)
        defer { acc.deallocate() }
        for j in range {
            let lo = offsets[j], hi = offsets[j + 1]
            if lo == hi { continue }
            let w = Double(weight?[j] ?? 0)
            let cj = c + j * d
            if w > 0 { for t in 0..<d { acc[t] = Double(cj[t]) * w } } else { for t in 0..<d { acc[t] = 0 } }
            for p in lo..<hi {
                let row = x + Int(order[p]) * d
                for t in 0..<d { acc[t] += Double(row[t]) }
            }
            let inv = 1 / (w + Double(hi - lo))
            for t in 0..<d { cj[t] = Float(acc[t] * inv) }
        }
    }
}

/// faiss-style re-seeding of empty clusters (see the file comment). Returns the number split.
func splitEmptyClusters(_ c: UnsafeMutablePointer<Float>, sizes: UnsafeMutablePointer<Int>, n: Int, k: Int, d: Int,
                        rng: inout Xoshiro256StarStar) -> Int {
    let eps: Float = 1.0 / 1024
    var splits = 0
    let denom = Double(max(n - k, 1))
    for e in 0..<k where sizes[e] == 0 {
        var j = 0
        while true {
            let p = Double(sizes[j] - 1) / denom
            if rng.uniform() < p { break }
            j = (j + 1) % k
        }
        let ce = c + e * d, cj = c + j * d
        for t in 0..<d {
            let v = cj[t]
            if t % 2 == 0 { ce[t] = v * (1 + eps); cj[t] = v * (1 - eps) } else { ce[t] = v * (1 - eps); cj[t] = v * (1 + eps) }
        }
        sizes[e] = sizes[j] / 2
        sizes[j] -= sizes[e]
        splits += 1
    }
    return splits
}

/// The rows of the random initialisation: the first k entries of a uniform random permutation of
/// 0..<n (partial Fisher–Yates), k ≤ n. Distributed k-means draws the same global rows.
public func randomInitialRows(_ rows: UnsafeMutablePointer<Int>, n: Int, k: Int, rng: inout Xoshiro256StarStar) {
    let perm = UnsafeMutablePointer<Int32>.allocate(capacity: n)
    defer { perm.deallocate() }
    for i in 0..<n { perm[i] = Int32(i) }
    for i in 0..<k {
        let j = i + rng.below(n - i)
        let t = perm[i]; perm[i] = perm[j]; perm[j] = t
        rows[i] = Int(perm[i])
    }
}

/// The end of a Lloyd iteration once the new means are in `c` [k, d]: split the empty clusters
/// (sizes [k], the global counts of the assignment, updated in place) and, spherical, normalise.
/// Distributed k-means calls it on the all-reduced means. Returns the number of splits.
public func finishLloydStep(_ c: UnsafeMutablePointer<Float>, sizes: UnsafeMutablePointer<Int>, n: Int, k: Int, d: Int,
                            spherical: Bool, rng: inout Xoshiro256StarStar) -> Int {
    let splits = splitEmptyClusters(c, sizes: sizes, n: n, k: k, d: d, rng: &rng)
    if spherical { normalizeRows(c, rows: k, d: d) }
    return splits
}

/// Initial centroids drawn from x with `rng` (random or k-means++).
func initialCentroids(_ c: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, n: Int, d: Int, k: Int,
                      kind: KMeansInit, rng: inout Xoshiro256StarStar, shouldStop: () -> Bool = { false }) {
    switch kind {
    case .given:
        return
    case .random:
        let rows = UnsafeMutablePointer<Int>.allocate(capacity: k)
        defer { rows.deallocate() }
        randomInitialRows(rows, n: n, k: k, rng: &rng)
        for i in 0..<k { (c + i * d).update(from: x + rows[i] * d, count: d) }
    case .plusPlus:
        let blocks = (n + KMeansBlocks.points - 1) / KMeansBlocks.points
        let minD = UnsafeMutablePointer<Float>.allocate(capacity: n)
        let sums = UnsafeMutablePointer<Double>.allocate(capacity: blocks)
        defer { minD.deallocate(); sums.deallocate() }
        nonisolated(unsafe) let (x, c, mind, blockSum) = (x, c, minD, sums)
        (c).update(from: x + rng.below(n) * d, count: d)
        for m in 0..<k where !shouldStop() {
            nonisolated(unsafe) let cm = UnsafePointer(c + m * d)
            let first = m == 0
            if m > 0 {
                // Draw the next centre with probability ∝ current D²(x).
                var total = 0.0
                for b in 0..<blocks { total += blockSum[b] }
                var pick = n - 1
                if total > 0 {
                    var r = rng.uniform() * total
                    var b = 0
                    while b < blocks - 1 && r >= blockSum[b] { r -= blockSum[b]; b += 1 }
                    let lo = b * KMeansBlocks.points, hi = min(n, lo + KMeansBlocks.points)
                    pick = hi - 1
                    for i in lo..<hi { r -= Double(mind[i]); if r < 0 { pick = i; break } }
                } else {
                    pick = rng.below(n)
                }
                (c + m * d).update(from: x + pick * d, count: d)
            }
            Parallel.forRanges(blocks) { range in
                for b in range {
                    let lo = b * KMeansBlocks.points, hi = min(n, lo + KMeansBlocks.points)
                    var s = 0.0
                    for i in lo..<hi {
                        let dd = squaredDistance(x + i * d, cm, d)
                        if first || dd < mind[i] { mind[i] = dd }
                        s += Double(mind[i])
                    }
                    blockSum[b] = s
                }
            }
        }
    }
}

/// Lloyd k-means on x [n, d] (n ≥ k ≥ 1). Writes the final centroids [k, d] and the labels [n]
/// of the final assignment. With `.given` the caller's centroids are the starting point.
///
/// `shouldStop` (e.g. Ctrl-C) is polled between blocks of points and between iterations; when
/// it answers true the run returns at the next boundary with `stopped` set.
public func kmeansFit(centroids: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>,
                      x: UnsafePointer<Float>, n: Int, d: Int, options o: KMeansOptions,
                      shouldStop: (@Sendable () -> Bool)? = nil) -> KMeansResult {
    let k = o.k
    let stop: @Sendable () -> Bool = shouldStop ?? { false }
    var rng = Xoshiro256StarStar(seed: o.seed, stream: o.stream)
    initialCentroids(centroids, x: x, n: n, d: d, k: k, kind: o.initialization, rng: &rng, shouldStop: stop)
    if stop() { return KMeansResult(history: [], inertia: .nan, stopped: true) }
    if o.spherical { normalizeRows(centroids, rows: k, d: d) }

    let P = KMeansBlocks.points
    let blocks = (n + P - 1) / P
    // Yinyang groups (KMeansYinyang.swift), formed once from the initial centroids.
    let groups: CentroidGroups? = o.bounds ? groupCentroids(centroids, k: k, d: d, n: n, seed: o.seed &+ o.stream) : nil
    let t = groups?.t ?? 0
    var largest = 1
    if let groups { for g in 0..<t { largest = max(largest, groups.offsets[g + 1] - groups.offsets[g]) } }
    let largestGroup = largest
    let norms = UnsafeMutablePointer<Float>.allocate(capacity: k)
    let xnorm = UnsafeMutablePointer<Float>.allocate(capacity: n)
    let upper = UnsafeMutablePointer<Float>.allocate(capacity: n)
    let lower = UnsafeMutablePointer<Float>.allocate(capacity: max(1, n * t))
    let drift = UnsafeMutablePointer<Float>.allocate(capacity: k)
    let groupDrift = UnsafeMutablePointer<Float>.allocate(capacity: max(1, t))
    let blockObjective = UnsafeMutablePointer<Double>.allocate(capacity: blocks)
    let blockSearched = UnsafeMutablePointer<Int>.allocate(capacity: blocks)
    let counts = UnsafeMutablePointer<Int>.allocate(capacity: k)
    let offsets = UnsafeMutablePointer<Int>.allocate(capacity: k + 1)
    let order = UnsafeMutablePointer<Int32>.allocate(capacity: n)
    let old = UnsafeMutablePointer<Float>.allocate(capacity: o.bounds ? k * d : 1)
    defer {
        norms.deallocate(); xnorm.deallocate(); upper.deallocate(); lower.deallocate(); drift.deallocate()
        groupDrift.deallocate(); blockObjective.deallocate(); blockSearched.deallocate(); counts.deallocate()
        offsets.deallocate(); order.deallocate(); old.deallocate(); groups?.deallocate()
    }
    nonisolated(unsafe) let (xs, cs, ns, xn, up, lw, bo, bs, lb, gs) =
        (x, centroids, norms, xnorm, upper, lower, blockObjective, blockSearched, labels, groups)
    Parallel.forRanges(n, grain: 1024) { r in for i in r { xn[i] = squaredNorm(xs + i * d, d) } }

    // Rounding slack of a distance computed through ‖x‖² − 2x·c + ‖c‖² in float: |Δd²| ≲ e·(‖x‖² + ‖c‖²)
    // with e ≈ √d · 2⁻²⁴ per product; 64× that, then |Δd| ≤ min(√|Δd²|, |Δd²| / d) (distanceMargin).
    let slack = Float(64.0 * Double(d).squareRoot() * 0x1.0p-24)

    /// One assignment pass; with `useBounds` points whose bounds prove their label skip the search,
    /// and the others search only the groups their bounds cannot exclude.
    func assign(useBounds: Bool) -> (Double, Int) {
        centroidSquaredNorms(ns, centroids: cs, k: k, d: d)
        var cmax: Float = 0
        for j in 0..<k { cmax = max(cmax, ns[j]) }
        let cmaxS = cmax
        // Workers take blocks round-robin (bound-skipping makes block costs uneven); each block's
        // result depends on its own points only, so any thread count gives the same labels.
        let workers = max(1, min(Parallel.threadCount, blocks))
        Parallel.forEach(workers) { w in
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: P * KMeansBlocks.centroids)
            let gathered = UnsafeMutablePointer<Float>.allocate(capacity: useBounds ? P * d : 1)
            let idx = UnsafeMutablePointer<Int>.allocate(capacity: P)
            let lab = UnsafeMutablePointer<Int32>.allocate(capacity: P)
            let best = UnsafeMutablePointer<Float>.allocate(capacity: 2 * P)
            let own = UnsafeMutablePointer<Float>.allocate(capacity: P)
            let groupMin = UnsafeMutablePointer<Float>.allocate(capacity: max(1, P * t))
            let dist = UnsafeMutablePointer<Float>.allocate(capacity: largestGroup)
            defer {
                scratch.deallocate(); gathered.deallocate(); idx.deallocate(); lab.deallocate(); best.deallocate()
                own.deallocate(); groupMin.deallocate(); dist.deallocate()
            }
            var b = w
            while b < blocks && !stop() {
                defer { b += workers }
                let lo = b * P, rows = min(P, n - lo)
                var obj = 0.0
                var m = 0, searched = 0
                if useBounds, let gs {
                    for i in lo..<(lo + rows) {
                        let a = lb[i]
                        let dd = squaredDistance(xs + i * d, cs + Int(a) * d, d)
                        own[i - lo] = dd
                        let e = slack * (xn[i] + cmaxS)
                        let bounds = lw + i * t
                        var gmin = Float.infinity
                        for g in 0..<t { gmin = min(gmin, bounds[g]) }
                        let u = dd.squareRoot()
                        if u + 2 * distanceMargin(e, u) < gmin { continue }
                        searched += 1
                        let r = yinyangSearch(x: xs + i * d, xn: xn[i], a: a, own: dd, lower: bounds, error: e,
                                              centroids: cs, norms: ns, d: d, groups: gs, dist: dist)
                        if r >= 0 {
                            if r != a { lb[i] = r; own[i - lo] = -1 }
                            continue
                        }
                        // No clear winner: the plain GEMM search decides, as without bounds.
                        own[i - lo] = -1
                        idx[m] = i
                        (gathered + m * d).update(from: xs + i * d, count: d)
                        m += 1
                    }
                    if m > 0 {
                        nearestCentroidsBlock(label: lab, best: best, second: best + P, x: gathered, rows: m, d: d,
                                              centroids: cs, norms: ns, k: k, scratch: scratch,
                                              groupOf: gs.groupOf, groupMin: groupMin, t: t)
                    }
                } else {
                    m = rows
                    searched = rows
                    for r in 0..<rows { idx[r] = lo + r; own[r] = -1 }
                    nearestCentroidsBlock(label: lab, best: best, second: best + P, x: xs + lo * d, rows: rows, d: d,
                                          centroids: cs, norms: ns, k: k, scratch: scratch,
                                          groupOf: gs?.groupOf, groupMin: gs == nil ? nil : groupMin, t: t)
                }
                for r in 0..<m {
                    let i = idx[r]
                    lb[i] = lab[r]
                    if let gs {
                        // Group minima of the GEMM; the label's own group falls back to the runner-up overall.
                        let bounds = lw + i * t, gm = groupMin + r * t
                        for g in 0..<t { bounds[g] = max(0, xn[i] + gm[g]).squareRoot() }
                        bounds[Int(gs.groupOf[Int(lab[r])])] = max(0, xn[i] + best[P + r]).squareRoot()
                    }
                }
                // Objective from exact distances (the same for searched and skipped points).
                for i in lo..<(lo + rows) {
                    let known = own[i - lo]
                    let dd = known >= 0 ? known : squaredDistance(xs + i * d, cs + Int(lb[i]) * d, d)
                    up[i] = dd.squareRoot()
                    obj += Double(dd)
                }
                bo[b] = obj
                bs[b] = searched
            }
        }
        var total = 0.0, searched = 0
        for b in 0..<blocks { total += bo[b]; searched += bs[b] }
        return (total, searched)
    }

    var history: [KMeansIteration] = []
    var haveBounds = false
    for _ in 0..<o.iterations {
        let t0 = monotonicSeconds()
        let (objective, searched) = assign(useBounds: haveBounds)
        if stop() { return KMeansResult(history: history, inertia: .nan, stopped: true) }
        if o.bounds { old.update(from: centroids, count: k * d) }
        groupByLabel(counts: counts, offsets: offsets, order: order, labels: labels, n: n, k: k)
        clusterMeans(centroids, weight: nil, x: x, d: d, counts: counts, offsets: offsets, order: order, k: k)
        let splits = finishLloydStep(centroids, sizes: counts, n: n, k: k, d: d, spherical: o.spherical, rng: &rng)
        if let groups {
            // Drifts δ_j and per-group maxima Δ_g; u += δ_a, l_g −= Δ_g.
            nonisolated(unsafe) let (dr, gd, oldC) = (drift, groupDrift, UnsafePointer(old))
            Parallel.forRanges(k, grain: 64) { r in
                for j in r { dr[j] = squaredDistance(oldC + j * d, cs + j * d, d).squareRoot() }
            }
            for g in 0..<t { gd[g] = 0 }
            for j in 0..<k { let g = Int(groups.groupOf[j]); gd[g] = max(gd[g], dr[j]) }
            Parallel.forRanges(n, grain: 1024) { r in
                for i in r {
                    up[i] += dr[Int(lb[i])]
                    let bounds = lw + i * t
                    for g in 0..<t { bounds[g] -= gd[g] }
                }
            }
            haveBounds = true
        }
        history.append(KMeansIteration(objective: objective, seconds: monotonicSeconds() - t0,
                                       splits: splits, searched: searched))
    }
    let (inertia, _) = assign(useBounds: haveBounds)
    return KMeansResult(history: history, inertia: inertia, stopped: stop())
}

/// One mini-batch step (Sculley 2010, in its per-batch form as scikit-learn's MiniBatchKMeans
/// with learning rate 1/count): assign the chunk, then move each centroid to the running mean of
/// every point it has received, c_j ← (c_j·N_j + Σ_{chunk} x) / (N_j + m_j), N_j += m_j.
/// Returns the chunk's objective against the centroids before the update.
public func kmeansMiniBatchStep(centroids: UnsafeMutablePointer<Float>, counts: UnsafeMutablePointer<Int64>,
                                labels: UnsafeMutablePointer<Int32>, x: UnsafePointer<Float>, n: Int, d: Int,
                                k: Int, spherical: Bool) -> Double {
    let dist = UnsafeMutablePointer<Float>.allocate(capacity: n)
    let sizes = UnsafeMutablePointer<Int>.allocate(capacity: k)
    let offsets = UnsafeMutablePointer<Int>.allocate(capacity: k + 1)
    let order = UnsafeMutablePointer<Int32>.allocate(capacity: n)
    defer { dist.deallocate(); sizes.deallocate(); offsets.deallocate(); order.deallocate() }
    kmeansAssign(labels: labels, distances: dist, x: x, n: n, d: d, centroids: centroids, k: k)
    var objective = 0.0
    for i in 0..<n { objective += Double(dist[i]) }
    groupByLabel(counts: sizes, offsets: offsets, order: order, labels: labels, n: n, k: k)
    clusterMeans(centroids, weight: counts, x: x, d: d, counts: sizes, offsets: offsets, order: order, k: k)
    for j in 0..<k { counts[j] += Int64(sizes[j]) }
    if spherical { normalizeRows(centroids, rows: k, d: d) }
    return objective
}
