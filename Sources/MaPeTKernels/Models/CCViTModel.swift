// CCViT (ALGORITHMS.md §4; Cakeyan/CCViT_Public modeling_pretrain.py, VisionTransformerForMaskedImageModelingCLS
// with shared_lm_head=False, trained with its dual loss). The input images already carry the
// corruption: block-masked patches (replaced by `mask_token` in the trunk) and centroid-replaced
// patches (their pixels swapped for their centroid's before normalisation, see CCViT.swift).
// With corrupted = masked ∪ replaced (rows sample-major, patch ascending; M rows in total):
//   token head:  logits [M, V] = lm_head(norm(x_L[corrupted]))           → cross-entropy on centroid ids
//   pixel head:  h_0 = [x_L[CLS] ; x_early[patches]]  (x_L before the final norm, as the reference)
//                h_{i+1} = cls_pt_layers.i(h_i)  (full attention over the n + 1 rows)
//                pixels [M, P] = cls_pt_lm_head(cls_pt_norm(h_H[corrupted]))  → MSE on normalised pixels
//   loss = tokenWeight · CE + pixelWeight · MSE      (1 : 1 in the paper)
// The pixel branch's gradient re-enters the trunk at x_L's class row and at x_early's patch rows.

/// The pixel branch's activations at (B, M).
final class CCViTPixelActivations: @unchecked Sendable {
    let B, M: Int
    let arena: Arena
    let hs: [UnsafeMutablePointer<Float>]          // H + 1 inputs/outputs of the pixel-head blocks [B·N, C]
    let caches: [BlockCache]
    let sel, normOut, normMean, normRstd, pixels, targets, ones: UnsafeMutablePointer<Float>
    let dh, dSel, dNormOut, dPixels: UnsafeMutablePointer<Float>

    init?(config k: PretrainConfig, B: Int, M: Int) {
        let v = k.vit, C = v.embedDim, N = v.sequenceLength, P = v.patchDim, H = k.pixelHeadDepth
        let R = B * N, attnProbs = B * v.numHeads * N * N
        var sizes = Array(repeating: R * C, count: H + 1)
        for _ in 0..<H { sizes += BlockCache.floats(rows: R, C: C, hidden: v.hidden, probs: attnProbs, ownsKV: true) }
        sizes += [M * C, M * C, M, M, M * P, M * P, M, R * C, M * C, M * C, M * P]
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        (self.B, self.M, self.arena) = (B, M, arena)
        hs = (0...H).map { _ in arena.take(R * C) }
        caches = (0..<H).map { _ in BlockCache(arena: arena, rows: R, C: C, hidden: v.hidden, probs: attnProbs, ownsKV: true) }
        sel = arena.take(M * C); normOut = arena.take(M * C); normMean = arena.take(M); normRstd = arena.take(M)
        pixels = arena.take(M * P); targets = arena.take(M * P); ones = arena.take(M)
        dh = arena.take(R * C); dSel = arena.take(M * C); dNormOut = arena.take(M * C); dPixels = arena.take(M * P)
        // Int32 1s: every gathered row is selected for maskedMSE.
        UnsafeMutableRawPointer(ones).assumingMemoryBound(to: Int32.self).update(repeating: 1, count: M)
    }

    var selectedRows: UnsafePointer<Int32> { UnsafePointer(UnsafeMutableRawPointer(ones).assumingMemoryBound(to: Int32.self)) }
}

/// The two CCViT losses of a step.
public struct CCViTLosses: Sendable, Equatable {
    public var total: Double
    public var tokens: Double
    public var pixels: Double
}

public final class CCViTModel: BEiTModel, @unchecked Sendable {
    private var pixelActs: CCViTPixelActivations?

    public override init?(config: PretrainConfig, seed: UInt64) {
        precondition(config.kind == .ccvit, "CCViTModel: kind must be ccvit")
        super.init(config: config, seed: seed)
    }

