// bf16 GEMM on AVX512-BF16 (see include/mapet_bf16.h for the contract).
//
// Structure (the classic pack + micro-kernel GEMM, Goto/BLIS):
//   op(B) [K, N] is packed once into panels of NR = 64 columns, [k-pair][column] inside a
//   panel, converting fp32 → bf16 with round-to-nearest-even (vcvtne2ps2bf16).
//   A tile of C (rows i0..i1, columns j0..j1) walks K in blocks of KCP k-pairs; for each block
//   it packs its rows of op(A) (at most MC) and runs the MR × NR = 6 × 64 micro-kernel over
//   the packed B panels: per k-pair, 4 vector loads of B, 6 broadcast pairs of A, 24
//   `vdpbf16ps` into 24 zmm accumulators (acc[i] += a.lo·b.lo + a.hi·b.hi per fp32 lane).
// Every element of C is one accumulator lane summed over its k-pairs in increasing order,
// one KC block after the other, so its value does not depend on the tiling or the threads.
#include "mapet_bf16.h"
#include "bf16_kernel.h"

int mapet_bf16_cpu_supported(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

const char *mapet_bf16_kernel_name(void) { return "avx512bf16 6x64"; }

long mapet_bf16_panel_cols(void) { return NR; }

size_t mapet_bf16_packed_b_words(long K, long N) {
    long kp = (K + 1) / 2, panels = (N + NR - 1) / NR;
    return (size_t)kp * (size_t)panels * NR;
}

size_t mapet_bf16_a_buffer_words(void) { return (size_t)MC * KCP; }

long mapet_bf16_k_block(void) { return 2 * KCP; }

void mapet_bf16_tile_shape(long M, long N, long K, long workers, long *tileRows, long *tileCols) {
    long rowTiles = (M + MC - 1) / MC, panels = (N + NR - 1) / NR;
    if (workers < 1) workers = 1;
    if (K >= 4 * (M > N ? M : N)) {
        // A long K (a weight gradient, dW = dYᵀ·X over all tokens): one tile per worker, cut
        // along the longer side. Each KC block of B then serves all of a tile's rows from L2
        // and each packed A block all of its columns; cut in MC-row tiles instead, every tile
        // streams all of B again (measured on Zen 4, 2 workers: 10–20% slower).
        if (M >= N) {
            long rows = (M + workers - 1) / workers;
            *tileRows = (rows + MR - 1) / MR * MR;
            *tileCols = panels * NR;
        } else {
            long cols = (panels + workers - 1) / workers;
            *tileRows = M;
            *tileCols = cols * NR;
        }
        return;
    }
    // Whole rows of C when there are enough row tiles to share out; otherwise also cut N so
    // that about 8 tiles exist (2–4 per worker on this project's machines).
    long colTiles = rowTiles >= 8 ? 1 : (8 + rowTiles - 1) / rowTiles;
    if (colTiles > panels) colTiles = panels;
    if (colTiles < 1) colTiles = 1;
    *tileRows = MC;
    *tileCols = (panels + colTiles - 1) / colTiles * NR;
}

long mapet_bf16_next(long *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

#if defined(__x86_64__)

// ---------------------------------------------------------------- packing B

/// In-register transpose of a 16 × 16 matrix of 32-bit words.
static inline void AVX512BF16 transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int m = 0; m < 8; m++) {
        a[2 * m] = _mm512_unpacklo_epi32(r[2 * m], r[2 * m + 1]);
        a[2 * m + 1] = _mm512_unpackhi_epi32(r[2 * m], r[2 * m + 1]);
    }
    for (int q = 0; q < 4; q++) {
        b[4 * q + 0] = _mm512_unpacklo_epi64(a[4 * q + 0], a[4 * q + 2]);
        b[4 * q + 1] = _mm512_unpackhi_epi64(a[4 * q + 0], a[4 * q + 2]);
        b[4 * q + 2] = _mm512_unpacklo_epi64(a[4 * q + 1], a[4 * q + 3]);
        b[4 * q + 3] = _mm512_unpackhi_epi64(a[4 * q + 1], a[4 * q + 3]);
    }
    // b[4q + c], 128-bit lane L: column 4L + c of rows 4q..4q+3.
    for (int c = 0; c < 4; c++) {
        __m512i s0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
        __m512i s1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        __m512i s2 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        __m512i s3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(s0, s1, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(s0, s1, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(s2, s3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(s2, s3, 0xDD);
    }
}

void mapet_bf16_pack_b(int transB, long K, long N, const float *B, long ldb,
                       long panel0, long panel1, uint32_t *packed) {
    mapet_bf16_pack_b_pairs(transB, K, N, B, ldb, panel0, panel1, 0, (K + 1) / 2, packed);
}

AVX512BF16
void mapet_bf16_pack_b_pairs(int transB, long K, long N, const float *B, long ldb,
                             long panel0, long panel1, long kp0, long kp1, uint32_t *packed) {
    long kpT = (K + 1) / 2;
    if (kp1 > kpT) kp1 = kpT;
    for (long p = panel0; p < panel1; p++) {
        uint32_t *dst = packed + (size_t)p * kpT * NR;
        long j0 = p * NR;
        if (!transB) {
            // op(B) = B [K, N]: pair rows k, k+1 column by column.
            for (long kp = kp0; kp < kp1; kp++) {
                const float *r0 = B + 2 * kp * ldb + j0;
                const float *r1 = 2 * kp + 1 < K ? r0 + ldb : NULL;
                for (int v = 0; v < NV; v++) {
                    __m512i w = cvt_interleave(r0 + 16 * v, r1 ? r1 + 16 * v : NULL, N - j0 - 16 * v);
                    _mm512_storeu_si512(dst + kp * NR + 16 * v, w);
                }
            }
        } else {
            // op(B) = Bᵀ, B [N, K]: column j of op(B) is row j of B, its pairs consecutive;
            // convert 16 rows × 16 pairs and transpose to [pair][column].
            for (int v = 0; v < NV; v++) {
                long jv = j0 + 16 * v;
                for (long kp = kp0; kp < kp1; kp += 16) {
                    __m512i r[16];
                    for (int jj = 0; jj < 16; jj++) {
                        if (jv + jj < N) r[jj] = cvt_consecutive(B + (jv + jj) * ldb + 2 * kp, K - 2 * kp);
                        else r[jj] = _mm512_setzero_si512();
                    }
                    transpose16(r);
                    long nq = kp1 - kp < 16 ? kp1 - kp : 16;
                    for (long q = 0; q < nq; q++) _mm512_storeu_si512(dst + (kp + q) * NR + 16 * v, r[q]);
                }
            }
        }
    }
}

AVX512BF16
void mapet_bf16_pack_b_pairs_bf16(long K, long N, const uint16_t *B, long ldb, long panel0, long panel1, long kp0,
                                  long kp1, uint32_t *packed) {
    long kpT = (K + 1) / 2;
    if (kp1 > kpT) kp1 = kpT;
    for (long p = panel0; p < panel1; p++) {
        uint32_t *dst = packed + (size_t)p * kpT * NR;
        long j0 = p * NR;
        for (long kp = kp0; kp < kp1; kp++) {
            // Rows k and k+1 already in bf16: word j = (row k+1, column j) << 16 | (row k, column j).
            const uint16_t *r0 = B + 2 * kp * ldb + j0;
            const uint16_t *r1 = 2 * kp + 1 < K ? r0 + ldb : NULL;
            for (int v = 0; v < NV; v++) {
                __mmask16 m = mask_first(N - j0 - 16 * v);
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + 16 * v));
                __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + 16 * v)) : _mm512_setzero_si512();
                _mm512_storeu_si512(dst + kp * NR + 16 * v, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
    }
}

// ---------------------------------------------------------------- packing A

/// Packs rows [ib, ib + mb) of op(A), k-pairs [kp0, kp0 + kpn), into abuf. Returns the strides
/// (in words) between rows and between k-pairs of the layout chosen: rows of pairs for
/// A [M, K] (each row converts straight from memory), pairs of rows for A [K, M].
AVX512BF16
static void pack_a(int transA, long K, const float *A, long lda, long ib, long mb, long kp0, long kpn,
                   uint32_t *abuf, long *rs, long *ks, float *rowsums, int abf16) {
    long mbr = (mb + MR - 1) / MR * MR;   // the micro-kernel reads whole MR-row panels
    if (!transA) {
        long k0 = 2 * kp0, nk = K - k0 < 2 * kpn ? K - k0 : 2 * kpn;
        for (long i = 0; i < mb; i++) {
            uint32_t *dst = abuf + i * KCP;
            if (abf16) {
                // Already in bf16: the row's pairs are its consecutive 32-bit words; an odd K's
                // last pair has one value (read alone: the word would reach past the row).
                const uint16_t *src = (const uint16_t *)A + (ib + i) * lda + k0;
                long whole = nk / 2;   // pairs with both values in the row
                for (long q = 0; q < whole; q += 16) {
                    __mmask16 m = mask_first(whole - q);
                    _mm512_mask_storeu_epi32(dst + q, m, _mm512_maskz_loadu_epi32(m, src + 2 * q));
                }
                if (whole < kpn) dst[whole] = src[2 * whole];
            } else {
                const float *src = A + (ib + i) * lda + k0;
                for (long q = 0; q < kpn; q += 16) {
                    __m512i w = cvt_consecutive(src + 2 * q, nk - 2 * q);
                    _mm512_mask_storeu_epi32(dst + q, mask_first(kpn - q), w);
                }
            }
        }
        for (long i = mb; i < mbr; i++) memset(abuf + i * KCP, 0, (size_t)kpn * 4);
        *rs = KCP; *ks = 1;
    } else {
        long mbv = (mbr + 15) / 16 * 16;   // ≤ MC: MC is a multiple of 48
        for (long q = 0; q < kpn; q++) {
            long k = 2 * (kp0 + q);
            const float *r0 = A + k * lda + ib;
            const float *r1 = k + 1 < K ? r0 + lda : NULL;
            for (long i = 0; i < mbv; i += 16) {
                __m512i w = cvt_interleave(r0 + i, r1 ? r1 + i : NULL, mb - i);
                _mm512_storeu_si512(abuf + q * MC + i, w);
                if (rowsums) {
                    // Σ_k op(A)[i, k] from the fp32 values, k in increasing order.
                    __mmask16 m = mask_first(mb - i);
                    __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, rowsums + i), _mm512_maskz_loadu_ps(m, r0 + i));
                    if (r1) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(m, r1 + i));
                    _mm512_mask_storeu_ps(rowsums + i, m, sum);
                }
            }
        }
        *rs = 1; *ks = MC;
    }
}

