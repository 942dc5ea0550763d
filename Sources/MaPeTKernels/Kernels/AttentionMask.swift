/// A "may attend" rule for multi-head attention with rectangular query/key sets.
///
/// Attention asks the rule per (sample, query row, key column) instead of reading a dense
/// B×H×M×N float mask, so MaPeT can decide from permutation ranks in O(1) per pair.
/// The same rule applies to every head. Every query row must be allowed at least one key.
public protocol AttentionMask: Sendable {
    /// True when query row `query` of sample `batch` may attend key column `key`.
    func allows(batch: Int, query: Int, key: Int) -> Bool

    /// Optional block skipping: false only if *no* query in `queries` may attend *any* key
    /// in `keys` for this sample. The default (always true) is always correct.
    func anyAllowed(batch: Int, queries: Range<Int>, keys: Range<Int>) -> Bool

    /// True when every pair is allowed (lets attention take the unmasked fast path).
    var isFull: Bool { get }

    /// Optional precomputed form: the row of additive score biases (0 = may attend, −∞ = may
    /// not) of `query` in sample `batch`, `Nk` floats; the rows of one sample follow each other
    /// `Nk` floats apart (the fused bf16 attention reads them from the first). nil (the
    /// default): attention asks `allows`.
    func scoreBias(batch: Int, query: Int) -> UnsafePointer<Float>?

    /// Optional interval form, the same for every sample (see `KeyIntervals`); nil (the
    /// default): attention asks `scoreBias` or `allows`.
    var keyIntervals: KeyIntervals? { get }
}

extension AttentionMask {
    @inlinable public func anyAllowed(batch: Int, queries: Range<Int>, keys: Range<Int>) -> Bool { true }
    @inlinable public var isFull: Bool { false }
    @inlinable public func scoreBias(batch: Int, query: Int) -> UnsafePointer<Float>? { nil }
    @inlinable public var keyIntervals: KeyIntervals? { nil }
}

/// Keys in two sections, [0, split) and [split, Nk): query row i (of every sample) may attend
/// the prefix [0, prefixEnd[i]) of the first and the suffix [split + suffixStart[i], Nk) of
/// the second. A two-stream model whose rows and keys are in permutation-rank order has
/// exactly this rule (`rankOrderIntervals`); the fused bf16 attention then skips the blocks of
/// scores that no row of a strip may attend. The caller owns the two arrays.
public struct KeyIntervals: @unchecked Sendable {
    public let split: Int
    public let prefixEnd: UnsafePointer<Int32>
    public let suffixStart: UnsafePointer<Int32>

    public init(split: Int, prefixEnd: UnsafePointer<Int32>, suffixStart: UnsafePointer<Int32>) {
        self.split = split; self.prefixEnd = prefixEnd; self.suffixStart = suffixStart
    }

    @inlinable public func allows(query i: Int, key j: Int) -> Bool {
        j < Int(prefixEnd[i]) || j >= split + Int(suffixStart[i])
    }
}

/// The rule of a `KeyIntervals`, as a mask.
public struct IntervalMask: AttentionMask {
    public let intervals: KeyIntervals
    public init(_ intervals: KeyIntervals) { self.intervals = intervals }
    @inlinable public func allows(batch: Int, query: Int, key: Int) -> Bool { intervals.allows(query: query, key: key) }
    @inlinable public var keyIntervals: KeyIntervals? { intervals }
}

/// Every query attends every key (the ViT encoder).
public struct FullAttention: AttentionMask {
    public init() {}
    @inlinable public func allows(batch: Int, query: Int, key: Int) -> Bool { true }
    @inlinable public var isFull: Bool { true }
}

/// A rule given as additive score biases [B, M, Nk] (0 or −∞), read by every head that uses
/// it (`mapet.ops.attention`'s dense masks come this way). The caller owns `bias`; any rule can
/// be written into it with `fillScoreBias`.
public struct ScoreBiasMask: AttentionMask, @unchecked Sendable {
    public let bias: UnsafePointer<Float>
    public let M: Int, Nk: Int

    public init(bias: UnsafePointer<Float>, M: Int, Nk: Int) {
        self.bias = bias; self.M = M; self.Nk = Nk
    }

    @inlinable public func allows(batch: Int, query: Int, key: Int) -> Bool {
        bias[(batch * M + query) * Nk + key] == 0
    }

    @inlinable public func scoreBias(batch: Int, query: Int) -> UnsafePointer<Float>? {
        bias + (batch * M + query) * Nk
    }
}

/// bias[b, i, j] = 0 where `mask` allows (b, i, j), else −∞, for b < B, i < M, j < Nk.
public func fillScoreBias<Mask: AttentionMask>(_ mask: Mask, B: Int, M: Int, Nk: Int, bias: UnsafeMutablePointer<Float>) {
    nonisolated(unsafe) let bias = bias
    Parallel.forRanges(B * M, grain: max(1, 4096 / max(Nk, 1))) { rows in
        for row in rows {
            let b = row / M, i = row % M, out = bias + row * Nk
            for j in 0..<Nk { out[j] = mask.allows(batch: b, query: i, key: j) ? 0 : -.infinity }
        }
    }
}
