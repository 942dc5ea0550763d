import CBF16
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// Mixed-precision GEMM on CPUs with AVX512-BF16 (the C target `CBF16`):
///   C[M, N] = alpha · op(A) · op(B) + beta · C,   op(A) [M, K], op(B) [K, N], row-major,
/// with every input element rounded to bf16 (round-to-nearest-even) and the products
/// summed in fp32 (`vdpbf16ps`: two products of exactly representable bf16 values per step).
/// Error: against the exact product of the ROUNDED inputs, fp32 accumulation gives
/// |err| ≤ ~K·2⁻²⁴·Σ|a·b|; against the fp32 inputs the bf16 rounding dominates, ≈ 2⁻⁸·Σ|a·b|.
/// Like the instruction itself, bf16 subnormals (|x| < 2⁻¹²⁶) count as zero.
public enum BF16 {
    /// The CPU can run the AVX512-BF16 kernel.
    public static let isNative: Bool = mapet_bf16_cpu_supported() != 0

    /// The environment variable MAPET_BF16 set to off/0/false switches the kernel off
    /// (read once, at first use).
    private static let disabledByEnvironment: Bool = {
        guard let raw = getenv("MAPET_BF16") else { return false }
        let value = String(cString: raw).lowercased()
        return value == "off" || value == "0" || value == "false"
    }()

    /// Native and not switched off by the environment variable MAPET_BF16=off (read once, at first use).
    public static var isActive: Bool { isNative && !disabledByEnvironment }

    /// The largest K whose product the kernel sums in one block (see `BF16Storage.c`).
    public static let singleBlockK: Int = mapet_bf16_k_block()

    /// What `bf16Gemm` runs: the micro-kernel's name, or the fp32 fallback.
    public static var kernelName: String {
        isActive ? String(cString: mapet_bf16_kernel_name()) : "fp32 (sgemm fallback)"
    }
}

/// C = alpha·op(A)·op(B) + beta·C, inputs rounded to bf16 (RNE), fp32 accumulation. Single-threaded.
/// Semantics of cblas_sgemm (row-major; `lda`, `ldb`, `ldc` are row strides as stored; beta == 0
/// does not read C; K == 0 gives beta·C). Precondition: BF16.isActive — when it is not, this
/// computes in fp32 through `sgemm` instead of trapping.
public func bf16Gemm(transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int, B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int)
{
    bf16GemmDriver(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
                   B: B, ldb: ldb, beta: beta, C: C, ldc: ldc, bias: nil, rowSums: nil, multiplyBy: nil,
                   geluDerivative: nil, parallel: false)
}

/// The same over Parallel.threadCount workers. Work is split in tiles whose boundaries depend
/// only on (M, N, K), and every element's K summation order is fixed (one accumulator lane,
/// k-pairs in increasing order), so the result is bitwise independent of the thread count.
/// op(B) is packed once, in parallel, and shared; each worker packs its own rows of op(A).
/// With `bias` [N], every row of C also gets the bias added; with beta = 0 it enters in the
/// kernel's store of C (the bits of filling C with the bias and using beta = 1, one pass less).
/// With `transA` and `rowSums` [M], also rowSums[i] += Σ_k op(A)[i, k] in fp32, k in increasing
/// order — the bits of `columnSumAccumulate` over the stored A — taken while A is packed.
/// With `multiplyBy` [M, N] (row stride ldc), C's final values are multiplied by it elementwise
/// as they are stored (the bits of the product followed by a multiplying pass). With
/// `geluDerivative` [M, N] (row stride ldc), C receives gelu of its final values and
/// geluDerivative their gelu′ (the bits of the product followed by `geluForwardKeepingDerivative`).
/// `storage` says which operands hold bf16 values (uint16, strides in them) instead of fp32:
/// see `BF16Storage`; only with the kernel active (`BF16.isActive`).
public func bf16GemmParallel(transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int, B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int, bias: UnsafePointer<Float>? = nil,
    rowSums: UnsafeMutablePointer<Float>? = nil, multiplyBy: UnsafePointer<Float>? = nil,
    geluDerivative: UnsafeMutablePointer<Float>? = nil, storage: BF16Storage = [])
{
    bf16GemmDriver(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
                   B: B, ldb: ldb, beta: beta, C: C, ldc: ldc, bias: bias, rowSums: rowSums,
                   multiplyBy: multiplyBy, geluDerivative: geluDerivative, parallel: true, storage: storage)
}

