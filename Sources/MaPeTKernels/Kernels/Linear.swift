// Linear layer in PyTorch layout:  out [rows, OC] = input [rows, IC] · weightᵀ + bias,
// weight [OC, IC], bias [OC] (optional). GEMMs through `gemm(precision, …)`: `sgemmParallel`
// (row blocks over workers, single-threaded BLAS each) in fp32, bf16 inputs with fp32
// accumulation in bf16 (ALGORITHMS.md §7); the bias and the accumulation into gradients stay fp32.
// Backward:  dInput += dOut · weight,  dWeight += dOutᵀ · input,  dBias += Σ_rows dOut.
// `ldOut` (default OC) is the row stride of out / dOut: they may be a column range of a wider
// buffer (the keys and values inside a block's fused [q | k | v]). In bf16, `storage` (forward:
// .a input, .c out) and `inputInBF16` (backward) say which activations are held as bf16 values
// (see BF16Storage): the MLP's hidden activation between fc1 and fc2.

/// With `geluDerivative` [rows, OC], out = gelu(input · weightᵀ + bias) and geluDerivative its
/// gelu′ (the values of the product followed by `geluForwardKeepingDerivative`); in bf16 GELU
/// runs in the GEMM's store, no pass of its own.
public func linearForward(
    out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
    weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
    rows: Int, inFeatures IC: Int, outFeatures OC: Int, precision: Precision = .fp32,
    geluDerivative: UnsafeMutablePointer<Float>? = nil, ldOut: Int? = nil, storage: BF16Storage = []
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.gemm, t0) }
    let ldo = ldOut ?? OC
    precondition(geluDerivative == nil || ldo == OC, "linearForward: geluDerivative needs contiguous rows")
    precondition(storage.isEmpty || precision.usesBF16, "linearForward: bf16 storage in a bf16 product only")
    if precision.usesBF16 {
        // The bias enters in the kernel's store of C: no separate pass over the output.
        bf16GemmParallel(transA: false, transB: true, M: rows, N: OC, K: IC, alpha: 1, A: input, lda: IC,
                         B: weight, ldb: IC, beta: 0, C: out, ldc: ldo, bias: bias, geluDerivative: geluDerivative,
                         storage: storage.intersection([.a, .c]))
        return
    }
    if let geluDerivative {
        linearForward(out: geluDerivative, input: input, weight: weight, bias: bias, rows: rows, inFeatures: IC,
                      outFeatures: OC, precision: precision)
        geluForwardKeepingDerivative(out: out, inputThenDerivative: geluDerivative, count: rows * OC)
        return
    }
    var beta: Float = 0
    if let bias {
        nonisolated(unsafe) let out = out, bias = bias
        Parallel.forRanges(rows, grain: max(1, 16384 / max(OC, 1))) { r in
            for i in r { (out + i * ldo).update(from: bias, count: OC) }
        }
        beta = 1
    }
    gemm(precision, transA: false, transB: true, M: rows, N: OC, K: IC, alpha: 1, A: input, lda: IC,
                  B: weight, ldb: IC, beta: beta, C: out, ldc: ldo)
}

/// Any of dInput, dWeight, dBias may be nil (not needed / frozen). `accumulateInput: false`
/// writes dInput instead of adding to it (the same values as adding to zeros, one pass less).
/// `dInputScale` [rows, IC] (with `accumulateInput: false`) writes dInput = (dOut · weight) ⊙
/// dInputScale — the backward of an elementwise activation whose derivative is kept (GELU's)
/// taken in the same pass; in bf16 the multiply rides in the GEMM's store.
public func linearBackward(
    dInput: UnsafeMutablePointer<Float>?, dWeight: UnsafeMutablePointer<Float>?, dBias: UnsafeMutablePointer<Float>?,
    dOut: UnsafePointer<Float>, input: UnsafePointer<Float>, weight: UnsafePointer<Float>,
    rows: Int, inFeatures IC: Int, outFeatures OC: Int, precision: Precision = .fp32, accumulateInput: Bool = true,
    dInputScale: UnsafePointer<Float>? = nil, ldOut: Int? = nil, inputInBF16: Bool = false
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.gemm, t0) }
    precondition(!inputInBF16 || precision.usesBF16, "linearBackward: bf16 input in a bf16 product only")
    precondition(dInputScale == nil || !accumulateInput, "linearBackward: dInputScale writes dInput")
    let ldo = ldOut ?? OC
    if let dInput, let dInputScale, precision.usesBF16 {
        bf16GemmParallel(transA: false, transB: false, M: rows, N: IC, K: OC, alpha: 1, A: dOut, lda: ldo,
                         B: weight, ldb: IC, beta: 0, C: dInput, ldc: IC, multiplyBy: dInputScale)
    } else if let dInput {
        gemm(precision, transA: false, transB: false, M: rows, N: IC, K: OC, alpha: 1, A: dOut, lda: ldo,
                      B: weight, ldb: IC, beta: accumulateInput ? 1 : 0, C: dInput, ldc: IC)
        if let dInputScale {
            nonisolated(unsafe) let dInput = dInput, dInputScale = dInputScale
            Parallel.forRanges(rows * IC, grain: 1 << 15) { r in
                for i in r { dInput[i] *= dInputScale[i] }
            }
        }
    }
    if let dWeight, precision.usesBF16 {
        // dBias from the same pass over dOut that packs it for dWeight (the same bits).
        bf16GemmParallel(transA: true, transB: false, M: OC, N: IC, K: rows, alpha: 1, A: dOut, lda: ldo,
                         B: input, ldb: IC, beta: 1, C: dWeight, ldc: IC, rowSums: dBias, storage: inputInBF16 ? .b : [])
        return
    }
    if let dWeight {
        gemm(precision, transA: true, transB: false, M: OC, N: IC, K: rows, alpha: 1, A: dOut, lda: ldo,
                      B: input, ldb: IC, beta: 1, C: dWeight, ldc: IC)
    }
    if let dBias { columnSumAccumulate(dBias, dOut, rows: rows, cols: OC, ld: ldo) }
}

/// dst[j] += Σ_i src[i, j], split over column blocks (row order fixed: deterministic).
public func columnSumAccumulate(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, rows: Int, cols: Int,
                                ld: Int? = nil) {
    nonisolated(unsafe) let dst = dst, src = src
    let ld = ld ?? cols
    // Column blocks of 8k floats: each worker keeps its block in registers-sized SIMD steps.
    let blocks = (cols + 7) / 8
    Parallel.forRanges(blocks, grain: 4) { r in
        let lo = r.lowerBound * 8, hi = min(r.upperBound * 8, cols)
        var j = lo
        while j + 8 <= hi {
            var acc = loadV(dst + j)
            for i in 0..<rows { acc += loadV(src + i * ld + j) }
            storeV(acc, dst + j)
            j += 8
        }
        for jj in j..<hi { for i in 0..<rows { dst[jj] += src[i * ld + jj] } }
    }
}

/// Reference: plain loops with Double accumulation.
public func linearForwardNaive(
    out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
    weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
    rows: Int, inFeatures IC: Int, outFeatures OC: Int
) {
    for i in 0..<rows {
        for o in 0..<OC {
            var acc = Double(bias?[o] ?? 0)
            for k in 0..<IC { acc += Double(input[i * IC + k]) * Double(weight[o * IC + k]) }
            out[i * OC + o] = Float(acc)
        }
    }
}
