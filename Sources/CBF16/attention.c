// Fused bf16 attention, one head at a time (see include/mapet_bf16.h for the contract).
//
// Keys come in two sections, [0, split) and [split, Nk); row i may attend the prefix
// [0, pre[i]) of the first and the suffix [split + suf[i], Nk) of the second (no intervals:
// every key, split = Nk). In a two-stream model whose rows and keys are in permutation-rank
// order this is exactly its may-attend rule, and the work on what a row may not attend —
// about half of the scores — is skipped block by block.
//
// Forward, per strip of MR = 6 query rows, everything of the strip staying in L1:
//   S = Q_strip · Kᵀ             the GEMM micro-kernel over the packed Kᵀ panels the strip's
//                                 intervals touch, fp32 into probs
//   P = softmax(scale · S + bias)  row by row in place over the row's intervals, fp32, 16 lanes;
//                                 every other entry of the row is set to 0
//   out_strip = P · V             P rounded to bf16 straight from the strip, micro-kernel over
//                                 the packed V rows of the intervals
// These are the unfused path's products with the same roundings (Q, K, P, V to bf16 by
// round-to-nearest-even); what the fusion saves is the round trips of S and P through memory,
// two packings of P, an 8-lane softmax, and with intervals the masked blocks.
//
// Backward, per strip: dP = dO_strip · Vᵀ (micro-kernel over the packed Vᵀ panels of the
// intervals), dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale in place (0 outside the intervals),
// dQ_strip (+)= dS_strip · K (dS rounded from the strip); then dV (+)= Pᵀ · dO and
// dK (+)= dSᵀ · Q as GEMM tiles over chunks of keys, each summing over the runs of query rows
// that may attend some key of the chunk.
#include "mapet_bf16.h"
#include "bf16_kernel.h"

#include <math.h>

/// The two sections' packings of Kᵀ (or Vᵀ) and K (or V) take at most one panel, resp. one
/// k-pair per panel, more than the whole.
size_t mapet_bf16_attention_work_words(long M, long Nk, long D) {
    long kpD = (D + 1) / 2, kpN = (Nk + 1) / 2, panelsD = (D + NR - 1) / NR;
    return mapet_bf16_packed_b_words(D, Nk) + (size_t)kpD * NR + mapet_bf16_packed_b_words(Nk, D)
        + (size_t)panelsD * NR + (size_t)MR * (size_t)(kpD + kpN + 1) + 2 * mapet_bf16_packed_b_words(M, D)
        + (size_t)MC * KCP;
}

#if defined(__x86_64__)

/// The key intervals of one head (see the top of the file).
typedef struct {
    long Nk, split;
    const int32_t *pre, *suf;
} keyset;

static inline long row_prefix(const keyset *ks, long i) { return ks->pre ? ks->pre[i] : ks->split; }
/// Start of row i's suffix, as a key index (Nk: none).
static inline long row_suffix(const keyset *ks, long i) { return ks->pre ? ks->split + ks->suf[i] : ks->Nk; }

/// row[j] = softmax(scale · row + bias)[j] over j in [0, a) ∪ [b, n) (bias NULL: no bias),
/// 0 for j in [a, b); a row with nothing to attend (or all biases −∞) becomes zeros.
static void AVX512BF16 softmax_row(float *row, long n, float scale, const float *bias, long a, long b) {
    const long seg[2][2] = {{0, a}, {b, n}};
    const __m512 vs = _mm512_set1_ps(scale);
    if (b > a) memset(row + a, 0, (size_t)(b - a) * sizeof(float));
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < 2; g++)
        for (long j = seg[g][0]; j < seg[g][1]; j += 16) {
            __mmask16 m = mask_first(seg[g][1] - j);
            __m512 y = _mm512_maskz_loadu_ps(m, row + j);
            if (bias) {
                y = _mm512_add_ps(_mm512_mul_ps(y, vs), _mm512_maskz_loadu_ps(m, bias + j));
                _mm512_mask_storeu_ps(row + j, m, y);
            }
            mv = _mm512_mask_max_ps(mv, m, mv, y);
        }
    float mx = _mm512_reduce_max_ps(mv);
    if (mx == -INFINITY) { memset(row, 0, (size_t)n * sizeof(float)); return; }
    if (!bias) mx *= scale;
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < 2; g++)
        for (long j = seg[g][0]; j < seg[g][1]; j += 16) {
            __mmask16 m = mask_first(seg[g][1] - j);
            __m512 x = _mm512_maskz_loadu_ps(m, row + j);
            __m512 e = exp16(bias ? _mm512_sub_ps(x, vm) : _mm512_fmsub_ps(x, vs, vm));
            _mm512_mask_storeu_ps(row + j, m, e);
            acc = _mm512_mask_add_ps(acc, m, acc, e);
        }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));
    for (int g = 0; g < 2; g++)
        for (long j = seg[g][0]; j < seg[g][1]; j += 16) {
            __mmask16 m = mask_first(seg[g][1] - j);
            _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv));
        }
}

