// The OpenBLAS entry points mapet uses, as exported by PyPI's scipy-openblas32
// (LP64, every symbol prefixed `scipy_`). Declared here so no BLAS header is needed at build time.
#ifndef MAPET_CBLAS_H
#define MAPET_CBLAS_H

enum MapetCblasOrder { MapetCblasRowMajor = 101, MapetCblasColMajor = 102 };
enum MapetCblasTranspose { MapetCblasNoTrans = 111, MapetCblasTrans = 112 };

void scipy_cblas_sgemm(enum MapetCblasOrder order, enum MapetCblasTranspose transA,
                       enum MapetCblasTranspose transB, int M, int N, int K, float alpha,
                       const float *A, int lda, const float *B, int ldb, float beta,
                       float *C, int ldc);
void scipy_openblas_set_num_threads(int num_threads);
int scipy_openblas_get_num_threads(void);
char *scipy_openblas_get_config(void);
char *scipy_openblas_get_corename(void);

#endif
