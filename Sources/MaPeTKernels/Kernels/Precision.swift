// Numeric precision of a model's matrix products (ALGORITHMS.md §7, autocast semantics):
//   .fp32  every GEMM in fp32 (OpenBLAS sgemm);
//   .bf16  GEMM inputs rounded to bf16, fp32 accumulation, fp32 outputs — when the bf16
//          kernel is active (`BF16.isActive`); otherwise the fp32 path runs.
// Parameters, gradients, optimizer state, LayerNorm, softmax, GELU and losses are fp32 in both.

public enum Precision: String, Sendable, CaseIterable {
    case fp32, bf16

    /// Whether a product requested at this precision runs through the bf16 kernel.
    @inline(__always)
    public var usesBF16: Bool { self == .bf16 && BF16.isActive }
}

/// A GEMM kernel's arguments in `sgemm`'s order, unlabelled.
public typealias GemmKernel = (Bool, Bool, Int, Int, Int, Float, UnsafePointer<Float>, Int, UnsafePointer<Float>, Int,
                               Float, UnsafeMutablePointer<Float>, Int) -> Void

/// C[M, N] = alpha · op(A) · op(B) + beta · C at `precision` (arguments as `sgemm`), split over
/// the worker threads, or with `serial` on the calling thread (for callers that parallelise
/// outside, e.g. attention over batch × heads). The result does not depend on the thread count.
@inline(__always)
public func gemm(
    _ precision: Precision, transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int,
    B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int, serial: Bool = false
) {
    let kernel: GemmKernel = switch (precision.usesBF16, serial) {
    case (true, false): { bf16GemmParallel(transA: $0, transB: $1, M: $2, N: $3, K: $4, alpha: $5, A: $6, lda: $7,
                                           B: $8, ldb: $9, beta: $10, C: $11, ldc: $12) }
    case (true, true): bf16Gemm
    case (false, false): sgemmParallel
    case (false, true): sgemm
    }
    kernel(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
}
