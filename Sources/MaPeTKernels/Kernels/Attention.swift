import CBF16
#if canImport(Glibc)
import Glibc
#endif

// Multi-head scaled dot-product attention (Vaswani et al. 2017) with rectangular query and
// key sets and a pluggable may-attend rule.
//
//   q [B, M, ldQ]   k [B, Nk, ldK]   v [B, Nk, ldV]   out [B, M, ldOut]   probs [B, H, M, Nk]
// Head h reads/writes columns h·D ..< (h+1)·D of each row (D = C / H), so K and V may be two
// column ranges of one fused `kv` buffer (k = kv, v = kv + C, ldK = ldV = 2C).
//   S = Q_h K_hᵀ / √D,   P = softmax over the keys the mask allows (others get exactly 0),
//   out_h = P V_h.
// Backward (P cached):  dV_h += Pᵀ dO_h,  dP = dO_h V_hᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √D,
//   dQ_h += dS K_h,  dK_h += dSᵀ Q_h.  Masked entries have P = 0, hence dS = 0: the backward
// needs no mask (key intervals, when the forward had them, only let it skip blocks). Work is split over B × H tasks (Parallel.forEach), each running
// single-threaded GEMMs; tasks write disjoint elements, so results are thread-count independent.
// `precision` applies to all six products (QKᵀ, PV; dP, dV, dQ, dK): in bf16 their inputs —
// P and dS included — are rounded to bf16 and accumulate in fp32; softmax and dS stay fp32.
// With the bf16 kernel active, each head runs fused in C (CBF16/attention.c: one strip of six
// query rows goes through QKᵀ, softmax and PV while in L1) for masks that are full, key
// intervals or score biases; other masks and fp32 take the GEMM-per-product path below, which
// runs key intervals block by block (the end of this file).

/// One head's rows of an activation (D floats each, ld apart), for the fused kernels' prefetching.
private func headRows(_ p: UnsafePointer<Float>, rows: Int, D: Int, ld: Int) -> mapet_bf16_rows {
    let size = MemoryLayout<Float>.stride
    return mapet_bf16_rows(p: p, rows: rows, bytes: D * size, stride: ld * size)
}

public func attentionForward<Mask: AttentionMask>(
    out: UnsafeMutablePointer<Float>, ldOut: Int,
    probs: UnsafeMutablePointer<Float>,
    q: UnsafePointer<Float>, ldQ: Int,
    k: UnsafePointer<Float>, ldK: Int,
    v: UnsafePointer<Float>, ldV: Int,
    B: Int, M: Int, Nk: Int, C: Int, H: Int, mask: Mask, precision: Precision = .fp32
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.attention, t0) }
    precondition(H > 0 && C % H == 0, "attention: C must be a multiple of H")
    let D = C / H
    let scale = 1 / Float(D).squareRoot()
    nonisolated(unsafe) let out = out, probs = probs, q = q, k = k, v = v
    let intervals = mask.keyIntervals
    if precision.usesBF16 && BF16.isActive && M > 0 && Nk > 0
        && (mask.isFull || intervals != nil || mask.scoreBias(batch: 0, query: 0) != nil) {
        let words = mapet_bf16_attention_work_words(M, Nk, D)
        Parallel.forRanges(B * H) { tasks in
            let work = UnsafeMutableRawPointer.allocate(byteCount: words * 4, alignment: 64)
                .assumingMemoryBound(to: UInt32.self)
            defer { work.deallocate() }
            let ahead = UnsafeMutablePointer<mapet_bf16_rows>.allocate(capacity: 3)
            defer { ahead.deallocate() }
            for task in tasks {
                let b = task / H, h = task % H
                let bias = mask.isFull || intervals != nil ? nil : mask.scoreBias(batch: b, query: 0)
                var n = 0
                if task + 1 < tasks.upperBound {   // the next head's inputs, fetched while this one runs
                    let nb = (task + 1) / H, nh = (task + 1) % H
                    ahead[0] = headRows(q + nb * M * ldQ + nh * D, rows: M, D: D, ld: ldQ)
                    ahead[1] = headRows(k + nb * Nk * ldK + nh * D, rows: Nk, D: D, ld: ldK)
                    ahead[2] = headRows(v + nb * Nk * ldV + nh * D, rows: Nk, D: D, ld: ldV)
                    n = 3
                }
                mapet_bf16_attention_forward(M, Nk, D, scale, q + b * M * ldQ + h * D, ldQ,
                                             k + b * Nk * ldK + h * D, ldK, v + b * Nk * ldV + h * D, ldV,
                                             bias, Nk, intervals?.split ?? Nk, intervals?.prefixEnd, intervals?.suffixStart,
                                             probs + task * M * Nk, out + b * M * ldOut + h * D, ldOut, work, ahead, n)
            }
        }
        return
    }
    Parallel.forEach(B * H) { task in
        let b = task / H, h = task % H
        let qh = q + b * M * ldQ + h * D, kh = k + b * Nk * ldK + h * D, vh = v + b * Nk * ldV + h * D
        let P = probs + task * M * Nk
        if let iv = intervals {
            intervalHeadForward(iv, out: out + b * M * ldOut + h * D, ldOut: ldOut, probs: P, q: qh, ldQ: ldQ, k: kh, ldK: ldK,
                                v: vh, ldV: ldV, M: M, Nk: Nk, D: D, scale: scale, precision: precision)
            return
        }
        gemm(precision, transA: false, transB: true, M: M, N: Nk, K: D, alpha: 1, A: qh, lda: ldQ,
              B: kh, ldb: ldK, beta: 0, C: P, ldc: Nk, serial: true)
        for i in 0..<M {
            let row = P + i * Nk
            if mask.isFull {
                softmaxRowInPlace(row, count: Nk, scale: scale)
            } else if let bias = mask.scoreBias(batch: b, query: i) {
                softmaxRowInPlace(row, count: Nk, scale: scale, bias: bias)
            } else {
                var any = false
                for j in 0..<Nk {
                    if mask.allows(batch: b, query: i, key: j) { any = true } else { row[j] = -.infinity }
                }
                if any { softmaxRowInPlace(row, count: Nk, scale: scale) } else { row.update(repeating: 0, count: Nk) }
            }
        }
        gemm(precision, transA: false, transB: false, M: M, N: D, K: Nk, alpha: 1, A: P, lda: Nk,
              B: vh, ldb: ldV, beta: 0, C: out + b * M * ldOut + h * D, ldc: ldOut, serial: true)
    }
}

