import XCTest
import MaPeTKernels

final class SamplingTests: XCTestCase {
    func testGeneratorsMatchPublishedValues() {
        var sm = SplitMix64(state: 0)
        XCTAssertEqual(sm.next(), 0xE220_A839_7B1D_CDAF)
        var x = Xoshiro256StarStar(state: (1, 2, 3, 4))
        XCTAssertEqual(x.next(), 11520)
        XCTAssertEqual(x.next(), 0)
    }

    func testBoundedIntegersStayInRange() {
        var rng = Xoshiro256StarStar(seed: 5, stream: 0)
        for n in [1, 2, 3, 7, 196, 1 << 40] {
            for _ in 0..<200 { XCTAssert((0..<n).contains(rng.below(n))) }
        }
    }

    /// The rules straight from ALGORITHMS.md §2 (sets of tokens), against the O(1) forms.
    func testMasksMatchSpecSentences() {
        for (n, L) in [(1, 1), (8, 1), (8, 8), (20, 7)] {
            let N = n + 1
            guard let batch = PermutationBatch.sample(batchSize: 3, tokens: N, leastNumber: L, upperLimit: nil,
                                                      seed: 11, firstStream: 0) else { return XCTFail("alloc") }
            let content = TwoStreamContentMask(batch), query = TwoStreamQueryMask(batch)
            let P = N - L
            for b in 0..<3 {
                let rank = (0..<N).map { Int(batch.ranksPointer[b * N + $0]) }
                let T = (0..<N).filter { rank[$0] >= L }
                let inC = { (t: Int) in rank[t] < L }
                let sees = { (r: Int, c: Int) in inC(c) || rank[c] < rank[r] || c == r }
                for r in 0..<(N + P) {
                    for c in 0..<(N + P) {
                        let want: Bool
                        switch (r < N, c < N) {
                        case (true, true): want = sees(r, c)
                        case (true, false): want = !sees(r, T[c - N])
                        case (false, true): want = inC(c)
                        case (false, false): want = true
                        }
                        XCTAssertEqual(content.allows(batch: b, query: r, key: c), want)
                    }
                }
                for i in 0..<P {
                    for c in 0..<(N + P) {
                        let want = c < N ? (inC(c) || rank[c] < rank[T[i]]) : rank[T[c - N]] >= rank[T[i]]
                        XCTAssertEqual(query.allows(batch: b, query: i, key: c), want)
                    }
                }
                // block skipping agrees with the pairs on every block of a 3-way split
                let cuts = [0, (N + P) / 3, N, N + P]
                for q in 0..<3 {
                    for k in 0..<3 {
                        let qs = cuts[q]..<cuts[q + 1], ks = cuts[k]..<cuts[k + 1]
                        let any = qs.contains { r in ks.contains { c in content.allows(batch: b, query: r, key: c) } }
                        XCTAssertEqual(content.anyAllowed(batch: b, queries: qs, keys: ks), any)
                    }
                }
            }
        }
    }

    /// Attention through the precomputed score biases gives the same bits as asking the rank rules
    /// pair by pair (fully masked query rows included: none exist here, so one is made by hand).
    func testScoreBiasMaskGivesTheSameAttentionAsTheRules() {
        let (n, L, B, C, H) = (15, 4, 3, 16, 2)
        let N = n + 1, P = N - L, T = N + P
        guard let batch = PermutationBatch.sample(batchSize: B, tokens: N, leastNumber: L, upperLimit: nil,
                                                  seed: 5, firstStream: 0) else { return XCTFail("alloc") }
        var s: UInt64 = 99
        func rnd(_ count: Int) -> [Float] {
            (0..<count).map { _ in s = s &* 6364136223846793005 &+ 1442695040888963407; return Float(Int(s >> 41)) / Float(1 << 22) - 1 }
        }
        let q = rnd(B * T * C), kv = rnd(B * T * 2 * C)
        func run<M: AttentionMask>(_ mask: M, rows: Int) -> ([Float], [Float]) {
            var out = [Float](repeating: 0, count: B * rows * C), probs = [Float](repeating: 0, count: B * H * rows * T)
            kv.withUnsafeBufferPointer { kvp in
                attentionForward(out: &out, ldOut: C, probs: &probs, q: q, ldQ: C, k: kvp.baseAddress!, ldK: 2 * C,
                                 v: kvp.baseAddress! + C, ldV: 2 * C, B: B, M: rows, Nk: T, C: C, H: H, mask: mask)
            }
            return (out, probs)
        }
        let content = TwoStreamContentMask(batch), query = TwoStreamQueryMask(batch)
        var cBias = [Float](repeating: 1, count: B * T * T), qBias = [Float](repeating: 1, count: B * P * T)
        fillScoreBias(content, B: B, M: T, Nk: T, bias: &cBias)
        fillScoreBias(query, B: B, M: P, Nk: T, bias: &qBias)
        XCTAssertTrue(cBias.allSatisfy { $0 == 0 || $0 == -.infinity })
        cBias.withUnsafeBufferPointer { cb in
            let biased = run(ScoreBiasMask(bias: cb.baseAddress!, M: T, Nk: T), rows: T), rules = run(content, rows: T)
            XCTAssertEqual(biased.0, rules.0); XCTAssertEqual(biased.1, rules.1)
        }
        qBias.withUnsafeBufferPointer { qb in
            let biased = run(ScoreBiasMask(bias: qb.baseAddress!, M: P, Nk: T), rows: P), rules = run(query, rows: P)
            XCTAssertEqual(biased.0, rules.0); XCTAssertEqual(biased.1, rules.1)
        }
        // A row that may attend nothing gives zero probabilities and a zero output.
        for j in 0..<T { qBias[j] = -.infinity }
        qBias.withUnsafeBufferPointer { qb in
            let (out, probs) = run(ScoreBiasMask(bias: qb.baseAddress!, M: P, Nk: T), rows: P)
            XCTAssertTrue(out[0..<C].allSatisfy { $0 == 0 })
            XCTAssertTrue(probs[0..<T].allSatisfy { $0 == 0 })
        }
    }

    func testFromOrdersRejectsNonPermutations() {
        let bad: [Int64] = [0, 1, 2, 3, 0, 1, 1, 3]
        let r = PermutationBatch.fromOrders(bad, batchSize: 2, tokens: 4, leastNumber: 1, upperLimit: nil)
        guard case .failure(let e) = r else { return XCTFail("accepted a duplicate") }
        XCTAssertEqual(e, .duplicate(row: 1, value: 1, first: 1, second: 2))
    }
}
