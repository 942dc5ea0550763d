// Kernels exposed one by one (mapet.ops): inputs and outputs are caller-owned buffers.
import CPythonBridge
import MaPeTKernels

let kernelMethods: [Method] = [
    Method("gemm", { args in
        try gemmCall(args, "gemm", bf16: false)
    }, doc: "gemm(a, b, out, trans_a, trans_b, alpha, beta[, precision]) -> out: out = alpha·op(a)·op(b) + beta·out (float32, row-major; rows may be strided; out None: a new array, beta must be 0); precision 'fp32' (default) or 'bf16'."),

    Method("gemm_bf16", { args in
        try gemmCall(args, "gemm_bf16", bf16: true)
    }, doc: "gemm_bf16(a, b, out, trans_a, trans_b, alpha, beta) -> out: as gemm with precision 'bf16' (inputs rounded to bf16, fp32 accumulation; fp32 when bf16_info() says inactive)."),

    Method("bf16_info", { args in
        try args.expect(0)
        return try pyTuple([pyBool(BF16.isNative), pyBool(BF16.isActive), pyString(BF16.kernelName)])
    }, doc: "bf16_info() -> (native, active, kernel)"),

    Method("gelu_forward", { args in
        try args.expect(2)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32AnyShape(args[0], "x")
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(1, "out", x.shape)
        withoutGIL { geluForward(out: out.pointer, input: x.readOnly, count: x.count) }
        return try outputs.result()
    }, doc: "gelu_forward(x, out) -> out: out = x·Φ(x), float32 of any shape (out None: a new array)."),

    Method("gelu_backward", { args in
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let dout = try arena.float32AnyShape(args[0], "dout")
        let x = try arena.float32(args[1], "x", dout.shape)
        let outputs = Outputs(arena, args)
        let dx = try outputs.float32(2, "dx", dout.shape)
        withoutGIL { geluBackward(dInput: dx.pointer, dOut: dout.readOnly, input: x.readOnly, count: x.count) }
        return try outputs.result()
    }, doc: "gelu_backward(dout, x, dx) -> dx: dx += dout·gelu'(x), float32 of any shape (dx None: a new zero array)."),
]

/// gemm / gemm_bf16(a, b, out, trans_a, trans_b, alpha, beta[, precision]): out = alpha·op(a)·op(b) + beta·out.
/// a, b and out are 2-d float32 arrays with contiguous rows; rows may lie apart (column slices).
private func gemmCall(_ args: Args, _ name: String, bf16: Bool) throws -> PyObj? {
    if bf16 || args.count != 8 { try args.expect(7) }
    let precision = args.count == 8 ? try args.precision(7, "precision") : (bf16 ? .bf16 : .fp32)
    let arena = BufferArena(); defer { arena.release() }
    let (A, lda) = try arena.float32Rows(args[0], "a", [nil, nil])
    let (B, ldb) = try arena.float32Rows(args[1], "b", [nil, nil])
    let tA = try args.bool(3, "trans_a"), tB = try args.bool(4, "trans_b")
    let M = tA ? A.shape[1] : A.shape[0], K = tA ? A.shape[0] : A.shape[1]
    let K2 = tB ? B.shape[1] : B.shape[0], N = tB ? B.shape[0] : B.shape[1]
    guard K == K2 else {
        throw PyError.value("b: expected op(b) with \(K) rows to match op(a) [\(M), \(K)] (\(name)), got op(b) [\(K2), \(N)]")
    }
    let alpha = Float(try args.double(5, "alpha")), beta = Float(try args.double(6, "beta"))
    guard beta == 0 || !args.isNone(2) else {
        throw PyError.value("out: beta=\(beta) reads out, so it must be an array [\(M), \(N)], got None")
    }
    let outputs = Outputs(arena, args)
    let (C, ldc) = try outputs.float32Rows(2, "out", [M, N])
    nonisolated(unsafe) let (pa, pb, pc) = (A.readOnly, B.readOnly, C.pointer)
    withoutGIL {
        gemm(precision, transA: tA, transB: tB, M: M, N: N, K: K, alpha: alpha, A: pa, lda: lda,
             B: pb, ldb: ldb, beta: beta, C: pc, ldc: ldc)
    }
    return try outputs.result()
}
