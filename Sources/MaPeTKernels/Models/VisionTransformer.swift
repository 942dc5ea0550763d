#if canImport(Glibc)
import Glibc
#endif

// The ViT classifier (Dosovitskiy et al. 2021; timm `VisionTransformer`, ALGORITHMS.md §1):
//   x0 = [cls ; patch_embed(images)] + pos_embed,   x_{l+1} = block_l(x_l),
//   'token': logits = head(norm(x_L)[:, 0]);   'avg': logits = head(fc_norm(mean_{t≥1} x_L[:, t])).
// Parameters, gradients live in one block each, cut by a `ParameterTable` under timm names.
// The training activations (`ViTActivations`) are allocated once per batch size and reused.

public enum GlobalPool: String, Sendable { case token, avg }

public struct ViTConfig: Sendable, Equatable {
    public var imgSize, patchSize, inChans: Int
    public var embedDim, depth, numHeads: Int
    public var mlpRatio: Double
    public var numClasses: Int
    public var globalPool: GlobalPool
    /// Layer-scale init value; nil = no layer scale.
    public var initValues: Float?
    public var dropPathRate: Float
    public var qkvBias: Bool

    /// Every field is given: the defaults live in Python only (README, developer section).
    public init(imgSize: Int, patchSize: Int, inChans: Int, embedDim: Int, depth: Int, numHeads: Int, mlpRatio: Double,
                numClasses: Int, globalPool: GlobalPool, initValues: Float?, dropPathRate: Float, qkvBias: Bool) {
        (self.imgSize, self.patchSize, self.inChans) = (imgSize, patchSize, inChans)
        (self.embedDim, self.depth, self.numHeads, self.mlpRatio) = (embedDim, depth, numHeads, mlpRatio)
        (self.numClasses, self.globalPool) = (numClasses, globalPool)
        (self.initValues, self.dropPathRate, self.qkvBias) = (initValues, dropPathRate, qkvBias)
    }

    public var grid: Int { imgSize / patchSize }
    public var numPatches: Int { grid * grid }
    public var sequenceLength: Int { numPatches + 1 }
    public var hidden: Int { Int(Double(embedDim) * mlpRatio) }
    public var patchDim: Int { inChans * patchSize * patchSize }

    /// A description of the first invalid field, or nil.
    public var problem: String? {
        if imgSize < 1 || patchSize < 1 || imgSize % patchSize != 0 { return "img_size (\(imgSize)) must be a positive multiple of patch_size (\(patchSize))" }
        if inChans < 1 { return "in_chans must be ≥ 1, got \(inChans)" }
        if embedDim < 1 || numHeads < 1 || embedDim % numHeads != 0 { return "embed_dim (\(embedDim)) must be a positive multiple of num_heads (\(numHeads))" }
        if depth < 0 { return "depth must be ≥ 0, got \(depth)" }
        if hidden < 1 { return "mlp_ratio gives an empty MLP (\(mlpRatio))" }
        if numClasses < 1 { return "num_classes must be ≥ 1, got \(numClasses)" }
        if !(dropPathRate >= 0 && dropPathRate < 1) { return "drop_path_rate must be in [0, 1), got \(dropPathRate)" }
        if let v = initValues, !v.isFinite { return "init_values must be finite, got \(v)" }
        return nil
    }
}

/// Activations of one training forward at batch size B, kept for the backward.
public final class ViTActivations: @unchecked Sendable {
    public let B: Int
    let arena: Arena
    /// The trunk's: patches, block inputs and caches, scratch, keep masks.
    let t: TrunkActivations
    let pooled, normOut, normMean, normRstd, logits, probs, losses: UnsafeMutablePointer<Float>
    let dx, dPooled, dNormOut, dLogits: UnsafeMutablePointer<Float>
    let targets: UnsafeMutablePointer<Int32>

    init?(config k: ViTConfig, B: Int) {
        let C = k.embedDim, rows = B * k.sequenceLength, K = k.numClasses
        let sizes = TrunkActivations.floats(k, B: B, keepBlocks: k.depth)
            + [B * C, B * C, B, B, B * K, B * K, B, rows * C, B * C, B * C, B * K, B]
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        self.B = B
        self.arena = arena
        t = TrunkActivations(arena: arena, k, B: B, keepBlocks: k.depth)
        pooled = arena.take(B * C); normOut = arena.take(B * C); normMean = arena.take(B); normRstd = arena.take(B)
        logits = arena.take(B * K); probs = arena.take(B * K); losses = arena.take(B)
        dx = arena.take(rows * C); dPooled = arena.take(B * C); dNormOut = arena.take(B * C); dLogits = arena.take(B * K)
        targets = UnsafeMutableRawPointer(arena.take(B)).assumingMemoryBound(to: Int32.self)
    }
}

