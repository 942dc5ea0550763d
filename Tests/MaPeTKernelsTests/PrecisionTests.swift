import XCTest
import MaPeTKernels

/// `gemm(precision, …)`: fp32 is the plain sgemm path; bf16 multiplies the bf16-rounded inputs
/// with fp32 accumulation (ALGORITHMS.md §7).
final class PrecisionTests: XCTestCase {
    func values(_ n: Int, seed: UInt64) -> [Float] {
        var s = seed &* 0x9E3779B97F4A7C15 | 1
        return (0..<n).map { _ in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return Float(Int(s >> 40) - (1 << 23)) / Float(1 << 23)
        }
    }

    /// Round to nearest bf16, ties to even (written here, independently of the engine).
    func bf16(_ x: Float) -> Float {
        let bits = x.bitPattern, lower = bits & 0xFFFF, upper = bits & 0xFFFF_0000
        if lower > 0x8000 || (lower == 0x8000 && (bits >> 16) & 1 == 1) { return Float(bitPattern: upper &+ 0x1_0000) }
        return Float(bitPattern: upper)
    }

    func testBF16RoundingOfTheTestIsNearestEven() {
        XCTAssertEqual(bf16(1 + 1.0 / 256), 1)                        // halfway, 1 is even
        XCTAssertEqual(bf16(1 + 3.0 / 256), 1 + 4.0 / 256)            // halfway, rounds up to even
        XCTAssertEqual(bf16(1 + 1.0 / 256 + 1.0 / 65536), 1 + 2.0 / 256)
    }

    func testFP32PrecisionIsTheSgemmPath() {
        let (M, N, K) = (37, 29, 53)
        let a = values(M * K, seed: 1), b = values(K * N, seed: 2)
        var c0 = values(M * N, seed: 3), c1 = c0
        Parallel.threadCount = 2
        sgemmParallel(transA: false, transB: true, M: M, N: N, K: K, alpha: 1, A: a, lda: K, B: b, ldb: K,
                      beta: 1, C: &c0, ldc: N)
        gemm(.fp32, transA: false, transB: true, M: M, N: N, K: K, alpha: 1, A: a, lda: K, B: b, ldb: K,
             beta: 1, C: &c1, ldc: N)
        XCTAssertEqual(c0, c1)
    }

    /// |C − Σ bf16(a)·bf16(b)| ≤ (K + 2)·2⁻²⁴·(Σ|bf16(a)·bf16(b)| + |beta·C|) — fp32 accumulation of exact
    /// products — for all transposes, odd sizes, strided inputs, serial and threaded; and the result
    /// differs from the unrounded product by bf16-sized amounts.
    func testBF16MultipliesRoundedInputsWithFP32Accumulation() throws {
        try XCTSkipUnless(BF16.isActive, "bf16 products are not active (MAPET_BF16=off or no bf16 kernel)")
        for (M, N, K) in [(1, 1, 1), (7, 5, 3), (33, 17, 65), (70, 130, 41)] {
            for tA in [false, true] {
                for tB in [false, true] {
                    let lda = (tA ? M : K) + 3, ldb = (tB ? K : N) + 2, ldc = N + 1
                    let a = values((tA ? K : M) * lda, seed: 11), b = values((tB ? N : K) * ldb, seed: 12)
                    let c = values(M * ldc, seed: 13)
                    for threaded in [false, true] {
                        var got = c
                        Parallel.threadCount = 2
                        if threaded {
                            gemm(.bf16, transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: lda,
                                 B: b, ldb: ldb, beta: 2, C: &got, ldc: ldc)
                        } else {
                            gemm(.bf16, transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: lda,
                                       B: b, ldb: ldb, beta: 2, C: &got, ldc: ldc, serial: true)
                        }
                        var maxBF16Effect = 0.0
                        for i in 0..<M {
                            for j in 0..<N {
                                var exact = 0.0, rounded = 0.0, magnitude = 0.0
                                for k in 0..<K {
                                    let x = tA ? a[k * lda + i] : a[i * lda + k]
                                    let y = tB ? b[j * ldb + k] : b[k * ldb + j]
                                    exact += Double(x) * Double(y)
                                    let p = Double(bf16(x)) * Double(bf16(y))
                                    rounded += p
                                    magnitude += abs(p)
                                }
                                let prev = 2 * Double(c[i * ldc + j])
                                let want = 0.5 * rounded + prev
                                let bound = Double(K + 2) * pow(2, -24) * (0.5 * magnitude + abs(prev)) + 1e-30
                                let g = Double(got[i * ldc + j])
                                XCTAssertLessThanOrEqual(abs(g - want), bound, "M\(M) N\(N) K\(K) tA\(tA) tB\(tB) threaded \(threaded)")
                                maxBF16Effect = max(maxBF16Effect, abs(0.5 * exact + prev - want) / (0.5 * magnitude + 1e-30))
                                // the padding column of C is left alone
                            }
                            XCTAssertEqual(got[i * ldc + N], c[i * ldc + N])
                        }
                        if K > 1 { XCTAssertGreaterThan(maxBF16Effect, pow(2, -14)) }
                        XCTAssertLessThanOrEqual(maxBF16Effect, 2 * pow(2, -8))
                    }
                }
            }
        }
    }
}