/// Packs mr rows of K floats (row stride ld) into MR rows of kp = ⌈K/2⌉ bf16 pairs (the
/// micro-kernel's A layout with rs = kp, ks = 1); rows mr..MR−1 are zeros.
static void AVX512BF16 pack_rows(const float *src, long ld, long mr, long K, uint32_t *dst) {
    long kp = (K + 1) / 2;
    for (long r = 0; r < mr; r++)
        for (long q = 0; q < kp; q += 16)
            _mm512_mask_storeu_epi32(dst + r * kp + q, mask_first(kp - q),
                                     cvt_consecutive(src + r * ld + 2 * q, K - 2 * q));
    if (mr < MR) memset(dst + mr * kp, 0, (size_t)(MR - mr) * (size_t)kp * 4);
}

/// C[0:mr, c0:c1] = A_strip · op(B)[:, c0:c1] over the NR-column panels of packed op(B)
/// ([2·kp, N]) that cover columns [c0, c1); the first panel from the 16-column vector holding
/// c0 on only (so the micro-kernel's loads stay inside the panel), hence columns from there.
static void AVX512BF16 strip_scores(long kp, const uint32_t *a, const uint32_t *packed, long c0, long c1,
                                    float *c, long ldc, long mr) {
    for (long p = c0 / NR; p * NR < c1; p++) {
        long x = p * NR < c0 ? (c0 - p * NR) / 16 * 16 : 0, nr = (c1 - p * NR < NR ? c1 - p * NR : NR) - x;
        kernel_6x64(kp, a, kp, 1, packed + (size_t)p * kp * NR + x, c + p * NR + x, ldc, 1.0f, 0.0f, NULL, NULL, NULL,
                    1, mr, nr, 0);
    }
}

/// C[0:mr, 0:N] = A_strip · op(B)[k-pairs q0 .. q0+kpn, :] + beta · C, op(B) packed with kpT
/// pairs per panel; a is the strip packed with kpn pairs per row.
static void AVX512BF16 strip_product(long kpn, const uint32_t *a, const uint32_t *packed, long kpT, long q0,
                                     long N, float *c, long ldc, float beta, long mr) {
    for (long p = 0; p * NR < N; p++) {
        long nr = N - p * NR < NR ? N - p * NR : NR;
        kernel_6x64(kpn, a, kpn, 1, packed + ((size_t)p * kpT + q0) * NR, c + p * NR, ldc, 1.0f, beta, NULL, NULL, NULL,
                    1, mr, nr, 0);
    }
}

