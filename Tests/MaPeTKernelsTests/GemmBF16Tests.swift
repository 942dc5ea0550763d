import XCTest
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// bf16Gemm against a float64 triple loop over bf16-rounded inputs. Products of bf16 values are
/// exact in fp32, so the only error is fp32 rounding while accumulating: at most n·2⁻²⁴·Σ|a·b|
/// with n = 2K + 4 roundings on an element's path whatever the blocking (see tests/test_bf16_gemm.py).
final class GemmBF16Tests: XCTestCase {
    func values(_ n: Int, seed: UInt64) -> [Float] {
        var s = seed &* 0x9E3779B97F4A7C15 | 1
        return (0..<n).map { _ in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return Float(Int(s >> 40) - (1 << 23)) / Float(1 << 23)
        }
    }

    func testRoundingIsNearestEven() {
        // 1 + 2⁻⁸ is halfway between bf16 1 and 1 + 2⁻⁷: ties go to the even significand (1).
        XCTAssertEqual(bf16Round(1 + 0x1p-8), 1)
        XCTAssertEqual(bf16Round(1 + 3 * 0x1p-8), 1 + 2 * 0x1p-7)
        XCTAssertEqual(bf16Round(1 + 0x1p-8 + 0x1p-20), 1 + 0x1p-7)
        XCTAssertTrue(bf16Round(.nan).isNaN)
    }

    func testMatchesRoundedReferenceForAllTransposesAndStrides() {
        for (M, N, K) in [(1, 1, 1), (7, 5, 3), (33, 17, 65), (130, 70, 301), (97, 131, 513)] {
            for tA in [false, true] {
                for tB in [false, true] {
                    let pad = 3   // every row stride exceeds its row
                    let lda = (tA ? M : K) + pad, ldb = (tB ? K : N) + pad, ldc = N + pad
                    let a = values((tA ? K : M) * lda, seed: 1), b = values((tB ? N : K) * ldb, seed: 2)
                    let c0 = values(M * ldc, seed: 3)
                    var c = c0
                    let alpha: Float = 0.75, beta: Float = -1.5
                    bf16GemmParallel(transA: tA, transB: tB, M: M, N: N, K: K, alpha: alpha, A: a, lda: lda,
                                     B: b, ldb: ldb, beta: beta, C: &c, ldc: ldc)
                    let round: (Float) -> Float = BF16.isActive ? bf16Round : { $0 }
                    for i in 0..<M {
                        for j in 0..<N {
                            var s = 0.0, mag = 0.0
                            for k in 0..<K {
                                let x = Double(round(tA ? a[k * lda + i] : a[i * lda + k]))
                                let y = Double(round(tB ? b[j * ldb + k] : b[k * ldb + j]))
                                s += x * y; mag += abs(x * y)
                            }
                            let ref = Double(alpha) * s + Double(beta) * Double(c0[i * ldc + j])
                            let bound = Double(2 * K + 4) * 0x1p-24
                                * (Double(abs(alpha)) * mag + Double(abs(beta * c0[i * ldc + j])))
                            XCTAssertLessThanOrEqual(abs(Double(c[i * ldc + j]) - ref), bound,
                                                     "M\(M) N\(N) K\(K) tA\(tA) tB\(tB) at \(i),\(j)")
                        }
                        for j in N..<ldc { XCTAssertEqual(c[i * ldc + j], c0[i * ldc + j]) }  // padding untouched
                    }
                }
            }
        }
    }

    func testBetaZeroDoesNotReadC() {
        let M = 9, N = 70, K = 11
        let a = values(M * K, seed: 4), b = values(K * N, seed: 5)
        var c = [Float](repeating: .nan, count: M * N)
        bf16Gemm(transA: false, transB: false, M: M, N: N, K: K, alpha: 1, A: a, lda: K, B: b, ldb: N,
                 beta: 0, C: &c, ldc: N)
        XCTAssertTrue(c.allSatisfy { $0.isFinite })
        var z = [Float](repeating: .nan, count: M * N)
        bf16Gemm(transA: false, transB: false, M: M, N: N, K: 0, alpha: 1, A: a, lda: 1, B: b, ldb: N,
                 beta: 0, C: &z, ldc: N)
        XCTAssertTrue(z.allSatisfy { $0 == 0 })
    }

