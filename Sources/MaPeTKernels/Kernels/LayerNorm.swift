import CBF16
#if canImport(Glibc)
import Glibc
#endif

// LayerNorm over the last dimension (Ba, Kiros & Hinton 2016), eps 1e-6 as in timm's ViT:
//   x̂ = (x − μ) · rstd,  rstd = 1/√(σ² + eps),  out = x̂ ⊙ weight + bias.   input [rows, cols]
// Backward (per row, g = dOut ⊙ weight):
//   dx += rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  dWeight += Σ_rows dOut ⊙ x̂,  dBias += Σ_rows dOut.

public let layerNormEps: Float = 1e-6

/// out [rows, cols], mean [rows], rstd [rows] from input [rows, cols]; mean/rstd are the backward cache.
/// `outInBF16`: out receives the values rounded to bf16 (uint16 behind the Float pointer, row
/// stride cols) by `mapet_bf16_round` — for products that read it as bf16 (`BF16Storage`), which
/// then see the bits their own packing would have made. Only with the bf16 kernel active.
public func layerNormForward(
    out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>,
    input: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
    rows: Int, cols: Int, eps: Float = layerNormEps, outInBF16: Bool = false
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.norms, t0) }
    precondition(!outInBF16 || BF16.isActive, "layerNormForward: bf16 output needs the bf16 kernel")
    nonisolated(unsafe) let out = out, mean = mean, rstd = rstd, input = input, weight = weight, bias = bias
    let chunk = 32   // rows normalised into a scratch, then rounded in one call
    Parallel.forRanges(rows, grain: max(1, 8192 / max(cols, 1))) { r in
        let scratch = outInBF16 ? UnsafeMutablePointer<Float>.allocate(capacity: chunk * cols) : nil
        defer { scratch?.deallocate() }
        let out16 = UnsafeMutableRawPointer(out).assumingMemoryBound(to: UInt16.self)
        for i in r {
            let x = input + i * cols
            let y = scratch.map { $0 + ((i - r.lowerBound) % chunk) * cols } ?? out + i * cols
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
            if let scratch, (i - r.lowerBound) % chunk == chunk - 1 || i == r.upperBound - 1 {
                let first = i - (i - r.lowerBound) % chunk
                mapet_bf16_round(scratch, out16 + first * cols, (i - first + 1) * cols)
            }
        }
    }
}

/// Accumulates dInput, dWeight, dBias in one pass over the rows: dWeight/dBias are summed
/// per block of `reductionRows` rows (in row order) while dInput is formed, then the blocks'
/// sums are added in block order (`BlockColumnSums`), so results do not depend on the thread
/// count. `dWeight`/`dBias` may be nil (frozen parameters).
public func layerNormBackward(
    dInput: UnsafeMutablePointer<Float>, dWeight: UnsafeMutablePointer<Float>?, dBias: UnsafeMutablePointer<Float>?,
    dOut: UnsafePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
    mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, rows: Int, cols: Int
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.norms, t0) }
    nonisolated(unsafe) let dInput = dInput, dOut = dOut, input = input, weight = weight, mean = mean, rstd = rstd
    // The partial sums ride along with dInput's loop (also for frozen parameters: a branch-free
    // loop costs less than the sums).
    let sums = BlockColumnSums(rows: rows, cols: cols, vectors: 2)
    defer { sums.deallocate() }
    Parallel.forRanges(sums.blocks) { blocks in
        for block in blocks {
            let pw = sums.partial(block, 0)!, pb = sums.partial(block, 1)!
            for i in sums.rows(of: block) {
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
                    pw[j] += dy[j] * xh
                    pb[j] += dy[j]
                }
            }
        }
    }
    if let dWeight { sums.add(0, into: dWeight) }
    if let dBias { sums.add(1, into: dBias) }
}

/// Column sums of per-row terms, formed inside a pass over the rows: each block of
/// `reductionRows` rows sums its rows in order into its own partial vectors, and `add` then sums
/// the blocks in order into the destination. The grouping depends on the row count only, so a
/// pass whose workers each take whole blocks gives the same bits on any number of threads.
struct BlockColumnSums: @unchecked Sendable {
    static let reductionRows = 64
    let rows, cols, blocks, vectors: Int
    private let storage: UnsafeMutablePointer<Float>?

    /// `vectors` partial vectors of `cols` per block (0: nothing to sum).
    init(rows: Int, cols: Int, vectors: Int) {
        self.rows = rows; self.cols = cols; self.vectors = vectors
        blocks = (rows + Self.reductionRows - 1) / Self.reductionRows
        let count = blocks * vectors * cols
        storage = count > 0 ? UnsafeMutablePointer<Float>.allocate(capacity: count) : nil
        storage?.initialize(repeating: 0, count: count)
    }

    func rows(of block: Int) -> Range<Int> { block * Self.reductionRows ..< min(rows, (block + 1) * Self.reductionRows) }

    /// Partial vector `v` of `block` (nil when there are none).
    func partial(_ block: Int, _ v: Int) -> UnsafeMutablePointer<Float>? {
        v < vectors ? storage.map { $0 + (block * vectors + v) * cols } : nil
    }

    /// dst[j] += Σ_blocks partial(block, v)[j], blocks in order; columns split over workers.
    func add(_ v: Int, into dst: UnsafeMutablePointer<Float>) {
        guard let base = storage, v < vectors else { return }
        nonisolated(unsafe) let dst = dst, storage = base
        let (blocks, vectors, cols) = (self.blocks, self.vectors, self.cols)
        Parallel.forRanges(cols, grain: 64) { c in
            for block in 0..<blocks {
                let p = storage + (block * vectors + v) * cols
                for j in c { dst[j] += p[j] }
            }
        }
    }

    func deallocate() { storage?.deallocate() }
}
