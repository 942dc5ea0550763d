// The pre-norm ViT block (timm `Block`), written so that several token streams can share its
// weights and one stream's keys/values (MaPeT's content and query streams):
//   hn = norm1(x);  q = q(hn);  [k | v] = kv(hn_src);  a = softmax(q kᵀ/√D + mask) v
//   x' = x + keep1 · ls1 ⊙ proj(a)
//   out = x' + keep2 · ls2 ⊙ fc2(gelu(fc1(norm2(x'))))
// The forward comes in three steps (attention inputs, attention against a key/value source,
// output) and the backward mirrors them, so a two-stream model can run attention of one
// stream against the other's K/V and accumulate both streams' dK/dV before `kv` backward.

/// Pointers to one block's tensors inside a parameter (or gradient) block.
public struct BlockTensors: @unchecked Sendable {
    public var norm1W, norm1B, qW, kvW, projW, projB, norm2W, norm2B, fc1W, fc1B, fc2W, fc2B: UnsafeMutablePointer<Float>
    public var qB, kvB, ls1, ls2: UnsafeMutablePointer<Float>?

    /// Cuts block `i`'s tensors (timm names `blocks.{i}.…`) out of `base` with `table`.
    public init(base: UnsafeMutablePointer<Float>, table: ParameterTable, prefix: String) {
        func p(_ n: String) -> UnsafeMutablePointer<Float> { base + table.offset(prefix + n) }
        func o(_ n: String) -> UnsafeMutablePointer<Float>? { table[prefix + n].map { base + $0.offset } }
        norm1W = p("norm1.weight"); norm1B = p("norm1.bias")
        qW = p("attn.q.weight"); qB = o("attn.q.bias")
        kvW = p("attn.kv.weight"); kvB = o("attn.kv.bias")
        projW = p("attn.proj.weight"); projB = p("attn.proj.bias")
        ls1 = o("ls1.gamma")
        norm2W = p("norm2.weight"); norm2B = p("norm2.bias")
        fc1W = p("mlp.fc1.weight"); fc1B = p("mlp.fc1.bias")
        fc2W = p("mlp.fc2.weight"); fc2B = p("mlp.fc2.bias")
        ls2 = o("ls2.gamma")
    }

    /// Adds block `prefix`'s entries (reference order) to a table.
    public static func register(in table: inout ParameterTable, prefix: String, C: Int, hidden: Int,
                                qkvBias: Bool, layerScale: Bool) {
        table.add(prefix + "norm1.weight", [C]); table.add(prefix + "norm1.bias", [C])
        table.add(prefix + "attn.kv.weight", [2 * C, C]); if qkvBias { table.add(prefix + "attn.kv.bias", [2 * C]) }
        table.add(prefix + "attn.q.weight", [C, C]); if qkvBias { table.add(prefix + "attn.q.bias", [C]) }
        table.add(prefix + "attn.proj.weight", [C, C]); table.add(prefix + "attn.proj.bias", [C])
        if layerScale { table.add(prefix + "ls1.gamma", [C]) }
        table.add(prefix + "norm2.weight", [C]); table.add(prefix + "norm2.bias", [C])
        table.add(prefix + "mlp.fc1.weight", [hidden, C]); table.add(prefix + "mlp.fc1.bias", [hidden])
        table.add(prefix + "mlp.fc2.weight", [C, hidden]); table.add(prefix + "mlp.fc2.bias", [C])
        if layerScale { table.add(prefix + "ls2.gamma", [C]) }
    }
}

/// A bump allocator over one TensorStorage: carve named float regions, allocated once.
public final class Arena: @unchecked Sendable {
    public let storage: TensorStorage
    private var used = 0

    public init?(floats: Int) {
        guard let s = TensorStorage(count: floats, dtype: .float32) else { return nil }
        storage = s
    }

    public func take(_ count: Int) -> UnsafeMutablePointer<Float> {
        let off = (used + 15) / 16 * 16
        precondition(off + count <= storage.byteCount / 4, "arena exhausted")
        used = off + count
        return storage.floats + off
    }

    public static func size(_ counts: [Int]) -> Int { counts.reduce(0) { $0 + ($1 + 15) / 16 * 16 } }
}

