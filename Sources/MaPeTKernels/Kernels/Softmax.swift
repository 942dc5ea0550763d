#if canImport(Glibc)
import Glibc
#endif

// Row softmax:  out[r, j] = exp(x[r, j] − max_j x[r, ·]) / Σ_j exp(x[r, j] − max).
// Backward:     dx[r, j] += out[r, j] · (dout[r, j] − Σ_k dout[r, k] · out[r, k]).

/// One row in place: `row[j] = softmax(scale · row)[j]` over `count` entries. Returns the max of
/// scale·row it subtracted and, with `sumInDouble`, Σ_j exp(scale·row[j] − max) of the same exp
/// values summed in Double (otherwise 0): cross-entropy's log-sum-exp, max + log(expSum), without
/// a second pass of exps or of the max.
@inlinable @discardableResult
public func softmaxRowInPlace(_ row: UnsafeMutablePointer<Float>, count: Int, scale: Float = 1,
                              sumInDouble: Bool = false) -> (max: Float, expSum: Double) {
    var mv = FloatVector(repeating: -.infinity)
    var j = 0
    while j + 8 <= count { mv = pointwiseMax(mv, loadV(row + j)); j += 8 }
    var mx = mv.max()
    while j < count { mx = max(mx, row[j]); j += 1 }
    mx *= scale
    let s = FloatVector(repeating: scale), m = FloatVector(repeating: mx)
    var acc = FloatVector(), wide = SIMD8<Double>()
    j = 0
    while j + 8 <= count {
        let e = vexp(loadV(row + j) * s - m)
        storeV(e, row + j)
        acc += e
        if sumInDouble { wide += SIMD8<Double>(e) }
        j += 8
    }
    var total = acc.sum(), wideTotal = wide.sum()
    while j < count {
        let e = sexp(row[j] * scale - mx); row[j] = e; total += e
        if sumInDouble { wideTotal += Double(e) }
        j += 1
    }
    let inv = 1 / total
    for j in 0..<count { row[j] *= inv }
    return (mx, sumInDouble ? wideTotal : 0)
}

/// One row in place with additive biases (0 or −∞): `row[j] = softmax(scale · row + bias)[j]`;
/// a row whose biases are all −∞ becomes zeros. Where a bias is 0 the values are those of
/// `softmaxRowInPlace` with the −∞ entries written into the row.
@inlinable
public func softmaxRowInPlace(_ row: UnsafeMutablePointer<Float>, count: Int, scale: Float, bias: UnsafePointer<Float>) {
    let s = FloatVector(repeating: scale)
    var mv = FloatVector(repeating: -.infinity)
    var j = 0
    while j + 8 <= count {
        let y = loadV(row + j) * s + loadV(bias + j)
        storeV(y, row + j)
        mv = pointwiseMax(mv, y)
        j += 8
    }
    var mx = mv.max()
    while j < count { let y = row[j] * scale + bias[j]; row[j] = y; mx = max(mx, y); j += 1 }
    if mx == -.infinity { row.update(repeating: 0, count: count); return }
    let m = FloatVector(repeating: mx)
    var acc = FloatVector()
    j = 0
    while j + 8 <= count {
        let e = vexp(loadV(row + j) - m)
        storeV(e, row + j)
        acc += e
        j += 8
    }
    var total = acc.sum()
    while j < count { let e = sexp(row[j] - mx); row[j] = e; total += e; j += 1 }
    let inv = 1 / total
    for j in 0..<count { row[j] *= inv }
}

/// out [rows, cols] = softmax over each row of input [rows, cols].
public func softmaxForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, rows: Int, cols: Int) {
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(rows, grain: max(1, 4096 / max(cols, 1))) { r in
        for i in r {
            (out + i * cols).update(from: input + i * cols, count: cols)
            softmaxRowInPlace(out + i * cols, count: cols)
        }
    }
}

/// dInput [rows, cols] += out ⊙ (dOut − rowsum(dOut ⊙ out)).
public func softmaxBackward(
    dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>, out: UnsafePointer<Float>,
    rows: Int, cols: Int
) {
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, out = out
    Parallel.forRanges(rows, grain: max(1, 4096 / max(cols, 1))) { r in
        for i in r {
            let y = out + i * cols, dy = dOut + i * cols, dx = dInput + i * cols
            let s = vdot(y, dy, cols)
            for j in 0..<cols { dx[j] += y[j] * (dy[j] - s) }
        }
    }
}

/// Reference: plain loops with libm exp and Double sums.
public func softmaxForwardNaive(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, rows: Int, cols: Int) {
    for i in 0..<rows {
        var mx = -Float.infinity
        for j in 0..<cols { mx = max(mx, input[i * cols + j]) }
        var s: Double = 0
        for j in 0..<cols { s += exp(Double(input[i * cols + j] - mx)) }
        for j in 0..<cols { out[i * cols + j] = Float(exp(Double(input[i * cols + j] - mx)) / s) }
    }
}