/// Operands of a bf16 product stored as bf16 (uint16 values behind the Float pointer, strides
/// counted in them). An activation that one product writes so and the next reads so gives the
/// bits of fp32 storage — the reader rounds to bf16 by the same rule — with half the memory
/// traffic.
public struct BF16Storage: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    /// A (not transposed) is read as bf16.
    public static let a = BF16Storage(rawValue: 1)
    /// B (not transposed) is read as bf16.
    public static let b = BF16Storage(rawValue: 2)
    /// C is written as bf16: beta 0 and K ≤ `BF16.singleBlockK` (C stored once, never read).
    public static let c = BF16Storage(rawValue: 4)
}

/// Rounds to bf16 with round-to-nearest-even and back to fp32 (NaN stays NaN): the reference
/// for what the kernel does to each input element.
@inlinable
public func bf16Round(_ x: Float) -> Float {
    if x.isNaN { return x }
    let u = x.bitPattern
    return Float(bitPattern: (u &+ 0x7FFF &+ ((u >> 16) & 1)) & 0xFFFF_0000)
}

private func bf16GemmDriver(transA: Bool, transB: Bool, M: Int, N: Int, K: Int,
    alpha: Float, A: UnsafePointer<Float>, lda: Int, B: UnsafePointer<Float>, ldb: Int,
    beta: Float, C: UnsafeMutablePointer<Float>, ldc: Int, bias: UnsafePointer<Float>?,
    rowSums: UnsafeMutablePointer<Float>?, multiplyBy: UnsafePointer<Float>?,
    geluDerivative: UnsafeMutablePointer<Float>?, parallel: Bool, storage: BF16Storage = [])
{
    if M <= 0 || N <= 0 { return }
    precondition(storage.isEmpty || (BF16.isActive && K > 0), "bf16 storage needs the bf16 kernel and K > 0")
    precondition(!storage.contains(.a) || !transA, "bf16 storage of A: not transposed")
    precondition(!storage.contains(.b) || !transB, "bf16 storage of B: not transposed")
    precondition(!storage.contains(.c) || (beta == 0 && K <= BF16.singleBlockK && multiplyBy == nil),
                 "bf16 storage of C: beta 0, one K block")
    if multiplyBy != nil || geluDerivative != nil, !(BF16.isActive && K > 0) {
        // The fallback and the empty product: the product, then the elementwise pass.
        bf16GemmDriver(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda, B: B, ldb: ldb,
                       beta: beta, C: C, ldc: ldc, bias: bias, rowSums: rowSums, multiplyBy: nil, geluDerivative: nil,
                       parallel: parallel)
        for i in 0..<M {
            let row = C + i * ldc
            if let multiplyBy { for j in 0..<N { row[j] *= multiplyBy[i * ldc + j] } }
            if let geluDerivative {
                let d = geluDerivative + i * ldc
                d.update(from: row, count: N)
                geluForwardKeepingDerivative(out: row, inputThenDerivative: d, count: N)
            }
        }
        return
    }
    if let rowSums, !(BF16.isActive && transA && K > 0) {
        // The fallback and the cases the packing does not cover: a separate pass.
        if transA && lda == M { columnSumAccumulate(rowSums, A, rows: K, cols: M) }
        else { for k in 0..<K { for i in 0..<M { rowSums[i] += transA ? A[k * lda + i] : A[i * lda + k] } } }
    }
    let kernelRowSums = BF16.isActive && transA && K > 0 ? rowSums : nil
    var betaC = beta
    if let bias, !BF16.isActive || K <= 0 || beta != 0 {
        // The fallback, the empty product, and beta ≠ 0: put the bias into C and add to it.
        for i in 0..<M {
            let row = C + i * ldc
            for j in 0..<N { row[j] = beta == 0 ? bias[j] : beta * row[j] + bias[j] }
        }
        betaC = 1
    }
    let folded = betaC != beta
    let beta = betaC
    guard BF16.isActive else {
        if !parallel {
            sgemm(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
                  B: B, ldb: ldb, beta: beta, C: C, ldc: ldc)
        } else {
            sgemmParallel(transA: transA, transB: transB, M: M, N: N, K: K, alpha: alpha, A: A, lda: lda,
                          B: B, ldb: ldb, beta: beta, C: C, ldc: ldc)
        }
        return
    }
    if K <= 0 {
        if !folded { for i in 0..<M { for j in 0..<N { C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j] } } }
        return
    }
    let NR = mapet_bf16_panel_cols()
    let panels = (N + NR - 1) / NR
    let packed = UnsafeMutableRawPointer.allocate(
        byteCount: mapet_bf16_packed_b_words(K, N) * 4, alignment: 64).assumingMemoryBound(to: UInt32.self)
    defer { packed.deallocate() }
    // Small products are not worth a thread hop (the result is the same either way).
    let flops = 2.0 * Double(M) * Double(N) * Double(K)
    let threads = parallel && flops >= 4e6 ? Parallel.threadCount : 1
    var shape = (rows: 0, cols: 0)
    mapet_bf16_tile_shape(M, N, K, threads, &shape.rows, &shape.cols)
    let tileRows = shape.rows, tileCols = shape.cols
    let rowTiles = (M + tileRows - 1) / tileRows, colTiles = (N + tileCols - 1) / tileCols
    let tiles = rowTiles * colTiles
    let workers = max(1, min(threads, tiles))
    let tA: Int32 = transA ? 1 : 0, tB: Int32 = transB ? 1 : 0

    let kernelBias = folded ? nil : bias
    let flags = Int32((storage.contains(.a) ? Int(MAPET_BF16_A_IS_BF16) : 0) | (storage.contains(.c) ? Int(MAPET_BF16_C_AS_BF16) : 0))
    nonisolated(unsafe) let B16 = UnsafeRawPointer(B).assumingMemoryBound(to: UInt16.self)
    let bIsBF16 = storage.contains(.b)
    nonisolated(unsafe) let A = A, B = B, C = C, packedB = packed, bias = kernelBias, rowSums = kernelRowSums, emul = multiplyBy,
                            gderiv = geluDerivative
    let runTile = { @Sendable (t: Int, abuf: UnsafeMutablePointer<UInt32>) in
        let i0 = (t / colTiles) * tileRows, j0 = (t % colTiles) * tileCols
        // Row sums come from the first column tile of each row range: every row exactly once.
        mapet_bf16_tile(tA, M, N, K, alpha, A, lda, packedB, beta, bias, C, ldc,
                        i0, min(i0 + tileRows, M), j0, min(j0 + tileCols, N), abuf, j0 == 0 ? rowSums : nil, emul, gderiv,
                        flags)
    }
    let abufBytes = mapet_bf16_a_buffer_words() * 4
    if workers == 1 {
        if bIsBF16 { mapet_bf16_pack_b_pairs_bf16(K, N, B16, ldb, 0, panels, 0, (K + 1) / 2, packedB) }
        else { mapet_bf16_pack_b(tB, K, N, B, ldb, 0, panels, packedB) }
        let abuf = UnsafeMutableRawPointer.allocate(byteCount: abufBytes, alignment: 64)
            .assumingMemoryBound(to: UInt32.self)
        defer { abuf.deallocate() }
        for t in 0..<tiles { runTile(t, abuf) }
        return
    }
    // Packing B is shared out in pieces of (panel, run of 16·chunk k-pairs), as evenly as the
    // pieces allow: three tall panels (N = 192) would otherwise keep one of two workers idle
    // for a third of the packing.
    let pairs = (K + 1) / 2, runs = (pairs + 15) / 16
    let chunksPerPanel = min(runs, max(1, (4 * workers + panels - 1) / panels))
    let pieces = panels * chunksPerPanel
    DispatchQueue.concurrentPerform(iterations: workers) { w in
        for piece in stride(from: w, to: pieces, by: workers) {
            let p = piece / chunksPerPanel, c = piece % chunksPerPanel
            let kp0 = 16 * (runs * c / chunksPerPanel), kp1 = 16 * (runs * (c + 1) / chunksPerPanel)
            if bIsBF16 { mapet_bf16_pack_b_pairs_bf16(K, N, B16, ldb, p, p + 1, kp0, kp1, packedB) }
            else { mapet_bf16_pack_b_pairs(tB, K, N, B, ldb, p, p + 1, kp0, kp1, packedB) }
        }
    }
    // Tiles are handed out first come, first served: which worker computes a tile never
    // changes its value.
    let counter = UnsafeMutablePointer<Int>.allocate(capacity: 1)
    counter.initialize(to: 0)
    defer { counter.deallocate() }
    nonisolated(unsafe) let next = counter
    DispatchQueue.concurrentPerform(iterations: workers) { _ in
        let abuf = UnsafeMutableRawPointer.allocate(byteCount: abufBytes, alignment: 64)
            .assumingMemoryBound(to: UInt32.self)
        defer { abuf.deallocate() }
        while true {
            let t = mapet_bf16_next(next)
            if t >= tiles { break }
            runTile(t, abuf)
        }
    }
}
