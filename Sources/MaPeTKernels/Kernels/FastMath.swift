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
    let input = x
    var x = x.clamped(lowerBound: lo, upperBound: hi)
    let n = (x * 1.44269504088896341).rounded(.toNearestOrEven)
    x = x - n * 0.693359375
    x = x + n * 2.12194440e-4
    var p = FloatVector(repeating: 1.9875691500e-4)
    p = p * x + 1.3981999507e-3
    p = p * x + 8.3334519073e-3
    p = p * x + 4.1665795894e-2
    p = p * x + 1.6666665459e-1
    p = p * x + 5.0000001201e-1
    p = p * (x * x) + x + 1
    let e = (SIMD8<Int32>(n, rounding: .towardZero) &+ 127) &<< 23
    // Exact zero below the range (masked logits are −∞).
    return (p * unsafeBitCast(e, to: FloatVector.self)).replacing(with: 0, where: input .< lo)
}

/// Scalar exp through the same polynomial (tails of vector loops agree with their bodies).
@inlinable @inline(__always)
public func sexp(_ x: Float) -> Float {
    vexp(FloatVector(repeating: x))[0]
}

/// Sum of `count` floats with 8-wide accumulators.
@inlinable
public func vsum(_ x: UnsafePointer<Float>, _ count: Int) -> Float {
    var acc = FloatVector()
    var i = 0
    while i + 8 <= count {
        acc += UnsafeRawPointer(x + i).loadUnaligned(as: FloatVector.self)
        i += 8
    }
    var s = acc.sum()
    while i < count { s += x[i]; i += 1 }
    return s
}

/// Dot product of two float arrays with 8-wide accumulators.
@inlinable
public func vdot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ count: Int) -> Float {
    var acc = FloatVector()
    var i = 0
    while i + 8 <= count {
        acc += UnsafeRawPointer(x + i).loadUnaligned(as: FloatVector.self)
            * UnsafeRawPointer(y + i).loadUnaligned(as: FloatVector.self)
        i += 8
    }
    var s = acc.sum()
    while i < count { s += x[i] * y[i]; i += 1 }
    return s
}

@inlinable @inline(__always)
func loadV(_ p: UnsafePointer<Float>) -> FloatVector {
    UnsafeRawPointer(p).loadUnaligned(as: FloatVector.self)
}

@inlinable @inline(__always)
func storeV(_ v: FloatVector, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: FloatVector.self)
}
