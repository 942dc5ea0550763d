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
            p.update(from: x, count: K)
            // log p_k = x_k − mx − log Σ exp(x − mx), from the logits (not from p, whose small
            // entries underflow): the softmax's exps (~2·10⁻⁷ relative, `vexp`) summed in Double.
            let (mx, se) = softmaxRowInPlace(p, count: K, sumInDouble: true)
            let t = Int(targets[i])
            guard t >= 0 else { losses[i] = 0; continue }
            let lse = Double(mx) + log(se)
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

/// `accumulate: false` writes dLogits (ignored rows get zeros) instead of adding to it: the bits
/// of adding to zeros (a zero is still added, so −0 becomes +0), without a pass that zeroes a
/// [rows, K] buffer first — with MaPeT's 8192-token vocabulary that pass and the extra read
/// cost as much as the gradient itself.
public func crossEntropyBackward(
    dLogits: UnsafeMutablePointer<Float>, probs: UnsafePointer<Float>, targets: UnsafePointer<Int32>,
    rows: Int, K: Int, smoothing: Float = 0, scale: Float, accumulate: Bool = true
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.loss, t0) }
    nonisolated(unsafe) let dLogits = dLogits, probs = probs, targets = targets
    let off = smoothing / Float(K)
    Parallel.forRanges(rows, grain: max(1, 8192 / max(K, 1))) { r in
        for i in r {
            let t = Int(targets[i])
            let p = probs + i * K, d = dLogits + i * K
            guard t >= 0 else {
                if !accumulate { d.update(repeating: 0, count: K) }
                continue
            }
            if accumulate { for j in 0..<K { d[j] += scale * (p[j] - off) } }
            else { for j in 0..<K { d[j] = 0 + scale * (p[j] - off) } }
            d[t] -= scale * (1 - smoothing)
        }
    }
}
