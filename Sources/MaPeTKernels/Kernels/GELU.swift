#if canImport(Glibc)
import Glibc
#endif

// GELU, exact erf form (Hendrycks & Gimpel 2016):  gelu(x) = x · Φ(x) = ½ x (1 + erf(x / √2)).

/// out[n] = gelu(input[n]), 8 lanes at a time with the vector erf (|error| ≤ 1.5·10⁻⁷·|x|/2).
public func geluForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
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
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        var i = r.lowerBound
        while i + 8 <= r.upperBound {
            storeV(loadV(dInput + i) + loadV(dOut + i) * grad(loadV(input + i)), dInput + i)
            i += 8
        }
        while i < r.upperBound {
            dInput[i] += dOut[i] * grad(FloatVector(repeating: input[i]))[0]
            i += 1
        }
    }
}

/// gelu'(x) = Φ(x) + x · φ(x) on 8 lanes.
@inline(__always)
private func grad(_ x: FloatVector) -> FloatVector {
    0.5 * (1 + verf(x * 0.70710678118654752)) + x * vexp(-0.5 * x * x) * 0.39894228040143268
}

/// Reference: out[n] = gelu(input[n]) with libm erff.
public func geluForwardNaive(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        for i in r {
            let x = input[i]
            out[i] = 0.5 * x * (1 + erff(x * 0.70710678118654752))
        }
    }
}

/// Reference: dInput[n] += dOut[n] · gelu'(input[n]),  gelu'(x) = Φ(x) + x · φ(x), with libm.
public func geluBackwardNaive(
    dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
    input: UnsafePointer<Float>, count: Int
) {
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        for i in r {
            let x = input[i]
            let cdf = 0.5 * (1 + erff(x * 0.70710678118654752))
            let pdf = expf(-0.5 * x * x) * 0.39894228040143268
            dInput[i] += dOut[i] * (cdf + x * pdf)
        }
    }
}
