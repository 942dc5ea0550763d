#if canImport(Glibc)
import Glibc
#endif

// Softmax cross-entropy against soft targets (timm's SoftTargetCrossEntropy; the loss of
// mixup/cutmix fine-tuning, whose targets are mixed, label-smoothed one-hot rows).
//   logits [rows, K], targets [rows, K] (each row a distribution: entries ≥ 0 summing to 1).
//   loss_r = −Σ_k q_rk · log softmax(x_r)_k = (Σ_k q_rk) · lse(x_r) − Σ_k q_rk · x_rk
// Backward: dLogits_r += scale · (softmax(x_r) · Σ_k q_rk − q_r), the exact derivative of the
// forward above (= scale · (p − q) when the row sums to 1); scale is usually 1 / rows.

/// Fills probs [rows, K] and losses [rows]. Returns Σ losses (Double). Callers validate the targets.
@discardableResult
public func softTargetCrossEntropyForward(
    losses: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
    logits: UnsafePointer<Float>, targets: UnsafePointer<Float>, rows: Int, K: Int
) -> Double {
    let t0 = Profiler.begin(); defer { Profiler.end(.loss, t0) }
    nonisolated(unsafe) let losses = losses, probs = probs, logits = logits, targets = targets
    Parallel.forRanges(rows, grain: max(1, 8192 / max(K, 1))) { r in
        for i in r {
            let x = logits + i * K, p = probs + i * K, q = targets + i * K
            p.update(from: x, count: K)
            let (mx, se) = softmaxRowInPlace(p, count: K, sumInDouble: true)
            // log-sum-exp in Double from the logits, as the hard-label path.
            var sq: Double = 0, sqx: Double = 0
            for j in 0..<K {
                sq += Double(q[j])
                sqx += Double(q[j]) * Double(x[j])
            }
            losses[i] = Float(sq * (Double(mx) + log(se)) - sqx)
        }
    }
    var sum: Double = 0
    for i in 0..<rows { sum += Double(losses[i]) }
    return sum
}

/// dLogits [rows, K] += scale · (probs · Σ_k q − q).
public func softTargetCrossEntropyBackward(
    dLogits: UnsafeMutablePointer<Float>, probs: UnsafePointer<Float>, targets: UnsafePointer<Float>,
    rows: Int, K: Int, scale: Float
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.loss, t0) }
    nonisolated(unsafe) let dLogits = dLogits, probs = probs, targets = targets
    Parallel.forRanges(rows, grain: max(1, 8192 / max(K, 1))) { r in
        for i in r {
            let p = probs + i * K, q = targets + i * K, d = dLogits + i * K
            var sq: Float = 0
            for j in 0..<K { sq += q[j] }
            for j in 0..<K { d[j] += scale * (p[j] * sq - q[j]) }
        }
    }
}