    /// The bias added in the kernel's store gives the bits of filling C with the bias and using
    /// beta = 1 (K = 0 included, N not a multiple of 16); with beta = 2 the bias is folded into
    /// C first, so the same fill computes it.
    func testBiasInTheStoreEqualsBiasFilledC() {
        for (M, N, K) in [(13, 197, 64), (7, 70, 300), (5, 33, 0)] {
            let a = values(M * max(K, 1), seed: 7), b = values(max(K, 1) * N, seed: 8)
            let bias = values(N, seed: 9), c0 = values(M * N, seed: 10)
            for beta: Float in [0, 2] {
                var fused = c0, filled = c0
                bf16GemmParallel(transA: false, transB: true, M: M, N: N, K: K, alpha: 1, A: a, lda: max(K, 1),
                                 B: b, ldb: max(K, 1), beta: beta, C: &fused, ldc: N, bias: bias)
                for i in 0..<M { for j in 0..<N { filled[i * N + j] = beta * filled[i * N + j] + bias[j] } }
                bf16GemmParallel(transA: false, transB: true, M: M, N: N, K: K, alpha: 1, A: a, lda: max(K, 1),
                                 B: b, ldb: max(K, 1), beta: 1, C: &filled, ldc: N)
                XCTAssertEqual(fused, filled, "M\(M) N\(N) K\(K) beta \(beta)")
            }
        }
    }

    func testThreadCountDoesNotChangeBits() {
        let M = 517, N = 389, K = 263
        let saved = Parallel.threadCount
        defer { Parallel.threadCount = saved }
        for (tA, tB) in [(false, false), (true, false), (false, true)] {
            let a = values(M * K, seed: 6), b = values(K * N, seed: 7)
            var results: [[Float]] = []
            for threads in [1, 2, 3] {
                Parallel.threadCount = threads
                var c = values(M * N, seed: 8)
                bf16GemmParallel(transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: tA ? M : K,
                                 B: b, ldb: tB ? K : N, beta: 2, C: &c, ldc: N)
                results.append(c)
            }
            var single = values(M * N, seed: 8)
            bf16Gemm(transA: tA, transB: tB, M: M, N: N, K: K, alpha: 0.5, A: a, lda: tA ? M : K,
                     B: b, ldb: tB ? K : N, beta: 2, C: &single, ldc: N)
            if BF16.isActive {
                XCTAssertEqual(results[0], results[1])
                XCTAssertEqual(results[0], results[2])
                XCTAssertEqual(results[0], single)
            }
        }
    }

