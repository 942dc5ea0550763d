#if canImport(Glibc)
import Glibc
#endif

// The CLIP ViT image tower (Radford et al. 2021; OpenAI `VisionTransformer`, open_clip
// `visual.*`; ALGORITHMS.md §6), frozen, on the ViT trunk's `TransformerBlock`:
//   x0 = ln_pre([class_embedding ; conv1(images)] + positional_embedding)      conv1 has no bias
//   x_{l+1} = block_l(x_l)          pre-LN; QuickGELU (OpenAI) or exact GELU; LayerNorm eps 1e-5
//   tokens = ln_post(x_L) [B, N, C],  projected = tokens · proj [B, N, E],  embedding = projected[:, 0].
// Attention weights are fused: `attn.in_proj_weight [3C, C]` holds q, k, v rows in that order,
// which is the block's q [C, C] followed by its kv [2C, C] (K rows then V rows) — the block reads
// them in place. Parameters live in one block under the reference names (without `visual.`).

public struct CLIPVisionConfig: Sendable, Equatable {
    /// Geometry and size: imgSize, patchSize, inChans, embedDim (= width), depth (= layers),
    /// numHeads (= width / 64 in the published towers), mlpRatio.
    public var trunk: ViTConfig
    /// Width of `proj`'s output (the joint embedding).
    public var outputDim: Int
    public var activation: Activation

    /// Every field is given: the defaults live in Python only (README, developer section).
    public init(trunk: ViTConfig, outputDim: Int, activation: Activation) {
        (self.trunk, self.outputDim, self.activation) = (trunk, outputDim, activation)
    }

    /// A description of the first invalid field, or nil.
    public var problem: String? {
        if let p = trunk.problem { return p }
        if outputDim < 1 { return "output_dim must be ≥ 1, got \(outputDim)" }
        return nil
    }
}

/// LayerNorm eps of CLIP (PyTorch's `nn.LayerNorm` default).
public let clipLayerNormEps: Float = 1e-5

extension BlockTensors {
    /// Block `prefix` (`transformer.resblocks.{i}.`) of a CLIP tower: q and kv point into
    /// `attn.in_proj_weight`/`in_proj_bias`. CLIP blocks have no layer scale.
    init(clip base: UnsafeMutablePointer<Float>, table: ParameterTable, prefix: String, C: Int) {
        func p(_ n: String) -> UnsafeMutablePointer<Float> { base + table.offset(prefix + n) }
        let inW = p("attn.in_proj_weight"), inB = p("attn.in_proj_bias")
        norm1W = p("ln_1.weight"); norm1B = p("ln_1.bias")
        qW = inW; qB = inB
        kvW = inW + C * C; kvB = inB + C
        projW = p("attn.out_proj.weight"); projB = p("attn.out_proj.bias")
        norm2W = p("ln_2.weight"); norm2B = p("ln_2.bias")
        fc1W = p("mlp.c_fc.weight"); fc1B = p("mlp.c_fc.bias")
        fc2W = p("mlp.c_proj.weight"); fc2B = p("mlp.c_proj.bias")
        ls1 = nil; ls2 = nil
    }
}

/// The parameters of a CLIP tower outside its blocks, resolved once (as `TrunkTensors` for the ViT).
struct CLIPTowerTensors: @unchecked Sendable {
    let conv1, classEmbedding, positionalEmbedding, lnPreWeight, lnPreBias, lnPostWeight, lnPostBias, proj: UnsafeMutablePointer<Float>

    init(base: UnsafeMutablePointer<Float>, table: ParameterTable) {
        func at(_ name: String) -> UnsafeMutablePointer<Float> { base + table.offset(name) }
        conv1 = at("conv1.weight"); classEmbedding = at("class_embedding"); positionalEmbedding = at("positional_embedding")
        lnPreWeight = at("ln_pre.weight"); lnPreBias = at("ln_pre.bias")
        lnPostWeight = at("ln_post.weight"); lnPostBias = at("ln_post.bias")
        proj = at("proj")
    }
}

