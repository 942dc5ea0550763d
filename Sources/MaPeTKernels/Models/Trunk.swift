// The ViT trunk every trainable model here holds (ALGORITHMS.md §1): the parameter table and its
// parameter/gradient blocks, the patch embedding, class token and positions, the blocks, the final
// norm and head entries, the drop-path schedule and generator, and the embedding and block passes.
//   x0[b] = [cls ; patch_embed(images[b]) (or the special token where masked)] + pos_embed
//   x_{l+1} = block_l(x_l)     (full attention; the two-stream models run the blocks themselves)
// `VisionTransformer` adds the classifier head; the pre-training models add their special token,
// their heads and (CCViT) pixel-head blocks through the `TrunkLayout`. Every parameter is resolved
// once into typed views (`w`/`g`, each block's `BlockTensors`), never looked up by name in a step.

/// Where a model's own entries go around the trunk's in the reference state_dict order:
///   cls_token, pos_embed, [special], patch_embed.proj.{weight,bias}, blocks.{i}.…,
///   {norm}.{weight,bias}, {head}.{weight,bias} [headOutputs, C], then `tail`.
public struct TrunkLayout {
    /// The learned token between pos_embed and patch_embed (`mask_token`, `mask_positional_token`).
    public var special: String?
    /// The final norm (`norm`, or `fc_norm` for the ViT's 'avg' pool).
    public var norm: String
    /// The Linear head after the norm (`head`, `decoder`, `lm_head`) and its outputs.
    public var head: String
    public var headOutputs: Int
    /// Entries after the head (CCViT's pixel head), added in order.
    public var tail: (inout ParameterTable) -> Void = { _ in }

    public init(special: String?, norm: String, head: String, headOutputs: Int,
                tail: @escaping (inout ParameterTable) -> Void = { _ in }) {
        self.special = special; self.norm = norm; self.head = head; self.headOutputs = headOutputs; self.tail = tail
    }
}

public final class Trunk: @unchecked Sendable {
    public let config: ViTConfig
    public let table: ParameterTable
    public let params: TensorStorage
    public let grads: TensorStorage
    /// The parameters outside the blocks (`w`) and their gradients (`g`), resolved once.
    let w: TrunkTensors, g: TrunkTensors
    public private(set) var blocks: [TransformerBlock]
    /// Precision of the patch embedding and the blocks' matrix products (ALGORITHMS.md §7).
    public var precision: Precision = .fp32 {
        didSet { for i in blocks.indices { blocks[i].precision = precision } }
    }
    /// Drop-path rate of every block that draws keep masks: the trunk's (linear 0 → drop_path_rate
    /// over depth, timm), then any the model appends (`appendDropRates`).
    public private(set) var dropRates: [Float]
    /// Drop-path generator; advances once per training step (rewound on a non-finite loss).
    public var rng: Xoshiro256StarStar

    public var parameterCount: Int { table.entries.reduce(0) { $0 + $1.count } }

    /// The parameter table of `config` under `layout`.
    public static func makeTable(_ k: ViTConfig, _ layout: TrunkLayout) -> ParameterTable {
        var t = ParameterTable()
        let C = k.embedDim
        t.add("cls_token", [1, 1, C])
        t.add("pos_embed", [1, k.sequenceLength, C])
        if let special = layout.special { t.add(special, [1, 1, C]) }
        t.add("patch_embed.proj.weight", [C, k.inChans, k.patchSize, k.patchSize])
        t.add("patch_embed.proj.bias", [C])
        for i in 0..<k.depth {
            BlockTensors.register(in: &t, prefix: "blocks.\(i).", C: C, hidden: k.hidden, qkvBias: k.qkvBias,
                                  layerScale: k.initValues != nil)
        }
        t.add(layout.norm + ".weight", [C]); t.add(layout.norm + ".bias", [C])
        t.add(layout.head + ".weight", [layout.headOutputs, C]); t.add(layout.head + ".bias", [layout.headOutputs])
        layout.tail(&t)
        return t
    }

