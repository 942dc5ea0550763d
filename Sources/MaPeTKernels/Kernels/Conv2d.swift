// 2-d convolution (PyTorch `nn.Conv2d`, groups = 1, dilation = 1), inference only, NCHW:
//   out[b, o, y, x] = bias[o] + Σ_{c, i, j} weight[o, c, i, j] · in[b, c, y·s + i − p, x·s + j − p]
//   input [B, Cin, H, W], weight [Cout, Cin, kH, kW], out [B, Cout, Ho, Wo],
//   Ho = (H + 2p − kH) / s + 1, Wo = (W + 2p − kW) / s + 1 (floor), zero padding.
// Written as im2col + GEMM: for each image, columns [Cin·kH·kW, n] of a block of n output pixels,
// then out[b][:, block] = weight [Cout, Cin·kH·kW] · columns (a 1×1 stride-1 convolution needs no
// columns: the image itself is the [Cin, H·W] operand). Epilogue, in this order: + residual
// [B, Cout, Ho, Wo] (optional), then ReLU (optional) — a ResNet bottleneck's conv3 + shortcut +
// ReLU is one call. The GEMM is `gemm(precision, …)`: bitwise the same for any thread count.

/// Output pixels per im2col block: bounds the scratch at Cin·kH·kW·4096 floats per call.
public let conv2dBlockPixels = 4096

public func conv2dOutputSize(_ size: Int, kernel: Int, stride: Int, padding: Int) -> Int {
    (size + 2 * padding - kernel) / stride + 1
}

public func conv2dForward(
    out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
    weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?, residual: UnsafePointer<Float>?, relu: Bool,
    B: Int, inChans Cin: Int, H: Int, W: Int, outChans Cout: Int, kernelH kH: Int, kernelW kW: Int,
    stride s: Int, padding p: Int, precision: Precision = .fp32
) {
    let Ho = conv2dOutputSize(H, kernel: kH, stride: s, padding: p)
    let Wo = conv2dOutputSize(W, kernel: kW, stride: s, padding: p)
    let HWo = Ho * Wo, K = Cin * kH * kW
    if B == 0 || Cout == 0 || HWo <= 0 { return }
    let direct = kH == 1 && kW == 1 && s == 1 && p == 0
    let block = min(HWo, conv2dBlockPixels)
    let columns: UnsafeMutablePointer<Float>? = direct ? nil : .allocate(capacity: max(K * block, 1))
    defer { columns?.deallocate() }
    for b in 0..<B {
        let image = input + b * Cin * H * W, dst = out + b * Cout * HWo
        var n0 = 0
        while n0 < HWo {
            let n = min(block, HWo - n0)
            let t0 = Profiler.begin()
            if let columns {
                im2col(columns: columns, image: image, Cin: Cin, H: H, W: W, kH: kH, kW: kW, stride: s, padding: p,
                       Wo: Wo, first: n0, count: n)
            }
            Profiler.end(.elementwise, t0)
            let t1 = Profiler.begin()
            gemm(precision, transA: false, transB: false, M: Cout, N: n, K: K, alpha: 1, A: weight, lda: K,
                 B: columns.map { UnsafePointer($0) } ?? image + n0, ldb: columns == nil ? HWo : n,
                 beta: 0, C: dst + n0, ldc: HWo)
            Profiler.end(.gemm, t1)
            n0 += n
        }
    }
    let t2 = Profiler.begin(); defer { Profiler.end(.elementwise, t2) }
    nonisolated(unsafe) let out = out, bias = bias, residual = residual
    Parallel.forRanges(B * Cout, grain: max(1, 16384 / max(HWo, 1))) { rows in
        for row in rows {
            let o = out + row * HWo
            if let bias { let v = bias[row % Cout]; for i in 0..<HWo { o[i] += v } }
            if let residual { let r = residual + row * HWo; for i in 0..<HWo { o[i] += r[i] } }
            if relu { for i in 0..<HWo { o[i] = max(o[i], 0) } }
        }
    }
}

/// columns [Cin·kH·kW, count]: row (c, i, j), column t = the input pixel under kernel tap (i, j)
/// for output pixel first + t (zero where the tap falls into the padding). Rows split over workers.
func im2col(columns: UnsafeMutablePointer<Float>, image: UnsafePointer<Float>, Cin: Int, H: Int, W: Int,
            kH: Int, kW: Int, stride s: Int, padding p: Int, Wo: Int, first: Int, count: Int) {
    nonisolated(unsafe) let columns = columns, image = image
    Parallel.forRanges(Cin * kH * kW, grain: max(1, 8192 / max(count, 1))) { rows in
        for r in rows {
            let c = r / (kH * kW), i = (r / kW) % kH, j = r % kW
            let plane = image + c * H * W, dst = columns + r * count
            var t = 0
            while t < count {
                let y = (first + t) / Wo, x0 = (first + t) % Wo
                let run = min(Wo - x0, count - t)     // output pixels left on this output row
                let iy = y * s + i - p
                if iy < 0 || iy >= H {
                    (dst + t).update(repeating: 0, count: run)
                } else {
                    let src = plane + iy * W
                    for k in 0..<run {
                        let ix = (x0 + k) * s + j - p
                        dst[t + k] = ix >= 0 && ix < W ? src[ix] : 0
                    }
                }
                t += run
            }
        }
    }
}

/// Reference: the defining sum, Double accumulation, one output at a time.
public func conv2dForwardNaive(
    out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
    weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?, residual: UnsafePointer<Float>?, relu: Bool,
    B: Int, inChans Cin: Int, H: Int, W: Int, outChans Cout: Int, kernelH kH: Int, kernelW kW: Int,
    stride s: Int, padding p: Int
) {
    let Ho = conv2dOutputSize(H, kernel: kH, stride: s, padding: p)
    let Wo = conv2dOutputSize(W, kernel: kW, stride: s, padding: p)
    for b in 0..<B {
        for o in 0..<Cout {
            for y in 0..<Ho {
                for x in 0..<Wo {
                    var acc = Double(bias?[o] ?? 0)
                    for c in 0..<Cin {
                        for i in 0..<kH {
                            let iy = y * s + i - p
                            if iy < 0 || iy >= H { continue }
                            for j in 0..<kW {
                                let ix = x * s + j - p
                                if ix < 0 || ix >= W { continue }
                                acc += Double(weight[((o * Cin + c) * kH + i) * kW + j])
                                    * Double(input[((b * Cin + c) * H + iy) * W + ix])
                            }
                        }
                    }
                    let at = ((b * Cout + o) * Ho + y) * Wo + x
                    var v = Float(acc)
                    if let residual { v += residual[at] }
                    out[at] = relu ? max(v, 0) : v
                }
            }
        }
    }
}