public final class CLIPVisionTransformer: @unchecked Sendable {
    public let config: CLIPVisionConfig
    public let table: ParameterTable
    public let params: TensorStorage
    public private(set) var blocks: [TransformerBlock]
    /// The parameters outside the blocks, resolved once.
    let tower: CLIPTowerTensors
    /// Precision of every matrix product (patch conv, blocks, proj; ALGORITHMS.md §7).
    public var precision: Precision = .fp32 {
        didSet { for i in blocks.indices { blocks[i].precision = precision } }
    }

    public var parameterCount: Int { table.entries.reduce(0) { $0 + $1.count } }

    /// The reference (OpenAI / open_clip `visual.`) parameter table, in registration order.
    public static func makeTable(_ config: CLIPVisionConfig) -> ParameterTable {
        let k = config.trunk, C = k.embedDim
        var t = ParameterTable()
        t.add("conv1.weight", [C, k.inChans, k.patchSize, k.patchSize])
        t.add("class_embedding", [C])
        t.add("positional_embedding", [k.sequenceLength, C])
        t.add("ln_pre.weight", [C]); t.add("ln_pre.bias", [C])
        for i in 0..<k.depth {
            let p = "transformer.resblocks.\(i)."
            t.add(p + "ln_1.weight", [C]); t.add(p + "ln_1.bias", [C])
            t.add(p + "attn.in_proj_weight", [3 * C, C]); t.add(p + "attn.in_proj_bias", [3 * C])
            t.add(p + "attn.out_proj.weight", [C, C]); t.add(p + "attn.out_proj.bias", [C])
            t.add(p + "ln_2.weight", [C]); t.add(p + "ln_2.bias", [C])
            t.add(p + "mlp.c_fc.weight", [k.hidden, C]); t.add(p + "mlp.c_fc.bias", [k.hidden])
            t.add(p + "mlp.c_proj.weight", [C, k.hidden]); t.add(p + "mlp.c_proj.bias", [C])
        }
        t.add("ln_post.weight", [C]); t.add("ln_post.bias", [C])
        t.add("proj", [C, config.outputDim])
        return t
    }

    /// A tower initialised as OpenAI's `CLIP.initialize_parameters` (normal draws from stream 0 of
    /// `seed`: class/positional embeddings std C^-½ and 0.01, attention std C^-½, c_fc (2C)^-½,
    /// projections C^-½·(2·layers)^-½, proj C^-½; conv1 std .02; LayerNorm (1, 0); biases 0).
    /// Real use loads a checkpoint over it. Returns nil when memory runs out.
    public init?(config: CLIPVisionConfig, seed: UInt64) {
        precondition(config.problem == nil, config.problem ?? "")
        self.config = config
        let table = CLIPVisionTransformer.makeTable(config)
        self.table = table
        guard let p = TensorStorage(count: table.total, dtype: .float32) else { return nil }
        params = p
        tower = CLIPTowerTensors(base: p.floats, table: table)
        let k = config.trunk, C = k.embedDim
        blocks = (0..<k.depth).map { i in
            let w = BlockTensors(clip: p.floats, table: table, prefix: "transformer.resblocks.\(i).", C: C)
            // Frozen tower: no backward ever runs, so the gradient slots alias the weights.
            var b = TransformerBlock(C: C, H: k.numHeads, hidden: k.hidden, weights: w, grads: w)
            b.activation = config.activation
            b.normEps = clipLayerNormEps
            return b
        }
        initialize(seed: seed)
    }

    private func initialize(seed: UInt64) {
        var r = Xoshiro256StarStar(seed: seed, stream: 0)
        func normal() -> Double {
            let u1 = 1 - r.uniform(), u2 = r.uniform()   // Box–Muller, u1 in (0, 1]
            return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
        }
        let C = Double(config.trunk.embedDim), L = Double(max(config.trunk.depth, 1))
        for e in table.entries {
            let p = params.floats + e.offset, n = e.name
            var std = 0.0
            if n == "class_embedding" || n == "proj" || n.hasSuffix("in_proj_weight") { std = 1 / C.squareRoot() }
            else if n == "positional_embedding" { std = 0.01 }
            else if n == "conv1.weight" { std = 0.02 }
            else if n.hasSuffix("c_fc.weight") { std = 1 / (2 * C).squareRoot() }
            else if n.hasSuffix("out_proj.weight") || n.hasSuffix("c_proj.weight") { std = 1 / C.squareRoot() / (2 * L).squareRoot() }
            if std > 0 {
                for i in 0..<e.count { p[i] = Float(std * normal()) }
            } else {
                p.update(repeating: n.hasSuffix(".weight") ? 1 : 0, count: e.count)   // LayerNorm (1, 0), biases 0
            }
        }
    }


