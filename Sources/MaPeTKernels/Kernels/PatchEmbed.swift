// Patch embedding (Dosovitskiy et al. 2021): a stride-p, kernel-p convolution written as
// patchify + GEMM.  images [B, Cin, S, S] → patches [B, n, Cin·p·p] with n = (S/p)², tokens in
// row-major grid order and each patch flattened in (channel, row, col) order — the layout of
// `patch_embed.proj.weight [C, Cin, p, p]` — then out [B, n, C] = patches · weightᵀ + bias.

public func patchifyForward(patches: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
                            B: Int, inChans: Int, imgSize S: Int, patch p: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    let g = S / p, n = g * g, K = inChans * p * p
    nonisolated(unsafe) let patches = patches, images = images
    Parallel.forEach(B) { b in
        for t in 0..<n {
            let gy = t / g, gx = t % g
            var dst = patches + (b * n + t) * K
            for c in 0..<inChans {
                for y in 0..<p {
                    let src = images + ((b * inChans + c) * S + gy * p + y) * S + gx * p
                    dst.update(from: src, count: p)
                    dst += p
                }
            }
        }
    }
}

/// dImages += the patches' gradient scattered back to pixel positions.
public func patchifyBackward(dImages: UnsafeMutablePointer<Float>, dPatches: UnsafePointer<Float>,
                             B: Int, inChans: Int, imgSize S: Int, patch p: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    let g = S / p, n = g * g, K = inChans * p * p
    nonisolated(unsafe) let dImages = dImages, dPatches = dPatches
    Parallel.forEach(B) { b in
        for t in 0..<n {
            let gy = t / g, gx = t % g
            var src = dPatches + (b * n + t) * K
            for c in 0..<inChans {
                for y in 0..<p {
                    let dst = dImages + ((b * inChans + c) * S + gy * p + y) * S + gx * p
                    for x in 0..<p { dst[x] += src[x] }
                    src += p
                }
            }
        }
    }
}

/// out [B, n, C]; `patches` [B, n, Cin·p·p] is filled (and kept as the backward cache).
public func patchEmbedForward(
    out: UnsafeMutablePointer<Float>, patches: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
    weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
    B: Int, inChans: Int, imgSize S: Int, patch p: Int, C: Int, precision: Precision = .fp32
) {
    patchifyForward(patches: patches, images: images, B: B, inChans: inChans, imgSize: S, patch: p)
    let n = (S / p) * (S / p)
    linearForward(out: out, input: patches, weight: weight, bias: bias, rows: B * n, inFeatures: inChans * p * p, outFeatures: C,
                  precision: precision)
}

/// dImages (optional) += ∂/∂images; dWeight, dBias accumulate.
public func patchEmbedBackward(
    dImages: UnsafeMutablePointer<Float>?, dWeight: UnsafeMutablePointer<Float>?, dBias: UnsafeMutablePointer<Float>?,
    dOut: UnsafePointer<Float>, patches: UnsafePointer<Float>, weight: UnsafePointer<Float>,
    B: Int, inChans: Int, imgSize S: Int, patch p: Int, C: Int, precision: Precision = .fp32
) {
    let n = (S / p) * (S / p), K = inChans * p * p
    var dPatches: UnsafeMutablePointer<Float>? = nil
    if dImages != nil {
        dPatches = .allocate(capacity: max(B * n * K, 1))
        dPatches!.initialize(repeating: 0, count: B * n * K)
    }
    defer { dPatches?.deallocate() }
    linearBackward(dInput: dPatches, dWeight: dWeight, dBias: dBias, dOut: dOut, input: patches, weight: weight,
                   rows: B * n, inFeatures: K, outFeatures: C, precision: precision)
    if let dImages, let dPatches {
        patchifyBackward(dImages: dImages, dPatches: dPatches, B: B, inChans: inChans, imgSize: S, patch: p)
    }
}