/// What one block keeps from the forward for the backward, for one stream of `rows = B·T` tokens.
/// A stream that computes its own keys and values keeps q, k and v side by side, [rows, 3C]
/// (one product with the stacked weights `wqkv`): q, kv and their gradients then have row
/// stride 3C. A stream that borrows another's K/V keeps q alone, [rows, C].
public struct BlockCache: @unchecked Sendable {
    public var ln1, ln1Mean, ln1Rstd, q, attn, proj, xMid, ln2, ln2Mean, ln2Rstd, act, fc2: UnsafeMutablePointer<Float>
    /// fc1's output; with GELU replaced in the forward by gelu' of it (all the backward needs).
    public var fc1: UnsafeMutablePointer<Float>
    /// Keys | values, q + C (row stride 3C); nil for a stream that borrows another stream's K/V.
    public var kv: UnsafeMutablePointer<Float>?
    /// [3C, C] the q and kv weights stacked, then [3C] their biases: filled by the forward from
    /// the parameters (which live apart, under their reference names), read by the backward.
    public var wqkv: UnsafeMutablePointer<Float>?
    /// Row strides of q and of kv.
    public let ldQ, ldKV: Int
    /// [B, H, T, Nk] attention probabilities.
    public var probs: UnsafeMutablePointer<Float>

    public static func floats(rows: Int, C: Int, hidden: Int, probs: Int, ownsKV: Bool) -> [Int] {
        [rows * C, rows, rows, ownsKV ? rows * 3 * C : rows * C, rows * C, rows * C, rows * C, rows * C, rows, rows,
         rows * hidden, rows * hidden, rows * C, ownsKV ? 3 * C * C + 3 * C : 0, probs]
    }

    public init(arena: Arena, rows: Int, C: Int, hidden: Int, probs: Int, ownsKV: Bool) {
        ln1 = arena.take(rows * C); ln1Mean = arena.take(rows); ln1Rstd = arena.take(rows)
        q = arena.take(ownsKV ? rows * 3 * C : rows * C); attn = arena.take(rows * C); proj = arena.take(rows * C)
        xMid = arena.take(rows * C); ln2 = arena.take(rows * C); ln2Mean = arena.take(rows); ln2Rstd = arena.take(rows)
        fc1 = arena.take(rows * hidden); act = arena.take(rows * hidden); fc2 = arena.take(rows * C)
        kv = ownsKV ? q + C : nil
        wqkv = ownsKV ? arena.take(3 * C * C + 3 * C) : nil
        ldQ = ownsKV ? 3 * C : C
        ldKV = 3 * C
        self.probs = arena.take(probs)
    }
}

/// Gradient scratch for one stream, shared by all blocks (each backward step clears what it uses).
/// A stream with its own K/V keeps dQ | dK | dV side by side, [rows, 3C], like its cache.
public struct BlockScratch: @unchecked Sendable {
    public var dLn, dQ, dAttn, dBranch, dAct, dFc1: UnsafeMutablePointer<Float>
    /// dQ + C (row stride 3C), nil without own K/V.
    public var dKV: UnsafeMutablePointer<Float>?
    /// [3C, C] + [3C]: the stacked q/kv weights' gradient of one block, before it is added to
    /// the parameters' own gradients.
    public var dWqkv: UnsafeMutablePointer<Float>?

    public static func floats(rows: Int, C: Int, hidden: Int, ownsKV: Bool) -> [Int] {
        [rows * C, ownsKV ? rows * 3 * C : rows * C, rows * C, rows * C, rows * hidden, rows * hidden,
         ownsKV ? 3 * C * C + 3 * C : 0]
    }

    public init(arena: Arena, rows: Int, C: Int, hidden: Int, ownsKV: Bool) {
        dLn = arena.take(rows * C); dQ = arena.take(ownsKV ? rows * 3 * C : rows * C); dAttn = arena.take(rows * C)
        dBranch = arena.take(rows * C); dAct = arena.take(rows * hidden); dFc1 = arena.take(rows * hidden)
        dKV = ownsKV ? dQ + C : nil
        dWqkv = ownsKV ? arena.take(3 * C * C + 3 * C) : nil
    }
}

/// dst[i] += src[i] for i < n.
@inline(__always)
func add(_ src: UnsafePointer<Float>, into dst: UnsafeMutablePointer<Float>, _ n: Int) {
    for i in 0..<n { dst[i] += src[i] }
}

@inline(__always)
func zero(_ p: UnsafeMutablePointer<Float>, _ n: Int) {
    nonisolated(unsafe) let p = p
    Parallel.forRanges(n, grain: 1 << 16) { r in (p + r.lowerBound).update(repeating: 0, count: r.count) }
}

