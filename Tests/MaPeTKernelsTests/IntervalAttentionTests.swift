import XCTest
import MaPeTKernels

/// Attention whose mask is given as key intervals (the two-stream rules in rank order).
final class IntervalAttentionTests: XCTestCase {
    /// Sorted by rank, the content and query rules of `TwoStreamMasks` are exactly the intervals
    /// of `fillRankOrderIntervals`, for every pair of every sample, with and without the
    /// auxiliary positional tokens.
    func testRankOrderIntervalsAreTheRulesInRankOrder() {
        for (n, L) in [(8, 1), (8, 8), (20, 7), (48, 12)] {
            for positional in [true, false] {
                let N = n + 1, P = N - L, T = positional ? N + P : N
                guard let batch = PermutationBatch.sample(batchSize: 3, tokens: N, leastNumber: L, upperLimit: nil,
                                                          seed: 3, firstStream: 0) else { return XCTFail("alloc") }
                var cp = [Int32](repeating: -1, count: T), cs = cp, qp = [Int32](repeating: -1, count: P), qs = qp
                fillRankOrderIntervals(N: N, L: L, positionalTokens: positional, contentPrefix: &cp, contentSuffix: &cs,
                                       queryPrefix: &qp, querySuffix: &qs)
                let content = TwoStreamContentMask(batch, positionalTokens: positional)
                let query = TwoStreamQueryMask(batch, positionalTokens: positional)
                for b in 0..<3 {
                    let orders = (0..<N).map { Int(batch.ordersPointer[b * N + $0]) }
                    let predicted = (0..<P).map { Int(batch.predictedPointer[b * P + $0]) }
                    // Sorted index → index in position order: tokens by rank, then each m by its token's rank.
                    let original = (0..<T).map { s in s < N ? orders[s] : N + predicted.firstIndex(of: orders[L + s - N])! }
                    cp.withUnsafeBufferPointer { cpp in cs.withUnsafeBufferPointer { csp in
                        let rule = KeyIntervals(split: N, prefixEnd: cpp.baseAddress!, suffixStart: csp.baseAddress!)
                        for r in 0..<T {
                            for c in 0..<T {
                                XCTAssertEqual(rule.allows(query: r, key: c),
                                               content.allows(batch: b, query: original[r], key: original[c]), "content \(r) \(c)")
                            }
                        }
                    } }
                    qp.withUnsafeBufferPointer { qpp in qs.withUnsafeBufferPointer { qsp in
                        let rule = KeyIntervals(split: N, prefixEnd: qpp.baseAddress!, suffixStart: qsp.baseAddress!)
                        for i in 0..<P {
                            let row = predicted.firstIndex(of: orders[L + i])!
                            for c in 0..<T {
                                XCTAssertEqual(rule.allows(query: i, key: c), query.allows(batch: b, query: row, key: original[c]),
                                               "query \(i) \(c)")
                            }
                        }
                    } }
                }
            }
        }
    }

    /// Random data of one attention problem: B samples, M rows, Nk = split + n1 keys, H heads of D.
    struct Problem {
        let B = 2, H = 2, M: Int, split: Int, Nk: Int, D: Int
        var C: Int { H * D }
        var q: [Float], kv: [Float], dOut: [Float]
        var pre: [Int32], suf: [Int32]

        init(M: Int, split: Int, n1: Int, D: Int, random intervals: Bool, seed: UInt64) {
            self.M = M; self.split = split; Nk = split + n1; self.D = D
            var s = seed
            func next() -> UInt64 { s = s &* 6364136223846793005 &+ 1442695040888963407; return s >> 33 }
            func rnd(_ count: Int) -> [Float] { (0..<count).map { _ in Float(Int(next() % 2_000_001) - 1_000_000) / 500_000 } }
            let (B, H) = (2, 2)
            q = rnd(B * M * H * D); kv = rnd(B * (split + n1) * 2 * H * D); dOut = rnd(B * M * H * D)
            if intervals {
                // Any prefix end and suffix start, the empty row (0, n1) included.
                pre = (0..<M).map { _ in Int32(next() % UInt64(split + 1)) }
                suf = (0..<M).map { _ in Int32(next() % UInt64(n1 + 1)) }
                pre[M / 2] = 0; suf[M / 2] = Int32(n1)
            } else {
                // Rank-order two-stream content rows: split = N tokens, M = N + P rows, n1 = P.
                let N = split, P = n1, L = N - P
                var cp = [Int32](repeating: 0, count: N + P), cs = cp, qp = [Int32](repeating: 0, count: P), qs = qp
                fillRankOrderIntervals(N: N, L: L, positionalTokens: true, contentPrefix: &cp, contentSuffix: &cs,
                                       queryPrefix: &qp, querySuffix: &qs)
                precondition(M == N + P)
                pre = cp; suf = cs
            }
        }