// ---------------------------------------------------------------- a tile of C

void mapet_bf16_tile(int transA, long M, long N, long K, float alpha, const float *A, long lda,
                     const uint32_t *packedB, float beta, const float *bias, float *C, long ldc,
                     long i0, long i1, long j0, long j1, uint32_t *abuf, float *rowsums, const float *emul,
                     float *gderiv, int flags) {
    (void)M;
    bf16_tile_in(transA, N, K, alpha, A, lda, packedB, (K + 1) / 2, beta, bias, C, ldc, i0, i1, j0, j1, abuf, rowsums,
                 emul, gderiv, flags);
}

/// The source of op(A) for rows [ib, ib + mb), k-pairs [kp0, kp0 + kpn); `size` bytes per
/// element (2 for a bf16 A).
static mapet_bf16_rows a_source(int transA, long K, const float *A, long lda, long ib, long mb, long kp0, long kpn,
                                long size) {
    long k0 = 2 * kp0, nk = K - k0 < 2 * kpn ? K - k0 : 2 * kpn;
    const char *a = (const char *)A;
    if (transA) return (mapet_bf16_rows){a + (k0 * lda + ib) * size, nk, mb * size, lda * size};
    return (mapet_bf16_rows){a + (ib * lda + k0) * size, mb, nk * size, lda * size};
}

