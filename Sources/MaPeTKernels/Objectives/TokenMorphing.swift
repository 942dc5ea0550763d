#if canImport(Glibc)
import Glibc
#endif

// Dynamic Token Morphing, the target side of DTM (ALGORITHMS.md §5): bipartite soft matching (ToMe,
// Bolya et al. 2023) repeated k times on frozen teacher tokens, tracking which original token
// ends up in which group. Semantics matched to naver-ai/dtm (bm/merge.py, engine_for_dtm.py):
//
// One round on t current tokens x [t, D] with sizes s [t]:
//   r' = min(r, (t − protected) / 2)   (protected = 1 when token 0 is protected); r' ≤ 0: stop.
//   x̂ = x / ‖x‖ per token; A = x̂ at even positions 0, 2, 4…; B = x̂ at odd positions 1, 3, 5…
//   score[i, j] = ⟨A_i, B_j⟩; row 0 of the scores is −∞ when token 0 is protected (it sits
//   in A, so it can neither be merged away nor receive a merge: "class_token=True").
//   best[i] = first argmax_j score[i, j]   (torch.max returns the first maximal index).
//   The r' even tokens with the highest best score are merged into their odd match. Ties in
//   the ranking go to the lower even index (torch's argsort is unstable there; we fix the rule).
//   Merged value = size-weighted mean: (Σ s·x) / (Σ s); sizes add. Every row, merged or not,
//   is computed as (s·x)/s like the reference's merge_wavg.
//   New order: the unmerged even tokens in increasing position, then all odd tokens in order.
//   Token 0 therefore stays at position 0 and stays protected in every round.
// Membership: original token o belongs to group pos[o], its row in the final sequence
// (the reference's source matrix S, groups × n, is S[g, o] = [pos[o] == g]).
//
// In the reference DTM training loop the tokens are the 196 patch tokens (CLS stripped), so
// the protected "token 0" is the top-left patch, not a class token; we apply the rule to
// whatever token sits at index 0 of the features given.
// One deliberate difference: a zero feature vector has cosine 0 with everything here (the
// reference divides by its zero norm and produces NaN).

/// Number of groups left after `iterations` rounds of at most `r` merges on `N` tokens.
public func tokenMorphingGroupCount(N: Int, r: Int, iterations: Int, protectFirst: Bool = true) -> Int {
    var t = N
    let protected = protectFirst ? 1 : 0
    for _ in 0..<max(iterations, 0) {
        let rr = min(r, max(t - protected, 0) / 2)
        if rr <= 0 { break }
        t -= rr
    }
    return t
}

/// Token morphing of each sample of `features` [B, N, D].
///   membership [B, N]: group of each original token (0..<G)
///   sizes [B, G]: tokens per group (optional)
///   merged [B, G, D]: size-weighted mean feature of each group (optional)
/// with G = tokenMorphingGroupCount(N:r:iterations:protectFirst:). Samples run in parallel;
/// the score matrix of a round is one single-threaded GEMM.
public func tokenMorphing(
    membership: UnsafeMutablePointer<Int32>, sizes: UnsafeMutablePointer<Int32>?,
    merged: UnsafeMutablePointer<Float>?, features: UnsafePointer<Float>,
    B: Int, N: Int, D: Int, r: Int, iterations: Int, protectFirst: Bool = true
) {
    let G = tokenMorphingGroupCount(N: N, r: r, iterations: iterations, protectFirst: protectFirst)
    nonisolated(unsafe) let membership = membership, sizes = sizes, merged = merged, features = features
    Parallel.forEach(B) { b in
        var m = MorphingState(features: features + b * N * D, N: N, D: D)
        for _ in 0..<max(iterations, 0) {
            if !m.round(r: r, protectFirst: protectFirst) { break }
        }
        precondition(m.t == G, "tokenMorphing: group count mismatch")
        for o in 0..<N { membership[b * N + o] = m.pos[o] }
        if let sizes {
            for g in 0..<G { sizes[b * G + g] = Int32(m.size[g]) }
        }
        if let merged {
            let out = merged + b * G * D
            for k in 0..<(G * D) { out[k] = m.x[k] }
        }
    }
}

/// The per-sample state of the rounds: current tokens, their sizes, and where each original
/// token lives now.
struct MorphingState {
    let N: Int, D: Int
    var t: Int
    var x: [Float], size: [Float], pos: [Int32]
    // scratch, reused across rounds
    var xn: [Float], scores: [Float], best: [Float], bestIdx: [Int], order: [Int]
    var isSource: [Bool], remap: [Int32], nx: [Float], nsize: [Float]