    private func pixelActivations(B: Int, M: Int) -> CCViTPixelActivations? {
        if let p = pixelActs, p.B == B, p.M == M { return p }
        pixelActs = nil
        pixelActs = CCViTPixelActivations(config: config, B: B, M: M)
        return pixelActs
    }

    public override func releaseActivations() {
        super.releaseActivations()
        pixelActs = nil
    }

    /// corrupted [B, n] = masked | replaced.
    private func corruptedFlags(masked: UnsafePointer<Int32>, replaced: UnsafePointer<Int32>, B: Int) -> [Int32] {
        (0..<(B * config.vit.numPatches)).map { masked[$0] != 0 || replaced[$0] != 0 ? 1 : 0 }
    }

    /// Pixel branch forward after the trunk (`a` holds the trunk's activations): p.pixels [M, P].
    private func pixelForward(_ a: MIMActivations, _ p: CCViTPixelActivations, training: Bool) {
        let v = config.vit, C = v.embedDim, N = v.sequenceLength, B = a.B, M = a.M
        nonisolated(unsafe) let h0 = p.hs[0], xL = a.t.xs[v.depth], xE = a.t.xs[config.earlyLayers]
        Parallel.forEach(B) { b in
            (h0 + b * N * C).update(from: xL + b * N * C, count: C)
            (h0 + (b * N + 1) * C).update(from: xE + (b * N + 1) * C, count: (N - 1) * C)
        }
        for (i, blk) in headBlocks.enumerated() {
            let (keep1, keep2) = trunk.keepPointers(a.t.keeps, l: v.depth + i, B: B, training: training)
            blk.forward(out: p.hs[i + 1], x: p.hs[i], cache: p.caches[i], B: B, T: N, mask: FullAttention(), keep1: keep1, keep2: keep2)
        }
        rowHeadForward(out: p.pixels, sel: p.sel, normOut: p.normOut, mean: p.normMean, rstd: p.normRstd,
                       x: p.hs[headBlocks.count], rows: a.rows, M: M, head: pixelHead!,
                       K: v.patchDim)
    }

    /// Pixel branch backward from p.dPixels: leaves ∂L/∂h_0 in p.dh.
    private func pixelBackward(_ a: MIMActivations, _ p: CCViTPixelActivations) {
        let v = config.vit, N = v.sequenceLength, B = a.B
        rowHeadBackward(dX: p.dh, dXCount: B * N * v.embedDim, dSel: p.dSel, dNormOut: p.dNormOut, dOut: p.dPixels,
                        sel: p.sel, normOut: p.normOut, mean: p.normMean, rstd: p.normRstd, rows: a.rows, M: a.M,
                        head: pixelHead!, dHead: dPixelHead!, K: v.patchDim)
        for i in stride(from: headBlocks.count - 1, through: 0, by: -1) {
            let (keep1, keep2) = trunk.keepPointers(a.t.keeps, l: v.depth + i, B: B, training: true)
            headBlocks[i].backward(dx: p.dh, x: p.hs[i], cache: p.caches[i], scratch: a.t.scratch, B: B, T: N,
                                   keep1: keep1, keep2: keep2)
        }
    }

    /// Adds the pixel branch's ∂L/∂h_0 into the trunk gradient at the levels it was read from.
    private func injectPixelGradient(_ p: CCViTPixelActivations, level: Int, dx: UnsafeMutablePointer<Float>, B: Int) {
        let C = config.vit.embedDim, N = config.vit.sequenceLength
        nonisolated(unsafe) let dh = p.dh, dx = dx
        let cls = level == config.vit.depth, early = level == config.earlyLayers
        guard cls || early else { return }
        Parallel.forEach(B) { b in
            if cls {
                let d = dx + b * N * C, s = dh + b * N * C
                for j in 0..<C { d[j] += s[j] }
            }
            if early {
                let d = dx + (b * N + 1) * C, s = dh + (b * N + 1) * C
                for j in 0..<((N - 1) * C) { d[j] += s[j] }
            }
        }
    }