public final class VisionTransformer: @unchecked Sendable {
    public let config: ViTConfig
    /// Embedding, blocks, `norm`/`fc_norm` and `head`: the parameters, gradients and drop path.
    public let trunk: Trunk
    public var table: ParameterTable { trunk.table }
    public var params: TensorStorage { trunk.params }
    public var grads: TensorStorage { trunk.grads }
    public var blocks: [TransformerBlock] { trunk.blocks }
    /// Precision of every matrix product, forward and backward (ALGORITHMS.md §7); parameters,
    /// gradients and everything else stay fp32.
    public var precision: Precision {
        get { trunk.precision }
        set { trunk.precision = newValue }
    }
    /// Drop-path generator; its state advances once per training step.
    public var rng: Xoshiro256StarStar {
        get { trunk.rng }
        set { trunk.rng = newValue }
    }
    private var train: ViTActivations?
    /// The parameters outside the blocks, and their gradients, resolved once.
    private var w: TrunkTensors { trunk.w }
    private var g: TrunkTensors { trunk.g }

    public var parameterCount: Int { trunk.parameterCount }

    /// Where the classifier's entries go: `norm` ('token') or `fc_norm` ('avg'), then `head`.
    static func layout(_ k: ViTConfig) -> TrunkLayout {
        TrunkLayout(special: nil, norm: k.globalPool == .avg ? "fc_norm" : "norm", head: "head", headOutputs: k.numClasses)
    }

    /// The timm parameter table for `config`.
    public static func makeTable(_ k: ViTConfig) -> ParameterTable { Trunk.makeTable(k, layout(k)) }

    /// A model initialised as ALGORITHMS.md §1 / timm: Linear trunc-normal(.02) with zero bias, pos_embed
    /// trunc-normal(.02), cls_token normal(1e-6), patch conv PyTorch default (uniform ±1/√fan_in),
    /// LayerNorm (1, 0), layer scale = init_values. Returns nil when memory runs out.
    public init?(config: ViTConfig, seed: UInt64) {
        guard let trunk = Trunk(config: config, layout: VisionTransformer.layout(config), seed: seed) else { return nil }
        self.config = config
        self.trunk = trunk
    }

    public func zeroGrad() { trunk.zeroGrad() }

    // MARK: Inference

    /// Final tokens [B, N, C] without keeping activations: `norm(x_L)` for 'token', x_L for 'avg'
    /// (timm's forward_features, where `norm` is the identity when fc_norm is used).
    public func forwardFeatures(out: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, B: Int) -> Bool {
        guard let final = inferenceTokens(images: images, B: B) else { return false }
        let (x, arena) = final
        let k = config, rows = B * k.sequenceLength, C = k.embedDim
        if k.globalPool == .token {
            let mean = arena.take(rows), rstd = arena.take(rows)
            layerNormForward(out: out, mean: mean, rstd: rstd, input: x, weight: w.normWeight!, bias: w.normBias!, rows: rows, cols: C)
        } else {
            out.update(from: x, count: rows * C)
        }
        return true
    }

    /// Logits [B, numClasses] without keeping activations.
    public func forward(logits: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, B: Int) -> Bool {
        guard let final = inferenceTokens(images: images, B: B) else { return false }
        let (x, arena) = final
        let C = config.embedDim
        let pooled = arena.take(B * C), normOut = arena.take(B * C), mean = arena.take(B), rstd = arena.take(B)
        head(logits: logits, pooled: pooled, normOut: normOut, mean: mean, rstd: rstd, x: x, B: B)
        return true
    }

    /// The trunk's inference pass, with room for the head's buffers after the final tokens.
    private func inferenceTokens(images: UnsafePointer<Float>, B: Int) -> (UnsafeMutablePointer<Float>, Arena)? {
        let C = config.embedDim, rows = B * config.sequenceLength
        return trunk.inferenceTokens(images: images, B: B, extra: [B * C, B * C, B, B, rows, rows])
    }

    /// pool → norm → head on final tokens x [B, N, C].
    private func head(logits: UnsafeMutablePointer<Float>, pooled: UnsafeMutablePointer<Float>, normOut: UnsafeMutablePointer<Float>,
                      mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, B: Int) {
        let k = config, N = k.sequenceLength, C = k.embedDim
        if k.globalPool == .avg {
            meanPoolForward(out: pooled, input: x, B: B, T: N, C: C, start: 1)
        } else {
            tokenSelectForward(out: pooled, input: x, B: B, T: N, C: C, token: 0)
        }
        layerNormForward(out: normOut, mean: mean, rstd: rstd, input: pooled, weight: w.normWeight!,
                         bias: w.normBias!, rows: B, cols: C)
        linearForward(out: logits, input: normOut, weight: w.headWeight!, bias: w.headBias!, rows: B, inFeatures: C, outFeatures: k.numClasses,
                      precision: precision)
    }