public struct TransformerBlock: @unchecked Sendable {
    public let C, H, hidden: Int
    public let w: BlockTensors
    public let g: BlockTensors
    /// Precision of the block's matrix products (linears and attention); the model sets it.
    public var precision: Precision = .fp32
    /// MLP nonlinearity and LayerNorm eps: GELU / 1e-6 (timm); CLIP sets QuickGELU / 1e-5.
    public var activation: Activation = .gelu
    public var normEps: Float = layerNormEps

    public init(C: Int, H: Int, hidden: Int, weights: BlockTensors, grads: BlockTensors) {
        self.C = C; self.H = H; self.hidden = hidden; w = weights; g = grads
    }

    /// The MLP's hidden activation (GELU of fc1, read only by fc2's products, which round it to
    /// bf16) is held in bf16: fc1's store rounds it, fc2's packing reads it as it is — the bits of
    /// fp32 storage, half the memory traffic of the block's largest activation. fc1's product must
    /// be one K block for its store to be final.
    private var actInBF16: Bool {
        precision.usesBF16 && BF16.isActive && activation == .gelu && C <= BF16.singleBlockK
    }

    /// norm1's and norm2's outputs likewise (read only by q|k|v, resp. fc1, and their weight
    /// gradients): LayerNorm rounds them as the packing would (`layerNormForward(outInBF16:)`).
    var normsInBF16: Bool { precision.usesBF16 && BF16.isActive }

    // MARK: Forward

    /// norm1 and the query projection of `x [rows, C]`; keys/values too when `c.kv` is set, in
    /// the same product (q | k | v = ln1 · wqkvᵀ: norm1's output is packed once, the weights'
    /// panels side by side).
    public func forwardAttentionInputs(x: UnsafePointer<Float>, cache c: BlockCache, rows: Int) {
        let ln: BF16Storage = normsInBF16 ? .a : []
        layerNormForward(out: c.ln1, mean: c.ln1Mean, rstd: c.ln1Rstd, input: x, weight: w.norm1W, bias: w.norm1B, rows: rows,
                         cols: C, eps: normEps, outInBF16: normsInBF16)
        guard let wqkv = c.wqkv else {
            linearForward(out: c.q, input: c.ln1, weight: w.qW, bias: w.qB, rows: rows, inFeatures: C, outFeatures: C,
                          precision: precision, storage: ln)
            return
        }
        stackQKV(into: wqkv)
        linearForward(out: c.q, input: c.ln1, weight: wqkv, bias: w.qB == nil ? nil : wqkv + 3 * C * C, rows: rows,
                      inFeatures: C, outFeatures: 3 * C, precision: precision, storage: ln)
    }

    /// [wq; wkv] and [bq; bkv] into `dst` ([3C, C] then [3C]).
    private func stackQKV(into dst: UnsafeMutablePointer<Float>) {
        dst.update(from: w.qW, count: C * C)
        (dst + C * C).update(from: w.kvW, count: 2 * C * C)
        if let qB = w.qB, let kvB = w.kvB {
            (dst + 3 * C * C).update(from: qB, count: C)
            (dst + 3 * C * C + C).update(from: kvB, count: 2 * C)
        }
    }

    /// Attention of this stream's T queries per sample against `source`'s Nk keys/values.
    public func forwardAttention<Mask: AttentionMask>(cache c: BlockCache, source: BlockCache, B: Int, T: Int, Nk: Int, mask: Mask) {
        let kv = source.kv!
        attentionForward(out: c.attn, ldOut: C, probs: c.probs, q: c.q, ldQ: c.ldQ, k: kv, ldK: source.ldKV, v: kv + C, ldV: source.ldKV,
                         B: B, M: T, Nk: Nk, C: C, H: H, mask: mask, precision: precision)
    }

