// One batch of MaPeT permutations and the tables every may-attend decision reads
// (ALGORITHMS.md §2). Sequence positions: 0 = class token, 1..n = patches, N = n + 1 tokens.
//
//   orders          [B, N]  orders[b, k] = the token at permutation index k (orders[b, 0] = 0)
//   ranks           [B, N]  ranks[b, t]  = k with orders[b, k] = t (the inverse permutation)
//   predicted       [B, P]  the tokens with rank ≥ L, ascending (P = N − L)
//   predictedRanks  [B, P]  ranks[b, predicted[b, j]]
//
// Context C = {t : rank(t) < L}. A predicted token counts in the loss when its rank is
// ≤ upperLimit (the reference's `upper_limit`; ranks count the class token as 0).

/// Why user-supplied orders were rejected (row = sample index).
public enum PermutationError: Error, Equatable, Sendable {
    case classTokenNotFirst(row: Int, found: Int64)
    case outOfRange(row: Int, position: Int, value: Int64)
    case duplicate(row: Int, value: Int64, first: Int, second: Int)

    public var message: String {
        switch self {
        case let .classTokenNotFirst(row, found):
            return "row \(row): expected the class token 0 at position 0, got \(found)"
        case let .outOfRange(row, position, value):
            return "row \(row): value \(value) at position \(position) is not a token index (expected 0..<N)"
        case let .duplicate(row, value, first, second):
            return "row \(row): token \(value) appears twice (positions \(first) and \(second)); each row must be a permutation"
        }
    }
}

public final class PermutationBatch: @unchecked Sendable {
    public let batchSize: Int
    /// N = num_patches + 1.
    public let tokens: Int
    /// L = least_number: tokens ranked below L form the context.
    public let leastNumber: Int
    /// P = N − L predicted tokens per sample.
    public let predictedCount: Int
    /// Predicted tokens ranked above this are left out of the loss (nil: none are).
    public let upperLimit: Int?

    public let orders: TensorStorage
    public let ranks: TensorStorage
    public let predicted: TensorStorage
    public let predictedRanks: TensorStorage

    @inlinable public var ordersPointer: UnsafeMutablePointer<Int64> { orders.raw.assumingMemoryBound(to: Int64.self) }
    @inlinable public var ranksPointer: UnsafeMutablePointer<Int64> { ranks.raw.assumingMemoryBound(to: Int64.self) }
    @inlinable public var predictedPointer: UnsafeMutablePointer<Int64> { predicted.raw.assumingMemoryBound(to: Int64.self) }
    @inlinable public var predictedRanksPointer: UnsafeMutablePointer<Int64> {
        predictedRanks.raw.assumingMemoryBound(to: Int64.self)
    }

    /// Number of predicted tokens per sample that count in the loss (the same for every sample:
    /// the ranks L…min(upperLimit, N−1)).
    public var lossCount: Int {
        guard let u = upperLimit else { return predictedCount }
        return max(0, min(u, tokens - 1) - leastNumber + 1)
    }

    /// True when predicted token j of sample b counts in the loss.
    @inlinable public func inLoss(batch b: Int, predicted j: Int) -> Bool {
        guard let u = upperLimit else { return true }
        return predictedRanksPointer[b * predictedCount + j] <= Int64(u)
    }

    /// Allocates the tables (orders uninitialised); nil when memory runs out.
    init?(batchSize B: Int, tokens N: Int, leastNumber L: Int, upperLimit: Int?) {
        precondition(B >= 0 && N >= 2 && L >= 1 && L < N, "invalid permutation batch sizes")
        let P = N - L
        guard let o = TensorStorage(count: B * N, dtype: .int64),
              let r = TensorStorage(count: B * N, dtype: .int64),
              let p = TensorStorage(count: B * P, dtype: .int64),
              let pr = TensorStorage(count: B * P, dtype: .int64) else { return nil }
        (batchSize, tokens, leastNumber, predictedCount, self.upperLimit) = (B, N, L, P, upperLimit)
        (orders, ranks, predicted, predictedRanks) = (o, r, p, pr)
    }

    /// Fills ranks, predicted and predictedRanks from valid orders.
    func deriveTables() {
        let (N, L, P) = (tokens, leastNumber, predictedCount)
        nonisolated(unsafe) let (o, r, p, pr) = (ordersPointer, ranksPointer, predictedPointer, predictedRanksPointer)
        Parallel.forRanges(batchSize, grain: 64) { rows in
            for b in rows {
                let ob = o + b * N, rb = r + b * N
                for k in 0..<N { rb[Int(ob[k])] = Int64(k) }
                var j = 0
                for t in 0..<N where rb[t] >= Int64(L) {
                    p[b * P + j] = Int64(t)
                    pr[b * P + j] = rb[t]
                    j += 1
                }
            }
        }
    }

    /// Draws B permutations: sample b uses stream `firstStream + b` of `seed`. The class token
    /// stays first; patches 1..n are shuffled by Fisher–Yates from the identity
    /// (for i = n−1 down to 1: swap items i and below(i+1), over the n patch slots).
    public static func sample(batchSize B: Int, tokens N: Int, leastNumber L: Int, upperLimit: Int?,
                              seed: UInt64, firstStream: UInt64) -> PermutationBatch? {
        guard let batch = PermutationBatch(batchSize: B, tokens: N, leastNumber: L, upperLimit: upperLimit) else {
            return nil
        }
        nonisolated(unsafe) let o = batch.ordersPointer
        Parallel.forRanges(B, grain: 64) { rows in
            for b in rows {
                var rng = Xoshiro256StarStar(seed: seed, stream: firstStream &+ UInt64(b))
                let ob = o + b * N
                for k in 0..<N { ob[k] = Int64(k) }
                let patches = ob + 1, n = N - 1
                var i = n - 1
                while i > 0 {
                    let j = rng.below(i + 1)
                    let t = patches[i]; patches[i] = patches[j]; patches[j] = t
                    i -= 1
                }
            }
        }
        batch.deriveTables()
        return batch
    }

    /// A batch from user orders [B, N]; validated row by row (the first bad row is reported).
    public static func fromOrders(_ orders: UnsafePointer<Int64>, batchSize B: Int, tokens N: Int, leastNumber L: Int,
                                  upperLimit: Int?) -> Result<PermutationBatch?, PermutationError> {
        if let error = validate(orders, batchSize: B, tokens: N) { return .failure(error) }
        guard let batch = PermutationBatch(batchSize: B, tokens: N, leastNumber: L, upperLimit: upperLimit) else {
            return .success(nil)
        }
        batch.ordersPointer.update(from: orders, count: B * N)
        batch.deriveTables()
        return .success(batch)
    }

    /// The first violation of "each row is a permutation of 0..<N with 0 first", if any.
    public static func validate(_ orders: UnsafePointer<Int64>, batchSize B: Int, tokens N: Int) -> PermutationError? {
        var seenAt = [Int](repeating: -1, count: N)
        for b in 0..<B {
            let ob = orders + b * N
            for k in 0..<N {
                let v = ob[k]
                guard v >= 0 && v < Int64(N) else { return .outOfRange(row: b, position: k, value: v) }
                if seenAt[Int(v)] >= 0 { return .duplicate(row: b, value: v, first: seenAt[Int(v)], second: k) }
                seenAt[Int(v)] = k
            }
            if ob[0] != 0 { return .classTokenNotFirst(row: b, found: ob[0]) }
            for k in 0..<N { seenAt[Int(ob[k])] = -1 }
        }
        return nil
    }
}
