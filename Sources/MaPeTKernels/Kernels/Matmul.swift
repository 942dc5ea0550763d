import CBLAS

/// Row-major GEMM through OpenBLAS:
///   C[M, N] = alpha · op(A) · op(B) + beta · C,   op(A) [M, K], op(B) [K, N].
/// `lda`, `ldb`, `ldc` are the row strides of A, B and C as stored.
@inlinable
public func sgemm(
    transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int,
    B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int
) {
    if M == 0 || N == 0 { return }
    if K == 0 {
        for i in 0..<M { for j in 0..<N { C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j] } }
        return
    }
    scipy_cblas_sgemm(
        MapetCblasRowMajor, transA ? MapetCblasTrans : MapetCblasNoTrans,
        transB ? MapetCblasTrans : MapetCblasNoTrans,
        Int32(M), Int32(N), Int32(K), alpha, A, Int32(lda), B, Int32(ldb), beta, C, Int32(ldc))
}

/// The same GEMM cut into tiles of C that run on `Parallel.threadCount` Dispatch workers, each
/// tile one single-threaded BLAS call.
///
/// Determinism, by construction: the tiles — which dimension is cut and where — depend only on
/// (M, N, K) and on `Parallel.planWidth` (the processor count, fixed for the process), never on
/// `Parallel.threadCount`. Any thread count therefore makes the same BLAS calls on the same
/// operands, and C is bitwise the same for 1, 2 or more threads on a given machine and kernel.
/// Nothing more is promised: OpenBLAS computes the leftover rows/columns of a block with other
/// micro-kernels (another FMA order), so a row of C may change in its last bits when M, N, the
/// row's position in the product, the processor count or the OpenBLAS kernel changes.
public func sgemmParallel(
    transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int,
    B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int
) {
    let plan = GemmTiles(M: M, N: N, K: K)
    if plan.count == 1 {
        sgemm(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
              B: B, ldb: ldb, beta: beta, C: C, ldc: ldc)
        return
    }
    nonisolated(unsafe) let A = A, B = B, C = C
    Parallel.forEach(plan.count) { t in
        let r = plan.range(t)
        if plan.splitsRows {
            let a = transA ? A + r.lowerBound : A + r.lowerBound * lda
            sgemm(transA: transA, transB: transB, M: r.count, N: N, K: K, alpha: alpha, A: a, lda: lda,
                  B: B, ldb: ldb, beta: beta, C: C + r.lowerBound * ldc, ldc: ldc)
        } else {
            let b = transB ? B + r.lowerBound * ldb : B + r.lowerBound
            sgemm(transA: transA, transB: transB, M: M, N: r.count, K: K, alpha: alpha, A: A, lda: lda,
                  B: b, ldb: ldb, beta: beta, C: C + r.lowerBound, ldc: ldc)
        }
    }
}

/// How `sgemmParallel` cuts C: `count` tiles along the rows (M ≥ N) or the columns, edges on
/// multiples of 16, at most one tile per processor and per 16 rows/columns. Products under
/// 2 MFLOP stay one call (not worth a thread hop).
public struct GemmTiles: Sendable {
    public let splitsRows: Bool
    public let count: Int
    let length: Int

    public init(M: Int, N: Int, K: Int) {
        splitsRows = M >= N
        length = splitsRows ? M : N
        let flops = 2.0 * Double(M) * Double(N) * Double(K)
        count = flops < 2e6 ? 1 : max(1, min(Parallel.planWidth, length / 16))
    }

    /// Tile t's rows (or columns): equal shares rounded to multiples of 16, the last takes the rest.
    public func range(_ t: Int) -> Range<Int> {
        func edge(_ i: Int) -> Int { i == count ? length : (length * i / count) / 16 * 16 }
        return edge(t)..<edge(t + 1)
    }
}

/// Plain triple loop, the algorithmic reference the BLAS path is tested against.
public func sgemmNaive(
    transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int,
    B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int
) {
    for i in 0..<M {
        for j in 0..<N {
            var acc: Double = 0
            for k in 0..<K {
                let a = transA ? A[k * lda + i] : A[i * lda + k]
                let b = transB ? B[j * ldb + k] : B[k * ldb + j]
                acc += Double(a) * Double(b)
            }
            let prev = beta == 0 ? 0 : beta * C[i * ldc + j]
            C[i * ldc + j] = alpha * Float(acc) + prev
        }
    }
}
