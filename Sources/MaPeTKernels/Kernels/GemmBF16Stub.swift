#if canImport(Glibc)
import Glibc
#endif

// EMULATED stand-in for the bf16 GEMM kernel (issue 14), with the real kernel's declarations so
// the engine can be wired to them now. The integrator deletes this file when the AVX512-BF16
// kernel (GemmBF16.swift) lands. Semantics (SPEC §7): op(A) and op(B) are rounded to bf16
// (round to nearest, ties to even), products accumulate in fp32, C = alpha·op(A)·op(B) + beta·C.
// Here the rounded copies are made in scratch and multiplied by OpenBLAS sgemm; bf16 values are
// exact in fp32, so only the accumulation order differs from a native kernel.

public enum BF16 {
    /// Whether the CPU runs bf16 products natively (the stub emulates them everywhere).
    public static let isNative: Bool = true
    /// bf16 products are used: native support and `MAPET_BF16` is not "off" (read once).
    public static var isActive: Bool { active }

    private static let active: Bool = {
        guard isNative else { return false }
        if let v = getenv("MAPET_BF16"), String(cString: v) == "off" { return false }
        return true
    }()
}

/// fp32 → nearest bf16 (ties to even), returned as the fp32 value it represents; NaN stays NaN.
@inline(__always)
private func roundedToBF16(_ x: Float) -> Float {
    let bits = x.bitPattern
    if x.isNaN { return Float(bitPattern: (bits | 0x0040_0000) & 0xFFFF_0000) }
    let rounded = bits &+ 0x7FFF &+ ((bits >> 16) & 1)
    return Float(bitPattern: rounded & 0xFFFF_0000)
}

/// The `rows × cols` matrix at `src` (row stride `ld`) rounded to bf16 into a new compact buffer.
private func roundedCopy(_ src: UnsafePointer<Float>, rows: Int, cols: Int, ld: Int) -> UnsafeMutablePointer<Float> {
    let dst = UnsafeMutablePointer<Float>.allocate(capacity: max(rows * cols, 1))
    for i in 0..<rows {
        let s = src + i * ld, d = dst + i * cols
        for j in 0..<cols { d[j] = roundedToBF16(s[j]) }
    }
    return dst
}

/// C[M, N] = alpha · bf16(op(A)) · bf16(op(B)) + beta · C with fp32 accumulation (row-major,
/// strides as in `sgemm`), single-threaded.
public func bf16Gemm(transA: Bool, transB: Bool, M: Int, N: Int, K: Int, alpha: Float, A: UnsafePointer<Float>,
                     lda: Int, B: UnsafePointer<Float>, ldb: Int, beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int) {
    if M == 0 || N == 0 { return }
    let a = transA ? roundedCopy(A, rows: K, cols: M, ld: lda) : roundedCopy(A, rows: M, cols: K, ld: lda)
    let b = transB ? roundedCopy(B, rows: N, cols: K, ld: ldb) : roundedCopy(B, rows: K, cols: N, ld: ldb)
    defer { a.deallocate(); b.deallocate() }
    sgemm(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: a, lda: transA ? M : K,
          B: b, ldb: transB ? K : N, beta: beta, C: C, ldc: ldc)
}

/// `bf16Gemm` over `Parallel.threadCount` workers; each element of C is computed by one worker,
/// so the result does not depend on the thread count.
public func bf16GemmParallel(transA: Bool, transB: Bool, M: Int, N: Int, K: Int, alpha: Float, A: UnsafePointer<Float>,
                             lda: Int, B: UnsafePointer<Float>, ldb: Int, beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int) {
    if M == 0 || N == 0 { return }
    let a = transA ? roundedCopy(A, rows: K, cols: M, ld: lda) : roundedCopy(A, rows: M, cols: K, ld: lda)
    let b = transB ? roundedCopy(B, rows: N, cols: K, ld: ldb) : roundedCopy(B, rows: K, cols: N, ld: ldb)
    defer { a.deallocate(); b.deallocate() }
    sgemmParallel(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: a, lda: transA ? M : K,
                  B: b, ldb: transB ? K : N, beta: beta, C: C, ldc: ldc)
}