    /// Floats of the inference arena for a batch of B (what `forward` allocates).
    public func arenaFloats(B: Int) -> Int {
        let k = config.trunk, N = k.sequenceLength, C = k.embedDim, rows = B * N
        var sizes = [B * k.numPatches * k.patchDim, B * k.numPatches * C, rows * C, rows * C, rows * C, rows, rows, B * C]
        sizes += BlockCache.floats(rows: rows, C: C, hidden: k.hidden, probs: B * k.numHeads * N * N, ownsKV: true)
        return Arena.size(sizes)
    }

    /// One pass over images [B, inChans, S, S]; fills whichever outputs are given:
    /// `tokens` [B, N, C] = ln_post(x_L), `projected` [B, N, E] = tokens · proj,
    /// `embedding` [B, E] = tokens[:, 0] · proj (open_clip's `encode_image`, unnormalised).
    /// Returns false when the activations cannot be allocated.
    public func forward(tokens: UnsafeMutablePointer<Float>?, projected: UnsafeMutablePointer<Float>?,
                        embedding: UnsafeMutablePointer<Float>?, images: UnsafePointer<Float>, B: Int) -> Bool {
        let k = config.trunk, N = k.sequenceLength, C = k.embedDim, n = k.numPatches, rows = B * N, E = config.outputDim
        guard let arena = Arena(floats: arenaFloats(B: B)) else { return false }
        let patches = arena.take(B * n * k.patchDim), patchOut = arena.take(B * n * C)
        var x = arena.take(rows * C), y = arena.take(rows * C)
        let post = arena.take(rows * C), mean = arena.take(rows), rstd = arena.take(rows), cls = arena.take(B * C)
        let cache = BlockCache(arena: arena, rows: rows, C: C, hidden: k.hidden, probs: B * k.numHeads * N * N, ownsKV: true)

        patchEmbedForward(out: patchOut, patches: patches, images: images, weight: tower.conv1, bias: nil,
                          B: B, inChans: k.inChans, imgSize: k.imgSize, patch: k.patchSize, C: C, precision: precision)
        embedTokensForward(x: y, stride: N, patchOut: patchOut, cls: tower.classEmbedding, pos: tower.positionalEmbedding,
                           special: nil, masked: nil, B: B, n: n, C: C)
        layerNormForward(out: x, mean: mean, rstd: rstd, input: y, weight: tower.lnPreWeight, bias: tower.lnPreBias,
                         rows: rows, cols: C, eps: clipLayerNormEps)
        forwardBlocksInference(blocks, x: &x, y: &y, cache: cache, B: B, T: N)
        let out = tokens ?? post
        layerNormForward(out: out, mean: mean, rstd: rstd, input: x, weight: tower.lnPostWeight, bias: tower.lnPostBias,
                         rows: rows, cols: C, eps: clipLayerNormEps)
        let proj = UnsafePointer(tower.proj)
        if let projected {
            gemm(precision, transA: false, transB: false, M: rows, N: E, K: C, alpha: 1, A: out, lda: C,
                 B: proj, ldb: E, beta: 0, C: projected, ldc: E)
        }
        if let embedding {
            if let projected {
                for b in 0..<B { (embedding + b * E).update(from: projected + b * N * E, count: E) }
            } else {
                tokenSelectForward(out: cls, input: out, B: B, T: N, C: C, token: 0)
                gemm(precision, transA: false, transB: false, M: B, N: E, K: C, alpha: 1, A: cls, lda: C,
                     B: proj, ldb: E, beta: 0, C: embedding, ldc: E)
            }
        }
        return true
    }
}
