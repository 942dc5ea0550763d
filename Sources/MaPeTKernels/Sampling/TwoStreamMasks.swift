// The MaPeT may-attend rules (ALGORITHMS.md §2) decided in O(1) per pair from the rank tables of a
// PermutationBatch; no dense per-sample masks exist on the training path.
//
// Index spaces (N tokens, P predicted, L = least_number, rank(·) from the batch):
//   content rows/keys: 0..<N are the tokens, N + j is the auxiliary positional token m_j of p_j
//   query rows:        i is predicted token p_i (ascending token order)
// Rules, simplified with "ranks are distinct" and "rank(p_j) ≥ L":
//   content token r → token c      rank(c) < L  or  rank(c) ≤ rank(r)   (≤ includes c = r)
//   content token r → m_j          rank(p_j) > rank(r)                  (= r may not see p_j)
//   content m_i     → token c      rank(c) < L
//   content m_i     → m_j          always
//   query p_i       → token c      rank(c) < rank(p_i)                  (context has rank < L ≤ rank(p_i))
//   query p_i       → m_j          rank(p_j) ≥ rank(p_i)
// Without auxiliary positional tokens (PIM) the keys stop at N and the token rules are unchanged.

/// Content-stream mask: rows and keys are the N tokens followed (with positional tokens) by
/// the P auxiliary positional tokens.
public struct TwoStreamContentMask: AttentionMask, @unchecked Sendable {
    public let batch: PermutationBatch
    public let positionalTokens: Bool
    @usableFromInline let ranks: UnsafePointer<Int64>
    @usableFromInline let predictedRanks: UnsafePointer<Int64>
    @usableFromInline let N: Int, P: Int, L: Int64

    public init(_ batch: PermutationBatch, positionalTokens: Bool = true) {
        self.batch = batch
        self.positionalTokens = positionalTokens
        ranks = UnsafePointer(batch.ranksPointer)
        predictedRanks = UnsafePointer(batch.predictedRanksPointer)
        (N, P, L) = (batch.tokens, batch.predictedCount, Int64(batch.leastNumber))
    }

    /// N + P with positional tokens, else N.
    public var rows: Int { positionalTokens ? N + P : N }
    public var keys: Int { rows }

    @inlinable public func allows(batch b: Int, query r: Int, key c: Int) -> Bool {
        let rk = ranks + b * N
        if r < N {
            if c < N {
                let rc = rk[c]
                return rc < L || rc <= rk[r]
            }
            return predictedRanks[b * P + c - N] > rk[r]
        }
        return c >= N || rk[c] < L
    }

    /// Exact, from the extreme ranks of the two ranges: O(|queries| + |keys|).
    @inlinable public func anyAllowed(batch b: Int, queries: Range<Int>, keys: Range<Int>) -> Bool {
        if queries.isEmpty || keys.isEmpty { return false }
        let rk = ranks + b * N, pr = predictedRanks + b * P
        let tokenRows = queries.clamped(to: 0..<N), markerRows = queries.clamped(to: N..<(N + P))
        let tokenKeys = keys.clamped(to: 0..<N), markerKeys = keys.clamped(to: N..<(N + P))
        if !markerRows.isEmpty && !markerKeys.isEmpty { return true }
        var minKeyRank = Int64.max
        for c in tokenKeys { minKeyRank = min(minKeyRank, rk[c]) }
        if !markerRows.isEmpty && minKeyRank < L { return true }
        if tokenRows.isEmpty { return false }
        var minRowRank = Int64.max, maxRowRank = Int64.min
        for r in tokenRows { minRowRank = min(minRowRank, rk[r]); maxRowRank = max(maxRowRank, rk[r]) }
        if !tokenKeys.isEmpty && (minKeyRank < L || minKeyRank <= maxRowRank) { return true }
        var maxMarkerRank = Int64.min
        for c in markerKeys { maxMarkerRank = max(maxMarkerRank, pr[c - N]) }
        return maxMarkerRank > minRowRank
    }
}