/// out_strip = W[:, 0:A] · X[0:A] + W[:, split+S0 : Nk] · X[split+S0 : Nk] + beta · out_strip,
/// S0 = S rounded down to even: W the strip's mr rows (stride Nk; zero outside the rows'
/// intervals), x0/x1 the two sections of X packed as op(B) [rows, D]. `wa` holds MR·(kpN+1) words.
static void AVX512BF16 strip_times_sections(const float *w, long mr, const keyset *ks, long A, long S,
                                            const uint32_t *x0, const uint32_t *x1, long D,
                                            float *out, long ldo, float beta, uint32_t *wa) {
    long n1 = ks->Nk - ks->split, S0 = S & ~1L;
    if (A > 0) {
        pack_rows(w, ks->Nk, mr, A, wa);
        strip_product((A + 1) / 2, wa, x0, (ks->split + 1) / 2, 0, D, out, ldo, beta, mr);
        beta = 1.0f;
    }
    if (S0 < n1) {
        pack_rows(w + ks->split + S0, ks->Nk, mr, n1 - S0, wa);
        strip_product((n1 - S0 + 1) / 2, wa, x1, (n1 + 1) / 2, S0 / 2, D, out, ldo, beta, mr);
    } else if (A == 0 && beta == 0.0f) {
        for (long r = 0; r < mr; r++) memset(out + r * ldo, 0, (size_t)D * sizeof(float));
    }
}

/// Packs the two key sections of X [Nk, D] (row stride ld) as op(B) = Xᵀ panels (dst0, dst1:
/// for scores) when `transposed`, else as op(B) = X (for products over the keys).
static void AVX512BF16 pack_sections(int transposed, const keyset *ks, long D, const float *x, long ld,
                                     uint32_t *dst0, uint32_t *dst1) {
    long n0 = ks->split, n1 = ks->Nk - ks->split;
    if (transposed) {
        if (n0) mapet_bf16_pack_b(1, D, n0, x, ld, 0, (n0 + NR - 1) / NR, dst0);
        if (n1) mapet_bf16_pack_b(1, D, n1, x + n0 * ld, ld, 0, (n1 + NR - 1) / NR, dst1);
    } else {
        if (n0) mapet_bf16_pack_b(0, n0, D, x, ld, 0, (D + NR - 1) / NR, dst0);
        if (n1) mapet_bf16_pack_b(0, n1, D, x + n0 * ld, ld, 0, (D + NR - 1) / NR, dst1);
    }
}

/// The strip's widest prefix end and earliest suffix start (relative to split).
static inline void strip_extent(const keyset *ks, long i0, long mr, long *A, long *S) {
    long a = 0, s = ks->Nk - ks->split;
    for (long r = 0; r < mr; r++) {
        long ar = row_prefix(ks, i0 + r), sr = row_suffix(ks, i0 + r) - ks->split;
        if (ar > a) a = ar;
        if (sr < s) s = sr;
    }
    *A = a; *S = s;
}

/// Work layout shared by forward and backward.
typedef struct { uint32_t *t0, *t1, *p0, *p1, *strip, *wa, *rows, *rows2, *abuf; } workspace;

static workspace carve(uint32_t *work, const keyset *ks, long M, long D) {
    long n0 = ks->split, n1 = ks->Nk - ks->split, kpD = (D + 1) / 2, kpN = (ks->Nk + 1) / 2;
    workspace w;
    w.t0 = work;                                           // op(B) = Xᵀ [D, n0]
    w.t1 = w.t0 + mapet_bf16_packed_b_words(D, n0);         // op(B) = Xᵀ [D, n1]
    w.p0 = w.t1 + mapet_bf16_packed_b_words(D, n1);         // op(B) = Y [n0, D]
    w.p1 = w.p0 + mapet_bf16_packed_b_words(n0, D);         // op(B) = Y [n1, D]
    w.strip = w.p1 + mapet_bf16_packed_b_words(n1, D);      // MR × kpD
    w.wa = w.strip + MR * kpD;                              // MR × (kpN + 1)
    w.rows = w.wa + MR * (kpN + 1);                         // op(B) [M, D]
    w.rows2 = w.rows + mapet_bf16_packed_b_words(M, D);     // op(B) [M, D]
    w.abuf = w.rows2 + mapet_bf16_packed_b_words(M, D);     // MC × KCP
    return w;
}

