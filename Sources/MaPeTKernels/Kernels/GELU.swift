import CBF16
#if canImport(Glibc)
import Glibc
#endif

// GELU, exact erf form (Hendrycks & Gimpel 2016):  gelu(x) = x · Φ(x) = ½ x (1 + erf(x / √2)).
// The forwards run 16 lanes wide in C where the CPU has AVX-512 (CBF16/elementwise.c: the same
// operations in the same order, so the same bits as the 8-lane Swift code below).

/// out[n] = gelu(input[n]), 8 lanes at a time with the vector erf (|error| ≤ 1.5·10⁻⁷·|x|/2).
public func geluForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        if BF16.isNative { mapet_avx512_gelu(out + r.lowerBound, input + r.lowerBound, r.count); return }
        var i = r.lowerBound
        while i + 8 <= r.upperBound {
            let x = loadV(input + i)
            storeV(0.5 * x * (1 + verf(x * 0.70710678118654752)), out + i)
            i += 8
        }
        while i < r.upperBound {
            let x = FloatVector(repeating: input[i])
            out[i] = (0.5 * x * (1 + verf(x * 0.70710678118654752)))[0]
            i += 1
        }
    }
}

/// dInput[n] += dOut[n] · gelu'(input[n]), vectorised as `geluForward`.
public func geluBackward(
    dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
    input: UnsafePointer<Float>, count: Int
) {
    accumulateTimesDerivative(dInput: dInput, dOut: dOut, input: input, count: count) { grad($0) }
}

/// out[n] = gelu(x[n]) and x[n] replaced by gelu'(x[n]): what the backward needs, so that it is
/// one product per element (taken in the next linear layer's backward GEMM, `linearBackward`'s
/// `dInputScale`) and the pre-activation need not be kept. Values
/// are those of `geluForward` and of the derivative `geluBackward` uses.
public func geluForwardKeepingDerivative(out: UnsafeMutablePointer<Float>, inputThenDerivative x: UnsafeMutablePointer<Float>,
                                         count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, x = x
    Parallel.forRanges(count, grain: 1 << 14) { r in
        if BF16.isNative { mapet_avx512_gelu_keep_derivative(out + r.lowerBound, x + r.lowerBound, r.count); return }
        var i = r.lowerBound
        while i + 8 <= r.upperBound {
            let (y, d) = geluAndGrad(loadV(x + i))
            storeV(y, out + i); storeV(d, x + i)
            i += 8
        }
        while i < r.upperBound {
            let (y, d) = geluAndGrad(FloatVector(repeating: x[i]))
            out[i] = y[0]; x[i] = d[0]
            i += 1
        }
    }
}

/// gelu'(x) = Φ(x) + x · φ(x) on 8 lanes.
@inline(__always)
private func grad(_ x: FloatVector) -> FloatVector { geluAndGrad(x).grad }

/// gelu(x) = ½x(1 + erf(x/√2)) and gelu'(x) = Φ(x) + x · φ(x) on 8 lanes; erf(x/√2) is built from
/// e^(−x²/2) = √(2π)·φ(x), so one exp serves both terms. `geluForward` computes the same value
/// through `verf` (the same erf), so both forwards give the same bits.
@inline(__always)
private func geluAndGrad(_ x: FloatVector) -> (value: FloatVector, grad: FloatVector) {
    let (erf, gauss) = verfAndGauss(x * 0.70710678118654752)
    return (0.5 * x * (1 + erf), 0.5 * (1 + erf) + x * gauss * 0.39894228040143268)
}
