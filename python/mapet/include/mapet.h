/* mapet C API: the numerics of MaPeTKernels for callers that link the Swift library
 * statically (the Python extension exports only PyInit__core). All arrays are row-major
 * float32; sizes are ptrdiff_t (Swift Int). */
#ifndef MAPET_H
#define MAPET_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

void mapet_set_num_threads(int32_t n);
int32_t mapet_get_num_threads(void);

/* C[M,N] = alpha * op(A) * op(B) + beta * C; op transposes when trans_* != 0. */
void mapet_sgemm(int32_t trans_a, int32_t trans_b, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                 float alpha, const float *A, ptrdiff_t lda, const float *B, ptrdiff_t ldb,
                 float beta, float *C, ptrdiff_t ldc);

/* out[i] = x[i] * Phi(x[i]) (exact erf GELU). */
void mapet_gelu_forward(float *out, const float *x, ptrdiff_t count);

#ifdef __cplusplus
}
#endif
#endif
