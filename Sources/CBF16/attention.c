// Fused bf16 attention, one head at a time (see include/mapet_bf16.h for the contract).
//
// Forward, per strip of MR = 6 query rows, everything of the strip staying in L1:
//   S = Q_strip · Kᵀ             the GEMM micro-kernel over the packed Kᵀ panels, fp32 into probs
//   P = softmax(scale · S + bias)  row by row in place, fp32, 16 lanes wide
//   out_strip = P · V             P rounded to bf16 straight from the strip, micro-kernel over packed V
// These are the unfused path's products with the same roundings (Q, K, P, V to bf16 by
// round-to-nearest-even) and, for K ≤ 2·KCP, the same summation order; what the fusion saves
// is the round trips of S and P through memory, two packings of P, and an 8-lane softmax.
//
// Backward, per strip: dP = dO_strip · Vᵀ (micro-kernel over packed Vᵀ), dS = P ⊙ (dP −
// rowsum(dP ⊙ P)) · scale in place, dQ_strip (+)= dS_strip · K (dS rounded from the strip);
// then dV (+)= Pᵀ · dO and dK (+)= dSᵀ · Q as two GEMM tiles over the whole head.
#include "mapet_bf16.h"
#include "bf16_kernel.h"

#include <math.h>

size_t mapet_bf16_attention_work_words(long M, long Nk, long D) {
    long kpD = (D + 1) / 2, kpN = (Nk + 1) / 2;
    return mapet_bf16_packed_b_words(D, Nk) + mapet_bf16_packed_b_words(Nk, D) + (size_t)MR * (size_t)(kpD + kpN)
        + mapet_bf16_packed_b_words(M, D) + (size_t)MC * KCP;
}

#if defined(__x86_64__)