    /// Allocates the blocks and initialises them (ALGORITHMS.md §1, `initializeParameters`; the
    /// special token trunc-normal(.02)); the drop-path generator is stream 1 of `seed`. Returns
    /// nil when memory runs out.
    public init?(config: ViTConfig, layout: TrunkLayout, seed: UInt64) {
        precondition(config.problem == nil, config.problem ?? "")
        self.config = config
        let table = Trunk.makeTable(config, layout)
        self.table = table
        guard let p = TensorStorage(count: table.total, dtype: .float32),
              let g = TensorStorage(count: table.total, dtype: .float32) else { return nil }
        params = p; grads = g
        zero(p.floats, table.total)
        zero(g.floats, table.total)
        w = TrunkTensors(base: p.floats, table: table, norm: layout.norm, head: layout.head, special: layout.special)
        self.g = TrunkTensors(base: g.floats, table: table, norm: layout.norm, head: layout.head, special: layout.special)
        blocks = []
        dropRates = (0..<config.depth).map { l in
            config.depth > 1 ? config.dropPathRate * Float(l) / Float(config.depth - 1) : 0
        }
        rng = Xoshiro256StarStar(seed: seed, stream: 1)
        blocks = makeBlocks(prefix: "blocks.", count: config.depth)
        initializeParameters(p.floats, table: table, seed: seed, patchDim: config.patchDim,
                             initValues: config.initValues, truncNormal: Set(layout.special.map { [$0] } ?? []))
    }

    /// Blocks `prefix{0..<count}.` of the table (the trunk's, or a model's extra blocks), resolved once.
    public func makeBlocks(prefix: String, count: Int) -> [TransformerBlock] {
        let k = config
        return (0..<count).map { i in
            var b = TransformerBlock(C: k.embedDim, H: k.numHeads, hidden: k.hidden,
                                     weights: BlockTensors(base: params.floats, table: table, prefix: "\(prefix)\(i)."),
                                     grads: BlockTensors(base: grads.floats, table: table, prefix: "\(prefix)\(i)."))
            b.precision = precision
            return b
        }
    }

    /// Appends the rates of a model's extra blocks (their keep masks follow the trunk's).
    public func appendDropRates(_ rates: [Float]) { dropRates += rates }

    public func zeroGrad() { zero(grads.floats, table.total) }

    // MARK: Drop path

    /// Draws the two per-sample keep masks of every block in `dropRates` into keeps [blocks, 2, B].
    func drawKeeps(_ keeps: UnsafeMutablePointer<Float>, B: Int) {
        for (l, rate) in dropRates.enumerated() {
            dropPathKeep(keep: keeps + (2 * l) * B, B: B, rate: rate, rng: &rng)
            dropPathKeep(keep: keeps + (2 * l + 1) * B, B: B, rate: rate, rng: &rng)
        }
    }

    /// keep pointers of block l (in `dropRates` order) for a pass (nil when its rate is 0 or at inference).
    func keepPointers(_ keeps: UnsafeMutablePointer<Float>, l: Int, B: Int, training: Bool)
        -> (UnsafePointer<Float>?, UnsafePointer<Float>?) {
        guard training, dropRates[l] > 0 else { return (nil, nil) }
        return (UnsafePointer(keeps + (2 * l) * B), UnsafePointer(keeps + (2 * l + 1) * B))
    }

    // MARK: Embedding

    /// Rows 0..<N of each sample of x [B, T, C] (T ≥ N rows per sample): the class token and the patch
    /// embeddings (the special token where `masked` [B, n] is non-zero), plus pos_embed.
    /// `patches` [B, n, patchDim] and `patchOut` [B, n, C] are kept for `embedBackward`.
    func embed(x: UnsafeMutablePointer<Float>, stride T: Int, patches: UnsafeMutablePointer<Float>,
               patchOut: UnsafeMutablePointer<Float>, images: UnsafePointer<Float>, B: Int,
               masked: UnsafePointer<Int32>? = nil) {
        let k = config
        patchEmbedForward(out: patchOut, patches: patches, images: images, weight: w.patchWeight, bias: w.patchBias,
                          B: B, inChans: k.inChans, imgSize: k.imgSize, patch: k.patchSize, C: k.embedDim,
                          precision: precision)
        embedTokensForward(x: x, stride: T, patchOut: patchOut, cls: w.clsToken, pos: w.posEmbed,
                           special: masked == nil ? nil : w.special, masked: masked, B: B, n: k.numPatches, C: k.embedDim)
    }

