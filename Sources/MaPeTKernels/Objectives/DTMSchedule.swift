// The random morphing schedule of Dynamic Token Morphing (Kim et al., "Morphing Tokens Draw
// Strong Masked Image Models", ALGORITHMS.md §5), as the reference training loop draws it
// (naver-ai/dtm, engines/engine_for_dtm.py):
//   for each of the L = 2 schedules, in this order: n̄₁ ~ U{0..n₁}, n̄₂ ~ U{0..n₂},
//   then k₁ ~ U{1..k₁max}, k₂ ~ U{1..k₂max}   (Python random.randint, inclusive),
//   r_l = ⌈n̄_l / k_l⌉, unless ⌈n̄_l / k_l⌉ · k_l exceeds the budget bound n₁, then ⌊n̄_l / k_l⌋.
// The reference compares against n₁ for every schedule (n₁ = n₂ = 196 by default, so the
// quirk never shows); we keep one bound `maxBudget` for all schedules, which is the same rule.
// Defaults there: n₁ = n₂ = 196 (the number of patch tokens, CLS stripped), k₁ = k₂ = 14.

/// One drawn schedule: merge `mergesPerIteration` pairs in each of `iterations` rounds.
public struct DTMScheduleEntry: Sendable, Equatable {
    /// n̄: the total token budget drawn (number of tokens to remove, before rounding).
    public let tokenBudget: Int
    /// k: the number of bipartite matching rounds.
    public let iterations: Int
    /// r: the merges per round derived from n̄ and k.
    public let mergesPerIteration: Int
}

/// r from n̄ and k with the reference's rounding rule (never more than `maxBudget` in total).
public func dtmMergesPerIteration(tokenBudget: Int, iterations: Int, maxBudget: Int) -> Int {
    precondition(iterations >= 1 && tokenBudget >= 0, "dtmMergesPerIteration: k ≥ 1, n̄ ≥ 0")
    let up = (tokenBudget + iterations - 1) / iterations
    return up * iterations > maxBudget ? tokenBudget / iterations : up
}

/// The seeded stream of DTM schedules, one `draw` per training step.
public final class DTMSchedule: @unchecked Sendable {
    public private(set) var rng: ObjectiveRNG
    public let seed: UInt64

    public init(seed: UInt64) {
        self.seed = seed
        rng = ObjectiveRNG(seed: seed)
    }

    /// Draws `count` schedules (L). Budgets come first, then iteration counts, as in the
    /// reference, so L = 2 consumes four bounded draws per step.
    public func draw(maxBudget: Int, maxIterations: Int = 14, count: Int = 2) -> [DTMScheduleEntry] {
        precondition(maxBudget >= 0 && maxIterations >= 1 && count >= 0)
        var budgets: [Int] = [], iters: [Int] = []
        for _ in 0..<count { budgets.append(rng.integer(0, maxBudget)) }
        for _ in 0..<count { iters.append(rng.integer(1, maxIterations)) }
        return (0..<count).map { l in
            DTMScheduleEntry(
                tokenBudget: budgets[l], iterations: iters[l],
                mergesPerIteration: dtmMergesPerIteration(
                    tokenBudget: budgets[l], iterations: iters[l], maxBudget: maxBudget))
        }
    }
}
