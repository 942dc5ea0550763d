// C entry points of MaPeTKernels for callers in other languages (static linking).
// Declared in python/mapet/include/mapet.h; every name carries the `mapet_` prefix.

@_cdecl("mapet_set_num_threads")
public func mapet_set_num_threads(_ n: Int32) {
    Parallel.threadCount = max(1, Int(n))
}

@_cdecl("mapet_get_num_threads")
public func mapet_get_num_threads() -> Int32 {
    Int32(Parallel.threadCount)
}

/// Row-major C = alpha·op(A)·op(B) + beta·C, parallel over row blocks.
@_cdecl("mapet_sgemm")
public func mapet_sgemm(
    _ transA: Int32, _ transB: Int32, _ M: Int, _ N: Int, _ K: Int,
    _ alpha: Float, _ A: UnsafePointer<Float>, _ lda: Int,
    _ B: UnsafePointer<Float>, _ ldb: Int,
    _ beta: Float, _ C: UnsafeMutablePointer<Float>, _ ldc: Int
) {
    sgemmParallel(transA: transA != 0, transB: transB != 0, M: M, N: N, K: K, alpha: alpha,
                  A: A, lda: lda, B: B, ldb: ldb, beta: beta, C: C, ldc: ldc)
}

@_cdecl("mapet_gelu_forward")
public func mapet_gelu_forward(_ out: UnsafeMutablePointer<Float>, _ input: UnsafePointer<Float>, _ count: Int) {
    geluForward(out: out, input: input, count: count)
}
