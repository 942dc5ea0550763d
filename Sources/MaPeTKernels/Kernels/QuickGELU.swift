// QuickGELU, the sigmoid approximation of GELU used by OpenAI's CLIP (Hendrycks & Gimpel 2016, §2):
//   quickgelu(x) = x · σ(1.702 x) = x / (1 + e^(−1.702 x))
//   quickgelu'(x) = σ + 1.702 · x · σ · (1 − σ),   σ = σ(1.702 x).
// `Activation` names the MLP nonlinearity of a transformer block (ALGORITHMS.md §1 exact GELU, §6 QuickGELU).

/// The MLP activation of a transformer block.
public enum Activation: String, Sendable {
    /// Exact erf GELU (timm, open_clip's non-OpenAI configs).
    case gelu
    /// x · σ(1.702 x) (OpenAI CLIP weights).
    case quickGELU = "quick_gelu"
}

/// σ(1.702 x) on 8 lanes; e^(−1.702 x) saturates at e^88 for x ≪ 0, so the result is a clean 0⁺.
@inline(__always)
private func quickSigmoid(_ x: FloatVector) -> FloatVector {
    1 / (1 + vexp(x * -1.702))
}

/// quickgelu'(x) on 8 lanes.
@inline(__always)
private func quickGeluGrad(_ x: FloatVector) -> FloatVector {
    let s = quickSigmoid(x)
    return s + 1.702 * x * s * (1 - s)
}

/// out[n] = quickgelu(input[n]).   input, out [count]
public func quickGeluForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        var i = r.lowerBound
        while i + 8 <= r.upperBound {
            let x = loadV(input + i)
            storeV(x * quickSigmoid(x), out + i)
            i += 8
        }
        while i < r.upperBound {
            let x = FloatVector(repeating: input[i])
            out[i] = (x * quickSigmoid(x))[0]
            i += 1
        }
    }
}

/// dInput[n] += dOut[n] · quickgelu'(input[n]).
public func quickGeluBackward(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                              input: UnsafePointer<Float>, count: Int) {
    accumulateTimesDerivative(dInput: dInput, dOut: dOut, input: input, count: count) { quickGeluGrad($0) }
}

/// dInput[n] += dOut[n] · derivative(input[n]), 8 lanes at a time (the tail lane by lane through
/// the same vector function): the backward of either activation.
@inline(__always)
func accumulateTimesDerivative(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                               input: UnsafePointer<Float>, count: Int,
                               _ derivative: @escaping @Sendable (FloatVector) -> FloatVector) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, input = input
    Parallel.forRanges(count, grain: 1 << 14) { r in
        var i = r.lowerBound
        while i + 8 <= r.upperBound {
            storeV(loadV(dInput + i) + loadV(dOut + i) * derivative(loadV(input + i)), dInput + i)
            i += 8
        }
        while i < r.upperBound {
            dInput[i] += dOut[i] * derivative(FloatVector(repeating: input[i]))[0]
            i += 1
        }
    }
}

/// out = activation(input), dispatching on the block's choice.
@inline(__always)
public func activationForward(_ activation: Activation, out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>, count: Int) {
    switch activation {
    case .gelu: geluForward(out: out, input: input, count: count)
    case .quickGELU: quickGeluForward(out: out, input: input, count: count)
    }
}

/// dInput += dOut · activation'(input).
@inline(__always)
public func activationBackward(_ activation: Activation, dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                               input: UnsafePointer<Float>, count: Int) {
    switch activation {
    case .gelu: geluBackward(dInput: dInput, dOut: dOut, input: input, count: count)
    case .quickGELU: quickGeluBackward(dInput: dInput, dOut: dOut, input: input, count: count)
    }
}