/// Accumulates dQ, dK, dV (same layouts and row strides as q, k, v; dK and dV may be two
/// column ranges of one buffer); `accumulateQ`/`accumulateKV` false write them instead (the
/// values of adding to zeros). `keyIntervals`: the forward's mask's, if it had them (lets the
/// fused bf16 backward skip what no row attended; any other mask needs nothing here).
public func attentionBackward(
    dQ: UnsafeMutablePointer<Float>, dK: UnsafeMutablePointer<Float>, dV: UnsafeMutablePointer<Float>,
    dOut: UnsafePointer<Float>, ldOut: Int,
    probs: UnsafePointer<Float>,
    q: UnsafePointer<Float>, ldQ: Int,
    k: UnsafePointer<Float>, ldK: Int,
    v: UnsafePointer<Float>, ldV: Int,
    B: Int, M: Int, Nk: Int, C: Int, H: Int, precision: Precision = .fp32,
    accumulateQ: Bool = true, accumulateKV: Bool = true, keyIntervals: KeyIntervals? = nil
) {
    let t0 = Profiler.begin(); defer { Profiler.end(.attention, t0) }
    let D = C / H
    let scale = 1 / Float(D).squareRoot()
    let betaQ: Float = accumulateQ ? 1 : 0, betaKV: Float = accumulateKV ? 1 : 0
    nonisolated(unsafe) let dQ = dQ, dK = dK, dV = dV, dOut = dOut, probs = probs, q = q, k = k, v = v
    let fused = precision.usesBF16 && BF16.isActive && M > 0 && Nk > 0
    let words = fused ? mapet_bf16_attention_work_words(M, Nk, D) : 0
    // One dS scratch per worker range (not per task): no allocator traffic inside the loop.
    Parallel.forRanges(B * H) { tasks in
      let dS = UnsafeMutablePointer<Float>.allocate(capacity: max(M * Nk, 1))
      defer { dS.deallocate() }
      if fused {
        let work = UnsafeMutableRawPointer.allocate(byteCount: words * 4, alignment: 64)
            .assumingMemoryBound(to: UInt32.self)
        defer { work.deallocate() }
        let ahead = UnsafeMutablePointer<mapet_bf16_rows>.allocate(capacity: 7)
        defer { ahead.deallocate() }
        for task in tasks {
            let b = task / H, h = task % H
            let qo = b * M * ldQ + h * D, ko = b * Nk * ldK + h * D, vo = b * Nk * ldV + h * D
            var n = 0
            if task + 1 < tasks.upperBound {   // the next head's inputs and outputs
                let nb = (task + 1) / H, nh = (task + 1) % H
                let nq = nb * M * ldQ + nh * D, nk = nb * Nk * ldK + nh * D, nv = nb * Nk * ldV + nh * D
                ahead[0] = headRows(q + nq, rows: M, D: D, ld: ldQ)
                ahead[1] = headRows(k + nk, rows: Nk, D: D, ld: ldK)
                ahead[2] = headRows(v + nv, rows: Nk, D: D, ld: ldV)
                ahead[3] = headRows(dOut + nb * M * ldOut + nh * D, rows: M, D: D, ld: ldOut)
                ahead[4] = headRows(dQ + nq, rows: M, D: D, ld: ldQ)
                ahead[5] = headRows(dK + nk, rows: Nk, D: D, ld: ldK)
                ahead[6] = headRows(dV + nv, rows: Nk, D: D, ld: ldV)
                n = 7
            }
            mapet_bf16_attention_backward(M, Nk, D, scale, q + qo, ldQ, k + ko, ldK, v + vo, ldV,
                                          keyIntervals?.split ?? Nk, keyIntervals?.prefixEnd, keyIntervals?.suffixStart,
                                          probs + task * M * Nk, dOut + b * M * ldOut + h * D, ldOut,
                                          dQ + qo, ldQ, betaQ, dK + ko, ldK, dV + vo, ldV, betaKV, dS, work, ahead, n)
        }
        return
      }
      for task in tasks {
        let b = task / H, h = task % H
        let qo = b * M * ldQ + h * D, ko = b * Nk * ldK + h * D, vo = b * Nk * ldV + h * D
        let dOh = dOut + b * M * ldOut + h * D
        let P = probs + task * M * Nk
        if let iv = keyIntervals {
            intervalHeadBackward(iv, dQ: dQ + qo, dK: dK + ko, dV: dV + vo, dOut: dOh, ldOut: ldOut, probs: P, q: q + qo, ldQ: ldQ,
                                 k: k + ko, ldK: ldK, v: v + vo, ldV: ldV, M: M, Nk: Nk, D: D, scale: scale,
                                 betaQ: betaQ, betaKV: betaKV, dS: dS, precision: precision)
            continue
        }
        gemm(precision, transA: false, transB: true, M: M, N: Nk, K: D, alpha: 1, A: dOh, lda: ldOut,
              B: v + vo, ldb: ldV, beta: 0, C: dS, ldc: Nk, serial: true)
        gemm(precision, transA: true, transB: false, M: Nk, N: D, K: M, alpha: 1, A: P, lda: Nk,
              B: dOh, ldb: ldOut, beta: betaKV, C: dV + vo, ldc: ldV, serial: true)
        for i in 0..<M {
            let p = P + i * Nk, d = dS + i * Nk
            let s = vdot(p, d, Nk)
            for j in 0..<Nk { d[j] = p[j] * (d[j] - s) * scale }
        }
        gemm(precision, transA: false, transB: false, M: M, N: D, K: Nk, alpha: 1, A: dS, lda: Nk,
              B: k + ko, ldb: ldK, beta: betaQ, C: dQ + qo, ldc: ldQ, serial: true)
        gemm(precision, transA: true, transB: false, M: Nk, N: D, K: M, alpha: 1, A: dS, lda: Nk,
              B: q + qo, ldb: ldQ, beta: betaKV, C: dK + ko, ldc: ldK, serial: true)
      }
    }
}