    /// Gradient of `embed` from dRows = ∂L/∂x (rows 0..<N of each sample, stride T rows): adds into
    /// cls_token, pos_embed, the patch conv and, at the `masked` rows, the special token.
    /// `dPatch` [B, n, C] is scratch; `patches` the forward's patch cache.
    func embedBackward(dRows: UnsafePointer<Float>, stride T: Int, dPatch: UnsafeMutablePointer<Float>,
                       patches: UnsafePointer<Float>, B: Int, masked: UnsafePointer<Int32>? = nil) {
        let k = config, C = k.embedDim, N = k.sequenceLength, n = k.numPatches
        nonisolated(unsafe) let dCls = g.clsToken, dPos = g.posEmbed, dRows = dRows, dPatch = dPatch
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
        patchEmbedBackward(dImages: nil, dWeight: g.patchWeight, dBias: g.patchBias, dOut: dPatch, patches: patches,
                           weight: w.patchWeight, B: B, inChans: k.inChans, imgSize: k.imgSize, patch: k.patchSize, C: C,
                           precision: precision)
        if let masked {
            let dSpecial = g.special!
            for b in 0..<B {
                for t in 0..<n where masked[b * n + t] != 0 {
                    let row = dRows + (b * T + 1 + t) * C
                    for j in 0..<C { dSpecial[j] += row[j] }
                }
            }
        }
    }

    // MARK: Blocks

    /// The blocks with full attention over N = sequenceLength rows: t.xs[l + 1] = block_l(t.xs[l]);
    /// `training` applies the keep masks drawn by `drawKeeps`.
    func forwardBlocks(_ t: TrunkActivations, B: Int, training: Bool) {
        for (l, blk) in blocks.enumerated() {
            let (keep1, keep2) = keepPointers(t.keeps, l: l, B: B, training: training)
            blk.forward(out: t.xs[l + 1], x: t.xs[l], cache: t.caches[l], B: B, T: config.sequenceLength, mask: FullAttention(),
                        keep1: keep1, keep2: keep2)
        }
    }

    /// Backward of `forwardBlocks` (training) with dx = ∂L/∂x_depth in, ∂L/∂x_0 out. `inject(level, dx)`
    /// is called with dx = ∂L/∂x_level just before block level−1 runs backward (level = depth … 1),
    /// so a second head reading x_level can add its gradient.
    func backwardBlocks(dx: UnsafeMutablePointer<Float>, _ t: TrunkActivations, B: Int,
                        inject: ((Int, UnsafeMutablePointer<Float>) -> Void)? = nil) {
        for l in stride(from: config.depth - 1, through: 0, by: -1) {
            inject?(l + 1, dx)
            let (keep1, keep2) = keepPointers(t.keeps, l: l, B: B, training: true)
            blocks[l].backward(dx: dx, x: t.xs[l], cache: t.caches[l], scratch: t.scratch, B: B, T: config.sequenceLength,
                               keep1: keep1, keep2: keep2)
        }
    }

    /// Embedding and blocks without keeping activations (inference): the final tokens [B, N, C] and the
    /// arena holding them, which also holds `extra` floats for the caller to take after them.
    func inferenceTokens(images: UnsafePointer<Float>, B: Int, extra: [Int] = []) -> (UnsafeMutablePointer<Float>, Arena)? {
        let k = config, N = k.sequenceLength, C = k.embedDim, rows = B * N
        let probs = B * k.numHeads * N * N
        var sizes = [B * k.numPatches * k.patchDim, B * k.numPatches * C, rows * C, rows * C] + extra
        sizes += BlockCache.floats(rows: rows, C: C, hidden: k.hidden, probs: probs, ownsKV: true)
        guard let arena = Arena(floats: Arena.size(sizes)) else { return nil }
        let patches = arena.take(B * k.numPatches * k.patchDim), patchOut = arena.take(B * k.numPatches * C)
        var x = arena.take(rows * C), y = arena.take(rows * C)
        let cache = BlockCache(arena: arena, rows: rows, C: C, hidden: k.hidden, probs: probs, ownsKV: true)
        embed(x: x, stride: N, patches: patches, patchOut: patchOut, images: images, B: B)
        forwardBlocksInference(blocks, x: &x, y: &y, cache: cache, B: B, T: N)
        return (x, arena)
    }
}

