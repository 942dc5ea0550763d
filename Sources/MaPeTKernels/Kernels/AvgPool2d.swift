// Average pooling with kernel = stride (PyTorch `nn.AvgPool2d(s)`, no padding, floor):
//   out[b, c, y, x] = (1 / s²) Σ_{i, j < s} in[b, c, y·s + i, x·s + j]
//   input [B, C, H, W] → out [B, C, H / s, W / s]. CLIP's ModifiedResNet downsamples this way
//   (anti-aliasing) before its strided-free 1×1 convolutions. Each output sums its s² inputs in
//   row-major order, whatever the thread count.

public func avgPool2dForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                             B: Int, C: Int, H: Int, W: Int, stride s: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    let Ho = H / s, Wo = W / s
    if B * C == 0 || Ho == 0 || Wo == 0 { return }
    let inv = 1 / Float(s * s)
    nonisolated(unsafe) let out = out, input = input
    Parallel.forRanges(B * C, grain: max(1, 16384 / max(H * W, 1))) { planes in
        for plane in planes {
            let src = input + plane * H * W, dst = out + plane * Ho * Wo
            for y in 0..<Ho {
                for x in 0..<Wo {
                    var acc: Float = 0
                    for i in 0..<s { let row = src + (y * s + i) * W + x * s; for j in 0..<s { acc += row[j] } }
                    dst[y * Wo + x] = acc * inv
                }
            }
        }
    }
}
