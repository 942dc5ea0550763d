// Internal to CBF16 (not part of the C API): the blocking constants, fp32 → bf16 conversion
// helpers and the 6 × 64 micro-kernel shared by the GEMM (bf16gemm.c) and the fused attention
// (attention.c). Everything here is AVX-512 code: call it only behind mapet_bf16_cpu_supported().
#ifndef MAPET_BF16_KERNEL_H
#define MAPET_BF16_KERNEL_H

#include <stdint.h>
#include "mapet_bf16.h"
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,avx2")))

// Blocking, overridable at build time for tuning (-DMAPET_BF16_KCP=…). Measured on Zen 5:
// KCP 64–192 and MC 48–192 are within noise of each other; 6×64 and 8×48 micro-kernels tie,
// 12×32 and 14×32 are slower; what is lost against the bare instruction is memory traffic
// (A packing on narrow N, C and B panels out of L1), not the micro-kernel. On Zen 4 (2
// workers, the ViT-Tiny linears) KCP 384 against 128: +6–9% where K = 768 (one K block, C
// stored once instead of read and written three times), +2–5% on the weight gradients, the
// same elsewhere.
#ifndef MAPET_BF16_KCP
#define MAPET_BF16_KCP 384
#endif
#ifndef MAPET_BF16_MC
#define MAPET_BF16_MC 96
#endif
enum {
    MR = 6,          // rows of the micro-kernel
    NV = 4,          // zmm vectors per row: NR = 16·NV columns
    NR = 16 * NV,
    KCP = MAPET_BF16_KCP,   // k-pairs per K block: a 6 × KCP slice of A and a KCP × NR panel of B
    MC = MAPET_BF16_MC,     // rows of op(A) packed at once (a multiple of MR and of 16)
};

#if defined(__x86_64__)

// ---------------------------------------------------------------- conversion helpers

static inline __mmask16 AVX512BF16 mask_first(long n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/// 32 consecutive fp32 (masked: the missing ones are 0) → 16 words of consecutive pairs.
static inline __m512i AVX512BF16 cvt_consecutive(const float *x, long n) {
    __m512 lo = _mm512_maskz_loadu_ps(mask_first(n), x);
    __m512 hi = _mm512_maskz_loadu_ps(mask_first(n - 16), x + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/// Rows k and k+1, 16 columns each → 16 words (row k in the low half of word j).
static inline __m512i AVX512BF16 cvt_interleave(const float *r0, const float *r1, long n) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __mmask16 m = mask_first(n);
    __m512 a = _mm512_maskz_loadu_ps(m, r0);
    __m512 b = r1 ? _mm512_maskz_loadu_ps(m, r1) : _mm512_setzero_ps();
    __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);   // words 0..15: row k, 16..31: row k+1
    return _mm512_permutexvar_epi16(idx, both);
}

// ---------------------------------------------------------------- prefetching

/// Prefetches into L2 every cache line of rows [rows·part/parts, rows·(part+1)/parts) of r.
static inline void prefetch_share(const mapet_bf16_rows *r, long part, long parts) {
    for (long i = r->rows * part / parts, end = r->rows * (part + 1) / parts; i < end; i++) {
        const char *a = (const char *)r->p + i * r->stride, *e = a + r->bytes;
        for (a = (const char *)((uintptr_t)a & ~(uintptr_t)63); a < e; a += 64) _mm_prefetch(a, _MM_HINT_T1);
    }
}

// ---------------------------------------------------------------- exp

/// exp of 16 lanes: n = round(x·log₂e), r = x − n·ln2 in two parts (Cody–Waite), Cephes'
/// degree-6 polynomial for e^r on |r| ≤ ½ln2 in FMA form, then p·2ⁿ by `vscalefps` (which
/// also makes the subnormal results). Within 2 ulp of exp for x ≤ 88.37; below −87.33654
/// (−∞ included) gives exactly 0, as Swift's `vexp` (FastMath.swift) does; it is that
/// function's polynomial, but the FMAs round once where it rounds twice, so the two may
/// differ in the last bit.
static inline __m512 AVX512BF16 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.37626f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(keep, p, n);
}

// ---------------------------------------------------------------- GELU

/// gelu(x) = x·Φ(x) and gelu′(x) = Φ(x) + x·φ(x) with Φ(x) = ½(1 + erf(x/√2)); erf by
/// Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5·10⁻⁷), whose e^(−x²/2) also gives φ. In FMA
/// form, |z| and erf's sign by bit masks, 1/(1 + p·|z|) by vrcp14ps and a Newton step: the
/// epilogue of fc1's product runs once per element of its [tokens, 4C] output.
static inline void AVX512BF16 gelu_and_grad(__m512 x, __m512 *value, __m512 *grad) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u));
    __m512 a = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(z), sign));   // |z|
    __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one);
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));   // ≈ 2⁻²⁸ relative
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    __m512 gauss = exp16(_mm512_fnmadd_ps(a, a, _mm512_setzero_ps()));   // e^(−z²)
    __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), gauss, one);          // erf(|z|)
    __m512 erf = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(y), sign));
    __m512 cdf = _mm512_fmadd_ps(half, erf, half);
    *value = _mm512_mul_ps(x, cdf);
    *grad = _mm512_fmadd_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f), cdf);
}

