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

/// The same for k-pairs [kp0, kp1) only (kp0 a multiple of 16): lets several workers share
/// the packing of few, tall panels.
void mapet_bf16_pack_b_pairs(int transB, long K, long N, const float *B, long ldb,
                             long panel0, long panel1, long kp0, long kp1, uint32_t *packed);

/// The same from op(B) = B [K, N] already in bf16 (uint16 values, row stride ldb in them): the
/// pairs are formed without rounding.
void mapet_bf16_pack_b_pairs_bf16(long K, long N, const uint16_t *B, long ldb, long panel0, long panel1, long kp0,
                                  long kp1, uint32_t *packed);
/// Number of 32-bit words a worker's A buffer needs.
size_t mapet_bf16_a_buffer_words(void);

/// Tile grid for (M, N, K) shared by `workers`: rows and columns per tile (columns a multiple
/// of NR). A tile's values do not depend on the grid: it only decides the speed.
void mapet_bf16_tile_shape(long M, long N, long K, long workers, long *tileRows, long *tileCols);

/// C[i0:i1, j0:j1] = alpha·op(A)[i0:i1, :]·op(B)[:, j0:j1] + beta·C[i0:i1, j0:j1] (+ bias[j0:j1]
/// on every row, when bias is not NULL) with op(B) packed by mapet_bf16_pack_b (all panels
/// covering j0..j1; j0 a multiple of NR). beta == 0 does not read C. `abuf` holds
/// mapet_bf16_a_buffer_words() words. With transA and `rowsums` not NULL, also adds
/// Σ_k op(A)[i, k] (the fp32 values, k in increasing order) to rowsums[i] for i in [i0, i1)
/// (a linear layer's bias gradient from the dW product's pass over dOut); give it to one tile
/// per row range only. With `emul` [M, N] (row stride ldc) not NULL, the final values of C are
/// multiplied elementwise by it as they are stored (e.g. dOut·W ⊙ gelu′: an activation's
/// backward in the product's store instead of a pass of its own). With `gderiv` [M, N] (row
/// stride ldc) not NULL, C receives gelu of its final values and gderiv their gelu′ (GELU's
/// forward, keeping what its backward needs, in the store of the product feeding it).
/// `flags`: MAPET_BF16_A_IS_BF16: A (not transposed) holds uint16 bf16 values, lda in them;
/// MAPET_BF16_C_AS_BF16: C receives its final values as uint16 bf16 (round to nearest even),
/// ldc in them — only with beta 0 and K ≤ mapet_bf16_k_block() (C is stored once, never read).
/// An activation stored so by one product and read so by the next gives the bits of storing it
/// in fp32: the next product rounds its inputs to bf16 the same way.
void mapet_bf16_tile(int transA, long M, long N, long K, float alpha, const float *A, long lda,
                     const uint32_t *packedB, float beta, const float *bias, float *C, long ldc,
                     long i0, long i1, long j0, long j1, uint32_t *abuf, float *rowsums, const float *emul,
                     float *gderiv, int flags);
enum { MAPET_BF16_A_IS_BF16 = 1, MAPET_BF16_C_AS_BF16 = 2 };
/// The largest K whose product is one K block (C stored once).
long mapet_bf16_k_block(void);

/// A block of memory to bring into cache: `rows` runs of `bytes` bytes, `stride` bytes apart.
typedef struct { const void *p; long rows, bytes, stride; } mapet_bf16_rows;
/// Words of the `work` buffer the attention functions below need for one head of these sizes.
size_t mapet_bf16_attention_work_words(long M, long Nk, long D);

/// One head of attention, fused: probs[M, Nk] (row stride Nk) = softmax(scale · Q Kᵀ + bias)
/// and out[M, D] (row stride ldo) = probs · V, every product's inputs rounded to bf16 and
/// summed in fp32. q [M, D], k and v [Nk, D] with their row strides; bias NULL or [M, Nk]
/// with row stride ldbias, entries 0 (may attend) or −∞. Key intervals: with `pre` not NULL,
/// row i may attend only the keys [0, pre[i]) ∪ [split + suf[i], Nk) (0 ≤ pre[i] ≤ split ≤ Nk,
/// 0 ≤ suf[i] ≤ Nk − split), its other probabilities are 0 and the blocks of scores no row of
/// a strip may attend are not computed; pre NULL: every key. A row with no key allowed gives
/// zero probabilities and output. `next` (n blocks, may be NULL with n = 0): what the next
/// head will read, prefetched into L2 a share per strip of this one (its Q, K and V are rows
/// a few hundred bytes long scattered over a large activation: read cold, they stall).
void mapet_bf16_attention_forward(long M, long Nk, long D, float scale,
                                  const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                  const float *bias, long ldbias, long split, const int32_t *pre, const int32_t *suf,
                                  float *probs, float *out, long ldo, uint32_t *work,
                                  const mapet_bf16_rows *next, long n);

/// Its backward from the probabilities (the same key intervals as the forward): dQ = dS·K +
/// betaQ·dQ, dK = dSᵀ·Q + betaKV·dK, dV = Pᵀ·dO + betaKV·dV with dS = P ⊙ (dO·Vᵀ − rowsum) ·
/// scale written to ds [M, Nk] (row stride Nk; 0 outside the intervals); bf16 inputs, fp32
/// sums, beta 0 does not read the output. `next`, n: as for the forward.
void mapet_bf16_attention_backward(long M, long Nk, long D, float scale,
                                   const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                                   long split, const int32_t *pre, const int32_t *suf,
                                   const float *probs, const float *dout, long lddo,
                                   float *dq, long lddq, float betaQ, float *dk, long lddk, float *dv, long lddv,
                                   float betaKV, float *ds, uint32_t *work, const mapet_bf16_rows *next, long n);

/// y[i] = x[i] rounded to bf16 by the packing's own instruction (`vcvtneps2bf16`: nearest even,
/// denormal inputs as zero, NaN quieted): an activation stored so is read as its packing would
/// have rounded it.
void mapet_bf16_round(const float *x, uint16_t *y, long n);

/// GELU (exact erf form) over `count` floats, 16 lanes: out = gelu(x), and with
/// `keep_derivative` x is overwritten by gelu′(x). The same bits as the Swift 8-lane code.
void mapet_avx512_gelu(float *out, const float *x, long count);
void mapet_avx512_gelu_keep_derivative(float *out, float *x, long count);

/// Atomically adds 1 to *counter and returns the previous value (tile dispatch).
long mapet_bf16_next(long *counter);

#ifdef __cplusplus
}
#endif

#endif
