// Patch embedding (Dosovitskiy et al. 2021): a stride-p, kernel-p convolution written as
// patchify + GEMM.  images [B, Cin, S, S] → patches [B, n, Cin·p·p] with n = (S/p)², tokens in
// row-major grid order and each patch flattened in (channel, row, col) order — the layout of
// `patch_embed.proj.weight [C, Cin, p, p]` — then out [B, n, C] = patches · weightᵀ + bias.

/// Calls `run(patchOffset, imageOffset)` for every p-float run of every patch of every image, in
/// parallel over the batch: where the run starts in patches [B, n, Cin·p·p] and in images
/// [B, Cin, S, S]. The one statement of the layout, shared by both directions.
@inline(__always)
private func forEachPatchRun(B: Int, inChans: Int, imgSize S: Int, patch p: Int, _ run: @Sendable (Int, Int) -> Void) {
    let g = S / p, n = g * g
    Parallel.forEach(B) { b in
        var offset = b * n * inChans * p * p
        for t in 0..<n {
            let gy = t / g, gx = t % g
            for c in 0..<inChans {
                for y in 0..<p {
                    run(offset, ((b * inChans + c) * S + gy * p + y) * S + gx * p)
                    offset += p
                }
            }
        }
    }
}

public func patchifyForward(patches: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
                            B: Int, inChans: Int, imgSize S: Int, patch p: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let patches = patches, images = images
    forEachPatchRun(B: B, inChans: inChans, imgSize: S, patch: p) { (patches + $0).update(from: images + $1, count: p) }
}

/// dImages += the patches' gradient scattered back to pixel positions.
public func patchifyBackward(dImages: UnsafeMutablePointer<Float>, dPatches: UnsafePointer<Float>,
                             B: Int, inChans: Int, imgSize S: Int, patch p: Int) {
    let t0 = Profiler.begin(); defer { Profiler.end(.elementwise, t0) }
    nonisolated(unsafe) let dImages = dImages, dPatches = dPatches
    forEachPatchRun(B: B, inChans: inChans, imgSize: S, patch: p) { src, dst in
        for x in 0..<p { dImages[dst + x] += dPatches[src + x] }
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
