// MaPeT (Baraldi et al. 2023, ALGORITHMS.md §2): masked and permuted pre-training with two streams that
// share every weight. With N = n + 1 tokens, P predicted tokens p_0 < … < p_{P−1} and
// m_j = mask_positional_token + pos_embed[p_j]:
//   content h0 = [cls + pos_0 ; patch_embed + pos_{1..n} ; m_0..m_{P−1}]   (PIM: without the m_j)
//   query   g0 = [m_0..m_{P−1}]
//   per block: K, V from norm1(h) only; h attends under TwoStreamContentMask, g under
//   TwoStreamQueryMask (decided from the permutation ranks, never dense masks); both streams
//   then run proj/MLP residuals with the same per-sample drop-path keep masks.
//   logits [B, P, V] = decoder(norm(g_L)); loss = mean CE over the predicted tokens that count
//   (PermutationBatch.inLoss) against tokens[b, p_j − 1].
// The content stream's last block only feeds keys/values to the query stream, so only norm1
// and kv are computed there.
// Rows run in permutation-rank order, not in position order: content rows are the tokens by
// rank (then the m_j by the rank of p_j), query rows the predicted tokens by rank. Every
// per-row operation is indifferent to the order, and in this order the two rules are key
// intervals (`fillRankOrderIntervals`) whose masked blocks the bf16 attention skips. Positions
// enter only through pos_embed, gathered in `embed` and scattered back in the backward;
// logits leave in ascending predicted order as before.

/// Activations of one two-stream pass at (B, P), kept for the backward.
final class TwoStreamActivations: @unchecked Sendable {
    let B, P, T: Int      // T = content rows per sample (N + P, or N for PIM)
    let arena: Arena
    let patches, patchOut: UnsafeMutablePointer<Float>
    /// hs[l], gs[l]: inputs of block l ([B, T, C], [B, P, C]); hs[depth] is never computed.
    let hs, gs: [UnsafeMutablePointer<Float>]
    let hCaches, gCaches: [BlockCache]
    let hScratch, gScratch: BlockScratch
    let keeps: UnsafeMutablePointer<Float>        // [depth, 2, B]
    let normOut, normMean, normRstd, logits, probs, losses: UnsafeMutablePointer<Float>
    let dh, dg, dNormOut, dLogits: UnsafeMutablePointer<Float>
    let targets: UnsafeMutablePointer<Int32>
    /// The two may-attend rules in rank order (content T rows, query P rows; see the top).
    let contentIntervals, queryIntervals: KeyIntervals

    init?(config k: PretrainConfig, B: Int, P: Int) {
        let v = k.vit, C = v.embedDim, N = v.sequenceLength, n = v.numPatches, V = k.vocabSize, depth = v.depth
        let T = k.kind == .mapet ? N + P : N
        let hRows = B * T, gRows = B * P
        let hProbs = B * v.numHeads * T * T, gProbs = B * v.numHeads * P * T
        var sizes = [B * n * v.patchDim, B * n * C]
        sizes += Array(repeating: hRows * C, count: depth + 1) + Array(repeating: gRows * C, count: depth + 1)
        for _ in 0..<depth {
            sizes += BlockCache.floats(rows: hRows, C: C, hidden: v.hidden, probs: hProbs, ownsKV: true)
            sizes += BlockCache.floats(rows: gRows, C: C, hidden: v.hidden, probs: gProbs, ownsKV: false)
        }
        sizes += BlockScratch.floats(rows: hRows, C: C, hidden: v.hidden, ownsKV: true)
        sizes += BlockScratch.floats(rows: gRows, C: C, hidden: v.hidden, ownsKV: false)
        sizes += [depth * 2 * B, gRows * C, gRows, gRows, gRows * V, gRows * V, gRows,
                  hRows * C, gRows * C, gRows * C, gRows * V, gRows, 2 * (T + P)]
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        (self.B, self.P, self.T, self.arena) = (B, P, T, arena)
        patches = arena.take(B * n * v.patchDim); patchOut = arena.take(B * n * C)
        hs = (0...depth).map { _ in arena.take(hRows * C) }
        gs = (0...depth).map { _ in arena.take(gRows * C) }
        var hc: [BlockCache] = [], gc: [BlockCache] = []
        for _ in 0..<depth {
            hc.append(BlockCache(arena: arena, rows: hRows, C: C, hidden: v.hidden, probs: hProbs, ownsKV: true))
            gc.append(BlockCache(arena: arena, rows: gRows, C: C, hidden: v.hidden, probs: gProbs, ownsKV: false))
        }
        (hCaches, gCaches) = (hc, gc)
        hScratch = BlockScratch(arena: arena, rows: hRows, C: C, hidden: v.hidden, ownsKV: true)
        gScratch = BlockScratch(arena: arena, rows: gRows, C: C, hidden: v.hidden, ownsKV: false)
        keeps = arena.take(depth * 2 * B)
        normOut = arena.take(gRows * C); normMean = arena.take(gRows); normRstd = arena.take(gRows)
        logits = arena.take(gRows * V); probs = arena.take(gRows * V); losses = arena.take(gRows)
        dh = arena.take(hRows * C); dg = arena.take(gRows * C); dNormOut = arena.take(gRows * C)
        dLogits = arena.take(gRows * V)
        targets = UnsafeMutableRawPointer(arena.take(gRows)).assumingMemoryBound(to: Int32.self)
        let bounds = UnsafeMutableRawPointer(arena.take(2 * (T + P))).assumingMemoryBound(to: Int32.self)
        fillRankOrderIntervals(N: N, L: N - P, positionalTokens: k.kind == .mapet, contentPrefix: bounds,
                               contentSuffix: bounds + T, queryPrefix: bounds + 2 * T, querySuffix: bounds + 2 * T + P)
        contentIntervals = KeyIntervals(split: N, prefixEnd: bounds, suffixStart: bounds + T)
        queryIntervals = KeyIntervals(split: N, prefixEnd: bounds + 2 * T, suffixStart: bounds + 2 * T + P)
    }
}