    /// Inference: token logits [M, V] and pixel predictions [M, P] at the corrupted patches.
    public func forward(logits: UnsafeMutablePointer<Float>, pixels: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>,
                        masked: UnsafePointer<Int32>, replaced: UnsafePointer<Int32>, B: Int) -> Bool {
        let corrupted = corruptedFlags(masked: masked, replaced: replaced, B: B)
        let M = corrupted.reduce(0) { $0 + Int($1) }
        guard let a = activations(B: B, M: M), let p = pixelActivations(B: B, M: M) else { return false }
        corrupted.withUnsafeBufferPointer { runForward(a, images: images, masked: masked, select: $0.baseAddress!, training: false) }
        pixelForward(a, p, training: false)
        logits.update(from: a.logits, count: M * config.vocabSize)
        pixels.update(from: p.pixels, count: M * config.vit.patchDim)
        return true
    }

    /// Forward, loss = tokenWeight · CE(centroid ids) + pixelWeight · MSE(pixel targets) over the
    /// corrupted patches, backward (adds into `grads`).
    ///   tokens [B, n] in 0..<V (centroid ids of the clean patches), pixelTargets [B, n, P]
    ///   (per-patch normalised clean pixels), masked / replaced [B, n] (non-zero = flagged).
    public func trainStep(images: UnsafePointer<Float>, tokens: UnsafePointer<Int32>, pixelTargets: UnsafePointer<Float>,
                          masked: UnsafePointer<Int32>, replaced: UnsafePointer<Int32>, B: Int,
                          tokenWeight: Double = 1, pixelWeight: Double = 1,
                          logitsOut: UnsafeMutablePointer<Float>? = nil, pixelsOut: UnsafeMutablePointer<Float>? = nil)
        -> Result<CCViTLosses, StepError> {
        let v = config.vit, n = v.numPatches, N = v.sequenceLength, V = config.vocabSize, P = v.patchDim
        let corrupted = corruptedFlags(masked: masked, replaced: replaced, B: B)
        let M = corrupted.reduce(0) { $0 + Int($1) }
        guard let a = activations(B: B, M: M), let p = pixelActivations(B: B, M: M) else { return .failure(.outOfMemory) }
        let savedRNG = rng
        trunk.drawKeeps(a.t.keeps, B: B)
        corrupted.withUnsafeBufferPointer { runForward(a, images: images, masked: masked, select: $0.baseAddress!, training: true) }
        pixelForward(a, p, training: true)
        let (ceSum, count) = tokenCrossEntropy(a, tokens: tokens)
        let ce = count > 0 ? ceSum / Double(count) : 0
        for i in 0..<M {
            let r = Int(a.rows[i]), b = r / N, t = r % N - 1
            (p.targets + i * P).update(from: pixelTargets + (b * n + t) * P, count: P)
        }
        let mse = maskedMSEForward(pred: p.pixels, target: p.targets, rows: p.selectedRows, R: M, M: P)
        let total = tokenWeight * ce + pixelWeight * mse
        if let logitsOut { logitsOut.update(from: a.logits, count: M * V) }
        if let pixelsOut { pixelsOut.update(from: p.pixels, count: M * P) }
        let losses = CCViTLosses(total: total, tokens: ce, pixels: mse)
        guard total.isFinite else { rng = savedRNG; return .failure(.nonFiniteLoss(total)) }
        guard M > 0 else { return .success(losses) }

        zero(p.dPixels, M * P)
        maskedMSEBackward(dPred: p.dPixels, dLoss: pixelWeight, pred: p.pixels, target: p.targets, rows: p.selectedRows, R: M, M: P)
        pixelBackward(a, p)
        crossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: a.targets, rows: M, K: V,
                             scale: Float(tokenWeight / Double(count)), accumulate: false)
        runBackward(a, masked: masked) { level, dx in self.injectPixelGradient(p, level: level, dx: dx, B: B) }
        return .success(losses)
    }
}
