#if canImport(Glibc)
import Glibc
#endif

// What the pre-training models share (ALGORITHMS.md §1–2): a ViT trunk without classifier, one
// learned special token and a linear head over the visual-token vocabulary.
//   MaPeT / PIM (two-stream): cls_token, pos_embed, mask_positional_token, patch_embed, blocks,
//                             norm, decoder [V, C]
//   BEiT (MIM):               cls_token, pos_embed, mask_token, patch_embed, blocks, norm, lm_head [V, C]
//   DTM:                      as BEiT, lm_head [D, C] to the teacher dimension D (= vocabSize)
//   CCViT:                    as BEiT, then cls_pt_layers (2 blocks), cls_pt_norm, cls_pt_lm_head [P, C]
//                             with P = in_chans·patch² (Cakeyan/CCViT_Public, shared_lm_head=False)
// The order is the PyTorch state_dict order of the references (a module's own parameters
// first, then its submodules in registration order). Parameters and gradients live in one
// block each, cut by a `ParameterTable`.

public enum PretrainKind: String, Sendable {
    /// Two-stream with auxiliary positional tokens.
    case mapet
    /// Two-stream without auxiliary positional tokens (XLNet-style permuted modeling).
    case pim
    /// BEiT masked image modeling.
    case beit
    /// CCViT: BEiT-style masking plus centroid replacement, token head and pixel head.
    case ccvit
    /// DTM student: BEiT-style masked encoder regressing morphed teacher features.
    case dtm
}

public struct PretrainConfig: Sendable, Equatable {
    /// The trunk (`numClasses` and `globalPool` are unused).
    public var vit = ViTConfig()
    public var kind: PretrainKind = .mapet
    /// V: visual-token vocabulary (`num_tokens` in Python; outputs of decoder / lm_head).
    public var vocabSize = 8192
    /// Default context size L of the two-stream models (`least_number`); batches carry their own.
    public var leastNumber = 50
    /// CCViT: the pixel head reads the patch tokens after this many blocks (9 of 12).
    public var earlyLayers = 9
    /// CCViT: transformer blocks of the pixel head.
    public var headLayers = 2

    public init() {}

    public var twoStream: Bool { kind == .mapet || kind == .pim }
    /// The number of pixel-head blocks (0 unless CCViT).
    public var pixelHeadDepth: Int { kind == .ccvit ? headLayers : 0 }
    public var specialToken: String { twoStream ? "mask_positional_token" : "mask_token" }
    public var headName: String { twoStream ? "decoder" : "lm_head" }

    /// A description of the first invalid field, or nil.
    public var problem: String? {
        if let p = vit.problem { return p }
        if vocabSize < 1 { return "num_tokens must be ≥ 1, got \(vocabSize)" }
        if twoStream && !(leastNumber >= 1 && leastNumber < vit.sequenceLength) {
            return "least_number must be in [1, \(vit.sequenceLength - 1)] for \(vit.numPatches) patches, got \(leastNumber)"
        }
        if kind == .ccvit && !(earlyLayers >= 1 && earlyLayers <= vit.depth) {
            return "early_layers must be in [1, depth=\(vit.depth)], got \(earlyLayers)"
        }
        if kind == .ccvit && !(headLayers >= 1 && headLayers <= 64) {
            return "head_layers must be in [1, 64], got \(headLayers)"
        }
        return nil
    }
}

/// Parameters, gradients, blocks and the drop-path generator of a pre-training model.
public class PretrainModel: @unchecked Sendable {
    public let config: PretrainConfig
    public let table: ParameterTable
    public let params: TensorStorage
    public let grads: TensorStorage
    /// The parameters outside the blocks, and their gradients, resolved once.
    let trunk: TrunkTensors, dTrunk: TrunkTensors
    /// `norm` + the token head (`decoder` / `lm_head`), and CCViT's pixel head (nil for the other kinds).
    let tokenHead: HeadTensors, dTokenHead: HeadTensors, pixelHead: HeadTensors?, dPixelHead: HeadTensors?
    public private(set) var blocks: [TransformerBlock]
    /// CCViT's pixel-head blocks (`cls_pt_layers`); empty for the other kinds.
    public private(set) var headBlocks: [TransformerBlock]
    /// Precision of every matrix product, forward and backward (ALGORITHMS.md §7); parameters,
    /// gradients and everything else stay fp32.
    public var precision: Precision = .fp32 {
        didSet {
            for i in blocks.indices { blocks[i].precision = precision }
            for i in headBlocks.indices { headBlocks[i].precision = precision }
        }
    }
    /// Drop-path generator; advances once per training step (rewound on a non-finite loss).
    public var rng: Xoshiro256StarStar