// ---------------------------------------------------------------- micro-kernel

/// C[0:mr, 0:nr] (+)= alpha · Σ_k a·b over kpn k-pairs. a: row r, pair q at a[r·rs + q·ks];
/// b: [q][NR]. first: C = alpha·acc + beta·C (beta == 0: C not read); else C += alpha·acc.
/// With `emul` (laid out as C, row stride ldc), the value stored is that result ⊙ emul; with
/// `gderiv` (laid out as C), C gets gelu(result) and gderiv gelu′(result). With `cbf16`, C is
/// uint16 bf16 values (ldc in them) and gets the final values rounded to nearest even (only
/// with first and beta 0: it is never read).
/// `nvu` (1…NV, a constant after inlining) vectors of each B row are used: the last panel of
/// an N that is not a multiple of NR (197 = 3·64 + 5) computes only the columns it has.
static inline __attribute__((always_inline)) AVX512BF16
void kernel_body(long kpn, const uint32_t *a, long rs, long ks, const uint32_t *b,
                 float *c, long ldc, float alpha, float beta, const float *bias, const float *emul,
                 float *gderiv, int first, long mr, long nr, int cbf16, const int nvu) {
    __m512 acc[MR][NV];
#pragma clang loop unroll(full)
    for (int r = 0; r < MR; r++)
#pragma clang loop unroll(full)
        for (int v = 0; v < nvu; v++) acc[r][v] = _mm512_setzero_ps();
    // Bring the C tile in while the k loop runs: it is read and written only at the end, and
    // a large C is far out of cache (its rows are pages apart).
    for (long r = 0; r < mr; r++)
        for (long v = 0; v < nr; v += cbf16 ? 32 : 16)
            _mm_prefetch(cbf16 ? (const char *)((uint16_t *)c + r * ldc + v) : (const char *)(c + r * ldc + v), _MM_HINT_T0);
    const uint32_t *a0 = a, *a1 = a + rs, *a2 = a + 2 * rs, *a3 = a + 3 * rs, *a4 = a + 4 * rs, *a5 = a + 5 * rs;
    long off = 0;
    for (long q = 0; q < kpn; q++, off += ks, b += NR) {
        __m512bh bv[NV];
#pragma clang loop unroll(full)
        for (int v = 0; v < nvu; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + 16 * v);
        const uint32_t *rows[MR] = {a0, a1, a2, a3, a4, a5};
#pragma clang loop unroll(full)
        for (int r = 0; r < MR; r++) {
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)rows[r][off]);
#pragma clang loop unroll(full)
            for (int v = 0; v < nvu; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
        }
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (long r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
#pragma clang loop unroll(full)
        for (int v = 0; v < nvu; v++) {
            __mmask16 m = mask_first(nr - 16 * v);
            if (!m) break;
            __m512 x;
            if (first) {
                x = _mm512_mul_ps(va, acc[r][v]);
                if (beta != 0.0f) x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, cr + 16 * v), x);
                if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + 16 * v));
            } else {
                x = _mm512_fmadd_ps(va, acc[r][v], _mm512_maskz_loadu_ps(m, cr + 16 * v));
            }
            if (emul) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, emul + r * ldc + 16 * v));
            if (gderiv) {
                __m512 grad;
                gelu_and_grad(x, &x, &grad);
                _mm512_mask_storeu_ps(gderiv + r * ldc + 16 * v, m, grad);
            }
            if (cbf16) _mm256_mask_storeu_epi16((uint16_t *)c + r * ldc + 16 * v, m, (__m256i)_mm512_cvtneps_pbh(x));
            else _mm512_mask_storeu_ps(cr + 16 * v, m, x);
        }
    }
}

static inline AVX512BF16
void kernel_6x64(long kpn, const uint32_t *a, long rs, long ks, const uint32_t *b,
                 float *c, long ldc, float alpha, float beta, const float *bias, const float *emul,
                 float *gderiv, int first, long mr, long nr, int cbf16) {
    switch ((nr + 15) / 16) {
    case 1: kernel_body(kpn, a, rs, ks, b, c, ldc, alpha, beta, bias, emul, gderiv, first, mr, nr, cbf16, 1); break;
    case 2: kernel_body(kpn, a, rs, ks, b, c, ldc, alpha, beta, bias, emul, gderiv, first, mr, nr, cbf16, 2); break;
    case 3: kernel_body(kpn, a, rs, ks, b, c, ldc, alpha, beta, bias, emul, gderiv, first, mr, nr, cbf16, 3); break;
    default: kernel_body(kpn, a, rs, ks, b, c, ldc, alpha, beta, bias, emul, gderiv, first, mr, nr, cbf16, NV); break;
    }
}

/// mapet_bf16_tile on the first K rows of a packed op(B) that has `panelPairs` k-pairs per
/// panel (≥ ⌈K/2⌉): a product over some leading rows of a packing of more (attention.c).
void bf16_tile_in(int transA, long N, long K, float alpha, const float *A, long lda, const uint32_t *packedB,
                  long panelPairs, float beta, const float *bias, float *C, long ldc, long i0, long i1, long j0, long j1,
                  uint32_t *abuf, float *rowsums, const float *emul, float *gderiv, int flags);

#endif   // __x86_64__

#endif
