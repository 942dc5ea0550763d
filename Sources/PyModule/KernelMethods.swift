// Kernels exposed one by one (mapet.ops): inputs and outputs are caller-owned buffers.
import CPythonBridge
import MaPeTKernels

let kernelMethods: [Method] = [
    Method(name: "gemm", function: { _, a, n in call(a, n, "gemm") { args in
        // gemm(a, b, out, trans_a, trans_b, alpha, beta): out = alpha·op(a)·op(b) + beta·out
        try args.expect(7)
        let arena = BufferArena(); defer { arena.release() }
        let A = try arena.float32(args[0], "a", [nil, nil])
        let B = try arena.float32(args[1], "b", [nil, nil])
        let tA = try args.bool(3, "trans_a"), tB = try args.bool(4, "trans_b")
        let M = tA ? A.shape[1] : A.shape[0], K = tA ? A.shape[0] : A.shape[1]
        let K2 = tB ? B.shape[1] : B.shape[0], N = tB ? B.shape[0] : B.shape[1]
        guard K == K2 else {
            throw PyError.value("gemm: inner dimensions differ: op(a) is [\(M), \(K)], op(b) is [\(K2), \(N)]")
        }
        let C = try arena.float32(args[2], "out", [M, N], writable: true)
        let alpha = Float(try args.double(5, "alpha")), beta = Float(try args.double(6, "beta"))
        nonisolated(unsafe) let (pa, pb, pc) = (A.readOnly, B.readOnly, C.pointer)
        withoutGIL {
            sgemmParallel(transA: tA, transB: tB, M: M, N: N, K: K, alpha: alpha, A: pa, lda: A.shape[1],
                          B: pb, ldb: B.shape[1], beta: beta, C: pc, ldc: N)
        }
        return none()
    } }, doc: "gemm(a, b, out, trans_a, trans_b, alpha, beta): out = alpha·op(a)·op(b) + beta·out (float32, row-major)."),

    Method(name: "gelu_forward", function: { _, a, n in call(a, n, "gelu_forward") { args in
        try args.expect(2)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil])
        let out = try arena.float32(args[1], "out", [x.count], writable: true)
        withoutGIL { geluForward(out: out.pointer, input: x.readOnly, count: x.count) }
        return none()
    } }, doc: "gelu_forward(x, out): out = x·Φ(x), 1-d float32."),

    Method(name: "gelu_backward", function: { _, a, n in call(a, n, "gelu_backward") { args in
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let dout = try arena.float32(args[0], "dout", [nil])
        let x = try arena.float32(args[1], "x", [dout.count])
        let dx = try arena.float32(args[2], "dx", [dout.count], writable: true)
        withoutGIL { geluBackward(dInput: dx.pointer, dOut: dout.readOnly, input: x.readOnly, count: x.count) }
        return none()
    } }, doc: "gelu_backward(dout, x, dx): dx += dout·gelu'(x), 1-d float32."),
]
