#if canImport(Glibc)
import Glibc
#endif

// LayerNorm over the last dimension (Ba, Kiros & Hinton 2016), eps 1e-6 as in timm's ViT:
//   x̂ = (x − μ) · rstd,  rstd = 1/√(σ² + eps),  out = x̂ ⊙ weight + bias.   input [rows, cols]
// Backward (per row, g = dOut ⊙ weight):
//   dx += rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  dWeight += Σ_rows dOut ⊙ x̂,  dBias += Σ_rows dOut.

public let layerNormEps: Float = 1e-6

/// out [rows, cols], mean [rows], rstd [rows] from input [rows, cols]; mean/rstd are the backward cache.
public func layerNormForward(
    out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>,
    input: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
    rows: Int, cols: Int, eps: Float = layerNormEps
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.norms, t0) }
    nonisolated(unsafe) let out = out, mean = mean, rstd = rstd, input = input, weight = weight, bias = bias
    Parallel.forRanges(rows, grain: max(1, 8192 / max(cols, 1))) { r in
        for i in r {
            let x = input + i * cols, y = out + i * cols
            let mu = vsum(x, cols) / Float(cols)
            // Two-pass variance: no cancellation when |μ| ≫ σ.
            var acc = FloatVector()
            let m = FloatVector(repeating: mu)
            var j = 0
            while j + 8 <= cols { let d = loadV(x + j) - m; acc += d * d; j += 8 }
            var v = acc.sum()
            while j < cols { let d = x[j] - mu; v += d * d; j += 1 }
            let rs = 1 / (v / Float(cols) + eps).squareRoot()
            mean[i] = mu
            rstd[i] = rs
            for j in 0..<cols { y[j] = (x[j] - mu) * rs * weight[j] + bias[j] }
        }
    }
}

/// Accumulates dInput, dWeight, dBias. dInput rows run in parallel; dWeight/dBias are summed
/// per column block over all rows in row order, so results do not depend on the thread count.
/// `dWeight`/`dBias` may be nil (frozen parameters).
public func layerNormBackward(
    dInput: UnsafeMutablePointer<Float>, dWeight: UnsafeMutablePointer<Float>?, dBias: UnsafeMutablePointer<Float>?,
    dOut: UnsafePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
    mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, rows: Int, cols: Int
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.norms, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, input = input, weight = weight, mean = mean, rstd = rstd
    Parallel.forRanges(rows, grain: max(1, 4096 / max(cols, 1))) { r in
        for i in r {
            let x = input + i * cols, dy = dOut + i * cols, dx = dInput + i * cols
            let mu = mean[i], rs = rstd[i]
            // Σ g and Σ g·x̂ with 8-lane accumulators (a scalar sum cannot be vectorised).
            var ag = FloatVector(), agx = FloatVector()
            let m = FloatVector(repeating: mu), s = FloatVector(repeating: rs)
            var j = 0
            while j + 8 <= cols {
                let g = loadV(dy + j) * loadV(weight + j)
                ag += g
                agx += g * (loadV(x + j) - m) * s
                j += 8
            }
            var sg = ag.sum(), sgx = agx.sum()
            while j < cols {
                let g = dy[j] * weight[j]
                sg += g
                sgx += g * (x[j] - mu) * rs
                j += 1
            }
            sg /= Float(cols); sgx /= Float(cols)
            for j in 0..<cols {
                let xh = (x[j] - mu) * rs
                dx[j] += rs * (dy[j] * weight[j] - sg - xh * sgx)
            }
        }
    }
    guard dWeight != nil || dBias != nil else { return }
    nonisolated(unsafe) let dW = dWeight, dB = dBias
    Parallel.forRanges(cols, grain: 16) { c in
        for i in 0..<rows {
            let x = input + i * cols, dy = dOut + i * cols
            let mu = mean[i], rs = rstd[i]
            if let dW { for j in c { dW[j] += dy[j] * (x[j] - mu) * rs } }
            if let dB { for j in c { dB[j] += dy[j] } }
        }
    }
}