public final class MaPeTModel: PretrainModel, @unchecked Sendable {
    private var acts: TwoStreamActivations?

    /// `config.kind` must be `.mapet` or `.pim`.
    public override init?(config: PretrainConfig, seed: UInt64) {
        precondition(config.twoStream, "MaPeTModel: kind must be mapet or pim")
        super.init(config: config, seed: seed)
    }

    public var positionalTokens: Bool { config.kind == .mapet }

    private func activations(B: Int, P: Int) -> TwoStreamActivations? {
        if let a = acts, a.B == B, a.P == P { return a }
        acts = nil
        acts = TwoStreamActivations(config: config, B: B, P: P)
        return acts
    }

    /// Frees the cached activations (re-allocated by the next call).
    public func releaseActivations() { acts = nil }

    // MARK: Forward

    /// h0 and g0, rows in rank order, from the images and the permutations.
    private func embed(_ a: TwoStreamActivations, images: UnsafePointer<Float>, batch: PermutationBatch) {
        let v = config.vit, C = v.embedDim, N = v.sequenceLength, B = a.B, P = a.P, T = a.T, L = N - P
        // Tokens in position order into hs[1] (unused until block 0's output), then by rank into hs[0].
        trunk.embed(x: a.hs[1], stride: T, patches: a.patches, patchOut: a.patchOut, images: images, B: B)
        nonisolated(unsafe) let h = a.hs[0], byPosition = a.hs[1], g = a.gs[0], pos = w.posEmbed, mpt = w.special!,
                                orders = batch.ordersPointer
        let markers = positionalTokens
        Parallel.forEach(B) { b in
            let hb = h + b * T * C, order = orders + b * N
            for s in 0..<N { (hb + s * C).update(from: byPosition + (b * T + Int(order[s])) * C, count: C) }
            for i in 0..<P {
                let pe = pos + Int(order[L + i]) * C, dst = g + (b * P + i) * C
                for j in 0..<C { dst[j] = mpt[j] + pe[j] }
                if markers { (hb + (N + i) * C).update(from: dst, count: C) }
            }
        }
    }