    init(features: UnsafePointer<Float>, N: Int, D: Int) {
        self.N = N; self.D = D; t = N
        x = Array(UnsafeBufferPointer(start: features, count: N * D))
        size = [Float](repeating: 1, count: N)
        pos = (0..<N).map { Int32($0) }
        xn = [Float](repeating: 0, count: N * D)
        scores = [Float](repeating: 0, count: ((N + 1) / 2) * (N / 2))
        best = [Float](repeating: 0, count: (N + 1) / 2)
        bestIdx = [Int](repeating: 0, count: (N + 1) / 2)
        order = []
        isSource = [Bool](repeating: false, count: (N + 1) / 2)
        remap = [Int32](repeating: 0, count: N)
        nx = [Float](repeating: 0, count: N * D)
        nsize = [Float](repeating: 0, count: N)
    }

    /// One bipartite matching round; false when nothing can be merged.
    mutating func round(r: Int, protectFirst: Bool) -> Bool {
        let rr = min(r, max(t - (protectFirst ? 1 : 0), 0) / 2)
        if rr <= 0 { return false }
        let D = self.D, t = self.t
        let ta = (t + 1) / 2, tb = t / 2

        // L2-normalised copy.
        for i in 0..<t {
            var ss: Float = 0
            for c in 0..<D { ss += x[i * D + c] * x[i * D + c] }
            let inv: Float = ss > 0 ? 1 / ss.squareRoot() : 0
            for c in 0..<D { xn[i * D + c] = x[i * D + c] * inv }
        }
        // scores [ta, tb] = even rows · odd rowsᵀ (row stride 2D picks every other token).
        xn.withUnsafeBufferPointer { xp in
            scores.withUnsafeMutableBufferPointer { sp in
                sgemm(transA: false, transB: true, M: ta, N: tb, K: D, alpha: 1,
                      A: xp.baseAddress!, lda: 2 * D, B: xp.baseAddress! + D, ldb: 2 * D,
                      beta: 0, C: sp.baseAddress!, ldc: tb)
            }
        }
        for i in 0..<ta {
            if protectFirst && i == 0 { best[0] = -.infinity; bestIdx[0] = 0; continue }
            var bi = 0, bv = scores[i * tb]
            for j in 1..<max(tb, 1) where scores[i * tb + j] > bv { bv = scores[i * tb + j]; bi = j }
            best[i] = bv; bestIdx[i] = bi
        }
        // Rank even tokens by best score, high first; ties to the lower index.
        let bestScore = best
        order = Array(0..<ta)
        order.sort { a, b in bestScore[a] > bestScore[b] || (bestScore[a] == bestScore[b] && a < b) }
        for i in 0..<ta { isSource[i] = false }
        for k in 0..<rr { isSource[order[k]] = true }

        // New positions: unmerged evens first (in order), then the odd tokens.
        let unmerged = ta - rr
        var k = 0
        for i in 0..<ta {
            if isSource[i] {
                remap[2 * i] = Int32(unmerged + bestIdx[i])
            } else {
                remap[2 * i] = Int32(k); k += 1
            }
        }
        for j in 0..<tb { remap[2 * j + 1] = Int32(unmerged + j) }

        // Size-weighted sums into the new rows: each odd token first, then its sources in
        // increasing position; then divide by the summed sizes.
        let newT = unmerged + tb
        for g in 0..<newT { nsize[g] = 0 }
        for c in 0..<(newT * D) { nx[c] = 0 }
        for p in 0..<t where p % 2 == 1 || !isSource[p / 2] {
            accumulate(from: p, into: Int(remap[p]))
        }
        for p in Swift.stride(from: 0, to: t, by: 2) where isSource[p / 2] {
            accumulate(from: p, into: Int(remap[p]))
        }
        for g in 0..<newT {
            let s = nsize[g]
            for c in 0..<D { nx[g * D + c] /= s }
        }
        swap(&x, &nx)
        swap(&size, &nsize)
        for o in 0..<N { pos[o] = remap[Int(pos[o])] }
        self.t = newT
        return true
    }

    private mutating func accumulate(from p: Int, into g: Int) {
        let s = size[p]
        nsize[g] += s
        for c in 0..<D { nx[g * D + c] += x[p * D + c] * s }
    }
}
