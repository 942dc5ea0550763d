import XCTest
import MaPeTKernels

/// conv2dForward (im2col + GEMM, blocked over output pixels) against conv2dForwardNaive (the
/// defining sum in Double). Per output, a float32 dot product of length K = Cin·kH·kW is within
/// γ_K·Σ|w·x|; the bound here is (K + 3)·2⁻²⁴ times the same sum of absolute values, plus |bias|
/// and |residual|.
final class Conv2dTests: XCTestCase {
    func values(_ n: Int, seed: UInt64) -> [Float] {
        var s = seed &* 0x9E3779B97F4A7C15 | 1
        return (0..<n).map { _ in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return Float(Int(s >> 40) - (1 << 23)) / Float(1 << 23)
        }
    }

    func testFastConvMatchesNaiveReference() {
        // (B, Cin, H, W, Cout, kH, kW, stride, padding); 70×70 spans two im2col blocks
        let cases = [(2, 3, 9, 9, 4, 3, 3, 1, 1), (1, 3, 17, 12, 5, 3, 3, 2, 1), (2, 6, 7, 7, 8, 1, 1, 1, 0),
                     (1, 4, 11, 13, 3, 5, 2, 3, 2), (1, 2, 70, 70, 3, 3, 3, 1, 1)]
        for (B, Cin, H, W, Cout, kH, kW, s, p) in cases {
            let Ho = conv2dOutputSize(H, kernel: kH, stride: s, padding: p)
            let Wo = conv2dOutputSize(W, kernel: kW, stride: s, padding: p)
            let n = B * Cout * Ho * Wo, K = Cin * kH * kW
            let x = values(B * Cin * H * W, seed: 1), w = values(Cout * K, seed: 2), b = values(Cout, seed: 3)
            let r = values(n, seed: 4)
            let ax = x.map(abs), aw = w.map(abs), ab = b.map(abs), ar = r.map(abs)
            for relu in [false, true] {
                var want = [Float](repeating: 0, count: n), got = want, scale = want
                conv2dForwardNaive(out: &want, input: x, weight: w, bias: b, residual: r, relu: relu, B: B, inChans: Cin,
                                   H: H, W: W, outChans: Cout, kernelH: kH, kernelW: kW, stride: s, padding: p)
                conv2dForwardNaive(out: &scale, input: ax, weight: aw, bias: ab, residual: ar, relu: false, B: B, inChans: Cin,
                                   H: H, W: W, outChans: Cout, kernelH: kH, kernelW: kW, stride: s, padding: p)
                Parallel.threadCount = 2
                conv2dForward(out: &got, input: x, weight: w, bias: b, residual: r, relu: relu, B: B, inChans: Cin,
                              H: H, W: W, outChans: Cout, kernelH: kH, kernelW: kW, stride: s, padding: p)
                let tol = Float(K + 3) * 0x1p-24 * 1.01
                for i in 0..<n {
                    XCTAssertLessThanOrEqual(abs(got[i] - want[i]), tol * scale[i] + 0x1p-24 * abs(want[i]),
                                             "case \((B, Cin, H, W, Cout, kH, kW, s, p)) relu \(relu) at \(i)")
                }
            }
        }
    }

    func testAvgPoolAveragesWindowsAndFloors() {
        let (B, C, H, W, s) = (1, 2, 5, 7, 2)
        let x = values(B * C * H * W, seed: 5)
        var out = [Float](repeating: 0, count: B * C * (H / s) * (W / s))
        avgPool2dForward(out: &out, input: x, B: B, C: C, H: H, W: W, stride: s)
        for c in 0..<C {
            for y in 0..<(H / s) {
                for xx in 0..<(W / s) {
                    var acc = 0.0
                    for i in 0..<s { for j in 0..<s { acc += Double(x[(c * H + y * s + i) * W + xx * s + j]) } }
                    XCTAssertEqual(Double(out[(c * (H / s) + y) * (W / s) + xx]), acc / Double(s * s), accuracy: 1e-6)
                }
            }
        }
    }
}