    /// Blocks and head; logits in a.logits. `training` applies the drawn drop-path masks.
    private func runForward(_ a: TwoStreamActivations, images: UnsafePointer<Float>, batch: PermutationBatch, training: Bool) {
        let v = config.vit, C = v.embedDim, B = a.B, P = a.P, T = a.T, depth = v.depth
        embed(a, images: images, batch: batch)
        let contentMask = IntervalMask(a.contentIntervals), queryMask = IntervalMask(a.queryIntervals)
        for (l, blk) in blocks.enumerated() {
            let (keep1, keep2) = trunk.keepPointers(a.keeps, l: l, B: B, training: training)
            let ch = a.hCaches[l], cg = a.gCaches[l]
            if l < depth - 1 {
                blk.forwardAttentionInputs(x: a.hs[l], cache: ch, rows: B * T)
            } else {
                // Last block: the content stream only provides keys and values.
                let w = blk.w
                layerNormForward(out: ch.ln1, mean: ch.ln1Mean, rstd: ch.ln1Rstd, input: a.hs[l], weight: w.norm1W,
                                 bias: w.norm1B, rows: B * T, cols: C, outInBF16: blk.normsInBF16)
                linearForward(out: ch.kv!, input: ch.ln1, weight: w.kvW, bias: w.kvB, rows: B * T, inFeatures: C, outFeatures: 2 * C,
                              precision: precision, ldOut: ch.ldKV, storage: blk.normsInBF16 ? .a : [])
            }
            blk.forwardAttentionInputs(x: a.gs[l], cache: cg, rows: B * P)
            if l < depth - 1 {
                blk.forwardAttention(cache: ch, source: ch, B: B, T: T, Nk: T, mask: contentMask)
            }
            blk.forwardAttention(cache: cg, source: ch, B: B, T: P, Nk: T, mask: queryMask)
            if l < depth - 1 {
                blk.forwardOutput(out: a.hs[l + 1], x: a.hs[l], cache: ch, B: B, T: T, keep1: keep1, keep2: keep2)
            }
            blk.forwardOutput(out: a.gs[l + 1], x: a.gs[l], cache: cg, B: B, T: P, keep1: keep1, keep2: keep2)
        }
        layerNormForward(out: a.normOut, mean: a.normMean, rstd: a.normRstd, input: a.gs[depth], weight: w.normWeight!,
                         bias: w.normBias!, rows: B * P, cols: C)
        linearForward(out: a.logits, input: a.normOut, weight: w.headWeight!, bias: w.headBias!,
                      rows: B * P, inFeatures: C, outFeatures: config.vocabSize, precision: precision)
    }

    /// Inference logits [B, P, V] for the predicted positions of `batch` (ascending), no drop path.
    /// images [B, inChans, S, S]; `batch` must have B samples of N tokens (callers check).
    public func forward(logits: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, batch: PermutationBatch) -> Bool {
        let B = batch.batchSize, P = batch.predictedCount
        guard let a = activations(B: B, P: P) else { return false }
        runForward(a, images: images, batch: batch, training: false)
        copyLogitsInPredictedOrder(logits, a, batch: batch)
        return true
    }

    /// out[b, j] = the logits of predicted token j (ascending position), whose row is its rank − L.
    private func copyLogitsInPredictedOrder(_ out: UnsafeMutablePointer<Float>, _ a: TwoStreamActivations,
                                            batch: PermutationBatch) {
        let V = config.vocabSize, P = a.P, L = batch.leastNumber
        nonisolated(unsafe) let out = out, logits = a.logits, ranks = batch.predictedRanksPointer
        Parallel.forEach(a.B) { b in
            for j in 0..<P {
                let row = b * P + Int(ranks[b * P + j]) - L
                (out + (b * P + j) * V).update(from: logits + row * V, count: V)
            }
        }
    }

    // MARK: Training

    /// Forward, mean cross-entropy over the predicted tokens in the loss, backward: adds
    /// ∂loss/∂θ into `grads`, returns the loss. tokens [B, n] must be in 0..<V (callers check).
    /// On a non-finite loss nothing is accumulated and the drop-path generator is rewound.
    public func trainStep(images: UnsafePointer<Float>, tokens: UnsafePointer<Int32>, batch: PermutationBatch,
                          logitsOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        let v = config.vit, C = v.embedDim, N = v.sequenceLength, n = v.numPatches, V = config.vocabSize, depth = v.depth
        let B = batch.batchSize, P = batch.predictedCount
        guard let a = activations(B: B, P: P) else { return .failure(.outOfMemory) }
        let T = a.T
        let savedRNG = rng
        trunk.drawKeeps(a.keeps, B: B)
        runForward(a, images: images, batch: batch, training: true)
        // Query row i is the predicted token of rank L + i.
        nonisolated(unsafe) let orders = batch.ordersPointer
        let L = N - P
        for b in 0..<B {
            for i in 0..<P {
                let counts = batch.upperLimit.map { L + i <= $0 } ?? true
                a.targets[b * P + i] = counts ? tokens[b * n + Int(orders[b * N + L + i]) - 1] : -1
            }
        }
        let (sum, count) = crossEntropyForward(losses: a.losses, probs: a.probs, logits: a.logits, targets: a.targets,
                                               rows: B * P, K: V)
        let loss = count > 0 ? sum / Double(count) : 0
        if let logitsOut { copyLogitsInPredictedOrder(logitsOut, a, batch: batch) }
        guard loss.isFinite else { rng = savedRNG; return .failure(.nonFiniteLoss(loss)) }
        guard count > 0 else { return .success(0) }

        // Head.
        crossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: a.targets, rows: B * P, K: V, scale: 1 / Float(count),
                             accumulate: false)
        zero(a.dNormOut, B * P * C)
        linearBackward(dInput: a.dNormOut, dWeight: g.headWeight!, dBias: g.headBias!, dOut: a.dLogits,
                       input: a.normOut, weight: w.headWeight!, rows: B * P, inFeatures: C, outFeatures: V,
                       precision: precision)
        zero(a.dg, B * P * C)
        layerNormBackward(dInput: a.dg, dWeight: g.normWeight!, dBias: g.normBias!, dOut: a.dNormOut,
                          input: a.gs[depth], weight: w.normWeight!, mean: a.normMean, rstd: a.normRstd, rows: B * P, cols: C)
        zero(a.dh, B * T * C)

