// mapet's random generator: xoshiro256** (Blackman & Vigna, "Scrambled linear pseudorandom
// number generators", 2021) seeded through SplitMix64 (Steele, Lea & Flood 2014).
//
// Streams. Every random object a sampler draws (one permutation, one block mask) has a global
// index s = 0, 1, 2, … and its own generator: the xoshiro256** state is outputs 4s, 4s+1, 4s+2,
// 4s+3 of the SplitMix64 sequence started at `seed`. SplitMix64 is counter based (output k is
// mix(seed + (k+1)·γ)), so stream s is reached in O(1) and samples can be drawn in parallel:
// the values depend only on (seed, s), never on the thread count or on how a batch was split.
// A sampler's whole state is therefore (seed, number of samples drawn).
//
// Derived values (all written out so that other implementations can reproduce them):
//   uniform integer in 0..<n   Lemire's multiply-shift with rejection ("Fast random integer
//                              generation in an interval", 2019): m = x·n (128-bit); if
//                              low(m) < n, reject while low(m) < (2⁶⁴ − n) mod n; return high(m).
//   uniform double in [0, 1)   (x >> 11) · 2⁻⁵³.

/// SplitMix64: a 64-bit counter (increment γ = 0x9E3779B97F4A7C15) passed through a bijective mix.
public struct SplitMix64: Sendable {
    public static let gamma: UInt64 = 0x9E37_79B9_7F4A_7C15
    public var state: UInt64

    @inlinable public init(state: UInt64) { self.state = state }

    @inlinable public mutating func next() -> UInt64 {
        state &+= SplitMix64.gamma
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// xoshiro256**: 256-bit state, period 2²⁵⁶ − 1, output rotl(s1·5, 7)·9.
public struct Xoshiro256StarStar: Sendable {
    @usableFromInline var s0, s1, s2, s3: UInt64

    /// A generator with an explicit state (must not be all zero).
    @inlinable public init(state: (UInt64, UInt64, UInt64, UInt64)) {
        (s0, s1, s2, s3) = state
        precondition(s0 | s1 | s2 | s3 != 0, "xoshiro256** state must not be all zero")
    }

    /// The four state words (to carry a generator across calls, e.g. from Python).
    public var state: (UInt64, UInt64, UInt64, UInt64) { (s0, s1, s2, s3) }

    /// The generator of stream `stream` under `seed` (see the file comment). SplitMix64 is a
    /// bijection of its counter, so the four words are never all zero.
    @inlinable public init(seed: UInt64, stream: UInt64) {
        var sm = SplitMix64(state: seed &+ (stream &* 4) &* SplitMix64.gamma)
        s0 = sm.next(); s1 = sm.next(); s2 = sm.next(); s3 = sm.next()
    }

    @inlinable static func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 &- k)) }

    @inlinable public mutating func next() -> UInt64 {
        let result = Xoshiro256StarStar.rotl(s1 &* 5, 7) &* 9
        let t = s1 << 17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = Xoshiro256StarStar.rotl(s3, 45)
        return result
    }

    /// Uniform integer in 0..<n (n ≥ 1), unbiased (Lemire 2019).
    @inlinable public mutating func below(_ n: Int) -> Int {
        let bound = UInt64(n)
        var m = next().multipliedFullWidth(by: bound)
        if m.low < bound {
            let threshold = (0 &- bound) % bound
            while m.low < threshold { m = next().multipliedFullWidth(by: bound) }
        }
        return Int(m.high)
    }

    /// Uniform double in [0, 1) with 53 random bits.
    @inlinable public mutating func uniform() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    /// Uniform double between a and b (a + (b − a)·u, as Python's random.uniform).
    @inlinable public mutating func uniform(_ a: Double, _ b: Double) -> Double {
        a + (b - a) * uniform()
    }
}