    public enum StepError: Error, Equatable {
        case outOfMemory
        case nonFiniteLoss(Double)
    }

    /// The reference parameter table for `config`.
    public static func makeTable(_ k: PretrainConfig) -> ParameterTable {
        var t = ParameterTable()
        let v = k.vit, C = v.embedDim
        t.add("cls_token", [1, 1, C])
        t.add("pos_embed", [1, v.sequenceLength, C])
        t.add(k.specialToken, [1, 1, C])
        t.add("patch_embed.proj.weight", [C, v.inChans, v.patchSize, v.patchSize])
        t.add("patch_embed.proj.bias", [C])
        for i in 0..<v.depth {
            BlockTensors.register(in: &t, prefix: "blocks.\(i).", C: C, hidden: v.hidden, qkvBias: v.qkvBias,
                                  layerScale: v.initValues != nil)
        }
        t.add("norm.weight", [C]); t.add("norm.bias", [C])
        t.add(k.headName + ".weight", [k.vocabSize, C]); t.add(k.headName + ".bias", [k.vocabSize])
        for i in 0..<k.pixelHeadDepth {
            BlockTensors.register(in: &t, prefix: "cls_pt_layers.\(i).", C: C, hidden: v.hidden, qkvBias: v.qkvBias,
                                  layerScale: v.initValues != nil)
        }
        if k.kind == .ccvit {
            t.add("cls_pt_norm.weight", [C]); t.add("cls_pt_norm.bias", [C])
            t.add("cls_pt_lm_head.weight", [v.patchDim, C]); t.add("cls_pt_lm_head.bias", [v.patchDim])
        }
        return t
    }

    /// Allocates and initialises (ALGORITHMS.md §1); nil when memory runs out.
    init?(config: PretrainConfig, seed: UInt64) {
        precondition(config.problem == nil, config.problem ?? "")
        self.config = config
        let table = PretrainModel.makeTable(config)
        self.table = table
        guard let p = TensorStorage(count: table.total, dtype: .float32),
              let g = TensorStorage(count: table.total, dtype: .float32) else { return nil }
        params = p; grads = g
        trunk = TrunkTensors(base: p.floats, table: table, norm: "norm", head: config.headName, special: config.specialToken)
        dTrunk = TrunkTensors(base: g.floats, table: table, norm: "norm", head: config.headName, special: config.specialToken)
        tokenHead = HeadTensors(base: p.floats, table: table, norm: "norm", head: config.headName)
        dTokenHead = HeadTensors(base: g.floats, table: table, norm: "norm", head: config.headName)
        let pixel = config.kind == .ccvit
        pixelHead = pixel ? HeadTensors(base: p.floats, table: table, norm: "cls_pt_norm", head: "cls_pt_lm_head") : nil
        dPixelHead = pixel ? HeadTensors(base: g.floats, table: table, norm: "cls_pt_norm", head: "cls_pt_lm_head") : nil
        zero(p.floats, table.total)
        zero(g.floats, table.total)
        let v = config.vit
        blocks = (0..<v.depth).map { i in
            TransformerBlock(C: v.embedDim, H: v.numHeads, hidden: v.hidden,
                             weights: BlockTensors(base: p.floats, table: table, prefix: "blocks.\(i)."),
                             grads: BlockTensors(base: g.floats, table: table, prefix: "blocks.\(i)."))
        }
        headBlocks = (0..<config.pixelHeadDepth).map { i in
            TransformerBlock(C: v.embedDim, H: v.numHeads, hidden: v.hidden,
                             weights: BlockTensors(base: p.floats, table: table, prefix: "cls_pt_layers.\(i)."),
                             grads: BlockTensors(base: g.floats, table: table, prefix: "cls_pt_layers.\(i)."))
        }
        rng = Xoshiro256StarStar(seed: seed, stream: 1)
        initialize(seed: seed)
    }

    private func initialize(seed: UInt64) {
        initializeParameters(params.floats, table: table, seed: seed, patchDim: config.vit.patchDim,
                             initValues: config.vit.initValues, truncNormal: [config.specialToken])
    }

