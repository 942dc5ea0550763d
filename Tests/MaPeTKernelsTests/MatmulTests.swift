import XCTest
import MaPeTKernels

final class MatmulTests: XCTestCase {
    /// Deterministic pseudo-random floats in [-1, 1).
    func values(_ n: Int, seed: UInt64) -> [Float] {
        var s = seed &* 0x9E3779B97F4A7C15 | 1
        return (0..<n).map { _ in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return Float(Int(s >> 40) - (1 << 23)) / Float(1 << 23)
        }
    }

    func testBlasMatchesNaiveForAllTransposes() {
        for (M, N, K) in [(1, 1, 1), (7, 5, 3), (33, 17, 65), (130, 70, 40)] {
            for tA in [false, true] {
                for tB in [false, true] {
                    let a = values(M * K, seed: 1), b = values(K * N, seed: 2)
                    var c0 = values(M * N, seed: 3), c1 = c0
                    let lda = tA ? M : K, ldb = tB ? K : N
                    sgemmNaive(transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: lda,
                               B: b, ldb: ldb, beta: 2, C: &c0, ldc: N)
                    Parallel.threadCount = 2
                    sgemmParallel(transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: lda,
                                  B: b, ldb: ldb, beta: 2, C: &c1, ldc: N)
                    for i in 0..<(M * N) {
                        XCTAssertEqual(c0[i], c1[i], accuracy: 1e-4 * (1 + abs(c0[i])), "M\(M) N\(N) K\(K) tA\(tA) tB\(tB)")
                    }
                }
            }
        }
    }

    func testGeluBackwardMatchesFiniteDifferences() {
        let x = values(257, seed: 9).map { $0 * 4 }
        var dx = [Float](repeating: 0, count: x.count)
        let ones = [Float](repeating: 1, count: x.count)
        geluBackward(dInput: &dx, dOut: ones, input: x, count: x.count)
        func gelu(_ v: Double) -> Double { 0.5 * v * (1 + erf(v / 2.0.squareRoot())) }
        for i in 0..<x.count {
            let h = 1e-4, v = Double(x[i])
            let fd = (gelu(v + h) - gelu(v - h)) / (2 * h)
            XCTAssertEqual(Double(dx[i]), fd, accuracy: 1e-4)
        }
    }

    /// The forward that keeps gelu' gives the same bits as `geluForward` and, through one product
    /// per element, as `geluBackward` accumulating into zeros.
    func testGeluKeepingDerivativeEqualsSeparateForwardAndBackward() {
        let x = values(1003, seed: 5).map { $0 * 6 }, dOut = values(1003, seed: 6)
        var y0 = [Float](repeating: 0, count: x.count), dx0 = y0
        geluForward(out: &y0, input: x, count: x.count)
        geluBackward(dInput: &dx0, dOut: dOut, input: x, count: x.count)
        var kept = x, y1 = [Float](repeating: 0, count: x.count)
        geluForwardKeepingDerivative(out: &y1, inputThenDerivative: &kept, count: x.count)
        XCTAssertEqual(y0, y1)
        XCTAssertEqual(dx0, zip(dOut, kept).map { $0 * $1 })
    }

    /// linearForward with `geluDerivative` is the product followed by GELU: in fp32 the bits of
    /// `geluForwardKeepingDerivative` (the same code runs); in bf16, where GELU runs in the GEMM's
    /// store in a faster FMA form, GELU and gelu′ of the same product bits within the error of
    /// the erf formula both use (Abramowitz & Stegun 7.1.26, |Δerf| ≤ 1.5·10⁻⁷, which moves Φ by
    /// at most 0.75·10⁻⁷) plus four float32 roundings of values of magnitude ≤ 1 on the way to
    /// Φ (2⁻²⁴ each; x·Φ scales both by |x|) and a few of the result.
    func testLinearForwardWithGELUEqualsProductThenGELU() {
        let rows = 300, IC = 77, OC = 45
        let x = values(rows * IC, seed: 11).map { $0 * 3 }, w = values(OC * IC, seed: 12), b = values(OC, seed: 13)
        for precision in [Precision.fp32, .bf16] {
            var pre = [Float](repeating: 0, count: rows * OC), act = pre, fusedAct = pre, fusedDeriv = pre
            linearForward(out: &pre, input: x, weight: w, bias: b, rows: rows, inFeatures: IC, outFeatures: OC,
                          precision: precision)
            let product = pre
            geluForwardKeepingDerivative(out: &act, inputThenDerivative: &pre, count: pre.count)
            linearForward(out: &fusedAct, input: x, weight: w, bias: b, rows: rows, inFeatures: IC, outFeatures: OC,
                          precision: precision, geluDerivative: &fusedDeriv)
            if precision == .fp32 || !BF16.isActive {
                XCTAssertEqual(fusedAct, act, "\(precision)")
                XCTAssertEqual(fusedDeriv, pre, "\(precision)")
                continue
            }
            for (i, v) in product.enumerated() {
                let z = Double(v), cdf = 0.5 * (1 + erf(z / 2.0.squareRoot()))
                let value = z * cdf, deriv = cdf + z * exp(-z * z / 2) / (2 * Double.pi).squareRoot()
                let ulp = 0x1p-23, cdfError = 0.75e-7 + 4 * 0x1p-24
                XCTAssertLessThanOrEqual(abs(Double(fusedAct[i]) - value), cdfError * abs(z) + 4 * ulp * abs(value),
                                         "gelu(\(v))")
                XCTAssertLessThanOrEqual(abs(Double(fusedDeriv[i]) - deriv), cdfError + 4 * ulp * abs(deriv),
                                         "gelu′(\(v))")
            }
        }
    }

    /// linearBackward with `dInputScale` writes (dOut · W) ⊙ scale: the bits of the product
    /// followed by the multiplying pass, in both precisions (in bf16 the multiply is in the
    /// GEMM's store; odd sizes cover the tile edges, 300 rows several row tiles).
    func testLinearBackwardWithInputScaleEqualsProductThenMultiply() {
        let rows = 300, IC = 77, OC = 45
        let dOut = values(rows * OC, seed: 7), x = values(rows * IC, seed: 8), w = values(OC * IC, seed: 9)
        let scale = values(rows * IC, seed: 10)
        for precision in [Precision.fp32, .bf16] {
            var plain = [Float](repeating: 0, count: rows * IC), fused = plain
            linearBackward(dInput: &plain, dWeight: nil, dBias: nil, dOut: dOut, input: x, weight: w,
                           rows: rows, inFeatures: IC, outFeatures: OC, precision: precision, accumulateInput: false)
            linearBackward(dInput: &fused, dWeight: nil, dBias: nil, dOut: dOut, input: x, weight: w,
                           rows: rows, inFeatures: IC, outFeatures: OC, precision: precision, accumulateInput: false,
                           dInputScale: scale)
            XCTAssertEqual(fused, zip(plain, scale).map { $0 * $1 }, "\(precision)")
        }
    }
}