// MARK: Key intervals, one head on the GEMM-per-product path
//
// Rows go in blocks; each block's products run over the keys its rows may attend (the widest
// prefix, the earliest suffix), so the masked blocks of a two-stream step are not computed.
// Entries of a row outside its intervals end as exact zeros of P and dS.

/// Rows per block of the interval path, keys per chunk of its dV/dK products.
private let intervalRowBlock = 64, intervalKeyChunk = 96

extension KeyIntervals {
    /// The widest prefix end and the earliest suffix start (relative to `split`) over `rows`.
    func extent(rows: Range<Int>, Nk: Int) -> (prefix: Int, suffix: Int) {
        var a = 0, s = Nk - split
        for i in rows { a = max(a, Int(prefixEnd[i])); s = min(s, Int(suffixStart[i])) }
        return (a, s)
    }

    /// The rows of 0..<M that may attend some key of `keys` (inside one section), as runs
    /// (gaps shorter than 8 rows merged; more than 4 runs become one covering run).
    func rowRuns(M: Int, keys: Range<Int>) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        for i in 0..<M {
            let some = keys.lowerBound < split ? Int(prefixEnd[i]) > keys.lowerBound : split + Int(suffixStart[i]) < keys.upperBound
            guard some else { continue }
            if let last = runs.last, i - last.upperBound < 8 {
                runs[runs.count - 1] = last.lowerBound..<(i + 1)
            } else if runs.count == 4 {
                runs = [runs[0].lowerBound..<(i + 1)]
            } else {
                runs.append(i..<(i + 1))
            }
        }
        return runs
    }
}

