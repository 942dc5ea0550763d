// Yinyang bounds for exact Lloyd k-means (Ding, Zhao, Shen, Musuvathi, Mytkowicz,
// "Yinyang K-Means: A Drop-In Replacement of the Classic K-Means with Consistent Speedup", ICML 2015).
//
//   centroids [k, d] split once into t groups G_1..G_t (k-means of the initial centroids, t ≈ k/10)
//   per point i: label a_i, upper bound u_i ≥ ‖x_i − c_{a_i}‖,
//                group bounds l_ig ≤ min_{j ∈ G_g, j ≠ a_i} ‖x_i − c_j‖   (lower [n, t])
//
// After the centroids move by δ_j: u_i += δ_{a_i}, l_ig −= Δ_g = max_{j ∈ G_g} δ_j. At the next
// assignment u_i is made exact; a point whose u_i is below every l_ig keeps its label (global filter);
// otherwise only the groups with l_ig ≤ u_i are searched, one direct distance per member (group filter),
// and their bounds are renewed. Unlike one Hamerly bound (t = 1) this survives a few centroids
// moving far, since only their own groups' bounds drop.
//
// Exactness: mapet's plain Lloyd labels are those of the blocked GEMM arg-min. Every comparison here
// carries a safety margin that covers the rounding of the GEMM identity (and of the dot products used
// in the group search), and a point whose winner is not clear by that margin is sent to the same GEMM
// block search plain Lloyd uses. Labels are therefore identical to bounds = false.

/// A partition of the k centroids into t groups: members of group g are order[offsets[g]..<offsets[g+1]].
public struct CentroidGroups {
    public let t: Int
    public let groupOf: UnsafeMutablePointer<Int32>
    public let order: UnsafeMutablePointer<Int32>
    public let offsets: UnsafeMutablePointer<Int>

    init(k: Int, t: Int, labels: UnsafePointer<Int32>) {
        self.t = t
        groupOf = .allocate(capacity: k)
        order = .allocate(capacity: k)
        offsets = .allocate(capacity: t + 1)
        groupOf.update(from: labels, count: k)
        let counts = UnsafeMutablePointer<Int>.allocate(capacity: t)
        defer { counts.deallocate() }
        groupByLabel(counts: counts, offsets: offsets, order: order, labels: labels, n: k, k: t)
    }

    func deallocate() { groupOf.deallocate(); order.deallocate(); offsets.deallocate() }
}

/// Groups the centroids c [k, d] by a short k-means of the centroids themselves (5 plain Lloyd
/// iterations, random init from the run's seed) into t = max(1, k / 10) groups, fewer when the
/// n × t bounds would exceed 2²⁷ floats (512 MiB), so memory stays bounded for any n.
func groupCentroids(_ c: UnsafePointer<Float>, k: Int, d: Int, n: Int, seed: UInt64) -> CentroidGroups {
    let t = max(1, min(k / 10, (1 << 27) / max(n, 1)))
    let labels = UnsafeMutablePointer<Int32>.allocate(capacity: k)
    defer { labels.deallocate() }
    if t == 1 {
        for j in 0..<k { labels[j] = 0 }
    } else {
        let gc = UnsafeMutablePointer<Float>.allocate(capacity: t * d)
        defer { gc.deallocate() }
        let o = KMeansOptions(k: t, iterations: 5, initialization: .random, seed: seed, stream: 0x9E37_79B9, bounds: false)
        _ = kmeansFit(centroids: gc, labels: labels, x: c, n: k, d: d, options: o)
    }
    return CentroidGroups(k: k, t: t, labels: labels)
}

/// x·c_j for four centroids at once (x loaded once per 16 floats).
@inlinable
func dot4(_ x: UnsafePointer<Float>, _ c0: UnsafePointer<Float>, _ c1: UnsafePointer<Float>,
          _ c2: UnsafePointer<Float>, _ c3: UnsafePointer<Float>, _ d: Int) -> SIMD4<Float> {
    var a0 = SIMD16<Float>(), a1 = SIMD16<Float>(), a2 = SIMD16<Float>(), a3 = SIMD16<Float>()
    var j = 0
    while j + 16 <= d {
        let xv = UnsafeRawPointer(x + j).loadUnaligned(as: SIMD16<Float>.self)
        a0.addProduct(xv, UnsafeRawPointer(c0 + j).loadUnaligned(as: SIMD16<Float>.self))
        a1.addProduct(xv, UnsafeRawPointer(c1 + j).loadUnaligned(as: SIMD16<Float>.self))
        a2.addProduct(xv, UnsafeRawPointer(c2 + j).loadUnaligned(as: SIMD16<Float>.self))
        a3.addProduct(xv, UnsafeRawPointer(c3 + j).loadUnaligned(as: SIMD16<Float>.self))
        j += 16
    }
    var r = SIMD4<Float>(a0.sum(), a1.sum(), a2.sum(), a3.sum())
    while j < d { r += x[j] * SIMD4(c0[j], c1[j], c2[j], c3[j]); j += 1 }
    return r
}

