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

    func testFromOrdersRejectsNonPermutations() {
        let bad: [Int64] = [0, 1, 2, 3, 0, 1, 1, 3]
        let r = PermutationBatch.fromOrders(bad, batchSize: 2, tokens: 4, leastNumber: 1, upperLimit: nil)
        guard case .failure(let e) = r else { return XCTFail("accepted a duplicate") }
        XCTAssertEqual(e, .duplicate(row: 1, value: 1, first: 1, second: 2))
    }
}
