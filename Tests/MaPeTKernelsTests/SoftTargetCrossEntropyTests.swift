import XCTest
@testable import MaPeTKernels

final class SoftTargetCrossEntropyTests: XCTestCase {
    /// Smoothed one-hot rows give the hard-label path's loss and gradient (timm:
    /// SoftTargetCrossEntropy(mixup_target(y, λ=1, ε)) = LabelSmoothingCrossEntropy(ε)).
    func testOneHotRowsMatchLabelSmoothing() {
        let rows = 3, K = 7, eps: Float = 0.1
        var logits = [Float](repeating: 0, count: rows * K)
        for i in logits.indices { logits[i] = Float((i * 37) % 11) * 0.3 - 1.2 }
        let labels: [Int32] = [2, 6, 0]
        var q = [Float](repeating: eps / Float(K), count: rows * K)
        for r in 0..<rows { q[r * K + Int(labels[r])] += 1 - eps }
        var lh = [Float](repeating: 0, count: rows), ls = lh
        var ph = [Float](repeating: 0, count: rows * K), ps = ph
        let hard = crossEntropyForward(losses: &lh, probs: &ph, logits: logits, targets: labels, rows: rows, K: K, smoothing: eps)
        let soft = softTargetCrossEntropyForward(losses: &ls, probs: &ps, logits: logits, targets: q, rows: rows, K: K)
        XCTAssertEqual(hard.sum, soft, accuracy: 1e-5 * abs(hard.sum))
        var dh = [Float](repeating: 0, count: rows * K), ds = dh
        crossEntropyBackward(dLogits: &dh, probs: ph, targets: labels, rows: rows, K: K, smoothing: eps, scale: 1 / Float(rows))
        softTargetCrossEntropyBackward(dLogits: &ds, probs: ps, targets: q, rows: rows, K: K, scale: 1 / Float(rows))
        for i in dh.indices { XCTAssertEqual(dh[i], ds[i], accuracy: 1e-6) }
    }

    /// The hard-label gradient written (`accumulate: false`, over a buffer of NaNs) is the bits
    /// of accumulating into zeros, ignored rows (target −1) included.
    func testWrittenGradientEqualsAccumulatedIntoZeros() {
        let rows = 5, K = 9, eps: Float = 0.1
        let logits = (0..<rows * K).map { Float(($0 * 53) % 17) * 0.4 - 3 }
        let labels: [Int32] = [4, -1, 0, 8, -1]
        var losses = [Float](repeating: 0, count: rows), probs = [Float](repeating: 0, count: rows * K)
        crossEntropyForward(losses: &losses, probs: &probs, logits: logits, targets: labels, rows: rows, K: K, smoothing: eps)
        var added = [Float](repeating: 0, count: rows * K), written = [Float](repeating: .nan, count: rows * K)
        crossEntropyBackward(dLogits: &added, probs: probs, targets: labels, rows: rows, K: K, smoothing: eps, scale: 1 / 3)
        crossEntropyBackward(dLogits: &written, probs: probs, targets: labels, rows: rows, K: K, smoothing: eps, scale: 1 / 3,
                             accumulate: false)
        XCTAssertEqual(written.map(\.bitPattern), added.map(\.bitPattern))
    }

    /// The gradient against central differences of the loss in Double.
    func testGradientAgainstFiniteDifferences() {
        let rows = 2, K = 5
        var x: [Float] = [0.3, -1.1, 2.0, 0.5, -0.2, 1.4, 0.0, -0.7, 0.9, 0.25]
        let q: [Float] = [0.5, 0.3, 0.2, 0, 0, 0.1, 0.1, 0.1, 0.6, 0.1]
        func loss(_ x: [Float]) -> Double {
            var l = [Float](repeating: 0, count: rows), p = [Float](repeating: 0, count: rows * K)
            return softTargetCrossEntropyForward(losses: &l, probs: &p, logits: x, targets: q, rows: rows, K: K)
        }
        var l = [Float](repeating: 0, count: rows), p = [Float](repeating: 0, count: rows * K)
        softTargetCrossEntropyForward(losses: &l, probs: &p, logits: x, targets: q, rows: rows, K: K)
        var d = [Float](repeating: 0, count: rows * K)
        softTargetCrossEntropyBackward(dLogits: &d, probs: p, targets: q, rows: rows, K: K, scale: 1)
        for i in x.indices {
            let old = x[i], h: Float = 1e-2
            x[i] = old + h; let lp = loss(x)
            x[i] = old - h; let lm = loss(x)
            x[i] = old
            // float32 logits: the Double sums see rounding ~1e-7 per evaluation; truncation O(h²) ≈ 1e-5.
            XCTAssertEqual(Double(d[i]), (lp - lm) / Double(2 * h), accuracy: 2e-4)
        }
    }
}
