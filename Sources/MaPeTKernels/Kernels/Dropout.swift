// Inverted dropout (Srivastava et al. 2014): each element kept with probability 1 − rate and
// scaled by 1/(1 − rate).  mask [n] ∈ {0, 1/(1−rate)},  out = mask ⊙ input,  dInput += mask ⊙ dOut.

public func dropoutMask(mask: UnsafeMutablePointer<Float>, count: Int, rate: Float, rng: inout Xoshiro256StarStar) {
    precondition(rate >= 0 && rate < 1, "dropout rate must be in [0, 1)")
    let s = 1 / (1 - rate)
    for i in 0..<count { mask[i] = rate == 0 ? 1 : (rng.uniform() >= Double(rate) ? s : 0) }
}

public func dropoutForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                           mask: UnsafePointer<Float>, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, input = input, mask = mask
    Parallel.forRanges(count, grain: 1 << 14) { r in for i in r { out[i] = mask[i] * input[i] } }
}

public func dropoutBackward(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                            mask: UnsafePointer<Float>, count: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, mask = mask
    Parallel.forRanges(count, grain: 1 << 14) { r in for i in r { dInput[i] += mask[i] * dOut[i] } }
}