/// row[j] = softmax(scale · row + bias)[j] over n entries (bias NULL: no bias); a row whose
/// biases are all −∞ becomes zeros.
static void AVX512BF16 softmax_row(float *row, long n, float scale, const float *bias) {
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 mv = _mm512_set1_ps(-INFINITY);
    float mx;
    if (bias) {
        for (long j = 0; j < n; j += 16) {
            __mmask16 m = mask_first(n - j);
            __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), vs),
                                     _mm512_maskz_loadu_ps(m, bias + j));
            _mm512_mask_storeu_ps(row + j, m, y);
            mv = _mm512_mask_max_ps(mv, m, mv, y);
        }
        mx = _mm512_reduce_max_ps(mv);
        if (mx == -INFINITY) { memset(row, 0, (size_t)n * sizeof(float)); return; }
    } else {
        for (long j = 0; j < n; j += 16) {
            __mmask16 m = mask_first(n - j);
            mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, row + j));
        }
        mx = _mm512_reduce_max_ps(mv) * scale;
    }
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (long j = 0; j < n; j += 16) {
        __mmask16 m = mask_first(n - j);
        __m512 x = _mm512_maskz_loadu_ps(m, row + j);
        __m512 e = exp16(_mm512_sub_ps(bias ? x : _mm512_mul_ps(x, vs), vm));
        _mm512_mask_storeu_ps(row + j, m, e);
        acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));
    for (long j = 0; j < n; j += 16) {
        __mmask16 m = mask_first(n - j);
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

/// C[0:mr, 0:N] = alpha · A_strip · op(B) + beta · C over all NR-column panels of packed B.
static void AVX512BF16 strip_times_panels(long kp, const uint32_t *a, const uint32_t *packed, long N,
                                          float *c, long ldc, float beta, long mr) {
    for (long p = 0; p * NR < N; p++) {
        long nr = N - p * NR < NR ? N - p * NR : NR;
        kernel_6x64(kp, a, kp, 1, packed + (size_t)p * kp * NR, c + p * NR, ldc, 1.0f, beta, NULL, NULL, NULL, 1, mr, nr);
    }
}

AVX512BF16
void mapet_bf16_attention_forward(long M, long Nk, long D, float scale,
                                  const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                  const float *bias, long ldbias, float *probs, float *out, long ldo,
                                  uint32_t *work) {
    long kpD = (D + 1) / 2, kpN = (Nk + 1) / 2;
    uint32_t *kT = work;                                          // op(B) = Kᵀ [D, Nk]
    uint32_t *vp = kT + mapet_bf16_packed_b_words(D, Nk);         // op(B) = V [Nk, D]
    uint32_t *qa = vp + mapet_bf16_packed_b_words(Nk, D);         // MR × kpD
    uint32_t *pa = qa + MR * kpD;                                 // MR × kpN
    mapet_bf16_pack_b(1, D, Nk, k, ldk, 0, (Nk + NR - 1) / NR, kT);
    mapet_bf16_pack_b(0, Nk, D, v, ldv, 0, (D + NR - 1) / NR, vp);
    for (long i0 = 0; i0 < M; i0 += MR) {
        long mr = M - i0 < MR ? M - i0 : MR;
        float *s = probs + i0 * Nk;
        pack_rows(q + i0 * ldq, ldq, mr, D, qa);
        strip_times_panels(kpD, qa, kT, Nk, s, Nk, 0.0f, mr);
        for (long r = 0; r < mr; r++) softmax_row(s + r * Nk, Nk, scale, bias ? bias + (i0 + r) * ldbias : NULL);
        pack_rows(s, Nk, mr, Nk, pa);
        strip_times_panels(kpN, pa, vp, D, out + i0 * ldo, ldo, 0.0f, mr);
    }
}

AVX512BF16
void mapet_bf16_attention_backward(long M, long Nk, long D, float scale,
                                   const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                   const float *probs, const float *dout, long lddo,
                                   float *dq, long lddq, float betaQ, float *dk, long lddk, float *dv, long lddv,
                                   float betaKV, float *ds, uint32_t *work) {
    long kpD = (D + 1) / 2, kpN = (Nk + 1) / 2;
    uint32_t *vT = work;                                          // op(B) = Vᵀ [D, Nk]
    uint32_t *kp = vT + mapet_bf16_packed_b_words(D, Nk);         // op(B) = K [Nk, D]
    uint32_t *oa = kp + mapet_bf16_packed_b_words(Nk, D);         // MR × kpD
    uint32_t *sa = oa + MR * kpD;                                 // MR × kpN
    uint32_t *mb = sa + MR * kpN;                                 // op(B) [M, D]: dO, then Q
    uint32_t *abuf = mb + mapet_bf16_packed_b_words(M, D);
    mapet_bf16_pack_b(1, D, Nk, v, ldv, 0, (Nk + NR - 1) / NR, vT);
    mapet_bf16_pack_b(0, Nk, D, k, ldk, 0, (D + NR - 1) / NR, kp);
    const __m512 vs = _mm512_set1_ps(scale);
    for (long i0 = 0; i0 < M; i0 += MR) {
        long mr = M - i0 < MR ? M - i0 : MR;
        float *d = ds + i0 * Nk;
        pack_rows(dout + i0 * lddo, lddo, mr, D, oa);
        strip_times_panels(kpD, oa, vT, Nk, d, Nk, 0.0f, mr);      // dP
        for (long r = 0; r < mr; r++) {
            const float *p = probs + (i0 + r) * Nk;
            float *dr = d + r * Nk;
            __m512 acc = _mm512_setzero_ps();
            for (long j = 0; j < Nk; j += 16) {
                __mmask16 m = mask_first(Nk - j);
                acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p + j), _mm512_maskz_loadu_ps(m, dr + j), acc);
            }
            const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
            for (long j = 0; j < Nk; j += 16) {
                __mmask16 m = mask_first(Nk - j);
                __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dr + j), sum);
                _mm512_mask_storeu_ps(dr + j, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), x), vs));
            }
        }
        pack_rows(d, Nk, mr, Nk, sa);
        strip_times_panels(kpN, sa, kp, D, dq + i0 * lddq, lddq, betaQ, mr);   // dQ
    }
    long panelsD = (D + NR - 1) / NR;
    mapet_bf16_pack_b(0, M, D, dout, lddo, 0, panelsD, mb);
    mapet_bf16_tile(1, Nk, D, M, 1.0f, probs, Nk, mb, betaKV, NULL, dv, lddv, 0, Nk, 0, D, abuf, NULL, NULL, NULL);   // dV
    mapet_bf16_pack_b(0, M, D, q, ldq, 0, panelsD, mb);
    mapet_bf16_tile(1, Nk, D, M, 1.0f, ds, Nk, mb, betaKV, NULL, dk, lddk, 0, Nk, 0, D, abuf, NULL, NULL, NULL);      // dK
}

#else   // not x86-64: mapet_bf16_cpu_supported() is 0 and nothing below is ever called

void mapet_bf16_attention_forward(long M, long Nk, long D, float scale,
                                  const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                  const float *bias, long ldbias, float *probs, float *out, long ldo,
                                  uint32_t *work) {
    (void)M; (void)Nk; (void)D; (void)scale; (void)q; (void)ldq; (void)k; (void)ldk; (void)v; (void)ldv;
    (void)bias; (void)ldbias; (void)probs; (void)out; (void)ldo; (void)work;
}

void mapet_bf16_attention_backward(long M, long Nk, long D, float scale,
                                   const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                   const float *probs, const float *dout, long lddo,
                                   float *dq, long lddq, float betaQ, float *dk, long lddk, float *dv, long lddv,
                                   float betaKV, float *ds, uint32_t *work) {
    (void)M; (void)Nk; (void)D; (void)scale; (void)q; (void)ldq; (void)k; (void)ldk; (void)v; (void)ldv;
    (void)probs; (void)dout; (void)lddo; (void)dq; (void)lddq; (void)betaQ; (void)dk; (void)lddk;
    (void)dv; (void)lddv; (void)betaKV; (void)ds; (void)work;
}

#endif
