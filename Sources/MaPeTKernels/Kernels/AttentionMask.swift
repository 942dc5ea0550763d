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
}

extension AttentionMask {
    @inlinable public func anyAllowed(batch: Int, queries: Range<Int>, keys: Range<Int>) -> Bool { true }
    @inlinable public var isFull: Bool { false }
}

/// Every query attends every key (the ViT encoder).
public struct FullAttention: AttentionMask {
    public init() {}
    @inlinable public func allows(batch: Int, query: Int, key: Int) -> Bool { true }
    @inlinable public var isFull: Bool { true }
}
