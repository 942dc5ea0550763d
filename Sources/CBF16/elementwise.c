// GELU on AVX-512, 16 lanes (see include/mapet_bf16.h). The operations and their order are
// those of the 8-lane Swift code (GELU.swift, FastMath.swift: `geluAndGrad`, `verfAndGauss`,
// `vexp`), with no fused multiply-adds, so every element gets the same bits on either path.
#include "mapet_bf16.h"
#include "bf16_kernel.h"

#if defined(__x86_64__)

/// −v exactly (the sign bit flipped), as Swift's prefix minus.
static inline __m512 AVX512BF16 negate(__m512 v) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
}

/// gelu(x) = ½x(1 + erf(x/√2)) and gelu′(x) = Φ(x) + x·φ(x); erf by Abramowitz & Stegun
/// 7.1.26, whose e^(−x²/2) also gives φ.
static inline void AVX512BF16 gelu_and_grad(__m512 x, __m512 *value, __m512 *grad) {
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
    __m512 gauss = exp16(negate(_mm512_mul_ps(a, a)));
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
        gelu_and_grad(_mm512_maskz_loadu_ps(m, x + i), &value, &grad);
        _mm512_mask_storeu_ps(out + i, m, value);
        _mm512_mask_storeu_ps(x + i, m, grad);
    }
}

AVX512BF16
void mapet_avx512_gelu(float *out, const float *x, long count) {
    for (long i = 0; i < count; i += 16) {
        __mmask16 m = mask_first(count - i);
        __m512 value, grad;
        gelu_and_grad(_mm512_maskz_loadu_ps(m, x + i), &value, &grad);
        _mm512_mask_storeu_ps(out + i, m, value);
    }
}

#else

void mapet_avx512_gelu_keep_derivative(float *out, float *x, long count) { (void)out; (void)x; (void)count; }
void mapet_avx512_gelu(float *out, const float *x, long count) { (void)out; (void)x; (void)count; }

#endif
