// Residual connection with optional layer scale (Touvron et al. 2021, CaiT) and optional
// per-sample drop-path scale:
//   out [B, T, C] = residual + keep[b] · gamma ⊙ branch      (gamma nil → 1, keep nil → 1)
// `out` may be the residual buffer itself (in-place x += …).
// Backward:  dResidual += dOut,  dBranch += keep[b] · gamma ⊙ dOut,
//            dGamma += Σ_{b,t} keep[b] · dOut ⊙ branch.

public func residualForward(
    out: UnsafeMutablePointer<Float>, residual: UnsafePointer<Float>, branch: UnsafePointer<Float>,
    gamma: UnsafePointer<Float>?, keep: UnsafePointer<Float>?, B: Int, T: Int, C: Int
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let out = out, residual = residual, branch = branch, gamma = gamma, keep = keep
    Parallel.forRanges(B * T, grain: max(1, 8192 / max(C, 1))) { r in
        for row in r {
            let s = keep?[row / T] ?? 1
            let o = out + row * C, x = residual + row * C, y = branch + row * C
            if let gamma {
                for j in 0..<C { o[j] = x[j] + s * gamma[j] * y[j] }
            } else {
                for j in 0..<C { o[j] = x[j] + s * y[j] }
            }
        }
    }
}

/// dResidual is usually nil: the residual gradient is dOut itself, which callers keep flowing.
/// `accumulateBranch: false` writes dBranch instead of adding to it (the bits of adding to
/// zeros — a zero is still added, so −0 becomes +0 as it did — without zeroing it first).
public func residualBackward(
    dResidual: UnsafeMutablePointer<Float>?, dBranch: UnsafeMutablePointer<Float>, dGamma: UnsafeMutablePointer<Float>?,
    dOut: UnsafePointer<Float>, branch: UnsafePointer<Float>,
    gamma: UnsafePointer<Float>?, keep: UnsafePointer<Float>?, B: Int, T: Int, C: Int, accumulateBranch: Bool = true
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dResidual = dResidual, dBranch = dBranch, dOut = dOut, branch = branch, gamma = gamma, keep = keep
    // dGamma's column sums are taken in the same pass, block by block (see BlockColumnSums).
    let sums = BlockColumnSums(rows: B * T, cols: C, vectors: dGamma != nil ? 1 : 0)
    defer { sums.deallocate() }
    Parallel.forRanges(sums.blocks) { blocks in
        for block in blocks {
            let pg = sums.partial(block, 0)
            for row in sums.rows(of: block) {
                let s = keep?[row / T] ?? 1
                let dy = dOut + row * C, db = dBranch + row * C
                if let dResidual { let dr = dResidual + row * C; for j in 0..<C { dr[j] += dy[j] } }
                let base: UnsafePointer<Float>? = accumulateBranch ? UnsafePointer(db) : nil
                if let gamma {
                    if let base { for j in 0..<C { db[j] = base[j] + s * gamma[j] * dy[j] } }
                    else { for j in 0..<C { db[j] = 0 + s * gamma[j] * dy[j] } }
                } else {
                    if let base { for j in 0..<C { db[j] = base[j] + s * dy[j] } }
                    else { for j in 0..<C { db[j] = 0 + s * dy[j] } }
                }
                if let pg, s != 0 {
                    let y = branch + row * C
                    for j in 0..<C { pg[j] += s * dy[j] * y[j] }
                }
            }
        }
    }
    if let dGamma { sums.add(0, into: dGamma) }
}