        // Blocks, last to first.
        let sh = a.hScratch, sg = a.gScratch, dKV = sh.dKV!
        for l in stride(from: depth - 1, through: 0, by: -1) {
            let blk = blocks[l], ch = a.hCaches[l], cg = a.gCaches[l]
            let (keep1, keep2) = trunk.keepPointers(a.keeps, l: l, B: B, training: true)
            let last = l == depth - 1
            blk.backwardOutput(dx: a.dg, cache: cg, scratch: sg, B: B, T: P, keep1: keep1, keep2: keep2)
            if !last { blk.backwardOutput(dx: a.dh, cache: ch, scratch: sh, B: B, T: T, keep1: keep1, keep2: keep2) }
            blk.backwardAttention(cache: cg, scratch: sg, source: ch, dKV: dKV, B: B, T: P, Nk: T, accumulateKV: false,
                                  keyIntervals: a.queryIntervals)
            if !last {
                blk.backwardAttention(cache: ch, scratch: sh, source: ch, dKV: dKV, B: B, T: T, Nk: T, accumulateKV: true,
                                      keyIntervals: a.contentIntervals)
            }
            blk.backwardAttentionInputs(dx: a.dg, x: a.gs[l], cache: cg, scratch: sg, dKV: nil, rows: B * P)
            if !last {
                blk.backwardAttentionInputs(dx: a.dh, x: a.hs[l], cache: ch, scratch: sh, dKV: dKV, rows: B * T)
            } else {
                let w = blk.w, g = blk.g
                linearBackward(dInput: sh.dLn, dWeight: g.kvW, dBias: g.kvB, dOut: dKV, input: ch.ln1, weight: w.kvW,
                               rows: B * T, inFeatures: C, outFeatures: 2 * C, precision: precision, accumulateInput: false,
                               ldOut: ch.ldKV, inputInBF16: blk.normsInBF16)
                layerNormBackward(dInput: a.dh, dWeight: g.norm1W, dBias: g.norm1B, dOut: sh.dLn, input: a.hs[l], weight: w.norm1W,
                                  mean: ch.ln1Mean, rstd: ch.ln1Rstd, rows: B * T, cols: C)
            }
        }

        // Embedding: token rows of h, back in position order (into hs[1], free now); the m_j rows
        // of h and g feed mask_positional_token and pos_embed[p_j].
        let dPatch = sh.dBranch   // [B, n, C] fits in [B·T, C]
        nonisolated(unsafe) let dMpt = g.special!, dPos = g.posEmbed, dh = a.dh, dg = a.dg, byPosition = a.hs[1]
        Parallel.forEach(B) { b in
            let order = orders + b * N
            for s in 0..<N { (byPosition + (b * T + Int(order[s])) * C).update(from: dh + (b * T + s) * C, count: C) }
        }
        trunk.embedBackward(dRows: byPosition, stride: T, dPatch: dPatch, patches: a.patches, B: B)
        let markers = positionalTokens
        Parallel.forRanges(C, grain: 16) { r in
            for b in 0..<B {
                for i in 0..<P {
                    let p = Int(orders[b * N + L + i])
                    let gRow = dg + (b * P + i) * C, hRow = dh + (b * T + N + i) * C, posRow = dPos + p * C
                    for j in r {
                        let d = markers ? gRow[j] + hRow[j] : gRow[j]
                        dMpt[j] += d
                        posRow[j] += d
                    }
                }
            }
        }
        return .success(loss)
    }
}
