// Nearest-centroid search for k-means and the visual tokenizers.
//
//   points x [n, d], centroids c [k, d]  →  label[i] = argmin_j ‖x_i − c_j‖²
//
// The distance pass is a GEMM: ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖², and ‖x‖² is constant per row,
// so the arg-min only needs s_j = ‖c_j‖² − 2 x·c_j. Points go in fixed blocks of
// `KMeansBlocks.points` rows, centroids in chunks of `KMeansBlocks.centroids`; each
// block × chunk product lands in a per-worker scratch tile and is folded into a running
// (best, second best) per row at once, so no n × k matrix ever exists. Blocks are fixed
// (independent of the thread count) and every row's result depends only on its own block, so
// labels are identical on any number of threads. Ties go to the lowest centroid index.
#if canImport(Glibc)
import Glibc
#endif

public enum KMeansBlocks {
    /// Rows of x per GEMM block (also the unit of parallel work and of partial sums).
    public static let points = 256
    /// Centroids per GEMM chunk: the scratch tile is points × centroids floats (1 MiB).
    public static let centroids = 1024
}

/// ‖a − b‖² over d floats (SIMD16 fused multiply-add accumulation).
@inlinable
public func squaredDistance(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ d: Int) -> Float {
    var acc = SIMD16<Float>()
    var j = 0
    while j + 16 <= d {
        let t = UnsafeRawPointer(a + j).loadUnaligned(as: SIMD16<Float>.self)
            - UnsafeRawPointer(b + j).loadUnaligned(as: SIMD16<Float>.self)
        acc.addProduct(t, t)
        j += 16
    }
    var s = acc.sum()
    while j < d { let t = a[j] - b[j]; s += t * t; j += 1 }
    return s
}

/// ‖a‖² over d floats.
@inlinable
public func squaredNorm(_ a: UnsafePointer<Float>, _ d: Int) -> Float {
    var acc = SIMD16<Float>()
    var j = 0
    while j + 16 <= d {
        let t = UnsafeRawPointer(a + j).loadUnaligned(as: SIMD16<Float>.self)
        acc.addProduct(t, t)
        j += 16
    }
    var s = acc.sum()
    while j < d { s += a[j] * a[j]; j += 1 }
    return s
}

/// ‖c_j‖² for every centroid.
public func centroidSquaredNorms(_ norms: UnsafeMutablePointer<Float>, centroids: UnsafePointer<Float>, k: Int, d: Int) {
    for j in 0..<k { norms[j] = squaredNorm(centroids + j * d, d) }
}

/// Nearest and second-nearest centroid of `rows` contiguous points x [rows, d].
/// Writes label[r], best[r] = min_j s_j and second[r] = the runner-up s_j, where
/// s_j = ‖c_j‖² − 2 x_r·c_j (add ‖x_r‖² for the squared distance).
/// `scratch` holds KMeansBlocks.points × KMeansBlocks.centroids floats; rows ≤ KMeansBlocks.points.
/// With `groupOf` ([k] group of each centroid, t groups), also writes groupMin [rows, t] = the
/// minimum s_j over each group (for Yinyang bounds).
@inlinable
public func nearestCentroidsBlock(
    label: UnsafeMutablePointer<Int32>, best: UnsafeMutablePointer<Float>, second: UnsafeMutablePointer<Float>,
    x: UnsafePointer<Float>, rows: Int, d: Int,
    centroids: UnsafePointer<Float>, norms: UnsafePointer<Float>, k: Int,
    scratch: UnsafeMutablePointer<Float>,
    groupOf: UnsafePointer<Int32>? = nil, groupMin: UnsafeMutablePointer<Float>? = nil, t: Int = 0
) {
    for r in 0..<rows { best[r] = .infinity; second[r] = .infinity; label[r] = 0 }
    if let groupMin { for q in 0..<(rows * t) { groupMin[q] = .infinity } }
    var c0 = 0
    while c0 < k {
        let cc = min(KMeansBlocks.centroids, k - c0)
        sgemm(transA: false, transB: true, M: rows, N: cc, K: d, alpha: -2, A: x, lda: d,
              B: centroids + c0 * d, ldb: d, beta: 0, C: scratch, ldc: cc)
        if let groupOf, let groupMin {
            for r in 0..<rows {
                let g = scratch + r * cc, gm = groupMin + r * t
                for j in 0..<cc {
                    let s = norms[c0 + j] + g[j], q = Int(groupOf[c0 + j])
                    if s < gm[q] { gm[q] = s }
                }
            }
        }
        for r in 0..<rows {
            let g = scratch + r * cc
            var b1 = best[r], b2 = second[r], a = label[r]
            for j in 0..<cc {
                let s = norms[c0 + j] + g[j]
                if s < b2 {
                    if s < b1 { b2 = b1; b1 = s; a = Int32(c0 + j) } else { b2 = s }
                }
            }
            best[r] = b1; second[r] = b2; label[r] = a
        }
        c0 += cc
    }
}