AVX512BF16
void bf16_tile_in(int transA, long N, long K, float alpha, const float *A, long lda, const uint32_t *packedB,
                  long panelPairs, float beta, const float *bias, float *C, long ldc, long i0, long i1, long j0, long j1,
                  uint32_t *abuf, float *rowsums, const float *emul, float *gderiv, int flags) {
    if (j1 > N) j1 = N;
    int abf16 = !transA && (flags & MAPET_BF16_A_IS_BF16), cbf16 = (flags & MAPET_BF16_C_AS_BF16) != 0;
    long kpT = (K + 1) / 2;
    for (long kp0 = 0; kp0 < kpT; kp0 += KCP) {
        long kpn = kpT - kp0 < KCP ? kpT - kp0 : KCP;
        int first = kp0 == 0, last = kp0 + kpn == kpT;
        for (long ib = i0; ib < i1; ib += MC) {
            long mb = i1 - ib < MC ? i1 - ib : MC;
            long rs, ks;
            pack_a(transA, K, A, lda, ib, mb, kp0, kpn, abuf, &rs, &ks, transA && rowsums ? rowsums + ib : NULL, abf16);
            // While this block runs, bring the next block's op(A) into L2, a share per
            // micro-kernel call: packing it then converts from L2 instead of waiting on memory
            // (a weight gradient's A is dOutᵀ, read a few hundred bytes per row).
            long nib = ib + MC < i1 ? ib + MC : i0, nkp0 = ib + MC < i1 ? kp0 : kp0 + KCP;
            mapet_bf16_rows next = {NULL, 0, 0, 0};
            if (nkp0 < kpT) {
                long nmb = i1 - nib < MC ? i1 - nib : MC, nkpn = kpT - nkp0 < KCP ? kpT - nkp0 : KCP;
                next = a_source(transA, K, A, lda, nib, nmb, nkp0, nkpn, abf16 ? 2 : 4);
            }
            long calls = ((j1 - j0 + NR - 1) / NR) * ((mb + MR - 1) / MR), call = 0;
            for (long j = j0; j < j1; j += NR) {
                long nr = j1 - j < NR ? j1 - j : NR;
                const uint32_t *bp = packedB + (size_t)(j / NR) * panelPairs * NR + (size_t)kp0 * NR;
                for (long ir = 0; ir < mb; ir += MR, call++) {
                    long mr = mb - ir < MR ? mb - ir : MR;
                    if (next.rows) prefetch_share(&next, call, calls);
                    float *c = cbf16 ? (float *)((uint16_t *)C + (ib + ir) * ldc + j) : C + (ib + ir) * ldc + j;
                    kernel_6x64(kpn, abuf + ir * rs, rs, ks, bp, c, ldc,
                                alpha, beta, bias ? bias + j : NULL, last && emul ? emul + (ib + ir) * ldc + j : NULL,
                                last && gderiv ? gderiv + (ib + ir) * ldc + j : NULL, first, mr, nr, cbf16);
                }
            }
        }
    }
}

