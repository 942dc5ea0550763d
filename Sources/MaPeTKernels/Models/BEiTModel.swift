// The masked-encoder pre-training models: BEiT (the MIM baseline of ALGORITHMS.md §2), the DTM student
// (ALGORITHMS.md §5) and, as a subclass, CCViT (ALGORITHMS.md §4). They share one trunk: the patch embeddings of
// masked patches are replaced by the learned `mask_token`, the class token is prepended and
// pos_embed added, the ViT blocks run with full attention, and a head reads selected rows:
//   head [M, V] = lm_head(norm(x_L[selected rows]))      (rows: sample-major, patch ascending)
//   BEiT:  selected = masked patches; loss = mean cross-entropy against their visual tokens.
//   DTM:   selected = every patch (V = teacher dimension); loss = group-mean smooth-L1 against
//          the teacher features under the step's morphing memberships (DTMLoss.swift).
//   CCViT: selected = masked ∪ centroid-replaced patches; see CCViTModel.swift.
// Only the selected rows go through the final norm and head.

/// Activations of one masked-encoder pass at (B, M selected rows in total), kept for the backward.
final class MIMActivations: @unchecked Sendable {
    let B, M: Int
    let arena: Arena
    /// The trunk's: patches, block inputs and caches, scratch, keep masks (trunk and pixel-head blocks).
    let t: TrunkActivations
    let sel, normOut, normMean, normRstd, logits, probs, losses: UnsafeMutablePointer<Float>
    let dx, dSel, dNormOut, dLogits: UnsafeMutablePointer<Float>
    let targets, rows: UnsafeMutablePointer<Int32>   // rows: selected row index b·N + 1 + t

    init?(config k: PretrainConfig, B: Int, M: Int) {
        let v = k.vit, C = v.embedDim, V = k.vocabSize, R = B * v.sequenceLength, blocks = v.depth + k.pixelHeadDepth
        // Cross-entropy buffers (probs, per-row losses, targets) only for the token heads.
        let ce = k.kind == .dtm ? 0 : 1
        let sizes = TrunkActivations.floats(v, B: B, keepBlocks: blocks)
            + [M * C, M * C, M, M, M * V, ce * M * V, ce * M, R * C, M * C, M * C, M * V, ce * M, M]
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        (self.B, self.M, self.arena) = (B, M, arena)
        t = TrunkActivations(arena: arena, v, B: B, keepBlocks: blocks)
        sel = arena.take(M * C); normOut = arena.take(M * C); normMean = arena.take(M); normRstd = arena.take(M)
        logits = arena.take(M * V); probs = arena.take(ce * M * V); losses = arena.take(ce * M)
        dx = arena.take(R * C); dSel = arena.take(M * C); dNormOut = arena.take(M * C); dLogits = arena.take(M * V)
        targets = UnsafeMutableRawPointer(arena.take(ce * M)).assumingMemoryBound(to: Int32.self)
        rows = UnsafeMutableRawPointer(arena.take(M)).assumingMemoryBound(to: Int32.self)
    }
}

public class BEiTModel: PretrainModel, @unchecked Sendable {
    var acts: MIMActivations?

    public override init?(config: PretrainConfig, seed: UInt64) {
        precondition([.beit, .dtm, .ccvit].contains(config.kind), "BEiTModel: kind must be beit, dtm or ccvit")
        super.init(config: config, seed: seed)
    }

    func activations(B: Int, M: Int) -> MIMActivations? {
        if let a = acts, a.B == B, a.M == M { return a }
        acts = nil
        acts = MIMActivations(config: config, B: B, M: M)
        return acts
    }

    public func releaseActivations() { acts = nil }

    /// Number of flagged patches in flags [B, n] (non-zero = flagged).
    public func maskedCount(_ masked: UnsafePointer<Int32>, B: Int) -> Int {
        var m = 0
        for i in 0..<(B * config.vit.numPatches) where masked[i] != 0 { m += 1 }
        return m
    }

    /// The number of rows the head reads: the flagged patches of `select`, or every patch when nil.
    func selectedCount(_ select: UnsafePointer<Int32>?, B: Int) -> Int {
        select.map { maskedCount($0, B: B) } ?? B * config.vit.numPatches
    }

