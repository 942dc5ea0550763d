#if canImport(Glibc)
import Glibc
#endif

// Softmax cross-entropy with optional label smoothing (Szegedy et al. 2016) and ignored rows.
//   logits [rows, K], targets [rows] (Int32; negative = ignored).
//   q = (1 − ε)·onehot(target) + ε/K,   loss_r = −Σ_k q_k log softmax(logits_r)_k
//   (timm's LabelSmoothingCrossEntropy; ε = 0 is plain cross-entropy).
// Backward: dLogits_r += scale · (softmax(logits_r) − q) for kept rows; scale is usually
// 1 / (number of kept rows) for a mean loss.

/// Fills probs [rows, K] and losses [rows] (0 for ignored rows). Returns (Σ losses in Double, kept rows).
/// Targets must be < K (callers validate).
@discardableResult
public func crossEntropyForward(
    losses: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
    logits: UnsafePointer<Float>, targets: UnsafePointer<Int32>,
    rows: Int, K: Int, smoothing: Float = 0
) -> (sum: Double, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.loss, t0) }
    nonisolated(unsafe) let losses = losses, probs = probs, logits = logits, targets = targets
    Parallel.forRanges(rows, grain: max(1, 8192 / max(K, 1))) { r in
        for i in r {
            let x = logits + i * K, p = probs + i * K
            var mx = -Float.infinity
            for j in 0..<K { mx = max(mx, x[j]) }
            p.update(from: x, count: K)
            softmaxRowInPlace(p, count: K)
            let t = Int(targets[i])
            guard t >= 0 else { losses[i] = 0; continue }
            // log p_k = x_k − mx − log Σ exp(x − mx), from the logits (not from p, whose small
            // entries underflow): each exp to ~2·10⁻⁷ relative (`vexp`), the sum in Double.
            let lse = Double(mx) + log(sumOfExp(x, count: K, minus: mx))
            var loss = (1 - Double(smoothing)) * (lse - Double(x[t]))
            if smoothing != 0 {
                var sx: Double = 0
                for j in 0..<K { sx += Double(x[j]) }
                loss += Double(smoothing) * (lse - sx / Double(K))
            }
            losses[i] = Float(loss)
        }
    }
    var sum: Double = 0, count = 0
    for i in 0..<rows where targets[i] >= 0 { sum += Double(losses[i]); count += 1 }
    return (sum, count)
}

/// Σ_j exp(x[j] − shift), each term by `vexp`, summed in Double.
@inlinable
func sumOfExp(_ x: UnsafePointer<Float>, count: Int, minus shift: Float) -> Double {
    let m = FloatVector(repeating: shift)
    var acc = SIMD8<Double>()
    var j = 0
    while j + 8 <= count { acc += SIMD8<Double>(vexp(loadV(x + j) - m)); j += 8 }
    var total = acc.sum()
    while j < count { total += Double(sexp(x[j] - shift)); j += 1 }
    return total
}

public func crossEntropyBackward(
    dLogits: UnsafeMutablePointer<Float>, probs: UnsafePointer<Float>, targets: UnsafePointer<Int32>,
    rows: Int, K: Int, smoothing: Float = 0, scale: Float
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.loss, t0) }
    nonisolated(unsafe) let dLogits = dLogits, probs = probs, targets = targets
    let off = smoothing / Float(K)
    Parallel.forRanges(rows, grain: max(1, 8192 / max(K, 1))) { r in
        for i in r {
            let t = Int(targets[i])
            guard t >= 0 else { continue }
            let p = probs + i * K, d = dLogits + i * K
            for j in 0..<K { d[j] += scale * (p[j] - off) }
            d[t] -= scale * (1 - smoothing)
        }
    }
}
