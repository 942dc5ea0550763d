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

    /// One update. Returns the gradient norm before clipping (computed only when clipping and
    /// `knownNorm` is nil; otherwise `knownNorm` or NaN).
    @discardableResult
    public func update(params: UnsafeMutablePointer<Float>, grads: UnsafeMutablePointer<Float>,
                       clipNorm: Float? = nil, knownNorm: Double? = nil) -> Double {
        let t0 = Profiler.begin(); defer { Profiler.end(.optimizer, t0) }
        var norm = knownNorm ?? .nan
        if clipNorm != nil && knownNorm == nil { norm = gradNorm(grads: grads) }
        let work = chunks()
        var clip: Float = 1
        if let clipNorm, norm.isFinite {
            let c = Double(clipNorm) / (norm + 1e-6)
            if c < 1 { clip = Float(c) }
        }
        step += 1
        let bc1 = 1 - pow(Double(beta1), Double(step)), bc2 = 1 - pow(Double(beta2), Double(step))
        let b1 = beta1, b2 = beta2, eps = eps, wd = weightDecay, lr = lr
        let bc2Sqrt = Float(bc2.squareRoot()), invBc1 = Float(1 / bc1)
        let segs = segments, clipFactor = clip
        nonisolated(unsafe) let p = params, g = grads, m = m.floats, v = v.floats
        Parallel.forEach(work.count) { w in
            let s = segs[work[w].seg]
            let lrI = lr * s.lrScale
            let decay: Float = s.decay ? 1 - lrI * wd : 1
            let stepSize = lrI * invBc1
            for i in work[w].range {
                if clipFactor != 1 { g[i] *= clipFactor }
                let gi = g[i]
                p[i] *= decay
                m[i] = b1 * m[i] + (1 - b1) * gi
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
                p[i] -= stepSize * m[i] / (v[i].squareRoot() / bc2Sqrt + eps)
            }
        }
        return norm
    }
}