        func allows(_ i: Int, _ j: Int) -> Bool { j < Int(pre[i]) || j >= split + Int(suf[i]) }
    }

    struct Result { var out, probs, dQ, dKV: [Float] }

    /// Forward and backward with the mask as intervals or as dense score biases.
    func run(_ p: Problem, precision: Precision, asIntervals: Bool) -> Result {
        let (B, H, M, Nk, C) = (p.B, p.H, p.M, p.Nk, p.C)
        var r = Result(out: .init(repeating: 0, count: B * M * C), probs: .init(repeating: 0, count: B * H * M * Nk),
                       dQ: .init(repeating: 0, count: B * M * C), dKV: .init(repeating: 0, count: B * Nk * 2 * C))
        var bias = [Float](repeating: 0, count: B * M * Nk)
        for b in 0..<B { for i in 0..<M { for j in 0..<Nk where !p.allows(i, j) { bias[(b * M + i) * Nk + j] = -.infinity } } }
        p.pre.withUnsafeBufferPointer { pre in p.suf.withUnsafeBufferPointer { suf in
        bias.withUnsafeBufferPointer { bp in p.kv.withUnsafeBufferPointer { kv in r.dKV.withUnsafeMutableBufferPointer { dKV in
            let intervals = KeyIntervals(split: p.split, prefixEnd: pre.baseAddress!, suffixStart: suf.baseAddress!)
            let k = kv.baseAddress!, v = k + C
            if asIntervals {
                attentionForward(out: &r.out, ldOut: C, probs: &r.probs, q: p.q, ldQ: C, k: k, ldK: 2 * C, v: v, ldV: 2 * C,
                                 B: B, M: M, Nk: Nk, C: C, H: H, mask: IntervalMask(intervals), precision: precision)
            } else {
                attentionForward(out: &r.out, ldOut: C, probs: &r.probs, q: p.q, ldQ: C, k: k, ldK: 2 * C, v: v, ldV: 2 * C,
                                 B: B, M: M, Nk: Nk, C: C, H: H, mask: ScoreBiasMask(bias: bp.baseAddress!, M: M, Nk: Nk),
                                 precision: precision)
            }
            attentionBackward(dQ: &r.dQ, dK: dKV.baseAddress!, dV: dKV.baseAddress! + C, dOut: p.dOut, ldOut: C,
                              probs: r.probs, q: p.q, ldQ: C, k: k, ldK: 2 * C, v: v, ldV: 2 * C, B: B, M: M, Nk: Nk,
                              C: C, H: H, precision: precision, accumulateQ: false, accumulateKV: false,
                              keyIntervals: asIntervals ? intervals : nil)
        } } } } }
        return r
    }

