// The DTM loss (ALGORITHMS.md §5; naver-ai/dtm engines/engine_for_dtm.py): for each of L morphing
// schedules, both predictions and targets are replaced by their group means and compared at
// every one of the N positions with smooth-L1, averaged; then the mean over schedules.
//   pred, target [B, N, D];  membership [L, B, N] (group id of each token, any ids in 0..<N)
//   mean_g(x) = Σ_{i∈g} x_i / (|g| + 1e-6)        (the reference's S·x / (S.sum(-1) + 1e-6))
//   loss = 1/L Σ_l 1/(B·N·D) Σ_{b,i,c} ℓ_β(mean_{g(i)}(pred) − mean_{g(i)}(target))
//   ℓ_β(u) = ½u²/β if |u| < β else |u| − ½β      (torch smooth_l1_loss, β = 2 in DTM)
// Group means are linear, so the difference of the means is the mean of pred − target per
// group; every member position of a group carries the same value, hence |g| · ℓ per group.
// Accumulation is in Double: the loss feeds finite-difference checks and a 6M-term sum.

/// The reference's denominator guard in the group mean.
public let dtmGroupMeanEpsilon: Double = 1e-6

@inline(__always)
func smoothL1(_ u: Double, beta: Double) -> Double {
    let a = abs(u)
    return a < beta ? 0.5 * u * u / beta : a - 0.5 * beta
}

@inline(__always)
func smoothL1Derivative(_ u: Double, beta: Double) -> Double {
    abs(u) < beta ? u / beta : (u > 0 ? 1 : -1)
}

/// Per-group sums of pred − target and group sizes for one (schedule, sample).
private func groupDifferences(
    _ diff: inout [Double], _ count: inout [Double],
    pred: UnsafePointer<Float>, target: UnsafePointer<Float>, groups: UnsafePointer<Int32>, N: Int, D: Int
) {
    for k in 0..<(N * D) { diff[k] = 0 }
    for g in 0..<N { count[g] = 0 }
    for i in 0..<N {
        let g = Int(groups[i])
        count[g] += 1
        for c in 0..<D { diff[g * D + c] += Double(pred[i * D + c]) - Double(target[i * D + c]) }
    }
}

/// Returns the DTM loss.
public func dtmLossForward(
    pred: UnsafePointer<Float>, target: UnsafePointer<Float>, membership: UnsafePointer<Int32>,
    L: Int, B: Int, N: Int, D: Int, beta: Double = 2
) -> Double {
    if L == 0 || B == 0 || N == 0 || D == 0 { return 0 }
    nonisolated(unsafe) let pred = pred, target = target, membership = membership
    let partial = UnsafeMutablePointer<Double>.allocate(capacity: B)
    defer { partial.deallocate() }
    nonisolated(unsafe) let part = partial
    Parallel.forEach(B) { b in
        var diff = [Double](repeating: 0, count: N * D), count = [Double](repeating: 0, count: N)
        var total: Double = 0
        for l in 0..<L {
            groupDifferences(&diff, &count, pred: pred + b * N * D, target: target + b * N * D,
                             groups: membership + (l * B + b) * N, N: N, D: D)
            for g in 0..<N where count[g] > 0 {
                let inv = 1 / (count[g] + dtmGroupMeanEpsilon)
                var s: Double = 0
                for c in 0..<D { s += smoothL1(diff[g * D + c] * inv, beta: beta) }
                total += count[g] * s
            }
        }
        part[b] = total
    }
    var sum: Double = 0
    for b in 0..<B { sum += partial[b] }   // fixed order: independent of the thread count
    return sum / Double(L * B * N * D)
}

/// dPred += dLoss · ∂loss/∂pred.  A token j of group g receives
///   Σ_{i∈g} ∂ℓ/∂mean_i · 1/(|g|+ε) = |g|/(|g|+ε) · ℓ'_β(mean diff of g) · dLoss/(L·B·N·D).
public func dtmLossBackward(
    dPred: UnsafeMutablePointer<Float>, dLoss: Double,
    pred: UnsafePointer<Float>, target: UnsafePointer<Float>, membership: UnsafePointer<Int32>,
    L: Int, B: Int, N: Int, D: Int, beta: Double = 2
) {
    if L == 0 || B == 0 || N == 0 || D == 0 { return }
    let scale = dLoss / Double(L * B * N * D)
    nonisolated(unsafe) let dPred = dPred, pred = pred, target = target, membership = membership
    Parallel.forEach(B) { b in
        var diff = [Double](repeating: 0, count: N * D), count = [Double](repeating: 0, count: N)
        var grad = [Double](repeating: 0, count: N * D)
        let groupsBase = membership + b * N
        for l in 0..<L {
            let groups = groupsBase + l * B * N
            groupDifferences(&diff, &count, pred: pred + b * N * D, target: target + b * N * D,
                             groups: groups, N: N, D: D)
            // Per-group gradient, in place of the group sums.
            for g in 0..<N where count[g] > 0 {
                let inv = 1 / (count[g] + dtmGroupMeanEpsilon)
                for c in 0..<D {
                    diff[g * D + c] = scale * count[g] * inv * smoothL1Derivative(diff[g * D + c] * inv, beta: beta)
                }
            }
            for i in 0..<N {
                let g = Int(groups[i])
                for c in 0..<D { grad[i * D + c] += diff[g * D + c] }
            }
        }
        let out = dPred + b * N * D
        for k in 0..<(N * D) { out[k] += Float(grad[k]) }
    }
}
