// BEiT masked image modeling (Bao et al. 2022; the MIM baseline of SPEC §2): the patch
// embeddings of masked patches are replaced by the learned `mask_token`, the class token is
// prepended and pos_embed added, the ViT blocks run with full attention, and
//   logits [M, V] = lm_head(norm(x_L[masked rows]))      (rows: sample-major, patch ascending)
//   loss = mean cross-entropy over the M masked patches against their visual tokens.
// Only the masked rows go through the final norm and head.

/// Activations of one MIM pass at (B, M masked patches in total), kept for the backward.
final class MIMActivations: @unchecked Sendable {
    let B, M: Int
    let arena: Arena
    let patches, patchOut: UnsafeMutablePointer<Float>
    let xs: [UnsafeMutablePointer<Float>]
    let caches: [BlockCache]
    let scratch: BlockScratch
    let keeps: UnsafeMutablePointer<Float>
    let sel, normOut, normMean, normRstd, logits, probs, losses: UnsafeMutablePointer<Float>
    let dx, dSel, dNormOut, dLogits: UnsafeMutablePointer<Float>
    let targets, rows: UnsafeMutablePointer<Int32>   // rows: masked row index b·N + 1 + t

    init?(config k: PretrainConfig, B: Int, M: Int) {
        let v = k.vit, C = v.embedDim, N = v.numTokens, n = v.numPatches, V = k.vocabSize, depth = v.depth
        let R = B * N, attnProbs = B * v.numHeads * N * N
        var sizes = [B * n * v.patchDim, B * n * C] + Array(repeating: R * C, count: depth + 1)
        for _ in 0..<depth { sizes += BlockCache.floats(rows: R, C: C, hidden: v.hidden, probs: attnProbs, ownsKV: true) }
        sizes += BlockScratch.floats(rows: R, C: C, hidden: v.hidden, ownsKV: true)
        sizes += [depth * 2 * B, M * C, M * C, M, M, M * V, M * V, M, R * C, M * C, M * C, M * V, M, M]
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        (self.B, self.M, self.arena) = (B, M, arena)
        patches = arena.take(B * n * v.patchDim); patchOut = arena.take(B * n * C)
        xs = (0...depth).map { _ in arena.take(R * C) }
        caches = (0..<depth).map { _ in BlockCache(arena: arena, rows: R, C: C, hidden: v.hidden, probs: attnProbs, ownsKV: true) }
        scratch = BlockScratch(arena: arena, rows: R, C: C, hidden: v.hidden, ownsKV: true)
        keeps = arena.take(depth * 2 * B)
        sel = arena.take(M * C); normOut = arena.take(M * C); normMean = arena.take(M); normRstd = arena.take(M)
        logits = arena.take(M * V); probs = arena.take(M * V); losses = arena.take(M)
        dx = arena.take(R * C); dSel = arena.take(M * C); dNormOut = arena.take(M * C); dLogits = arena.take(M * V)
        targets = UnsafeMutableRawPointer(arena.take(M)).assumingMemoryBound(to: Int32.self)
        rows = UnsafeMutableRawPointer(arena.take(M)).assumingMemoryBound(to: Int32.self)
    }
}

public final class BEiTModel: PretrainModel, @unchecked Sendable {
    private var acts: MIMActivations?

    public override init?(config: PretrainConfig, seed: UInt64) {
        precondition(config.kind == .beit, "BEiTModel: kind must be beit")
        super.init(config: config, seed: seed)
    }

    private func activations(B: Int, M: Int) -> MIMActivations? {
        if let a = acts, a.B == B, a.M == M { return a }
        acts = nil
        acts = MIMActivations(config: config, B: B, M: M)
        return acts
    }

    public func releaseActivations() { acts = nil }

    /// Number of masked patches in masked [B, n] (non-zero = masked).
    public func maskedCount(_ masked: UnsafePointer<Int32>, B: Int) -> Int {
        var m = 0
        for i in 0..<(B * config.vit.numPatches) where masked[i] != 0 { m += 1 }
        return m
    }