    /// With intervals, attention skips the masked blocks; its results follow the dense-bias
    /// path within the error of the products' bf16 inputs (2⁻⁸ per rounded factor, bounded
    /// term by term from the bias path's own values), and exactly 0 where a row may not
    /// attend. fp32 runs the same rule through the unfused path: equal up to fp32 sums.
    func testIntervalsFollowTheDenseBiasPath() {
        let problems = [Problem(M: 172, split: 101, n1: 71, D: 64, random: false, seed: 1),
                        Problem(M: 172, split: 101, n1: 71, D: 40, random: false, seed: 2),
                        Problem(M: 77, split: 130, n1: 33, D: 24, random: true, seed: 3),
                        Problem(M: 13, split: 5, n1: 140, D: 64, random: true, seed: 4)]
        for p in problems {
            for precision in [Precision.fp32, .bf16] {
                let fast = run(p, precision: precision, asIntervals: true), dense = run(p, precision: precision, asIntervals: false)
                let (B, H, M, Nk, C, D) = (p.B, p.H, p.M, p.Nk, p.C, p.D)
                // bf16: two roundings per product term (≤ 2·2⁻⁸ relative) plus fp32 sums; fp32: sums only.
                let rel: Float = precision.usesBF16 ? 1.0 / 64 : 1e-5
                let scale = 1 / Float(D).squareRoot()
                func check(_ a: Float, _ b: Float, _ bound: Float, _ what: String) {
                    XCTAssertLessThanOrEqual(abs(a - b), bound, "\(what) D=\(D) \(precision)")
                }
                for b in 0..<B {
                    for h in 0..<H {
                        let P = { (i: Int, j: Int) in dense.probs[((b * H + h) * M + i) * Nk + j] }
                        let F = { (i: Int, j: Int) in fast.probs[((b * H + h) * M + i) * Nk + j] }
                        let V = { (j: Int, d: Int) in p.kv[(b * Nk + j) * 2 * C + C + h * D + d] }
                        let K = { (j: Int, d: Int) in p.kv[(b * Nk + j) * 2 * C + h * D + d] }
                        let Q = { (i: Int, d: Int) in p.q[(b * M + i) * C + h * D + d] }
                        let dO = { (i: Int, d: Int) in p.dOut[(b * M + i) * C + h * D + d] }
                        // dS of the dense path, from its probabilities, in Double.
                        var dS = [Double](repeating: 0, count: M * Nk), rowMass = [Double](repeating: 0, count: M)
                        for i in 0..<M {
                            var dP = [Double](repeating: 0, count: Nk)
                            for j in 0..<Nk { for d in 0..<D { dP[j] += Double(dO(i, d)) * Double(V(j, d)) } }
                            var sum = 0.0
                            for j in 0..<Nk { sum += Double(P(i, j)) * dP[j]; rowMass[i] += abs(Double(P(i, j)) * dP[j]) }
                            for j in 0..<Nk { dS[i * Nk + j] = Double(P(i, j)) * (dP[j] - sum) * Double(scale) }
                        }
                        for i in 0..<M {
                            for j in 0..<Nk {
                                if !p.allows(i, j) { XCTAssertEqual(F(i, j), 0); continue }
                                check(F(i, j), P(i, j), 1e-5 * P(i, j) + 1e-12, "probs")
                            }
                            for d in 0..<D {
                                var pv: Float = 0, sk: Float = 0
                                for j in 0..<Nk {
                                    pv += P(i, j) * abs(V(j, d))
                                    sk += (Float(abs(dS[i * Nk + j])) * rel + P(i, j) * scale * Float(rowMass[i]) * 1e-5) * abs(K(j, d))
                                }
                                check(fast.out[(b * M + i) * C + h * D + d], dense.out[(b * M + i) * C + h * D + d],
                                      rel * pv + 1e-6, "out")
                                check(fast.dQ[(b * M + i) * C + h * D + d], dense.dQ[(b * M + i) * C + h * D + d],
                                      sk + 1e-6, "dQ")
                            }
                        }
                        for j in 0..<Nk {
                            for d in 0..<D {
                                var pdo: Float = 0, sq: Float = 0
                                for i in 0..<M {
                                    pdo += P(i, j) * abs(dO(i, d))
                                    sq += (Float(abs(dS[i * Nk + j])) * rel + P(i, j) * scale * Float(rowMass[i]) * 1e-5) * abs(Q(i, d))
                                }
                                check(fast.dKV[(b * Nk + j) * 2 * C + C + h * D + d], dense.dKV[(b * Nk + j) * 2 * C + C + h * D + d],
                                      rel * pdo + 1e-6, "dV")
                                check(fast.dKV[(b * Nk + j) * 2 * C + h * D + d], dense.dKV[(b * Nk + j) * 2 * C + h * D + d],
                                      sq + 1e-6, "dK")
                            }
                        }
                    }
                }
            }
        }
    }
}