    // MARK: Training

    public enum StepError: Error, Equatable {
        case outOfMemory
        case nonFiniteLoss(Double)
    }

    /// What a training step's cross-entropy compares the logits with.
    public enum ClassTargets {
        /// Class indices [B] in 0..<numClasses, with label smoothing ε.
        case labels(UnsafePointer<Int32>, smoothing: Float)
        /// Distributions [B, numClasses] (mixup/cutmix targets; rows ≥ 0 summing to 1).
        case soft(UnsafePointer<Float>)
    }

    /// Forward, mean cross-entropy (optional label smoothing), backward: adds ∂loss/∂θ into
    /// `grads` and returns the loss. Labels must be in 0..<numClasses (checked by callers).
    /// On a non-finite loss nothing is accumulated and the drop-path generator is rewound.
    public func trainStep(images: UnsafePointer<Float>, labels: UnsafePointer<Int32>, B: Int, smoothing: Float = 0,
                          logitsOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        trainStep(images: images, targets: .labels(labels, smoothing: smoothing), B: B, logitsOut: logitsOut)
    }

    /// The step with hard labels or soft targets (mean soft-target cross-entropy over the batch).
    public func trainStep(images: UnsafePointer<Float>, targets: ClassTargets, B: Int,
                          logitsOut: UnsafeMutablePointer<Float>? = nil) -> Result<Double, StepError> {
        let k = config, N = k.sequenceLength, C = k.embedDim, K = k.numClasses
        if train?.B != B {
            train = nil
            guard let a = ViTActivations(config: k, B: B) else { return .failure(.outOfMemory) }
            train = a
        }
        let a = train!
        let savedRNG = trunk.rng
        // Forward.
        trunk.drawKeeps(a.t.keeps, B: B)
        trunk.embed(x: a.t.xs[0], stride: N, patches: a.t.patches, patchOut: a.t.patchOut, images: images, B: B)
        trunk.forwardBlocks(a.t, B: B, training: true)
        head(logits: a.logits, pooled: a.pooled, normOut: a.normOut, mean: a.normMean, rstd: a.normRstd, x: a.t.xs[k.depth], B: B)
        let (sum, count): (Double, Int)
        switch targets {
        case .labels(let labels, let smoothing):
            a.targets.update(from: labels, count: B)
            (sum, count) = crossEntropyForward(losses: a.losses, probs: a.probs, logits: a.logits, targets: a.targets,
                                               rows: B, K: K, smoothing: smoothing)
        case .soft(let q):
            sum = softTargetCrossEntropyForward(losses: a.losses, probs: a.probs, logits: a.logits, targets: q, rows: B, K: K)
            count = B
        }
        let loss = sum / Double(max(count, 1))
        if let logitsOut { logitsOut.update(from: a.logits, count: B * K) }
        guard loss.isFinite else { trunk.rng = savedRNG; return .failure(.nonFiniteLoss(loss)) }

        // Backward.
        zero(a.dLogits, B * K)
        switch targets {
        case .labels(_, let smoothing):
            crossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: a.targets, rows: B, K: K, smoothing: smoothing,
                                 scale: 1 / Float(max(count, 1)))
        case .soft(let q):
            softTargetCrossEntropyBackward(dLogits: a.dLogits, probs: a.probs, targets: q, rows: B, K: K, scale: 1 / Float(B))
        }
        zero(a.dNormOut, B * C)
        linearBackward(dInput: a.dNormOut, dWeight: g.headWeight!, dBias: g.headBias!, dOut: a.dLogits,
                       input: a.normOut, weight: w.headWeight!, rows: B, inFeatures: C, outFeatures: K,
                       precision: precision)
        zero(a.dPooled, B * C)
        layerNormBackward(dInput: a.dPooled, dWeight: g.normWeight!, dBias: g.normBias!,
                          dOut: a.dNormOut, input: a.pooled, weight: w.normWeight!,
                          mean: a.normMean, rstd: a.normRstd, rows: B, cols: C)
        zero(a.dx, B * N * C)
        if k.globalPool == .avg {
            meanPoolBackward(dInput: a.dx, dOut: a.dPooled, B: B, T: N, C: C, start: 1)
        } else {
            tokenSelectBackward(dInput: a.dx, dOut: a.dPooled, B: B, T: N, C: C, token: 0)
        }
        trunk.backwardBlocks(dx: a.dx, a.t, B: B)
        trunk.embedBackward(dRows: a.dx, stride: N, dPatch: a.t.scratch.dLn, patches: a.t.patches, B: B)
        return .success(loss)
    }

    /// Frees the training activations (they are re-allocated by the next `trainStep`).
    public func releaseActivations() { train = nil }
}