    /// Embedding, trunk, and head over the rows flagged in `select` [B, n] (every patch when nil):
    /// a.logits [M, V]. The trunk's input rows of `masked` [B, n] patches hold the mask token.
    func runForward(_ a: MIMActivations, images: UnsafePointer<Float>, masked: UnsafePointer<Int32>,
                    select: UnsafePointer<Int32>?, training: Bool) {
        let v = config.vit, n = v.numPatches, N = v.sequenceLength, B = a.B, M = a.M
        trunk.embed(x: a.t.xs[0], stride: N, patches: a.t.patches, patchOut: a.t.patchOut, images: images, B: B, masked: masked)
        var r = 0
        for b in 0..<B {
            for t in 0..<n where select.map({ $0[b * n + t] != 0 }) ?? true { a.rows[r] = Int32(b * N + 1 + t); r += 1 }
        }
        precondition(r == M, "BEiTModel: selected row count changed")
        trunk.forwardBlocks(a.t, B: B, training: training)
        rowHeadForward(out: a.logits, sel: a.sel, normOut: a.normOut, mean: a.normMean, rstd: a.normRstd,
                       x: a.t.xs[v.depth], rows: a.rows, M: M, head: tokenHead, K: config.vocabSize)
    }

    /// A head over selected rows: sel [M, C] = x[rows], out [M, K] = head(norm(sel)) (the LayerNorm
    /// and Linear of `head`); sel, normOut, mean and rstd are kept for `rowHeadBackward`.
    func rowHeadForward(out: UnsafeMutablePointer<Float>, sel: UnsafeMutablePointer<Float>, normOut: UnsafeMutablePointer<Float>,
                        mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>,
                        rows: UnsafePointer<Int32>, M: Int, head: HeadTensors, K: Int) {
        let C = config.vit.embedDim
        nonisolated(unsafe) let sel = sel, x = x, rows = rows
        Parallel.forRanges(M, grain: 64) { rr in
            for i in rr { (sel + i * C).update(from: x + Int(rows[i]) * C, count: C) }
        }
        layerNormForward(out: normOut, mean: mean, rstd: rstd, input: sel, weight: head.normWeight,
                         bias: head.normBias, rows: M, cols: C)
        linearForward(out: out, input: normOut, weight: head.weight, bias: head.bias,
                      rows: M, inFeatures: C, outFeatures: K, precision: precision)
    }

    /// Backward of `rowHeadForward` from dOut [M, K]: adds the parameter gradients and writes
    /// ∂L/∂x at the selected rows of dX [B·N, C], which is zeroed first (other rows get 0).
    /// dSel, dNormOut [M, C] are scratch.
    func rowHeadBackward(dX: UnsafeMutablePointer<Float>, dXCount: Int, dSel: UnsafeMutablePointer<Float>,
                         dNormOut: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>, sel: UnsafePointer<Float>,
                         normOut: UnsafePointer<Float>, mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>,
                         rows: UnsafePointer<Int32>, M: Int, head: HeadTensors, dHead: HeadTensors, K: Int) {
        let C = config.vit.embedDim
        zero(dNormOut, M * C)
        linearBackward(dInput: dNormOut, dWeight: dHead.weight, dBias: dHead.bias, dOut: dOut,
                       input: normOut, weight: head.weight, rows: M, inFeatures: C, outFeatures: K,
                       precision: precision)
        zero(dSel, M * C)
        layerNormBackward(dInput: dSel, dWeight: dHead.normWeight, dBias: dHead.normBias, dOut: dNormOut,
                          input: sel, weight: head.normWeight, mean: mean, rstd: rstd, rows: M, cols: C)
        zero(dX, dXCount)
        for i in 0..<M { (dX + Int(rows[i]) * C).update(from: dSel + i * C, count: C) }
    }

    /// Backward of `runForward` from a.dLogits [M, V] (adds into `grads`). `inject(level, dx)` is
    /// called with dx = ∂L/∂x_level just before block level−1 runs backward (level = depth … 1)
    /// so a second head reading x_level can add its gradient.
    func runBackward(_ a: MIMActivations, masked: UnsafePointer<Int32>,
                     inject: ((Int, UnsafeMutablePointer<Float>) -> Void)? = nil) {
        let v = config.vit, C = v.embedDim, N = v.sequenceLength, B = a.B
        rowHeadBackward(dX: a.dx, dXCount: B * N * C, dSel: a.dSel, dNormOut: a.dNormOut, dOut: a.dLogits, sel: a.sel,
                        normOut: a.normOut, mean: a.normMean, rstd: a.normRstd, rows: a.rows, M: a.M,
                        head: tokenHead, dHead: dTokenHead, K: config.vocabSize)
        trunk.backwardBlocks(dx: a.dx, a.t, B: B, inject: inject)
        trunk.embedBackward(dRows: a.dx, stride: N, dPatch: a.t.scratch.dLn, patches: a.t.patches, B: B, masked: masked)
    }