    /// The MLP's hidden activation held in bf16 (BF16Storage): written by fc1's product (with
    /// GELU in its store), read by fc2's forward (.a) and by fc2's weight gradient (.b), it gives
    /// the bits of fp32 storage — each reader rounds its fp32 inputs to bf16 by the same rule.
    /// Odd sizes: fc2's K (the hidden width) odd, so the last pair of each row has one value.
    func testActivationStoredInBF16GivesTheBitsOfFP32Storage() throws {
        try XCTSkipUnless(BF16.isActive, "bf16 storage exists only with the AVX512-BF16 kernel")
        let rows = 301, C = 77, H = 45, C2 = 53
        let x = values(rows * C, seed: 21).map { $0 * 3 }, w1 = values(H * C, seed: 22), b1 = values(H, seed: 23)
        let w2 = values(C2 * H, seed: 24), b2 = values(C2, seed: 25), dy = values(rows * C2, seed: 26)
        // fp32 storage
        var act = [Float](repeating: 0, count: rows * H), deriv = act
        linearForward(out: &act, input: x, weight: w1, bias: b1, rows: rows, inFeatures: C, outFeatures: H,
                      precision: .bf16, geluDerivative: &deriv)
        var y = [Float](repeating: 0, count: rows * C2), dw = [Float](repeating: 0, count: C2 * H)
        linearForward(out: &y, input: act, weight: w2, bias: b2, rows: rows, inFeatures: H, outFeatures: C2, precision: .bf16)
        linearBackward(dInput: nil, dWeight: &dw, dBias: nil, dOut: dy, input: act, weight: w2,
                       rows: rows, inFeatures: H, outFeatures: C2, precision: .bf16)
        // bf16 storage
        var act16 = [UInt16](repeating: 0, count: rows * H), deriv16 = [Float](repeating: 0, count: rows * H)
        var y16 = y.map { _ in Float.nan }, dw16 = [Float](repeating: 0, count: C2 * H)
        act16.withUnsafeMutableBytes { raw in
            let a = raw.baseAddress!.assumingMemoryBound(to: Float.self)   // bf16 values behind a Float pointer
            linearForward(out: a, input: x, weight: w1, bias: b1, rows: rows, inFeatures: C, outFeatures: H,
                          precision: .bf16, geluDerivative: &deriv16, storage: .c)
            linearForward(out: &y16, input: a, weight: w2, bias: b2, rows: rows, inFeatures: H, outFeatures: C2,
                          precision: .bf16, storage: .a)
            linearBackward(dInput: nil, dWeight: &dw16, dBias: nil, dOut: dy, input: a, weight: w2,
                           rows: rows, inFeatures: H, outFeatures: C2, precision: .bf16, inputInBF16: true)
        }
        XCTAssertEqual(act16.map { Float(bitPattern: UInt32($0) << 16) }, act.map(bf16Round))
        XCTAssertEqual(deriv16, deriv)
        XCTAssertEqual(y16, y)
        XCTAssertEqual(dw16, dw)
    }

    /// LayerNorm writing bf16 (for products that read it so) gives its fp32 output rounded to
    /// nearest even, and the same mean and rstd; 301 rows cross several of its 32-row rounding
    /// chunks and the workers' row ranges.
    func testLayerNormOutputInBF16IsTheRoundedFP32Output() throws {
        try XCTSkipUnless(BF16.isActive, "bf16 storage exists only with the AVX512-BF16 kernel")
        let rows = 301, cols = 77
        let x = values(rows * cols, seed: 31).map { $0 * 4 + 1 }, w = values(cols, seed: 32), b = values(cols, seed: 33)
        var y = [Float](repeating: 0, count: rows * cols), mean = [Float](repeating: 0, count: rows), rstd = mean
        layerNormForward(out: &y, mean: &mean, rstd: &rstd, input: x, weight: w, bias: b, rows: rows, cols: cols)
        var y16 = [UInt16](repeating: 0, count: rows * cols), mean16 = mean.map { _ in Float.nan }, rstd16 = mean16
        y16.withUnsafeMutableBytes { raw in
            layerNormForward(out: raw.baseAddress!.assumingMemoryBound(to: Float.self), mean: &mean16, rstd: &rstd16,
                             input: x, weight: w, bias: b, rows: rows, cols: cols, outInBF16: true)
        }
        XCTAssertEqual(y16.map { Float(bitPattern: UInt32($0) << 16) }, y.map(bf16Round))
        XCTAssertEqual(mean16, mean)
        XCTAssertEqual(rstd16, rstd)
    }

    func testNativeFollowsCPUFlags() {
        guard let f = fopen("/proc/cpuinfo", "r") else { return }
        defer { fclose(f) }
        var flags: Set<Substring> = []
        var line = [CChar](repeating: 0, count: 1 << 16)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(cString: line)
            if s.hasPrefix("flags"), let colon = s.firstIndex(of: ":") {
                flags = Set(s[s.index(after: colon)...].split(whereSeparator: { $0 == " " || $0 == "\n" }))
                break
            }
        }
        let expected = ["avx512f", "avx512bw", "avx512vl", "avx512_bf16"].allSatisfy { flags.contains(Substring($0)) }
        XCTAssertEqual(BF16.isNative, expected)
    }
}