    /// proj + residual, then the MLP residual: out [B·T, C] (may not alias x).
    public func forwardOutput(out: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, cache c: BlockCache,
                              B: Int, T: Int, keep1: UnsafePointer<Float>?, keep2: UnsafePointer<Float>?) {
        let rows = B * T
        linearForward(out: c.proj, input: c.attn, weight: w.projW, bias: w.projB, rows: rows, inFeatures: C, outFeatures: C, precision: precision)
        residualForward(out: c.xMid, residual: x, branch: c.proj, gamma: w.ls1, keep: keep1, B: B, T: T, C: C)
        let ln: BF16Storage = normsInBF16 ? .a : []
        layerNormForward(out: c.ln2, mean: c.ln2Mean, rstd: c.ln2Rstd, input: c.xMid, weight: w.norm2W, bias: w.norm2B,
                         rows: rows, cols: C, eps: normEps, outInBF16: normsInBF16)
        if activation == .gelu {
            // act = gelu(fc1(ln2)), c.fc1 = gelu′ for the backward (in bf16, in the GEMM's store).
            linearForward(out: c.act, input: c.ln2, weight: w.fc1W, bias: w.fc1B, rows: rows, inFeatures: C,
                          outFeatures: hidden, precision: precision, geluDerivative: c.fc1,
                          storage: ln.union(actInBF16 ? .c : []))
        } else {
            linearForward(out: c.fc1, input: c.ln2, weight: w.fc1W, bias: w.fc1B, rows: rows, inFeatures: C, outFeatures: hidden,
                          precision: precision, storage: ln)
            activationForward(activation, out: c.act, input: c.fc1, count: rows * hidden)
        }
        linearForward(out: c.fc2, input: c.act, weight: w.fc2W, bias: w.fc2B, rows: rows, inFeatures: hidden, outFeatures: C,
                      precision: precision, storage: actInBF16 ? .a : [])
        residualForward(out: out, residual: c.xMid, branch: c.fc2, gamma: w.ls2, keep: keep2, B: B, T: T, C: C)
    }

    /// The whole block on one stream attending to itself.
    public func forward<Mask: AttentionMask>(out: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, cache c: BlockCache,
                                             B: Int, T: Int, mask: Mask, keep1: UnsafePointer<Float>?, keep2: UnsafePointer<Float>?) {
        forwardAttentionInputs(x: x, cache: c, rows: B * T)
        forwardAttention(cache: c, source: c, B: B, T: T, Nk: T, mask: mask)
        forwardOutput(out: out, x: x, cache: c, B: B, T: T, keep1: keep1, keep2: keep2)
    }

    // MARK: Backward (accumulates into `g` and into dx)

    /// From dx = ∂L/∂out to ∂L/∂x' (kept in dx) and ∂L/∂a in `s.dAttn`.
    public func backwardOutput(dx: UnsafeMutablePointer<Float>, cache c: BlockCache, scratch s: BlockScratch,
                               B: Int, T: Int, keep1: UnsafePointer<Float>?, keep2: UnsafePointer<Float>?) {
        let rows = B * T
        residualBackward(dResidual: nil, dBranch: s.dBranch, dGamma: g.ls2, dOut: dx, branch: c.fc2, gamma: w.ls2, keep: keep2,
                         B: B, T: T, C: C, accumulateBranch: false)
        if activation == .gelu {
            // dFc1 = (dBranch · fc2W) ⊙ gelu′ (kept in c.fc1 by the forward) in one pass.
            linearBackward(dInput: s.dFc1, dWeight: g.fc2W, dBias: g.fc2B, dOut: s.dBranch, input: c.act, weight: w.fc2W,
                           rows: rows, inFeatures: hidden, outFeatures: C, precision: precision, accumulateInput: false,
                           dInputScale: c.fc1, inputInBF16: actInBF16)
        } else {
            linearBackward(dInput: s.dAct, dWeight: g.fc2W, dBias: g.fc2B, dOut: s.dBranch, input: c.act, weight: w.fc2W,
                           rows: rows, inFeatures: hidden, outFeatures: C, precision: precision, accumulateInput: false)
            zero(s.dFc1, rows * hidden)
            activationBackward(activation, dInput: s.dFc1, dOut: s.dAct, input: c.fc1, count: rows * hidden)
        }
        linearBackward(dInput: s.dLn, dWeight: g.fc1W, dBias: g.fc1B, dOut: s.dFc1, input: c.ln2, weight: w.fc1W,
                       rows: rows, inFeatures: C, outFeatures: hidden, precision: precision, accumulateInput: false,
                       inputInBF16: normsInBF16)
        layerNormBackward(dInput: dx, dWeight: g.norm2W, dBias: g.norm2B, dOut: s.dLn, input: c.xMid, weight: w.norm2W,
                          mean: c.ln2Mean, rstd: c.ln2Rstd, rows: rows, cols: C)
        residualBackward(dResidual: nil, dBranch: s.dBranch, dGamma: g.ls1, dOut: dx, branch: c.proj, gamma: w.ls1, keep: keep1,
                         B: B, T: T, C: C, accumulateBranch: false)
        linearBackward(dInput: s.dAttn, dWeight: g.projW, dBias: g.projB, dOut: s.dBranch, input: c.attn, weight: w.projW,
                       rows: rows, inFeatures: C, outFeatures: C, precision: precision, accumulateInput: false)
    }

