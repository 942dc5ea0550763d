// The seeded generator behind the objectives' random choices (the DTM schedule, the CCViT
// replaced patches). SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
// number generators"; the constants are those of Vigna's public-domain splitmix64.c):
//   state += 0x9E3779B97F4A7C15;  z = state;
//   z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) · 0x94D049BB133111EB;
//   return z ^ (z >> 31)
// Bounded integers use rejection on the low bits (no modulo bias), so a draw sequence is a
// pure function of the seed and can be re-implemented in a few lines of Python.

/// SplitMix64 with an unbiased bounded draw. A value type: copying it forks the stream.
public struct ObjectiveRNG: Sendable {
    public private(set) var state: UInt64

    public init(seed: UInt64) { state = seed }

    /// An independent stream per (seed, stream) pair: stream `s` starts from the SplitMix64
    /// output of `seed + s` so neighbouring streams do not overlap in practice.
    public init(seed: UInt64, stream: UInt64) {
        var mixer = ObjectiveRNG(seed: seed &+ stream &* 0xD1B54A32D192ED03)
        state = mixer.next()
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform integer in 0..<bound (bound ≥ 1): draws `next() % bound` and rejects the
    /// top partial block of 2⁶⁴ so every value has the same probability.
    public mutating func below(_ bound: Int) -> Int {
        precondition(bound >= 1, "ObjectiveRNG.below: bound must be ≥ 1")
        let b = UInt64(bound)
        let limit = UInt64.max - (UInt64.max % b)   // accept x < limit (a multiple of b)
        while true {
            let x = next()
            if x < limit { return Int(x % b) }
        }
    }

    /// Uniform integer in lo...hi (inclusive, like Python's random.randint).
    public mutating func integer(_ lo: Int, _ hi: Int) -> Int {
        precondition(hi >= lo, "ObjectiveRNG.integer: empty range")
        return lo + below(hi - lo + 1)
    }
}