    public var parameterCount: Int { table.entries.reduce(0) { $0 + $1.count } }


    public func zeroGrad() { zero(grads.floats, table.total) }

    /// Drop-path rate of block l (linear 0 → drop_path_rate over depth, timm).
    func dropRate(_ l: Int) -> Float {
        let d = config.vit.depth
        return d > 1 ? config.vit.dropPathRate * Float(l) / Float(d - 1) : 0
    }

    /// Drop-path rate of block l of the trunk (l < depth) or of pixel-head block l − depth
    /// (CCViT reference: linspace(0, rate, max(depth, early + head))[early + i]).
    func blockDropRate(_ l: Int) -> Float {
        let v = config.vit
        if l < v.depth { return dropRate(l) }
        let total = max(v.depth, config.earlyLayers + config.headLayers)
        return total > 1 ? v.dropPathRate * Float(config.earlyLayers + l - v.depth) / Float(total - 1) : 0
    }

    /// Draws the two per-sample keep masks of every block (trunk, then pixel head) into keeps [blocks, 2, B].
    func drawKeeps(_ keeps: UnsafeMutablePointer<Float>, B: Int) {
        for l in 0..<(config.vit.depth + config.pixelHeadDepth) {
            dropPathKeep(keep: keeps + (2 * l) * B, B: B, rate: blockDropRate(l), rng: &rng)
            dropPathKeep(keep: keeps + (2 * l + 1) * B, B: B, rate: blockDropRate(l), rng: &rng)
        }
    }

    /// keep pointers of block l (trunk, then pixel head) for a training pass (nil when the block's
    /// rate is 0 or at inference).
    func keepPointers(_ keeps: UnsafeMutablePointer<Float>, l: Int, B: Int, training: Bool)
        -> (UnsafePointer<Float>?, UnsafePointer<Float>?) {
        guard training, blockDropRate(l) > 0 else { return (nil, nil) }
        return (UnsafePointer(keeps + (2 * l) * B), UnsafePointer(keeps + (2 * l + 1) * B))
    }

    /// Gradient of the embedding for the token rows of a stream: dRows holds ∂L/∂x for rows
    /// 0..<N of each sample (row stride `stride` rows per sample). Adds into cls_token, pos_embed
    /// and the patch conv. `dPatch` [B, n, C] is scratch; `patches` the forward's patch cache.
    /// Patches with `masked[b, t] != 0` were replaced by the mask token: no conv gradient.
    func embedTokensBackward(dRows: UnsafePointer<Float>, stride T: Int, dPatch: UnsafeMutablePointer<Float>,
                             patches: UnsafePointer<Float>, B: Int, masked: UnsafePointer<Int32>? = nil) {
        let v = config.vit, C = v.embedDim, N = v.sequenceLength, n = v.numPatches
        nonisolated(unsafe) let dCls = dTrunk.clsToken, dPos = dTrunk.posEmbed, dRows = dRows, dPatch = dPatch
        // cls and pos: sum over samples, samples in order (deterministic), split over columns.
        Parallel.forRanges(N * C, grain: 1024) { r in
            for b in 0..<B {
                let src = dRows + b * T * C
                for j in r { dPos[j] += src[j] }
            }
        }
        for b in 0..<B {
            let src = dRows + b * T * C
            for j in 0..<C { dCls[j] += src[j] }
        }
        nonisolated(unsafe) let masked = masked
        Parallel.forEach(B) { b in
            (dPatch + b * n * C).update(from: dRows + (b * T + 1) * C, count: n * C)
            if let masked {
                for t in 0..<n where masked[b * n + t] != 0 { (dPatch + (b * n + t) * C).update(repeating: 0, count: C) }
            }
        }
        patchEmbedBackward(dImages: nil, dWeight: dTrunk.patchWeight, dBias: dTrunk.patchBias,
                           dOut: dPatch, patches: patches, weight: trunk.patchWeight,
                           B: B, inChans: v.inChans, imgSize: v.imgSize, patch: v.patchSize, C: C,
                           precision: precision)
    }
}

extension Xoshiro256StarStar {
    /// The four state words (to save and restore a generator exactly).
    public var stateWords: (UInt64, UInt64, UInt64, UInt64) { (s0, s1, s2, s3) }
}
