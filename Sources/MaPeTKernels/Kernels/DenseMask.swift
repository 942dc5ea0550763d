// A may-attend rule read from a dense boolean table [B, M, Nk] (nonzero = may attend).
// For tests and one-off experiments; models compute their rules instead of storing them.

public struct DenseAttentionMask: AttentionMask, @unchecked Sendable {
    public let allowed: UnsafePointer<Int32>
    public let M: Int, Nk: Int

    public init(allowed: UnsafePointer<Int32>, M: Int, Nk: Int) {
        self.allowed = allowed; self.M = M; self.Nk = Nk
    }

    @inlinable public func allows(batch: Int, query: Int, key: Int) -> Bool {
        allowed[(batch * M + query) * Nk + key] != 0
    }
}
