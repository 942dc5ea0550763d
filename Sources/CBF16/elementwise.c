// GELU on AVX-512, 16 lanes, for the fp32 engine (see include/mapet_bf16.h). The operations and
// their order are those of the 8-lane Swift code (GELU.swift, FastMath.swift: `geluAndGrad`,
// `verfAndGauss`, `vexp`), with no fused multiply-adds, so every element gets the same bits on
// either path. (The bf16 GEMM's GELU epilogue, bf16_kernel.h, is a faster FMA form.)
#include "mapet_bf16.h"
#include "bf16_kernel.h"

#if defined(__x86_64__)

/// exp of 16 lanes: the polynomial and operation order of Swift's `vexp` (FastMath.swift), so
/// each lane's value equals the 8-lane Swift one. Below −87.33654 (−∞ included) gives 0.
static inline __m512 AVX512BF16 exp16_as_swift(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.37626f);
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 shifted = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), magic);
    __m512 n = _mm512_sub_ps(shifted, magic);
    x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    x = _mm512_add_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(x, x)), x), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x4B400000)),
                         _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
}

/// −v exactly (the sign bit flipped), as Swift's prefix minus.
static inline __m512 AVX512BF16 negate(__m512 v) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
}

/// gelu(x) = ½x(1 + erf(x/√2)) and gelu′(x) = Φ(x) + x·φ(x) as Swift's `geluAndGrad` computes
/// them (erf by Abramowitz & Stegun 7.1.26, whose e^(−x²/2) also gives φ).
static inline void AVX512BF16 gelu_and_grad_as_swift(__m512 x, __m512 *value, __m512 *grad) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 a = _mm512_mask_mov_ps(z, negative, negate(z));
    __m512 t = _mm512_div_ps(one, _mm512_add_ps(one, _mm512_mul_ps(_mm512_set1_ps(0.3275911f), a)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_sub_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(1.453152027f));
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(1.421413741f));
    p = _mm512_sub_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(0.284496736f));
    p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(0.254829592f));
    __m512 gauss = exp16_as_swift(negate(_mm512_mul_ps(a, a)));
    __m512 y = _mm512_sub_ps(one, _mm512_mul_ps(_mm512_mul_ps(p, t), gauss));
    __m512 erf = _mm512_mask_mov_ps(y, negative, negate(y));
    __m512 onePlusErf = _mm512_add_ps(one, erf);
    *value = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), onePlusErf);
    *grad = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), onePlusErf),
                          _mm512_mul_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f)));
}

AVX512BF16
void mapet_avx512_gelu_keep_derivative(float *out, float *x, long count) {
    for (long i = 0; i < count; i += 16) {
        __mmask16 m = mask_first(count - i);
        __m512 value, grad;
        gelu_and_grad_as_swift(_mm512_maskz_loadu_ps(m, x + i), &value, &grad);
        _mm512_mask_storeu_ps(out + i, m, value);
        _mm512_mask_storeu_ps(x + i, m, grad);
    }
}

AVX512BF16
void mapet_avx512_gelu(float *out, const float *x, long count) {
    for (long i = 0; i < count; i += 16) {
        __mmask16 m = mask_first(count - i);
        __m512 value, grad;
        gelu_and_grad_as_swift(_mm512_maskz_loadu_ps(m, x + i), &value, &grad);
        _mm512_mask_storeu_ps(out + i, m, value);
    }
}

AVX512BF16
void mapet_bf16_round(const float *x, uint16_t *y, long n) {
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = mask_first(n - i);
        _mm256_mask_storeu_epi16(y + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

#else

void mapet_bf16_round(const float *x, uint16_t *y, long n) { (void)x; (void)y; (void)n; }

void mapet_avx512_gelu_keep_derivative(float *out, float *x, long count) { (void)out; (void)x; (void)count; }
void mapet_avx512_gelu(float *out, const float *x, long count) { (void)out; (void)x; (void)count; }

#endif
