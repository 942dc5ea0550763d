import XCTest
@testable import MaPeTKernels

final class ObjectivesTests: XCTestCase {
    /// The first outputs of splitmix64.c (Vigna) for seed 0.
    func testObjectiveRNGMatchesSplitMix64() {
        var rng = ObjectiveRNG(seed: 0)
        XCTAssertEqual(rng.next(), 0xE220_A839_7B1D_CDAF)
        XCTAssertEqual(rng.next(), 0x6E78_9E6A_A1B9_65F4)
        XCTAssertEqual(rng.next(), 0x06C4_5D18_8009_454F)
    }

    func testBoundedDrawsStayInRangeAndCoverIt() {
        var rng = ObjectiveRNG(seed: 42)
        var seen = Set<Int>()
        for _ in 0..<2000 {
            let v = rng.integer(1, 14)
            XCTAssert((1...14).contains(v))
            seen.insert(v)
        }
        XCTAssertEqual(seen.count, 14)
    }

    func testMergesPerIterationRounding() {
        XCTAssertEqual(dtmMergesPerIteration(tokenBudget: 100, iterations: 7, maxBudget: 196), 15)
        XCTAssertEqual(dtmMergesPerIteration(tokenBudget: 196, iterations: 3, maxBudget: 196), 65)
        XCTAssertEqual(dtmMergesPerIteration(tokenBudget: 0, iterations: 5, maxBudget: 196), 0)
    }

    func testGroupCountAndProtectedToken() {
        XCTAssertEqual(tokenMorphingGroupCount(N: 33, r: 16, iterations: 14), 2)
        XCTAssertEqual(tokenMorphingGroupCount(N: 196, r: 10, iterations: 3), 166)
        let B = 2, N = 11, D = 3
        var x = [Float](repeating: 0, count: B * N * D)
        var rng = ObjectiveRNG(seed: 1)
        for i in x.indices { x[i] = Float(Int(rng.below(2001)) - 1000) / 1000 }
        let G = tokenMorphingGroupCount(N: N, r: 3, iterations: 2)
        var membership = [Int32](repeating: -1, count: B * N), sizes = [Int32](repeating: 0, count: B * G)
        tokenMorphing(membership: &membership, sizes: &sizes, merged: nil, features: x,
                      B: B, N: N, D: D, r: 3, iterations: 2)
        for b in 0..<B {
            XCTAssertEqual(membership[b * N], 0)
            XCTAssertEqual(sizes[b * G], 1)
            XCTAssertEqual(sizes[(b * G)..<((b + 1) * G)].reduce(0, +), Int32(N))
        }
    }
}
