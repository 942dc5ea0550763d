// bf16 GEMM for CPUs with AVX512-BF16: C = alpha·op(A)·op(B) + beta·C, inputs rounded to bf16
// (round-to-nearest-even), products summed in fp32 by `vdpbf16ps`. Row-major, any strides.
//
// The AVX-512 code is compiled with per-function target attributes; call nothing but
// `mapet_bf16_cpu_supported` unless it returned 1 (the rest would raise SIGILL on an AVX2 CPU).
//
// Layout of the packed operands (one 32-bit word = a bf16 pair (k, k+1), k even, low half = k):
//   packed B   panels of MAPET_BF16_NR columns, panel-major, inside a panel [k-pair][column];
//              an odd K is padded with a zero row, the last panel with zero columns.
//   packed A   per worker, one block of rows × one KC block of k-pairs at a time (internal).
// Threads are the caller's business: pack B panels, then run tiles, each on one worker with its
// own A buffer. A tile's result depends only on (M, N, K) and the data, never on which worker
// or in which order tiles run.
#ifndef MAPET_BF16_H
#define MAPET_BF16_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// 1 when the CPU runs AVX512F, BW, VL and BF16 (and the OS saves zmm state), else 0.
int mapet_bf16_cpu_supported(void);

/// Name of the micro-kernel, e.g. "avx512bf16 6x64".
const char *mapet_bf16_kernel_name(void);

/// Columns per packed-B panel (the micro-kernel's NR).
long mapet_bf16_panel_cols(void);

/// Number of 32-bit words of the packed form of op(B) [K, N].
size_t mapet_bf16_packed_b_words(long K, long N);

/// Packs panels [panel0, panel1) of op(B) [K, N] (B stored [K, N] or, with transB, [N, K],
/// row stride ldb) into `packed` (laid out for all panels; only the given ones are written).
void mapet_bf16_pack_b(int transB, long K, long N, const float *B, long ldb,
                       long panel0, long panel1, uint32_t *packed);

/// Number of 32-bit words a worker's A buffer needs.
size_t mapet_bf16_a_buffer_words(void);

/// Tile grid for (M, N, K): rows and columns per tile (columns a multiple of NR). Depends on
/// the shape only.
void mapet_bf16_tile_shape(long M, long N, long K, long *tileRows, long *tileCols);

/// C[i0:i1, j0:j1] = alpha·op(A)[i0:i1, :]·op(B)[:, j0:j1] + beta·C[i0:i1, j0:j1] (+ bias[j0:j1]
/// on every row, when bias is not NULL) with op(B) packed by mapet_bf16_pack_b (all panels
/// covering j0..j1; j0 a multiple of NR). beta == 0 does not read C. `abuf` holds
/// mapet_bf16_a_buffer_words() words.
void mapet_bf16_tile(int transA, long M, long N, long K, float alpha, const float *A, long lda,
                     const uint32_t *packedB, float beta, const float *bias, float *C, long ldc,
                     long i0, long i1, long j0, long j1, uint32_t *abuf);

/// Atomically adds 1 to *counter and returns the previous value (tile dispatch).
long mapet_bf16_next(long *counter);

#ifdef __cplusplus
}
#endif

#endif
