// GELU on AVX-512, 16 lanes (see include/mapet_bf16.h). The operations and their order are
// those of the 8-lane Swift code (GELU.swift, FastMath.swift: `geluAndGrad`, `verfAndGauss`,
// `vexp`), with no fused multiply-adds, so every element gets the same bits on either path.
#include "mapet_bf16.h"
#include "bf16_kernel.h"

#if defined(__x86_64__)

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