/// C[rows, D] = X[rows, 0:A]·Y[0:A] + X[rows, s0:Nk]·Y[s0:Nk] + beta·C (X row stride Nk).
private func productOverIntervals(_ precision: Precision, x: UnsafePointer<Float>, rows: Int, Nk: Int, A: Int, s0: Int,
                                  y: UnsafePointer<Float>, ldY: Int, D: Int, beta: Float,
                                  c: UnsafeMutablePointer<Float>, ldc: Int) {
    var beta = beta
    if A > 0 {
        gemm(precision, transA: false, transB: false, M: rows, N: D, K: A, alpha: 1, A: x, lda: Nk, B: y, ldb: ldY,
             beta: beta, C: c, ldc: ldc, serial: true)
        beta = 1
    }
    if s0 < Nk {
        gemm(precision, transA: false, transB: false, M: rows, N: D, K: Nk - s0, alpha: 1, A: x + s0, lda: Nk,
             B: y + s0 * ldY, ldb: ldY, beta: beta, C: c, ldc: ldc, serial: true)
    } else if beta == 0 {
        for r in 0..<rows { (c + r * ldc).update(repeating: 0, count: D) }
    }
}

/// S[rows, 0:A] and S[rows, s0:Nk] = X[rows]·Y[keys]ᵀ (S row stride Nk).
private func scoresOverIntervals(_ precision: Precision, x: UnsafePointer<Float>, ldX: Int, rows: Int, Nk: Int, A: Int,
                                 s0: Int, y: UnsafePointer<Float>, ldY: Int, D: Int, s: UnsafeMutablePointer<Float>) {
    if A > 0 {
        gemm(precision, transA: false, transB: true, M: rows, N: A, K: D, alpha: 1, A: x, lda: ldX, B: y, ldb: ldY,
             beta: 0, C: s, ldc: Nk, serial: true)
    }
    if s0 < Nk {
        gemm(precision, transA: false, transB: true, M: rows, N: Nk - s0, K: D, alpha: 1, A: x, lda: ldX, B: y + s0 * ldY,
             ldb: ldY, beta: 0, C: s + s0, ldc: Nk, serial: true)
    }
}

func intervalHeadForward(_ iv: KeyIntervals, out: UnsafeMutablePointer<Float>, ldOut: Int, probs: UnsafeMutablePointer<Float>,
                         q: UnsafePointer<Float>, ldQ: Int, k: UnsafePointer<Float>, ldK: Int, v: UnsafePointer<Float>, ldV: Int,
                         M: Int, Nk: Int, D: Int, scale: Float, precision: Precision) {
    for i0 in stride(from: 0, to: M, by: intervalRowBlock) {
        let rows = i0..<min(M, i0 + intervalRowBlock)
        let (A, S) = iv.extent(rows: rows, Nk: Nk), s0 = iv.split + S
        let block = probs + i0 * Nk
        scoresOverIntervals(precision, x: q + i0 * ldQ, ldX: ldQ, rows: rows.count, Nk: Nk, A: A, s0: s0, y: k, ldY: ldK,
                            D: D, s: block)
        for i in rows {
            // Everything not computed lies in [a, z): it becomes −∞, then exp gives exact zeros.
            let row = probs + i * Nk, a = Int(iv.prefixEnd[i]), z = iv.split + Int(iv.suffixStart[i])
            if a == 0 && z >= Nk { row.update(repeating: 0, count: Nk); continue }
            if z > a { (row + a).update(repeating: -.infinity, count: z - a) }
            softmaxRowInPlace(row, count: Nk, scale: scale)
        }
        productOverIntervals(precision, x: block, rows: rows.count, Nk: Nk, A: A, s0: s0, y: v, ldY: ldV, D: D, beta: 0,
                             c: out + i0 * ldOut, ldc: ldOut)
    }
}

