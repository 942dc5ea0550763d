// Convolution and pooling kernels (mapet.ops.conv2d / avg_pool2d; CLIP's ModifiedResNet):
// NCHW float32 buffers in and out (a None output is allocated here), every size checked before the kernel runs.
import CPythonBridge
import MaPeTKernels

/// True when the float ranges [a, a + n) and [b, b + m) share memory.
private func overlaps(_ a: UnsafePointer<Float>, _ n: Int, _ b: UnsafePointer<Float>, _ m: Int) -> Bool {
    n > 0 && m > 0 && a < b + m && b < a + n
}

let convMethods: [Method] = [
    Method("conv2d_forward", { args in
        // (out [B,Cout,Ho,Wo], x [B,Cin,H,W], weight [Cout,Cin,kH,kW], bias [Cout]|None,
        //  residual [B,Cout,Ho,Wo]|None, relu, stride, padding, precision)
        try args.expect(9)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil, nil, nil])
        let (B, Cin, H, W) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let w = try arena.float32(args[2], "weight", [nil, Cin, nil, nil])
        let (Cout, kH, kW) = (w.shape[0], w.shape[2], w.shape[3])
        let s = try args.int(6, "stride", min: 1, max: 1 << 20), p = try args.int(7, "padding", min: 0, max: 1 << 20)
        guard kH >= 1, kW >= 1 else { throw PyError.value("weight: expected a kernel of at least 1×1, got \(kH)×\(kW)") }
        guard H + 2 * p >= kH, W + 2 * p >= kW else {
            throw PyError.value("x: a \(H)×\(W) image with padding \(p) is smaller than the \(kH)×\(kW) kernel")
        }
        let Ho = conv2dOutputSize(H, kernel: kH, stride: s, padding: p)
        let Wo = conv2dOutputSize(W, kernel: kW, stride: s, padding: p)
        let b = args.isNone(3) ? nil : try arena.float32(args[3], "bias", [Cout])
        let r = args.isNone(4) ? nil : try arena.float32(args[4], "residual", [B, Cout, Ho, Wo])
        let relu = try args.bool(5, "relu")
        let precision = try args.precision(8, "precision")
        let scratch = try checkedProduct([Cin, kH, kW, min(Ho * Wo, conv2dBlockPixels), 4], "conv2d columns")
        try requireMemory(scratch, "conv2d_forward: the im2col columns")
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, Cout, Ho, Wo])
        guard !overlaps(out.readOnly, out.count, x.readOnly, x.count) else {  // (a new output shares nothing)
            throw PyError.value("out: must not share memory with x")
        }
        if let r, overlaps(out.readOnly, out.count, r.readOnly, r.count) {
            throw PyError.value("out: must not share memory with residual")
        }
        nonisolated(unsafe) let (po, px, pw, pb, pr) = (out.pointer, x.readOnly, w.readOnly, b?.readOnly, r?.readOnly)
        withoutGIL {
            conv2dForward(out: po, input: px, weight: pw, bias: pb, residual: pr, relu: relu,
                          B: B, inChans: Cin, H: H, W: W, outChans: Cout, kernelH: kH, kernelW: kW,
                          stride: s, padding: p, precision: precision)
        }
        return try outputs.result()
    }, doc: "conv2d_forward(out, x, weight, bias, residual, relu, stride, padding, precision) -> out (a new array when out is None): out = relu?(conv(x, weight) + bias + residual), NCHW float32, groups 1 (bias/residual may be None)."),

    Method("avg_pool2d_forward", { args in
        // (out [B,C,H/s,W/s], x [B,C,H,W], stride)
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[1], "x", [nil, nil, nil, nil])
        let (B, C, H, W) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let s = try args.int(2, "stride", min: 1, max: 1 << 20)
        guard H >= s, W >= s else { throw PyError.value("x: a \(H)×\(W) image is smaller than the \(s)×\(s) pooling window") }
        let outputs = Outputs(arena, args)
        let out = try outputs.float32(0, "out", [B, C, H / s, W / s])
        guard !overlaps(out.readOnly, out.count, x.readOnly, x.count) else {  // (a new output shares nothing)
            throw PyError.value("out: must not share memory with x")
        }
        nonisolated(unsafe) let (po, px) = (out.pointer, x.readOnly)
        withoutGIL { avgPool2dForward(out: po, input: px, B: B, C: C, H: H, W: W, stride: s) }
        return try outputs.result()
    }, doc: "avg_pool2d_forward(out, x, stride) -> out (a new array when out is None): mean over stride×stride windows (kernel = stride, no padding, floor), NCHW float32."),
]