@inlinable
func dot1(_ x: UnsafePointer<Float>, _ c: UnsafePointer<Float>, _ d: Int) -> Float {
    var a = SIMD16<Float>()
    var j = 0
    while j + 16 <= d {
        a.addProduct(UnsafeRawPointer(x + j).loadUnaligned(as: SIMD16<Float>.self),
                     UnsafeRawPointer(c + j).loadUnaligned(as: SIMD16<Float>.self))
        j += 16
    }
    var s = a.sum()
    while j < d { s += x[j] * c[j]; j += 1 }
    return s
}

/// Bound on the error of a distance near `dist` whose square has absolute error ≤ e:
/// |√a − √b| = |a − b| / (√a + √b) ≤ min(√e, e / dist).
@inlinable
func distanceMargin(_ e: Float, _ dist: Float) -> Float {
    min(e.squareRoot(), e / max(dist, 0x1p-60))
}

/// Group search of one point (the global filter failed). Inputs: x [d], its ‖x‖², its current label
/// `a` with exact squared distance `own`, the group bounds `lower` [t] (already decreased by the drifts),
/// `e` (bound on the rounding of a squared distance). Searches every group with lower[g] ≤ best + 2·margin,
/// renews those bounds, and returns the new label, or −1 when the winner is not clear by 2·margin or
/// when more than a quarter of the centroids would need a direct distance (the caller then runs the
/// GEMM search). `dist` is scratch of at least the largest group's size.
@inlinable
func yinyangSearch(x: UnsafePointer<Float>, xn: Float, a: Int32, own: Float, lower: UnsafeMutablePointer<Float>,
                   error e: Float, centroids: UnsafePointer<Float>, norms: UnsafePointer<Float>, d: Int,
                   groups: CentroidGroups, dist: UnsafeMutablePointer<Float>) -> Int32 {
    let t = groups.t
    var best = own.squareRoot(), bestJ = a, second = Float.infinity
    // Too many groups left: the GEMM search is cheaper than one dot product at a time.
    let reach = best + 2 * distanceMargin(e, best)
    var work = 0
    for g in 0..<t where lower[g] <= reach { work += groups.offsets[g + 1] - groups.offsets[g] }
    if work * 4 > groups.offsets[t] { return -1 }
    for g in 0..<t {
        if lower[g] > best + 2 * distanceMargin(e, best) { continue }
        let lo = groups.offsets[g], m = groups.offsets[g + 1] - lo
        let mem = groups.order + lo
        var q = 0
        while q + 4 <= m {
            let j0 = Int(mem[q]), j1 = Int(mem[q + 1]), j2 = Int(mem[q + 2]), j3 = Int(mem[q + 3])
            let p = dot4(x, centroids + j0 * d, centroids + j1 * d, centroids + j2 * d, centroids + j3 * d, d)
            let s = SIMD4(norms[j0], norms[j1], norms[j2], norms[j3]) - 2 * p + xn
            dist[q] = max(0, s[0]).squareRoot(); dist[q + 1] = max(0, s[1]).squareRoot()
            dist[q + 2] = max(0, s[2]).squareRoot(); dist[q + 3] = max(0, s[3]).squareRoot()
            q += 4
        }
        while q < m {
            let j = Int(mem[q])
            dist[q] = max(0, norms[j] - 2 * dot1(x, centroids + j * d, d) + xn).squareRoot()
            q += 1
        }
        // The bound of g excludes the old label (its distance is `own`, handled below).
        var gmin = Float.infinity
        for q in 0..<m {
            let j = mem[q]
            if j == a { continue }
            let v = dist[q]
            gmin = min(gmin, v)
            if v < best { second = best; best = v; bestJ = j } else if v < second { second = v }
        }
        lower[g] = gmin
    }
    // Every unsearched group lies beyond best + 2·margin; among the searched ones the winner must be clear.
    if second <= best + 2 * distanceMargin(e, best) { return -1 }
    if bestJ != a {
        // a is now one of "the others" for its group; bestJ stops being one for its own.
        let ga = Int(groups.groupOf[Int(a)])
        lower[ga] = min(lower[ga], own.squareRoot())
        let gb = Int(groups.groupOf[Int(bestJ)])
        var m2 = Float.infinity
        let lo = groups.offsets[gb], hi = groups.offsets[gb + 1]
        for q in lo..<hi {
            let j = groups.order[q]
            if j == bestJ { continue }
            if j == a { m2 = min(m2, own.squareRoot()); continue }
            m2 = min(m2, max(0, norms[Int(j)] - 2 * dot1(x, centroids + Int(j) * d, d) + xn).squareRoot())
        }
        lower[gb] = m2
    }
    return bestJ
}
