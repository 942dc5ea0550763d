// Stochastic depth (Huang et al. 2016) as in timm's `drop_path`: each sample's residual branch
// is kept with probability 1 − rate and scaled by 1/(1 − rate) when kept.
//   keep [B] ∈ {0, 1/(1−rate)},   out [B, R] = keep[b] · input[b],   dInput += keep[b] · dOut.

/// Draws the per-sample scales. rate 0 → all ones.
public func dropPathKeep(keep: UnsafeMutablePointer<Float>, B: Int, rate: Float, rng: inout Xoshiro256StarStar) {
    precondition(rate >= 0 && rate < 1, "drop path rate must be in [0, 1)")
    for b in 0..<B {
        keep[b] = rate == 0 ? 1 : (rng.uniform() >= Double(rate) ? 1 / (1 - rate) : 0)
    }
}

public func dropPathForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                            keep: UnsafePointer<Float>, B: Int, rowSize R: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, input = input, keep = keep
    Parallel.forEach(B) { b in
        let s = keep[b]
        for j in 0..<R { out[b * R + j] = s * input[b * R + j] }
    }
}

public func dropPathBackward(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                             keep: UnsafePointer<Float>, B: Int, rowSize R: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, keep = keep
    Parallel.forEach(B) { b in
        let s = keep[b]
        if s == 0 { return }
        for j in 0..<R { dInput[b * R + j] += s * dOut[b * R + j] }
    }
}