    private func runForward(_ a: MIMActivations, images: UnsafePointer<Float>, masked: UnsafePointer<Int32>, training: Bool) {
        let v = config.vit, C = v.embedDim, n = v.numPatches, N = v.numTokens, B = a.B, M = a.M
        patchEmbedForward(out: a.patchOut, patches: a.patches, images: images, weight: ptr("patch_embed.proj.weight"),
                          bias: ptr("patch_embed.proj.bias"), B: B, inChans: v.inChans, imgSize: v.imgSize,
                          patch: v.patchSize, C: C)
        nonisolated(unsafe) let x = a.xs[0], patchOut = a.patchOut, cls = ptr("cls_token"), pos = ptr("pos_embed"),
                                mt = ptr("mask_token"), masked = masked
        Parallel.forEach(B) { b in
            let xb = x + b * N * C
            for j in 0..<C { xb[j] = cls[j] + pos[j] }
            for t in 0..<n {
                let src = masked[b * n + t] != 0 ? UnsafePointer(mt) : UnsafePointer(patchOut + (b * n + t) * C)
                let dst = xb + (t + 1) * C, pe = pos + (t + 1) * C
                for j in 0..<C { dst[j] = src[j] + pe[j] }
            }
        }
        var r = 0
        for b in 0..<B {
            for t in 0..<n where masked[b * n + t] != 0 { a.rows[r] = Int32(b * N + 1 + t); r += 1 }
        }
        precondition(r == M, "BEiTModel: mask count changed")
        for (l, blk) in blocks.enumerated() {
            let (keep1, keep2) = keepPointers(a.keeps, l: l, B: B, training: training)
            blk.forward(out: a.xs[l + 1], x: a.xs[l], cache: a.caches[l], B: B, T: N, mask: FullAttention(), keep1: keep1, keep2: keep2)
        }
        nonisolated(unsafe) let sel = a.sel, xL = a.xs[v.depth], rows = a.rows
        Parallel.forRanges(M, grain: 64) { rr in
            for i in rr { (sel + i * C).update(from: xL + Int(rows[i]) * C, count: C) }
        }
        layerNormForward(out: a.normOut, mean: a.normMean, rstd: a.normRstd, input: a.sel, weight: ptr("norm.weight"),
                         bias: ptr("norm.bias"), rows: M, cols: C)
        linearForward(out: a.logits, input: a.normOut, weight: ptr("lm_head.weight"), bias: ptr("lm_head.bias"),
                      rows: M, inFeatures: C, outFeatures: config.vocabSize)
    }

    /// Inference logits [M, V] at the masked patches (sample-major, patch ascending); masked [B, n].
    public func forward(logits: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, masked: UnsafePointer<Int32>, B: Int) -> Bool {
        let M = maskedCount(masked, B: B)
        guard let a = activations(B: B, M: M) else { return false }
        runForward(a, images: images, masked: masked, training: false)
        logits.update(from: a.logits, count: M * config.vocabSize)
        return true
    }

    /// Forward, mean CE over the masked patches, backward (adds into `grads`); tokens [B, n] in 0..<V.
    public func trainStep(images: UnsafePointer<Float>, tokens: UnsafePointer<Int32>, masked: UnsafePointer<Int32>, B: Int,
                          logitsOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        let v = config.vit, C = v.embedDim, N = v.numTokens, n = v.numPatches, V = config.vocabSize
        let M = maskedCount(masked, B: B)
        guard let a = activations(B: B, M: M) else { return .failure(.outOfMemory) }
        let savedRNG = rng
        drawKeeps(a.keeps, B: B)
        runForward(a, images: images, masked: masked, training: true)
        for i in 0..<M {
            let r = Int(a.rows[i]), b = r / N, t = r % N - 1
            a.targets[i] = tokens[b * n + t]
        }
        let (sum, count) = crossEntropyForward(losses: a.losses, probs: a.probs, logits: a.logits, targets: a.targets, rows: M, K: V)
        let loss = count > 0 ? sum / Double(count) : 0
        if let logitsOut { logitsOut.update(from: a.logits, count: M * V) }
        guard loss.isFinite else { rng = savedRNG; return .failure(.nonFiniteLoss(loss)) }
        guard count > 0 else { return .success(0) }

        zero(a.dLogits, M * V)
        crossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: a.targets, rows: M, K: V, scale: 1 / Float(count))
        zero(a.dNormOut, M * C)
        linearBackward(dInput: a.dNormOut, dWeight: grad("lm_head.weight"), dBias: grad("lm_head.bias"), dOut: a.dLogits,
                       input: a.normOut, weight: ptr("lm_head.weight"), rows: M, inFeatures: C, outFeatures: V)
        zero(a.dSel, M * C)
        layerNormBackward(dInput: a.dSel, dWeight: grad("norm.weight"), dBias: grad("norm.bias"), dOut: a.dNormOut,
                          input: a.sel, weight: ptr("norm.weight"), mean: a.normMean, rstd: a.normRstd, rows: M, cols: C)
        zero(a.dx, B * N * C)
        for i in 0..<M { (a.dx + Int(a.rows[i]) * C).update(from: a.dSel + i * C, count: C) }
        for l in stride(from: v.depth - 1, through: 0, by: -1) {
            let (keep1, keep2) = keepPointers(a.keeps, l: l, B: B, training: true)
            blocks[l].backward(dx: a.dx, x: a.xs[l], cache: a.caches[l], scratch: a.scratch, B: B, T: N, keep1: keep1, keep2: keep2)
        }
        embedTokensBackward(dRows: a.dx, stride: N, dPatch: a.scratch.dLn, patches: a.patches, B: B, masked: masked)
        let dMt = grad("mask_token")
        for b in 0..<B {
            for t in 0..<n where masked[b * n + t] != 0 {
                let row = a.dx + (b * N + 1 + t) * C
                for j in 0..<C { dMt[j] += row[j] }
            }
        }
        return .success(loss)
    }
}