#else   // not x86-64: mapet_bf16_cpu_supported() is 0 and nothing below is ever called

void mapet_bf16_pack_b(int transB, long K, long N, const float *B, long ldb,
                       long panel0, long panel1, uint32_t *packed) {
    (void)transB; (void)K; (void)N; (void)B; (void)ldb; (void)panel0; (void)panel1; (void)packed;
}

void mapet_bf16_pack_b_pairs(int transB, long K, long N, const float *B, long ldb,
                             long panel0, long panel1, long kp0, long kp1, uint32_t *packed) {
    (void)transB; (void)K; (void)N; (void)B; (void)ldb; (void)panel0; (void)panel1; (void)kp0; (void)kp1;
    (void)packed;
}

void mapet_bf16_pack_b_pairs_bf16(long K, long N, const uint16_t *B, long ldb, long panel0, long panel1, long kp0,
                                  long kp1, uint32_t *packed) {
    (void)K; (void)N; (void)B; (void)ldb; (void)panel0; (void)panel1; (void)kp0; (void)kp1; (void)packed;
}

void mapet_bf16_tile(int transA, long M, long N, long K, float alpha, const float *A, long lda,
                     const uint32_t *packedB, float beta, const float *bias, float *C, long ldc,
                     long i0, long i1, long j0, long j1, uint32_t *abuf, float *rowsums, const float *emul,
                     float *gderiv, int flags) {
    (void)transA; (void)rowsums; (void)emul; (void)gderiv; (void)flags; (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)lda; (void)packedB;
    (void)beta; (void)bias; (void)C; (void)ldc; (void)i0; (void)i1; (void)j0; (void)j1; (void)abuf;
}

#endif
