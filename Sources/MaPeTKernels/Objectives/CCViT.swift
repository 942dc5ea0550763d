// The model-independent parts of the CCViT objective (Yan et al., "Centroid-centered Modeling
// for Efficient Vision Transformer Pre-training", ALGORITHMS.md §4), after Cakeyan/CCViT_Public:
//  - corruption: besides the block-masked patches (mask token in the model), `numReplace`
//    further visible patches are picked uniformly without replacement and their pixels are
//    replaced by the pixels of their own nearest centroid (datasets.py shuffles the visible
//    indices and keeps the first 20; utils.kmeans_mask pastes centroids[ids] back as patches).
//    This happens on raw pixels, before mean/std normalisation.
//  - pixel targets: each patch of the clean image as a (channel, row, col) vector of C·P·P
//    values, normalised as (x − mean) / sqrt(var_unbiased + 1e-6).
//  - pixel loss: MSE (torch nn.MSELoss, mean over rows × values) on the selected positions.
// The cross-entropy half of the loss is the shared CE kernel.
// Layout: images [B, C, H, W]; patch q = gy·(W/P) + gx covers rows gy·P..<(gy+1)·P and
// columns gx·P..<(gx+1)·P; centroids [K, C·P·P] in (channel, row, col) order.

/// Replaces the pixels of `numReplace` visible patches per sample by their centroid, in place.
///   images [B, C, H, W], replaced [B, n] (out: 1 where replaced, else 0),
///   mask [B, n] (nonzero = block-masked, never picked), centroidIds [B, n] in 0..<K,
///   centroids [K, C·P·P], n = (H/P)·(W/P).
/// Sample b draws from ObjectiveRNG(seed: seed, stream: firstStream + b) (firstStream: the
/// batch's offset in a global sample stream, so shards of a batch draw what the whole batch
/// would): the pick is a partial
/// Fisher–Yates shuffle of its visible patches in increasing index order, the first
/// min(numReplace, visible) kept — the same distribution as the reference's
/// np.random.shuffle + [:20], and independent of the thread count.
public func ccvitCorrupt(
    images: UnsafeMutablePointer<Float>, replaced: UnsafeMutablePointer<Int32>,
    mask: UnsafePointer<Int32>, centroidIds: UnsafePointer<Int32>, centroids: UnsafePointer<Float>,
    B: Int, C: Int, H: Int, W: Int, P: Int, numReplace: Int, seed: UInt64, firstStream: UInt64 = 0
) {
    let gw = W / P, n = (H / P) * gw
    nonisolated(unsafe) let images = images, replaced = replaced, mask = mask
    nonisolated(unsafe) let centroidIds = centroidIds, centroids = centroids
    Parallel.forEach(B) { b in
        var rng = ObjectiveRNG(seed: seed, stream: firstStream &+ UInt64(b))
        var visible: [Int] = []
        for q in 0..<n where mask[b * n + q] == 0 { visible.append(q) }
        let m = min(max(numReplace, 0), visible.count)
        for s in 0..<m {
            let j = s + rng.below(visible.count - s)
            visible.swapAt(s, j)
        }
        for q in 0..<n { replaced[b * n + q] = 0 }
        for s in 0..<m {
            let q = visible[s]
            replaced[b * n + q] = 1
            let gy = q / gw, gx = q % gw
            let src = centroids + Int(centroidIds[b * n + q]) * C * P * P
            for c in 0..<C {
                for row in 0..<P {
                    let dst = images + ((b * C + c) * H + gy * P + row) * W + gx * P
                    for col in 0..<P { dst[col] = src[(c * P + row) * P + col] }
                }
            }
        }
    }
}

/// Per-patch normalised pixel targets: out [B, n, C·P·P] from images [B, C, H, W],
///   out = (x − mean) / sqrt(var_unbiased + eps) over the C·P·P values of the patch.
public func ccvitPixelTargets(
    out: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
    B: Int, C: Int, H: Int, W: Int, P: Int, eps: Double = 1e-6
) {
    let gw = W / P, n = (H / P) * gw, M = C * P * P
    nonisolated(unsafe) let out = out, images = images
    Parallel.forEach(B * n) { item in
        let b = item / n, q = item % n, gy = q / gw, gx = q % gw
        let o = out + item * M
        for c in 0..<C {
            for row in 0..<P {
                let src = images + ((b * C + c) * H + gy * P + row) * W + gx * P
                for col in 0..<P { o[(c * P + row) * P + col] = src[col] }
            }
        }
        var mean: Double = 0
        for k in 0..<M { mean += Double(o[k]) }
        mean /= Double(M)
        var ss: Double = 0
        for k in 0..<M { let d = Double(o[k]) - mean; ss += d * d }
        let variance = M > 1 ? ss / Double(M - 1) : 0
        let inv = 1 / (variance + eps).squareRoot()
        for k in 0..<M { o[k] = Float((Double(o[k]) - mean) * inv) }
    }
}

/// MSE over the selected rows: pred, target [R, M], rows [R] (nonzero = selected);
///   loss = Σ_{selected r} Σ_k (pred − target)² / (selected · M);  0 when nothing is selected.
public func maskedMSEForward(
    pred: UnsafePointer<Float>, target: UnsafePointer<Float>, rows: UnsafePointer<Int32>, R: Int, M: Int
) -> Double {
    var selected = 0
    for r in 0..<R where rows[r] != 0 { selected += 1 }
    if selected == 0 || M == 0 { return 0 }
    let partial = UnsafeMutablePointer<Double>.allocate(capacity: R)
    defer { partial.deallocate() }
    nonisolated(unsafe) let pred = pred, target = target, rows = rows, part = partial
    Parallel.forRanges(R, grain: 16) { range in
        for r in range {
            var s: Double = 0
            if rows[r] != 0 {
                for k in 0..<M { let d = Double(pred[r * M + k]) - Double(target[r * M + k]); s += d * d }
            }
            part[r] = s
        }
    }
    var sum: Double = 0
    for r in 0..<R { sum += partial[r] }
    return sum / Double(selected * M)
}

/// dPred += dLoss · 2 (pred − target) / (selected · M) on the selected rows.
public func maskedMSEBackward(
    dPred: UnsafeMutablePointer<Float>, dLoss: Double,
    pred: UnsafePointer<Float>, target: UnsafePointer<Float>, rows: UnsafePointer<Int32>, R: Int, M: Int
) {
    var selected = 0
    for r in 0..<R where rows[r] != 0 { selected += 1 }
    if selected == 0 || M == 0 { return }
    let scale = Float(2 * dLoss / Double(selected * M))
    nonisolated(unsafe) let dPred = dPred, pred = pred, target = target, rows = rows
    Parallel.forRanges(R, grain: 16) { range in
        for r in range where rows[r] != 0 {
            for k in 0..<M { dPred[r * M + k] += scale * (pred[r * M + k] - target[r * M + k]) }
        }
    }
}