    /// ∂L/∂q into `s.dQ` (written) and ∂L/∂[k|v] into `dKV` (the source stream's): written by the
    /// first stream to reach it (`accumulateKV` false), added by the others. dQ and dKV have the
    /// row strides of q and kv (the scratch of a stream is laid out as its cache).
    public func backwardAttention(cache c: BlockCache, scratch s: BlockScratch, source: BlockCache, dKV: UnsafeMutablePointer<Float>,
                                  B: Int, T: Int, Nk: Int, accumulateKV: Bool, keyIntervals: KeyIntervals? = nil) {
        let kv = source.kv!
        attentionBackward(dQ: s.dQ, dK: dKV, dV: dKV + C, dOut: s.dAttn, ldOut: C, probs: c.probs,
                          q: c.q, ldQ: c.ldQ, k: kv, ldK: source.ldKV, v: kv + C, ldV: source.ldKV, B: B, M: T, Nk: Nk, C: C, H: H, precision: precision,
                          accumulateQ: false, accumulateKV: accumulateKV, keyIntervals: keyIntervals)
    }

    /// q (and kv, when `dKV` is given: then in one product over dQ | dK | dV and the stacked
    /// weights) backward, then norm1: adds ∂L/∂x into dx.
    public func backwardAttentionInputs(dx: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, cache c: BlockCache,
                                        scratch s: BlockScratch, dKV: UnsafePointer<Float>?, rows: Int) {
        if dKV != nil, let wqkv = c.wqkv, let dW = s.dWqkv {
            precondition(dKV == UnsafePointer(s.dQ + C), "backwardAttentionInputs: dKV must be the stream's own, beside dQ")
            let n = 3 * C * C + 3 * C
            dW.update(repeating: 0, count: n)
            let hasBias = g.qB != nil
            linearBackward(dInput: s.dLn, dWeight: dW, dBias: hasBias ? dW + 3 * C * C : nil, dOut: s.dQ, input: c.ln1,
                           weight: wqkv, rows: rows, inFeatures: C, outFeatures: 3 * C, precision: precision,
                           accumulateInput: false, inputInBF16: normsInBF16)
            add(dW, into: g.qW, C * C)
            add(dW + C * C, into: g.kvW, 2 * C * C)
            if let qB = g.qB, let kvB = g.kvB {
                add(dW + 3 * C * C, into: qB, C)
                add(dW + 3 * C * C + C, into: kvB, 2 * C)
            }
        } else {
            precondition(dKV == nil, "backwardAttentionInputs: keys/values of a stream without its own")
            linearBackward(dInput: s.dLn, dWeight: g.qW, dBias: g.qB, dOut: s.dQ, input: c.ln1, weight: w.qW,
                           rows: rows, inFeatures: C, outFeatures: C, precision: precision, accumulateInput: false,
                           inputInBF16: normsInBF16)
        }
        layerNormBackward(dInput: dx, dWeight: g.norm1W, dBias: g.norm1B, dOut: s.dLn, input: x, weight: w.norm1W,
                          mean: c.ln1Mean, rstd: c.ln1Rstd, rows: rows, cols: C)
    }

    /// The whole block's backward for a self-attending stream: dx holds ∂L/∂out on entry, ∂L/∂x on exit.
    public func backward(dx: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, cache c: BlockCache, scratch s: BlockScratch,
                         B: Int, T: Int, keep1: UnsafePointer<Float>?, keep2: UnsafePointer<Float>?) {
        let dKV = s.dKV!
        backwardOutput(dx: dx, cache: c, scratch: s, B: B, T: T, keep1: keep1, keep2: keep2)
        backwardAttention(cache: c, scratch: s, source: c, dKV: dKV, B: B, T: T, Nk: T, accumulateKV: false)
        backwardAttentionInputs(dx: dx, x: x, cache: c, scratch: s, dKV: dKV, rows: B * T)
    }
}