/// What a training pass over the trunk keeps for its backward (full attention, B samples of N rows): the
/// patch cache, every block's input and cache, one gradient scratch, and the keep masks of `keepBlocks`
/// blocks (the trunk's and any a model appends). Carved from the model's activation arena first.
final class TrunkActivations: @unchecked Sendable {
    let patches, patchOut: UnsafeMutablePointer<Float>
    /// xs[l] is the input of block l; xs[depth] the final tokens. [B, N, C] each.
    let xs: [UnsafeMutablePointer<Float>]
    let caches: [BlockCache]
    let scratch: BlockScratch
    let keeps: UnsafeMutablePointer<Float>         // [keepBlocks, 2, B]

    /// The arena sizes `init` takes, in order.
    static func floats(_ k: ViTConfig, B: Int, keepBlocks: Int) -> [Int] {
        let N = k.sequenceLength, C = k.embedDim, n = k.numPatches, rows = B * N, probs = B * k.numHeads * N * N
        var sizes = [B * n * k.patchDim, B * n * C] + Array(repeating: rows * C, count: k.depth + 1)
        for _ in 0..<k.depth { sizes += BlockCache.floats(rows: rows, C: C, hidden: k.hidden, probs: probs, ownsKV: true) }
        sizes += BlockScratch.floats(rows: rows, C: C, hidden: k.hidden, ownsKV: true)
        return sizes + [keepBlocks * 2 * B]
    }

    init(arena: Arena, _ k: ViTConfig, B: Int, keepBlocks: Int) {
        let N = k.sequenceLength, C = k.embedDim, n = k.numPatches, rows = B * N, probs = B * k.numHeads * N * N
        patches = arena.take(B * n * k.patchDim); patchOut = arena.take(B * n * C)
        xs = (0...k.depth).map { _ in arena.take(rows * C) }
        caches = (0..<k.depth).map { _ in BlockCache(arena: arena, rows: rows, C: C, hidden: k.hidden, probs: probs, ownsKV: true) }
        scratch = BlockScratch(arena: arena, rows: rows, C: C, hidden: k.hidden, ownsKV: true)
        keeps = arena.take(keepBlocks * 2 * B)
    }
}

/// Rows 0..<N (N = n + 1) of each sample of x [B, T, C]: x[b, 0] = cls + pos[0],
/// x[b, 1 + t] = (special where masked[b, t] != 0, else patchOut[b, t]) + pos[1 + t].
func embedTokensForward(x: UnsafeMutablePointer<Float>, stride T: Int, patchOut: UnsafePointer<Float>,
                        cls: UnsafePointer<Float>, pos: UnsafePointer<Float>, special: UnsafePointer<Float>?,
                        masked: UnsafePointer<Int32>?, B: Int, n: Int, C: Int) {
    nonisolated(unsafe) let x = x, patchOut = patchOut, cls = cls, pos = pos, special = special, masked = masked
    Parallel.forEach(B) { b in
        let xb = x + b * T * C
        for j in 0..<C { xb[j] = cls[j] + pos[j] }
        for t in 0..<n {
            let src = masked.map({ $0[b * n + t] != 0 }) ?? false ? special! : patchOut + (b * n + t) * C
            let dst = xb + (t + 1) * C, pe = pos + (t + 1) * C
            for j in 0..<C { dst[j] = src[j] + pe[j] }
        }
    }
}

/// Runs `blocks` with full attention and no drop path over x [B, T, C], reusing one cache:
/// on return x holds the final tokens (y is scratch; the two are swapped after each block).
func forwardBlocksInference(_ blocks: [TransformerBlock], x: inout UnsafeMutablePointer<Float>,
                            y: inout UnsafeMutablePointer<Float>, cache: BlockCache, B: Int, T: Int) {
    for blk in blocks {
        blk.forward(out: y, x: x, cache: cache, B: B, T: T, mask: FullAttention(), keep1: nil, keep2: nil)
        swap(&x, &y)
    }
}
