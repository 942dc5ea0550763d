import XCTest
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// QuickGELU x·σ(1.702x) (CLIP): the vector kernel against the formula in Double, its derivative
/// against central finite differences of that formula, and the tails (no NaN for ±large x).
final class QuickGELUTests: XCTestCase {
    func reference(_ x: Double) -> Double { x / (1 + exp(-1.702 * x)) }

    func testForwardMatchesTheFormula() {
        // 1003 values (a tail shorter than one SIMD vector) over [-12, 12] plus the extremes.
        var xs = (0..<1003).map { Float(-12 + 24 * Double($0) / 1002) }
        xs += [-100, -60, 60, 100, 0]
        var out = [Float](repeating: .nan, count: xs.count)
        quickGeluForward(out: &out, input: xs, count: xs.count)
        for (x, y) in zip(xs, out) {
            let want = reference(Double(x))
            // vexp has relative error ≈ 2e-7; a few float32 operations follow.
            XCTAssertEqual(Double(y), want, accuracy: 1e-6 * max(1, abs(want)), "x = \(x)")
        }
    }

    func testBackwardMatchesFiniteDifferencesAndAccumulates() {
        let xs = (0..<257).map { Float(-8 + 16 * Double($0) / 256) }
        let dOut = xs.indices.map { Float(1 + ($0 % 5)) / 4 }
        var dIn = [Float](repeating: 0.5, count: xs.count)   // backward adds
        quickGeluBackward(dInput: &dIn, dOut: dOut, input: xs, count: xs.count)
        for i in xs.indices {
            let x = Double(xs[i]), h = 1e-5
            let slope = (reference(x + h) - reference(x - h)) / (2 * h)
            XCTAssertEqual(Double(dIn[i]), 0.5 + Double(dOut[i]) * slope, accuracy: 2e-6 * (1 + abs(slope)), "x = \(x)")
        }
    }

    func testActivationSwitchDispatches() {
        let xs: [Float] = [-2, -0.5, 0.25, 1, 3, 0.1, -0.1, 2, 5]
        var a = [Float](repeating: 0, count: xs.count), b = a, c = a, d = a
        activationForward(.quickGELU, out: &a, input: xs, count: xs.count)
        quickGeluForward(out: &b, input: xs, count: xs.count)
        activationForward(.gelu, out: &c, input: xs, count: xs.count)
        geluForward(out: &d, input: xs, count: xs.count)
        XCTAssertEqual(a, b)
        XCTAssertEqual(c, d)
        XCTAssertNotEqual(a, c)
    }
}