/// Query-stream mask: row i is predicted token p_i; keys as in the content stream.
public struct TwoStreamQueryMask: AttentionMask, @unchecked Sendable {
    public let batch: PermutationBatch
    public let positionalTokens: Bool
    @usableFromInline let ranks: UnsafePointer<Int64>
    @usableFromInline let predictedRanks: UnsafePointer<Int64>
    @usableFromInline let N: Int, P: Int

    public init(_ batch: PermutationBatch, positionalTokens: Bool = true) {
        self.batch = batch
        self.positionalTokens = positionalTokens
        ranks = UnsafePointer(batch.ranksPointer)
        predictedRanks = UnsafePointer(batch.predictedRanksPointer)
        (N, P) = (batch.tokens, batch.predictedCount)
    }

    public var rows: Int { P }
    public var keys: Int { positionalTokens ? N + P : N }

    @inlinable public func allows(batch b: Int, query i: Int, key c: Int) -> Bool {
        let rq = predictedRanks[b * P + i]
        if c < N { return ranks[b * N + c] < rq }
        return predictedRanks[b * P + c - N] >= rq
    }

    /// Exact, from the extreme ranks of the two ranges: O(|queries| + |keys|).
    @inlinable public func anyAllowed(batch b: Int, queries: Range<Int>, keys: Range<Int>) -> Bool {
        let rows = queries.clamped(to: 0..<P)
        if rows.isEmpty || keys.isEmpty { return false }
        let rk = ranks + b * N, pr = predictedRanks + b * P
        var minRowRank = Int64.max, maxRowRank = Int64.min
        for i in rows { minRowRank = min(minRowRank, pr[i]); maxRowRank = max(maxRowRank, pr[i]) }
        for c in keys.clamped(to: 0..<N) where rk[c] < maxRowRank { return true }
        for c in keys.clamped(to: N..<(N + P)) where pr[c - N] >= minRowRank { return true }
        return false
    }
}

/// out[r, c] = mask.allows(batch, r, c) as 0/1 for r < rows, c < keys (inspection and tests;
/// the models never call this).
public func denseMask<M: AttentionMask>(_ mask: M, batch: Int, rows: Int, keys: Int, out: UnsafeMutablePointer<Int32>) {
    for r in 0..<rows {
        for c in 0..<keys { out[r * keys + c] = mask.allows(batch: batch, query: r, key: c) ? 1 : 0 }
    }
}

/// The MaPeT may-attend rules with rows and keys in permutation-rank order, as key intervals
/// (the same for every sample). Content rows/keys: the N tokens by rank (row s is token
/// orders[b, s], of rank s), then with positional tokens the P auxiliary tokens m in the rank
/// order of their predicted tokens (the j-th has rank L + j); query row i: the predicted token
/// of rank L + i. Sorted so, "rank(c) < L or rank(c) ≤ rank(r)" is "c < L or c ≤ r" and every
/// row's keys are a prefix of the tokens and a suffix of the m's:
///   content token s   tokens [0, max(s + 1, L))   m's [max(0, s − L + 1), P)
///   content m_i       tokens [0, L)               m's [0, P)
///   query i           tokens [0, L + i)           m's [i, P)
/// Without positional tokens (PIM) the keys are the N tokens only (split = N = Nk).
/// content*: N + P rows (N without positional tokens); query*: P rows.
public func fillRankOrderIntervals(N: Int, L: Int, positionalTokens: Bool,
                                   contentPrefix: UnsafeMutablePointer<Int32>, contentSuffix: UnsafeMutablePointer<Int32>,
                                   queryPrefix: UnsafeMutablePointer<Int32>, querySuffix: UnsafeMutablePointer<Int32>) {
    let P = N - L
    for s in 0..<N {
        contentPrefix[s] = Int32(max(s + 1, L))
        contentSuffix[s] = positionalTokens ? Int32(max(0, s - L + 1)) : 0
    }
    if positionalTokens {
        for i in 0..<P { contentPrefix[N + i] = Int32(L); contentSuffix[N + i] = 0 }
    }
    for i in 0..<P {
        queryPrefix[i] = Int32(L + i)
        querySuffix[i] = positionalTokens ? Int32(i) : 0
    }
}