func intervalHeadBackward(_ iv: KeyIntervals, dQ: UnsafeMutablePointer<Float>, dK: UnsafeMutablePointer<Float>,
                          dV: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>, ldOut: Int, probs: UnsafePointer<Float>,
                          q: UnsafePointer<Float>, ldQ: Int, k: UnsafePointer<Float>, ldK: Int, v: UnsafePointer<Float>, ldV: Int,
                          M: Int, Nk: Int, D: Int, scale: Float, betaQ: Float, betaKV: Float,
                          dS: UnsafeMutablePointer<Float>, precision: Precision) {
    for i0 in stride(from: 0, to: M, by: intervalRowBlock) {
        let rows = i0..<min(M, i0 + intervalRowBlock)
        let (A, S) = iv.extent(rows: rows, Nk: Nk), s0 = iv.split + S
        scoresOverIntervals(precision, x: dOut + i0 * ldOut, ldX: ldOut, rows: rows.count, Nk: Nk, A: A, s0: s0,
                            y: v, ldY: ldV, D: D, s: dS + i0 * Nk)                                  // dP
        for i in rows {
            let p = probs + i * Nk, d = dS + i * Nk, a = Int(iv.prefixEnd[i]), z = max(a, iv.split + Int(iv.suffixStart[i]))
            let sum = vdot(p, d, a) + vdot(p + z, d + z, Nk - z)
            for j in 0..<a { d[j] = p[j] * (d[j] - sum) * scale }
            for j in z..<Nk { d[j] = p[j] * (d[j] - sum) * scale }
            if z > a { (d + a).update(repeating: 0, count: z - a) }
        }
        productOverIntervals(precision, x: dS + i0 * Nk, rows: rows.count, Nk: Nk, A: A, s0: s0, y: k, ldY: ldK, D: D,
                             beta: betaQ, c: dQ + i0 * ldQ, ldc: ldQ)                                // dQ
    }
    // dV = Pᵀ·dO, dK = dSᵀ·Q by chunks of keys, each over the rows that may attend one of them.
    for (lo, hi) in [(0, iv.split), (iv.split, Nk)] {
        for c0 in stride(from: lo, to: hi, by: intervalKeyChunk) {
            let keys = c0..<min(hi, c0 + intervalKeyChunk)
            let runs = iv.rowRuns(M: M, keys: keys)
            for (t, run) in runs.enumerated() {
                let beta = t == 0 ? betaKV : 1
                gemm(precision, transA: true, transB: false, M: keys.count, N: D, K: run.count, alpha: 1,
                     A: probs + run.lowerBound * Nk + c0, lda: Nk, B: dOut + run.lowerBound * ldOut, ldb: ldOut,
                     beta: beta, C: dV + c0 * ldV, ldc: ldV, serial: true)
                gemm(precision, transA: true, transB: false, M: keys.count, N: D, K: run.count, alpha: 1,
                     A: dS + run.lowerBound * Nk + c0, lda: Nk, B: q + run.lowerBound * ldQ, ldb: ldQ,
                     beta: beta, C: dK + c0 * ldK, ldc: ldK, serial: true)
            }
            if runs.isEmpty && betaKV == 0 {
                for c in keys { (dV + c * ldV).update(repeating: 0, count: D); (dK + c * ldK).update(repeating: 0, count: D) }
            }
        }
    }
}

/// Reference: loops, Double sums, masked entries skipped. Same layouts as `attentionForward`.
public func attentionForwardNaive<Mask: AttentionMask>(
    out: UnsafeMutablePointer<Float>, ldOut: Int,
    q: UnsafePointer<Float>, ldQ: Int, k: UnsafePointer<Float>, ldK: Int, v: UnsafePointer<Float>, ldV: Int,
    B: Int, M: Int, Nk: Int, C: Int, H: Int, mask: Mask
) {
    let D = C / H
    let scale = 1 / Double(D).squareRoot()
    var s = [Double](repeating: 0, count: Nk)
    for b in 0..<B {
        for h in 0..<H {
            for i in 0..<M {
                var mx = -Double.infinity
                for j in 0..<Nk {
                    guard mask.allows(batch: b, query: i, key: j) else { s[j] = -.infinity; continue }
                    var acc: Double = 0
                    for d in 0..<D { acc += Double(q[(b * M + i) * ldQ + h * D + d]) * Double(k[(b * Nk + j) * ldK + h * D + d]) }
                    s[j] = acc * scale
                    mx = max(mx, s[j])
                }
                var total: Double = 0
                for j in 0..<Nk { s[j] = s[j] == -.infinity ? 0 : exp(s[j] - mx); total += s[j] }
                for d in 0..<D {
                    var acc: Double = 0
                    for j in 0..<Nk where s[j] != 0 { acc += s[j] / total * Double(v[(b * Nk + j) * ldV + h * D + d]) }
                    out[(b * M + i) * ldOut + h * D + d] = total > 0 ? Float(acc) : 0
                }
            }
        }
    }
}
