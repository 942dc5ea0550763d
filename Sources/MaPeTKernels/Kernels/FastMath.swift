// Vectorised exp for the inner loops of softmax and cross-entropy.
//
// exp(x) = 2ⁿ · exp(r),  n = round(x / ln 2),  r = x − n·ln 2 (ln 2 split in a hi and lo part,
// Cody & Waite), exp(r) on |r| ≤ ½ln 2 by the degree-6 Taylor/minimax polynomial of Cephes
// `expf` (relative error ≈ 2·10⁻⁷, tested against Foundation-free `expf`). Inputs below −87.3
// give 0, so masked or very negative logits underflow cleanly.

public typealias FloatVector = SIMD8<Float>

@inlinable @inline(__always)
public func vexp(_ x: FloatVector) -> FloatVector {
    let lo = FloatVector(repeating: -87.33654)
    let hi = FloatVector(repeating: 88.37626)
    let below = x .< lo
    var x = pointwiseMin(pointwiseMax(x, lo), hi)
    // n = round(x·log2 e) by the 1.5·2²³ trick: the sum's low mantissa bits hold n.
    let magic = FloatVector(repeating: 12582912)
    let shifted = x * 1.44269504088896341 + magic
    let n = shifted - magic
    x = x - n * 0.693359375
    x = x + n * 2.12194440e-4
    var p = FloatVector(repeating: 1.9875691500e-4)
    p = p * x + 1.3981999507e-3
    p = p * x + 8.3334519073e-3
    p = p * x + 4.1665795894e-2
    p = p * x + 1.6666665459e-1
    p = p * x + 5.0000001201e-1
    p = p * (x * x) + x + 1
    let bits = (unsafeBitCast(shifted, to: SIMD8<Int32>.self) &- 0x4B40_0000 &+ 127) &<< 23
    // Exact zero below the range (masked logits are −∞).
    return (p * unsafeBitCast(bits, to: FloatVector.self)).replacing(with: 0, where: below)
}

@inlinable @inline(__always)
func pointwiseMin(_ a: FloatVector, _ b: FloatVector) -> FloatVector { a.replacing(with: b, where: b .< a) }

@inlinable @inline(__always)
func pointwiseMax(_ a: FloatVector, _ b: FloatVector) -> FloatVector { a.replacing(with: b, where: b .> a) }

/// erf by Abramowitz & Stegun 7.1.26: 1 − (a₁t + … + a₅t⁵)·e^(−x²), t = 1/(1 + 0.3275911·|x|),
/// odd extension; absolute error ≤ 1.5·10⁻⁷.
@inlinable @inline(__always)
public func verf(_ x: FloatVector) -> FloatVector { verfAndGauss(x).erf }

/// erf(x) as `verf`, and the e^(−x²) it is built from (GELU's backward reuses it for φ).
@inlinable @inline(__always)
public func verfAndGauss(_ x: FloatVector) -> (erf: FloatVector, gauss: FloatVector) {
    let a = x.replacing(with: -x, where: x .< 0)
    let t = 1 / (1 + 0.3275911 * a)
    var p = FloatVector(repeating: 1.061405429)
    p = p * t - 1.453152027
    p = p * t + 1.421413741
    p = p * t - 0.284496736
    p = p * t + 0.254829592
    let gauss = vexp(-(a * a))
    let y = 1 - p * t * gauss
    return (y.replacing(with: -y, where: x .< 0), gauss)
}

/// Scalar exp through the same polynomial (tails of vector loops agree with their bodies).
@inlinable @inline(__always)
public func sexp(_ x: Float) -> Float {
    vexp(FloatVector(repeating: x))[0]
}

/// Σ term(i) over i < count: `vector(i)` gives the 8 terms from i on, `scalar(i)` one term (the
/// tail); 8-wide accumulators, summed across lanes, then the tail added in order.
@inlinable @inline(__always)
public func vreduce(_ count: Int, _ vector: (Int) -> FloatVector, _ scalar: (Int) -> Float) -> Float {
    var acc = FloatVector()
    var i = 0
    while i + 8 <= count {
        acc += vector(i)
        i += 8
    }
    var s = acc.sum()
    while i < count { s += scalar(i); i += 1 }
    return s
}

/// Sum of `count` floats with 8-wide accumulators.
@inlinable
public func vsum(_ x: UnsafePointer<Float>, _ count: Int) -> Float {
    vreduce(count, { UnsafeRawPointer(x + $0).loadUnaligned(as: FloatVector.self) }, { x[$0] })
}

/// Dot product of two float arrays with 8-wide accumulators.
@inlinable
public func vdot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ count: Int) -> Float {
    vreduce(count, { UnsafeRawPointer(x + $0).loadUnaligned(as: FloatVector.self)
                       * UnsafeRawPointer(y + $0).loadUnaligned(as: FloatVector.self) }, { x[$0] * y[$0] })
}

@inlinable @inline(__always)
func loadV(_ p: UnsafePointer<Float>) -> FloatVector {
    UnsafeRawPointer(p).loadUnaligned(as: FloatVector.self)
}

@inlinable @inline(__always)
func storeV(_ v: FloatVector, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: FloatVector.self)
}