static void AVX512BF16 forward(long M, long D, float scale, const keyset *ks,
                               const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                               const float *bias, long ldbias, float *probs, float *out, long ldo, uint32_t *work,
                               const mapet_bf16_rows *next, long n) {
    long Nk = ks->Nk, split = ks->split, kpD = (D + 1) / 2, strips = (M + MR - 1) / MR;
    workspace w = carve(work, ks, M, D);
    pack_sections(1, ks, D, k, ldk, w.t0, w.t1);
    pack_sections(0, ks, D, v, ldv, w.p0, w.p1);
    for (long i0 = 0; i0 < M; i0 += MR) {
        long mr = M - i0 < MR ? M - i0 : MR, A, S;
        strip_extent(ks, i0, mr, &A, &S);
        float *s = probs + i0 * Nk;
        for (long t = 0; t < n; t++) prefetch_share(next + t, i0 / MR, strips);
        pack_rows(q + i0 * ldq, ldq, mr, D, w.strip);
        if (A > 0) strip_scores(kpD, w.strip, w.t0, 0, A, s, Nk, mr);
        if (split + S < Nk) strip_scores(kpD, w.strip, w.t1, S, Nk - split, s + split, Nk, mr);
        for (long r = 0; r < mr; r++)
            softmax_row(s + r * Nk, Nk, scale, bias ? bias + (i0 + r) * ldbias : NULL, row_prefix(ks, i0 + r),
                        row_suffix(ks, i0 + r));
        strip_times_sections(s, mr, ks, A, S, w.p0, w.p1, D, out + i0 * ldo, ldo, 0.0f, w.wa);
    }
}

/// Runs of rows i (gaps shorter than MR merged) for which `some(i)` holds, at most `cap`;
/// more runs than that become one covering run. Returns the count.
static long row_runs(const keyset *ks, long M, int section, long c0, long c1, long runs[][2], long cap) {
    long n = 0;
    for (long i = 0; i < M; i++) {
        int some = section == 0 ? row_prefix(ks, i) > c0 : row_suffix(ks, i) < c1;
        if (!some) continue;
        if (n > 0 && i - runs[n - 1][1] < MR) { runs[n - 1][1] = i + 1; continue; }
        if (n == cap) { runs[0][1] = i + 1; n = 1; continue; }   // too many: one covering run
        runs[n][0] = i; runs[n][1] = i + 1; n++;
    }
    return n;
}

