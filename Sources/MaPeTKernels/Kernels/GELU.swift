#if canImport(Glibc)
import Glibc
#endif

// GELU, exact erf form (Hendrycks & Gimpel 2016):  gelu(x) = x · Φ(x) = ½ x (1 + erf(x / √2)).

/// out[n] = gelu(input[n])
public func geluForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        for i in r {
            let x = input[i]
            out[i] = 0.5 * x * (1 + erff(x * 0.70710678118654752))
        }
    }
}

/// dInput[n] += dOut[n] · gelu'(input[n]),  gelu'(x) = Φ(x) + x · φ(x).
public func geluBackward(
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