/// Assigns every point of x [n, d] to its nearest centroid of c [k, d]:
/// labels [n] and distances [n] = ‖x_i − c_label‖² (recomputed directly, not from the GEMM
/// identity, so they do not suffer its cancellation). Parallel over fixed point blocks.
/// `shouldStop` (e.g. Ctrl-C) is polled between blocks; when it answers true the remaining
/// blocks are skipped and the outputs are incomplete (the caller discards them).
public func kmeansAssign(
    labels: UnsafeMutablePointer<Int32>, distances: UnsafeMutablePointer<Float>?,
    x: UnsafePointer<Float>, n: Int, d: Int, centroids: UnsafePointer<Float>, k: Int,
    shouldStop: (@Sendable () -> Bool)? = nil
) {
    let stop: @Sendable () -> Bool = shouldStop ?? { false }
    let norms = UnsafeMutablePointer<Float>.allocate(capacity: k)
    defer { norms.deallocate() }
    centroidSquaredNorms(norms, centroids: centroids, k: k, d: d)
    let blocks = (n + KMeansBlocks.points - 1) / KMeansBlocks.points
    nonisolated(unsafe) let (x, c, nm, labels, distances) = (x, centroids, UnsafePointer(norms), labels, distances)
    Parallel.forRanges(blocks) { range in
        let P = KMeansBlocks.points
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: P * KMeansBlocks.centroids)
        let best = UnsafeMutablePointer<Float>.allocate(capacity: 2 * P)
        defer { scratch.deallocate(); best.deallocate() }
        for b in range where !stop() {
            let lo = b * P, rows = min(P, n - lo)
            nearestCentroidsBlock(label: labels + lo, best: best, second: best + P, x: x + lo * d, rows: rows, d: d,
                                  centroids: c, norms: nm, k: k, scratch: scratch)
            if let distances {
                for r in lo..<(lo + rows) {
                    distances[r] = squaredDistance(x + r * d, c + Int(labels[r]) * d, d)
                }
            }
        }
    }
}

/// Brute-force reference: one distance at a time, no GEMM (tests compare against it).
public func kmeansAssignNaive(
    labels: UnsafeMutablePointer<Int32>, distances: UnsafeMutablePointer<Float>,
    x: UnsafePointer<Float>, n: Int, d: Int, centroids: UnsafePointer<Float>, k: Int
) {
    for i in 0..<n {
        var best = Float.infinity, a = 0
        for j in 0..<k {
            let s = squaredDistance(x + i * d, centroids + j * d, d)
            if s < best { best = s; a = j }
        }
        labels[i] = Int32(a); distances[i] = best
    }
}

/// Index of the first row of x [n, d] holding a NaN or ±Inf, or −1.
public func firstNonFiniteRow(_ x: UnsafePointer<Float>, n: Int, d: Int) -> Int {
    let blocks = (n + 4095) / 4096
    let rowOf = UnsafeMutablePointer<Int>.allocate(capacity: max(blocks, 1))
    defer { rowOf.deallocate() }
    nonisolated(unsafe) let (x, found) = (x, rowOf)
    Parallel.forRanges(blocks) { range in
        for b in range {
            found[b] = -1
            let lo = b * 4096, hi = min(n, lo + 4096)
            rows: for i in lo..<hi {
                let row = x + i * d
                for j in 0..<d where !row[j].isFinite { found[b] = i; break rows }
            }
        }
    }
    for b in 0..<blocks where found[b] >= 0 { return found[b] }
    return -1
}