static void AVX512BF16 backward(long M, long D, float scale, const keyset *ks,
                                const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                const float *probs, const float *dout, long lddo,
                                float *dq, long lddq, float betaQ, float *dk, long lddk, float *dv, long lddv,
                                float betaKV, float *ds, uint32_t *work, const mapet_bf16_rows *next, long n) {
    long Nk = ks->Nk, split = ks->split, kpD = (D + 1) / 2, panelsD = (D + NR - 1) / NR, strips = (M + MR - 1) / MR;
    workspace w = carve(work, ks, M, D);
    pack_sections(1, ks, D, v, ldv, w.t0, w.t1);
    pack_sections(0, ks, D, k, ldk, w.p0, w.p1);
    const __m512 vs = _mm512_set1_ps(scale);
    for (long i0 = 0; i0 < M; i0 += MR) {
        long mr = M - i0 < MR ? M - i0 : MR, A, S;
        strip_extent(ks, i0, mr, &A, &S);
        float *d = ds + i0 * Nk;
        for (long t = 0; t < n; t++) prefetch_share(next + t, i0 / MR, strips);
        pack_rows(dout + i0 * lddo, lddo, mr, D, w.strip);
        if (A > 0) strip_scores(kpD, w.strip, w.t0, 0, A, d, Nk, mr);                       // dP
        if (split + S < Nk) strip_scores(kpD, w.strip, w.t1, S, Nk - split, d + split, Nk, mr);
        for (long r = 0; r < mr; r++) {
            const float *p = probs + (i0 + r) * Nk;
            float *dr = d + r * Nk;
            long a = row_prefix(ks, i0 + r), b = row_suffix(ks, i0 + r);
            const long seg[2][2] = {{0, a}, {b, Nk}};
            __m512 acc = _mm512_setzero_ps();
            for (int g = 0; g < 2; g++)
                for (long j = seg[g][0]; j < seg[g][1]; j += 16) {
                    __mmask16 m = mask_first(seg[g][1] - j);
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p + j), _mm512_maskz_loadu_ps(m, dr + j), acc);
                }
            const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
            for (int g = 0; g < 2; g++)
                for (long j = seg[g][0]; j < seg[g][1]; j += 16) {
                    __mmask16 m = mask_first(seg[g][1] - j);
                    __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dr + j), sum);
                    _mm512_mask_storeu_ps(dr + j, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), x), vs));
                }
            if (b > a) memset(dr + a, 0, (size_t)(b - a) * sizeof(float));
        }
        strip_times_sections(d, mr, ks, A, S, w.p0, w.p1, D, dq + i0 * lddq, lddq, betaQ, w.wa);   // dQ
    }
    // dV = Pᵀ·dO and dK = dSᵀ·Q, key chunk by key chunk (the whole head at once without
    // intervals), each over the runs of rows that may attend a key of the chunk. A run starts
    // on an even row so that it begins on a k-pair of dO and Q packed once: rows the run takes
    // in beyond its own contribute their probabilities (0 where masked), so any run is exact.
    long kpM = (M + 1) / 2;
    mapet_bf16_pack_b(0, M, D, dout, lddo, 0, panelsD, w.rows);
    mapet_bf16_pack_b(0, M, D, q, ldq, 0, panelsD, w.rows2);
    long chunk = ks->pre ? 8 * MR : Nk;
    for (int section = 0; section < 2; section++) {
        long lo = section == 0 ? 0 : split, hi = section == 0 ? split : Nk;
        for (long c0 = lo; c0 < hi; c0 += chunk) {
            long c1 = hi - c0 < chunk ? hi : c0 + chunk;
            long runs[4][2];
            long n = row_runs(ks, M, section, c0, c1, runs, 4);
            for (long t = 0; t < n; t++) {
                long r0 = runs[t][0] & ~1L, rn = runs[t][1] - r0;
                float beta = t == 0 ? betaKV : 1.0f;
                bf16_tile_in(1, D, rn, 1.0f, probs + r0 * Nk, Nk, w.rows + (r0 / 2) * NR, kpM, beta, NULL, dv, lddv,
                             c0, c1, 0, D, w.abuf, NULL, NULL, NULL, 0);
                bf16_tile_in(1, D, rn, 1.0f, ds + r0 * Nk, Nk, w.rows2 + (r0 / 2) * NR, kpM, beta, NULL, dk, lddk,
                             c0, c1, 0, D, w.abuf, NULL, NULL, NULL, 0);
            }
            if (n == 0 && betaKV == 0.0f)
                for (long c = c0; c < c1; c++) {
                    memset(dv + c * lddv, 0, (size_t)D * sizeof(float));
                    memset(dk + c * lddk, 0, (size_t)D * sizeof(float));
                }
        }
    }
}

#endif   // __x86_64__

// Elsewhere mapet_bf16_cpu_supported() is 0 and these are never called: their bodies are empty.

void mapet_bf16_attention_forward(long M, long Nk, long D, float scale,
                                  const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                  const float *bias, long ldbias, long split, const int32_t *pre, const int32_t *suf,
                                  float *probs, float *out, long ldo, uint32_t *work,
                                  const mapet_bf16_rows *next, long n) {
#if defined(__x86_64__)
    keyset ks = {Nk, pre ? split : Nk, pre, suf};
    forward(M, D, scale, &ks, q, ldq, k, ldk, v, ldv, bias, ldbias, probs, out, ldo, work, next, n);
#endif
}

void mapet_bf16_attention_backward(long M, long Nk, long D, float scale,
                                   const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                   long split, const int32_t *pre, const int32_t *suf,
                                   const float *probs, const float *dout, long lddo,
                                   float *dq, long lddq, float betaQ, float *dk, long lddk, float *dv, long lddv,
                                   float betaKV, float *ds, uint32_t *work, const mapet_bf16_rows *next, long n) {
#if defined(__x86_64__)
    keyset ks = {Nk, pre ? split : Nk, pre, suf};
    backward(M, D, scale, &ks, q, ldq, k, ldk, v, ldv, probs, dout, lddo, dq, lddq, betaQ, dk, lddk, dv, lddv, betaKV,
             ds, work, next, n);
#endif
}