    /// Inference head outputs [M, V] at the rows flagged in `select` (every patch when nil;
    /// sample-major, patch ascending); masked [B, n] patches enter as the mask token.
    public func forward(logits: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, masked: UnsafePointer<Int32>,
                        select: UnsafePointer<Int32>? = nil, B: Int) -> Bool {
        let rowsSelect = config.kind == .beit ? (select ?? masked) : select
        let M = selectedCount(rowsSelect, B: B)
        guard let a = activations(B: B, M: M) else { return false }
        runForward(a, images: images, masked: masked, select: rowsSelect, training: false)
        logits.update(from: a.logits, count: M * config.vocabSize)
        return true
    }

    /// BEiT: forward, mean CE over the masked patches, backward (adds into `grads`); tokens [B, n] in 0..<V.
    public func trainStep(images: UnsafePointer<Float>, tokens: UnsafePointer<Int32>, masked: UnsafePointer<Int32>, B: Int,
                          logitsOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        precondition(config.kind == .beit, "trainStep(tokens:) is the BEiT objective")
        let V = config.vocabSize
        let M = maskedCount(masked, B: B)
        guard let a = activations(B: B, M: M) else { return .failure(.outOfMemory) }
        let savedRNG = rng
        trunk.drawKeeps(a.t.keeps, B: B)
        runForward(a, images: images, masked: masked, select: masked, training: true)
        let (sum, count) = tokenCrossEntropy(a, tokens: tokens)
        let loss = count > 0 ? sum / Double(count) : 0
        if let logitsOut { logitsOut.update(from: a.logits, count: M * V) }
        guard loss.isFinite else { rng = savedRNG; return .failure(.nonFiniteLoss(loss)) }
        guard count > 0 else { return .success(0) }
        crossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: a.targets, rows: M, K: V, scale: 1 / Float(count),
                             accumulate: false)
        runBackward(a, masked: masked)
        return .success(loss)
    }

    /// Cross-entropy of a.logits against the visual tokens [B, n] of the selected rows
    /// (fills a.targets, a.probs, a.losses): (sum, count).
    func tokenCrossEntropy(_ a: MIMActivations, tokens: UnsafePointer<Int32>) -> (Double, Int) {
        let N = config.vit.sequenceLength, n = config.vit.numPatches
        for i in 0..<a.M {
            let r = Int(a.rows[i]), b = r / N, t = r % N - 1
            a.targets[i] = tokens[b * n + t]
        }
        return crossEntropyForward(losses: a.losses, probs: a.probs, logits: a.logits, targets: a.targets,
                                   rows: a.M, K: config.vocabSize)
    }

    /// DTM student step: predictions [B, n, D] = lm_head(norm(x_L)) at every patch, the DTM loss
    /// against `target` [B, n, D] under `membership` [L, B, n] (group ids in 0..<n) with smooth-L1
    /// `beta`, backward (adds into `grads`). masked [B, n]: the block mask of the student's input.
    public func dtmTrainStep(images: UnsafePointer<Float>, masked: UnsafePointer<Int32>, target: UnsafePointer<Float>,
                             membership: UnsafePointer<Int32>, L: Int, beta: Double, B: Int,
                             predOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        precondition(config.kind == .dtm, "dtmTrainStep is the DTM objective")
        let n = config.vit.numPatches, D = config.vocabSize, M = B * n
        guard let a = activations(B: B, M: M) else { return .failure(.outOfMemory) }
        let savedRNG = rng
        trunk.drawKeeps(a.t.keeps, B: B)
        runForward(a, images: images, masked: masked, select: nil, training: true)
        if let predOut { predOut.update(from: a.logits, count: M * D) }
        let loss = dtmLossForward(pred: a.logits, target: target, membership: membership, L: L, B: B, N: n, D: D, beta: beta)
        guard loss.isFinite else { rng = savedRNG; return .failure(.nonFiniteLoss(loss)) }
        zero(a.dLogits, M * D)
        dtmLossBackward(dPred: a.dLogits, dLoss: 1, pred: a.logits, target: target, membership: membership,
                        L: L, B: B, N: n, D: D, beta: beta)
        runBackward(a, masked: masked)
        return .success(loss)
    }
}
