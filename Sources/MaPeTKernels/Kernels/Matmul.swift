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

/// The same GEMM split over row blocks of C across `Parallel.threadCount` workers, each
/// calling single-threaded BLAS. Each element of C is computed by exactly one call, so
/// the result is independent of the split.
public func sgemmParallel(
    transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int,
    B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int
) {
    // Small products are not worth a thread hop.
    let flops = 2.0 * Double(M) * Double(N) * Double(K)
    if flops < 2e6 || Parallel.threadCount == 1 {
        sgemm(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
              B: B, ldb: ldb, beta: beta, C: C, ldc: ldc)
        return
    }
    nonisolated(unsafe) let A = A, B = B, C = C
    if M >= N || M >= 64 * Parallel.threadCount {
        // Split rows of C: rows of op(A).
        Parallel.forRanges(M, grain: 16) { r in
            let a = transA ? A + r.lowerBound : A + r.lowerBound * lda
            sgemm(transA: transA, transB: transB, M: r.count, N: N, K: K, alpha: alpha, A: a, lda: lda,
                  B: B, ldb: ldb, beta: beta, C: C + r.lowerBound * ldc, ldc: ldc)
        }
    } else {
        // Split columns of C: columns of op(B).
        Parallel.forRanges(N, grain: 16) { r in
            let b = transB ? B + r.lowerBound * ldb : B + r.lowerBound
            sgemm(transA: transA, transB: transB, M: M, N: r.count, K: K, alpha: alpha, A: A, lda: lda,
                  B: b, ldb: ldb, beta: beta, C: C + r.lowerBound, ldc: ldc)
        }
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
