#if canImport(Glibc)
import Glibc
#endif

// AdamW (Loshchilov & Hutter 2019, decoupled weight decay), written as torch.optim.AdamW:
//   t += 1;  lr_i = lr · scale_i;
//   θ ← θ · (1 − lr_i · wd_i)                              (wd_i = 0 for no-decay parameters)
//   m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
//   θ ← θ − (lr_i / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
// Optional global-norm clipping first (torch.nn.utils.clip_grad_norm_): with
// ‖g‖ = √Σ g², every gradient is multiplied in place by min(1, max_norm / (‖g‖ + 1e-6)).
// Moments live in two contiguous blocks laid out like the parameter block.

public struct AdamWSegment: Sendable {
    public let offset: Int
    public let count: Int
    public var decay: Bool
    public var lrScale: Float
    public init(offset: Int, count: Int, decay: Bool, lrScale: Float) {
        self.offset = offset; self.count = count; self.decay = decay; self.lrScale = lrScale
    }
}

public final class AdamW: @unchecked Sendable {
    public let total: Int
    public let m: TensorStorage
    public let v: TensorStorage
    public var segments: [AdamWSegment]
    public var step = 0
    public var lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float

    /// `total` floats in the parameter block; `segments` cover the tensors to update.
    public init?(total: Int, segments: [AdamWSegment], lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float) {
        guard let m = TensorStorage(count: total, dtype: .float32), let v = TensorStorage(count: total, dtype: .float32) else { return nil }
        self.total = total; self.m = m; self.v = v; self.segments = segments
        self.lr = lr; self.beta1 = beta1; self.beta2 = beta2; self.eps = eps; self.weightDecay = weightDecay
    }

    /// Work items of at most `chunk` floats each, in segment order.
    private func chunks(_ chunk: Int = 1 << 15) -> [(seg: Int, range: Range<Int>)] {
        var out: [(Int, Range<Int>)] = []
        for (i, s) in segments.enumerated() {
            var lo = s.offset
            while lo < s.offset + s.count { let hi = min(lo + chunk, s.offset + s.count); out.append((i, lo..<hi)); lo = hi }
        }
        return out
    }

    /// ‖g‖₂ over the segments (Double partial sums per chunk, added in chunk order: deterministic).
    public func gradNorm(grads: UnsafePointer<Float>) -> Double {
        let work = chunks()
        let partial = UnsafeMutablePointer<Double>.allocate(capacity: max(work.count, 1))
        defer { partial.deallocate() }
        nonisolated(unsafe) let partialS = partial, g = grads
        Parallel.forEach(work.count) { w in
            var acc: Double = 0
            for i in work[w].range { acc += Double(g[i]) * Double(g[i]) }
            partialS[w] = acc
        }
        var s: Double = 0
        for w in 0..<work.count { s += partial[w] }
        return s.squareRoot()
    }

    /// The clip factor for `norm` (1 when not clipping).
    private func clipFactor(_ clipNorm: Float?, _ norm: Double) -> Float {
        guard let clipNorm, norm.isFinite else { return 1 }
        let c = Double(clipNorm) / (norm + 1e-6)
        return c < 1 ? Float(c) : 1
    }

    /// One element of the update at step `t` (torch.optim.AdamW): (p, m, v) after it.
    @inline(__always)
    private static func element(p: Float, g: Float, m: Float, v: Float, decay: Float, stepSize: Float,
                                b1: Float, b2: Float, eps: Float, bc2Sqrt: Float) -> (Float, Float, Float) {
        let m1 = b1 * m + (1 - b1) * g
        let v1 = b2 * v + (1 - b2) * g * g
        return (p * decay - stepSize * m1 / (v1.squareRoot() / bc2Sqrt + eps), m1, v1)
    }

    /// Runs `body(item, range, decay, stepSize, β1, β2, ε, √bc2)` over the work items with the
    /// coefficients of step `t`; returns the number of items.
    @discardableResult
    private func sweep(step t: Int, _ body: @escaping @Sendable (Int, Range<Int>, Float, Float, Float, Float, Float, Float) -> Void) -> Int {
        let work = chunks()
        let bc1 = 1 - pow(Double(beta1), Double(t)), bc2 = 1 - pow(Double(beta2), Double(t))
        let b1 = beta1, b2 = beta2, eps = eps, wd = weightDecay, lr = lr
        let bc2Sqrt = Float(bc2.squareRoot()), invBc1 = Float(1 / bc1)
        let segs = segments
        Parallel.forEach(work.count) { w in
            let s = segs[work[w].seg]
            let lrI = lr * s.lrScale
            body(w, work[w].range, s.decay ? 1 - lrI * wd : 1, lrI * invBc1, b1, b2, eps, bc2Sqrt)
        }
        return work.count
    }

    /// Whether the next `update` with these arguments leaves every parameter and moment finite
    /// (a dry run: nothing is written). Lets a caller refuse an update that would corrupt the
    /// model (a learning rate too large for float32) instead of applying it.
    public func updateStaysFinite(params: UnsafePointer<Float>, grads: UnsafePointer<Float>,
                                  clipNorm: Float? = nil, knownNorm: Double? = nil) -> Bool {
        var norm = knownNorm ?? .nan
        if clipNorm != nil && knownNorm == nil { norm = gradNorm(grads: grads) }
        let clip = clipFactor(clipNorm, norm)
        let items = max(chunks().count, 1)
        let flags = UnsafeMutablePointer<Bool>.allocate(capacity: items)
        defer { flags.deallocate() }
        flags.initialize(repeating: true, count: items)
        nonisolated(unsafe) let p = params, g = grads, m = m.floats, v = v.floats, finite = flags
        sweep(step: step + 1) { w, range, decay, stepSize, b1, b2, eps, bc2Sqrt in
            var ok = true
            for i in range {
                let (p1, m1, v1) = AdamW.element(p: p[i], g: g[i] * clip, m: m[i], v: v[i], decay: decay,
                                                 stepSize: stepSize, b1: b1, b2: b2, eps: eps, bc2Sqrt: bc2Sqrt)
                ok = ok && p1.isFinite && m1.isFinite && v1.isFinite
            }
            finite[w] = ok
        }
        for k in 0..<items where !flags[k] { return false }
        return true
    }

    /// One update. Returns the gradient norm before clipping (computed only when clipping and
    /// `knownNorm` is nil; otherwise `knownNorm` or NaN).
    @discardableResult
    public func update(params: UnsafeMutablePointer<Float>, grads: UnsafeMutablePointer<Float>,
                       clipNorm: Float? = nil, knownNorm: Double? = nil) -> Double {
        let t0 = Profiler.begin(); defer { Profiler.end(.optimizer, t0) }
        var norm = knownNorm ?? .nan
        if clipNorm != nil && knownNorm == nil { norm = gradNorm(grads: grads) }
        let clip = clipFactor(clipNorm, norm)
        step += 1
        nonisolated(unsafe) let p = params, g = grads, m = m.floats, v = v.floats
        sweep(step: step) { _, range, decay, stepSize, b1, b2, eps, bc2Sqrt in
            for i in range {
                if clip != 1 { g[i] *= clip }
                (p[i], m[i], v[i]) = AdamW.element(p: p[i], g: g[i], m: m[i], v: v[i], decay: decay,
                                                   stepSize: stepSize, b1: b1, b2: b2, eps: eps, bc2Sqrt: bc2Sqrt)
            }
        }
        return norm
    }
}
