/* Weight-only int4 linear for x86 CPUs with AVX512-BF16, reading the checkpoint's packed bytes.
 *
 * Plain torch reference beside it: kernels/cpu_native.py (reference_gemm, reference_dequant).
 *
 *   W_hat[n, k] = q[n, k] * s[g, n] - zs[g, n]        g = k / group, zs = z * s
 *   y[m, n]     = sum_g ( s[g, n] * sum_{k in g} x[m, k] q[n, k]  -  zs[g, n] * sum_{k in g} x[m, k] )
 *
 * Codes: row n holds K/2 bytes at codes + n * row_stride; byte j = q[n, 2j] | q[n, 2j+1] << 4 (the
 * checkpoint's layout, core/packing.py), so nothing is repacked. Scales: s and zs are float32 [G, N]
 * (one row per group: 16 neighbouring outputs are one load). x and y are bf16 bit patterns.
 *
 * Why it exists: torch's int4 CPU kernel multiplies with float32 FMAs while the dense bf16 GEMM uses
 * AVX512-BF16 dot products (two multiply-adds per lane and instruction), so beyond a dozen tokens the
 * dense GEMM wins although it reads four times the bytes. Here codes become the exact bf16 numbers
 * 128 + q in registers (one shift and one logic op per 32 codes) and meet the activations in the same
 * dot-product instruction (vdpbf16ps); each group's scale is applied once to the float32 partial sums,
 * and the offset of 128 goes into the zero-point term: y[m, n] = sum_g (s T - (zs + 128 s) xsum) with
 * T the group's sum of (128 + q) x. For many tokens, qdlm_int4_gemm_blocked widens
 * each code once per call into cache-resident bf16 panels and runs every token block over them;
 * qdlm_int4_gemm_amx (end of file) runs the same panels on AMX tiles where the CPU has them.
 *
 * No threads here: the caller splits tiles (or panels) across its threads.
 */
#include <immintrin.h>
#include <stdint.h>

#define TILE_N 16  /* outputs per tile: one zmm of float32 lanes */
#define TILE_M 16  /* tokens per pass over a tile's codes: 16 accumulators */
#define CHUNK_K 128 /* codes per row read at a time: 64 bytes, one zmm */

int qdlm_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* One token block of activations in the layout the tile loops read: dst[p * tm + t] = a bf16 pair of
 * x[first + t] as one dword, zero for t >= rows: inputs 2p and 2p + 1 (the blocked kernel's panels),
 * or in nibble order inputs 8c + j and 8c + 4 + j for p = 4c + j (the fused kernel: the order in which
 * one shift and one mask unpack a dword of 8 codes, code_pair). Rows of x are 2K bytes apart and would
 * all fall in one L1 set; interleaved, the broadcasts of one pair for the block's tokens read one
 * cache line. Shared by the fused kernel (blocks of TILE_M) and the blocked one (<= MR). */
static void pair_block(const uint16_t *x, int64_t K, int64_t first, int64_t rows, int64_t tm, int nibble_order,
                       int32_t *dst) {
    const int64_t pairs = K / 2;
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *row = x + (first + t) * K;
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t k = nibble_order ? 8 * (p / 4) + p % 4 : 2 * p, next = nibble_order ? k + 4 : k + 1;
            dst[p * tm + t] = (int32_t)((uint32_t)row[k] | (uint32_t)row[next] << 16);
        }
    }
    for (int64_t t = rows; t < tm; t++)
        for (int64_t p = 0; p < pairs; p++) dst[p * tm + t] = 0;
}

/* The fused kernel's activations: token blocks of TILE_M (pair_block, nibble order), and xsum[m, g] =
 * sum of x[m, k] over group g. */
void qdlm_int4_prepare_x(const uint16_t *x, int64_t M, int64_t K, int64_t group, int32_t *xpairs, float *xsum) {
    const int64_t G = K / group, pairs = K / 2;
    for (int64_t m0 = 0; m0 < M; m0 += TILE_M)
        pair_block(x, K, m0, M - m0 < TILE_M ? M - m0 : TILE_M, TILE_M, 1, xpairs + (m0 / TILE_M) * pairs * TILE_M);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) acc += bf16_to_float(x[m * K + k]);
            xsum[m * G + g] = acc;
        }
}

/* 16 lanes of 8 codes (nibble i of a dword = the code of input 8c + i) -> each lane's codes j and 4 + j
 * as the exact bf16 numbers 128 + q (0x4300 | q: exponent 2^7, q in the low mantissa bits), one dword:
 * (dwords >> 4j) & 0x000F000F | 0x43004300 in one shift and one three-input logic op. */
static inline __m512i code_pair(__m512i dwords, int j) {
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(dwords, 4 * j), _mm512_set1_epi32(0x000F000F),
                                     _mm512_set1_epi32(0x43004300), 0xEA); /* (a & b) | c */
}

/* acc += pairwise dot of wv with the bf16 pair at *xpair in every lane. Written out so that the pair
 * is an embedded-broadcast memory operand ({1to16}); compilers emit a separate broadcast otherwise. */
static inline __attribute__((always_inline)) void dp_broadcast(__m512 *acc, __m512bh wv, const int32_t *xpair) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(*acc) : "v"(wv), "m"(*xpair));
}

/* r[j] = 16 dwords of row j  ->  r[c] = dword c of rows 0..15 (a 16 x 16 transpose in registers). */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + j], 128-bit lane L: dword 4L + j of rows i..i+3 */
        u[i + 0] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i p_lo = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), p_hi = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i q_lo = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), q_hi = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(p_lo, q_lo, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(p_lo, q_lo, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(p_hi, q_hi, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(p_hi, q_hi, 0xDD);
    }
}

/* Outputs n0..n0+15 of tokens 0..tm-1 of one token block. The next tile's codes (next_rows of them
 * from n0 + 16) are fetched into L2 at the pace this tile reads its own: 16 rows 2 KiB and more apart
 * are more streams than the hardware prefetchers follow, and read on demand from memory they took
 * longer than the dot products. AMD EPYC Zen 5, 16 tokens, weight out of the caches, time / dense
 * bf16: 4096 x 4096 0.74 -> 0.60-0.64, 12288 x 4096 0.75 -> 0.73; two tiles ahead (or 64 KiB ahead)
 * was no better at 4096 and worse at 12288 (0.83-0.88). */
static inline __attribute__((always_inline)) void gemm_tile(
    const int32_t *xpairs, const float *xsum, int64_t K, int64_t G, const uint8_t *codes, int64_t row_stride,
    int64_t N, int64_t n0, const float *s, const float *zs, int64_t group, uint16_t *y, const int tm,
    const int64_t next_rows) {
    const uint8_t *tile_codes = codes + n0 * row_stride;
    __m512 out[TILE_M], acc[TILE_M];
    for (int t = 0; t < tm; t++) out[t] = acc[t] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += CHUNK_K) {
        /* 64 bytes of each of the tile's 16 rows, turned so that dword c holds codes
         * k0 + 8c .. k0 + 8c + 7 of all 16 rows */
        __m512i chunk[16];
        for (int j = 0; j < 16; j++) chunk[j] = _mm512_loadu_si512(tile_codes + j * row_stride + k0 / 2);
        for (int64_t j = 0; j < next_rows; j++)
            _mm_prefetch((const char *)tile_codes + (16 + j) * row_stride + k0 / 2, _MM_HINT_T1);
        transpose16(chunk);
        for (int c = 0; c < 16; c++) {
            for (int j = 0; j < 4; j++) { /* inputs 8c + j and 8c + 4 + j: pair (k0 + 8c) / 2 + j in nibble order */
                const __m512bh wv = (__m512bh)code_pair(chunk[c], j);
                const int32_t *xpair = xpairs + ((k0 + 8 * c) / 2 + j) * TILE_M;
                for (int t = 0; t < tm; t++) dp_broadcast(&acc[t], wv, xpair + t);
            }
            const int64_t k_end = k0 + 8 * c + 8;
            if (k_end % group == 0) { /* a group ends: out += s * acc - (zs + 128 s) * (sum of x over it) */
                const int64_t g = k_end / group - 1;
                const __m512 sv = _mm512_loadu_ps(s + g * N + n0);
                const __m512 zv = _mm512_fmadd_ps(_mm512_set1_ps(128.0f), sv, _mm512_loadu_ps(zs + g * N + n0));
                for (int t = 0; t < tm; t++) {
                    out[t] = _mm512_fmadd_ps(sv, acc[t], out[t]);
                    out[t] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsum[t * G + g]), out[t]);
                    acc[t] = _mm512_setzero_ps();
                }
            }
        }
    }
    for (int t = 0; t < tm; t++)
        _mm256_storeu_si256((__m256i *)(y + t * N + n0), (__m256i)_mm512_cvtneps_pbh(out[t]));
}

#define TILE_CASE(T) \
    case T: gemm_tile(xp, xs, K, G, codes, row_stride, N, n0, s, zs, group, yb, T, next_rows); break;

/* y[:, 16 tile_start : 16 tile_stop] of y = x @ W_hat.T, from qdlm_int4_prepare_x's buffers.
 * Needs N % 16 == 0, K % 128 == 0, group % 8 == 0 and group dividing 128 or a multiple of it. */
void qdlm_int4_gemm_tiles(const int32_t *xpairs, const float *xsum, int64_t M, int64_t K, const uint8_t *codes,
                          int64_t row_stride, int64_t N, const float *s, const float *zs, int64_t group,
                          uint16_t *y, int64_t tile_start, int64_t tile_stop) {
    const int64_t G = K / group;
    for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
        const int tm = (int)(M - m0 < TILE_M ? M - m0 : TILE_M);
        const int32_t *xp = xpairs + (m0 / TILE_M) * (K / 2) * TILE_M;
        const float *xs = xsum + m0 * G;
        uint16_t *yb = y + m0 * N;
        for (int64_t tile = tile_start; tile < tile_stop; tile++) {
            const int64_t n0 = tile * TILE_N;
            const int64_t next_rows = tile + 1 < tile_stop ? TILE_N : 0; /* the caller's share only */
            switch (tm) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
                TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
                TILE_CASE(13) TILE_CASE(14) TILE_CASE(15) TILE_CASE(16)
            }
        }
    }
}

/* ---- many tokens: a blocked GEMM over dequantized panels ------------------------------------------
 *
 * The fused kernel above widens every code once per block of TILE_M tokens; with hundreds of tokens
 * that repeated unpacking, not the dot products, sets its speed. Here each weight element is
 * dequantized once per call, into a panel that stays in cache while every token block runs over it
 * (the loop order of a Goto-style GEMM):
 *
 *   for each block of BLOCKED_NC outputs (the caller's share, BLOCKED_NC at a time):
 *     for each slab of KC inputs:
 *       panels = bf16 W_hat[outputs, slab] as [panel][KC/2][32 dwords]        (L2: BLOCKED_NC * KC * 2 bytes)
 *       for each chunk of MC_BLOCKS token blocks:                             (L2: 168 * KC * 2 bytes of x)
 *         for each panel of PANEL_N = 32 outputs:                             (L1/L2: KC * 64 bytes)
 *           for each block of <= MR tokens:  acc[MR][2] (+)= x[tokens, slab] . panel     (registers)
 *
 * Float32 sums carry across slabs in `cbuf` ([M][BLOCKED_NC]); the last slab writes bf16 y. W_hat is rounded
 * to bf16 once (the float32 q * s - zs, rounded to nearest even), so this path equals x @ bf16(W_hat).T
 * up to the order of float32 additions. x comes from qdlm_bf16_pairs (blocks of up to MR tokens). */

#define MR 14        /* tokens per micro-tile: 14 x 2 accumulators + 2 panel registers of 32 */
#define PANEL_N 32   /* outputs per panel: two zmm of float32 lanes */
#ifndef KC
#define KC 512       /* inputs per slab: a 32-output panel is 32 KiB, a block of x 14 KiB */
#endif
#ifndef NC
#define NC 256       /* outputs per block of the AMX kernels: 256 KiB of bf16 panels per slab, in L2 */
#endif
#ifndef BLOCKED_NC
/* outputs per block of the AVX-512 kernel: 768 KiB of panels per slab, in a 1 MiB L2. Every block
 * reads all of x once, so wider blocks read it fewer times; at 1024 tokens x no longer stays in L3
 * when K is 12288 (24 MiB of bf16 beside the weight's stream). AMD EPYC Zen 5, 1 thread, 1024 x
 * 12288 -> 4096: 256 outputs ran at 1.17x the dense bf16 time, 512 at 1.05-1.08x, 768 at 1.04x,
 * 1024 (panels spilling L2) at 1.04x with 256 tokens 1.07x slower; 256 tokens unchanged at 768. */
#define BLOCKED_NC 768
#endif
#ifndef MC_BLOCKS
#define MC_BLOCKS 12 /* token blocks run over all of a slab's panels in turn: 168 x KC bf16 of x, in L2 */
#endif

/* The blocked kernel's sizes, asked for by the caller rather than copied: tokens per block of
 * qdlm_bf16_pairs, and the scratch bytes of one thread (cbuf, then wbuf). */
int64_t qdlm_int4_blocked_mr(void) { return MR; }
int64_t qdlm_int4_blocked_scratch(int64_t M) { return M * BLOCKED_NC * 4 + BLOCKED_NC * KC * 2; }

/* The blocked kernel's token blocks: ceil(M / MR) of them, block b holding tokens
 * [block_start(b), block_start(b + 1)), sizes differing by at most one (256 tokens: 13s and 14s, not
 * 18 x 14 + 4). */
static inline int64_t token_blocks(int64_t M) { return (M + MR - 1) / MR; }
static inline int64_t block_start(int64_t b, int64_t M) { return b * M / token_blocks(M); }

/* The blocked kernel's activations: xpairs[b] = pair_block of token block b (MR slots). */
void qdlm_bf16_pairs(const uint16_t *x, int64_t M, int64_t K, int32_t *xpairs) {
    for (int64_t b = 0; b < token_blocks(M); b++)
        pair_block(x, K, block_start(b, M), block_start(b + 1, M) - block_start(b, M), MR, 0, xpairs + b * (K / 2) * MR);
}

/* Panels of W_hat[n0 : n0 + 16 * tiles, k0 : k0 + kc] as bf16 pairs: panel[(p * 2 + j) * 16 + lane] is
 * (W_hat[n, k0 + 2p], W_hat[n, k0 + 2p + 1]) for n = n0 + 16 j + lane (j = 0, 1 within a panel of 32). */
static void dequant_panels(const uint8_t *codes, int64_t row_stride, int64_t N, const float *s, const float *zs,
                           int64_t group, int64_t n0, int64_t tiles, int64_t k0, int64_t kc, int32_t *panels) {
    /* interleave two 16-word halves: word i of the result is lo[i / 2] for even i, hi[i / 2] for odd */
    uint16_t idx[32];
    for (int i = 0; i < 32; i++) idx[i] = (uint16_t)((i & 1) * 16 + i / 2);
    const __m512i interleave = _mm512_loadu_si512(idx);
    const __m512i nib = _mm512_set1_epi32(0x0F);
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t n = n0 + tile * 16;
        int32_t *panel = panels + (tile / 2) * kc * PANEL_N / 2 + (tile % 2) * 16;
        const int64_t width = (tile / 2) * 2 + 2 <= tiles ? 2 : 1; /* tiles in this panel */
        for (int64_t kk = 0; kk < kc; kk += CHUNK_K) {
            __m512i chunk[16];
            for (int j = 0; j < 16; j++) chunk[j] = _mm512_loadu_si512(codes + (n + j) * row_stride + (k0 + kk) / 2);
            transpose16(chunk); /* chunk[c]: codes k0 + kk + 8c .. + 7 of the 16 rows */
            for (int c = 0; c < 16; c++) {
                const int64_t g = (k0 + kk + 8 * c) / group;
                const __m512 sv = _mm512_loadu_ps(s + g * N + n), zv = _mm512_loadu_ps(zs + g * N + n);
                for (int b = 0; b < 4; b++) {
                    const __m512i sh = _mm512_srli_epi32(chunk[c], 8 * b);
                    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(sh, nib));
                    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(sh, 4), nib));
                    const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmsub_ps(q1, sv, zv), _mm512_fmsub_ps(q0, sv, zv));
                    const int64_t p = (kk + 8 * c + 2 * b) / 2;
                    _mm512_storeu_si512(panel + p * 16 * width, _mm512_permutexvar_epi16(interleave, words));
                }
            }
        }
    }
}

/* acc[t][j] (+)= x[t, slab] . panel tile j, for t < mr tokens and j < nt tiles; then to cbuf or y. */
static inline __attribute__((always_inline)) void micro_tile(
    const int32_t *xp, const int32_t *panel, int64_t kc, float *c, int64_t ldc, int first, uint16_t *y, int64_t ldy,
    const int mr, const int nt) {
    __m512 acc[MR][2];
    for (int t = 0; t < mr; t++)
        for (int j = 0; j < nt; j++) acc[t][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + t * ldc + 16 * j);
    for (int64_t p = 0; p < kc / 2; p++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 16 * nt);
        const __m512bh w1 = nt == 2 ? (__m512bh)_mm512_loadu_si512(panel + p * 32 + 16) : w0;
        for (int t = 0; t < mr; t++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[p * MR + t]);
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], xv, w0);
            if (nt == 2) acc[t][1] = _mm512_dpbf16_ps(acc[t][1], xv, w1);
        }
    }
    for (int t = 0; t < mr; t++)
        for (int j = 0; j < nt; j++) {
            if (y) _mm256_storeu_si256((__m256i *)(y + t * ldy + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[t][j]));
            else _mm512_storeu_ps(c + t * ldc + 16 * j, acc[t][j]);
        }
}

/* The next slab's codes (KC / 128 lines per row, rows 2 KiB and more apart) are fetched into L2 while
 * the token blocks run over this one; read on demand they cost more than the widening. */
static inline void prefetch_next_slab(const uint8_t *codes, int64_t row_stride, int64_t K, int64_t nb, int64_t k0,
                                      int64_t n_stop, int64_t nc) {
    const int64_t next_k = k0 + KC < K ? k0 + KC : 0, next_nb = k0 + KC < K ? nb : nb + nc;
    const int64_t next_rows = next_nb >= n_stop ? 0 : (n_stop - next_nb < nc ? n_stop - next_nb : nc);
    const int64_t next_bytes = (K - next_k < KC ? K - next_k : KC) / 2;
    for (int64_t r = 0; r < next_rows; r++) {
        const char *row = (const char *)codes + (next_nb + r) * row_stride + next_k / 2;
        for (int64_t b = 0; b < next_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
    }
}

#define MICRO_CASE(T) \
    case T: if (nt == 2) micro_tile(xp, panel, kc, c, nc, first, yt, N, T, 2); \
            else micro_tile(xp, panel, kc, c, nc, first, yt, N, T, 1); break;

/* y[:, n_start : n_stop] of y = x @ W_hat.T (bf16 [M, N]), x from qdlm_bf16_pairs.
 * scratch: qdlm_int4_blocked_scratch(M) bytes, 64-byte aligned, per thread. Needs N, n_start and
 * n_stop multiples of 16, K % 128 == 0, group % 8 == 0 and group dividing 128 or a multiple
 * of it (as the fused kernel). */
void qdlm_int4_gemm_blocked(const int32_t *xpairs, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride,
                            int64_t N, const float *s, const float *zs, int64_t group, uint16_t *y,
                            int64_t n_start, int64_t n_stop, void *scratch) {
    const int64_t nc = BLOCKED_NC;
    float *cbuf = (float *)scratch;
    int32_t *wbuf = (int32_t *)((char *)scratch + M * nc * 4);
    for (int64_t nb = n_start; nb < n_stop; nb += nc) {
        const int64_t width = n_stop - nb < nc ? n_stop - nb : nc, tiles = width / 16;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            const int first = k0 == 0, last = k0 + kc == K;
            dequant_panels(codes, row_stride, N, s, zs, group, nb, tiles, k0, kc, wbuf);
            prefetch_next_slab(codes, row_stride, K, nb, k0, n_stop, nc);
            const int64_t blocks = token_blocks(M);
            for (int64_t b0 = 0; b0 < blocks; b0 += MC_BLOCKS)
            for (int64_t pn = 0; pn < width; pn += PANEL_N) {
                const int nt = width - pn >= PANEL_N ? 2 : 1;
                const int32_t *panel = wbuf + (pn / PANEL_N) * kc * PANEL_N / 2;
                for (int64_t b = b0; b < blocks && b < b0 + MC_BLOCKS; b++) {
                    const int64_t m0 = block_start(b, M);
                    const int mr = (int)(block_start(b + 1, M) - m0);
                    const int32_t *xp = xpairs + b * (K / 2) * MR + (k0 / 2) * MR;
                    float *c = cbuf + m0 * nc + pn;
                    uint16_t *yt = last ? y + m0 * N + nb + pn : 0;
                    switch (mr) {
                        MICRO_CASE(1) MICRO_CASE(2) MICRO_CASE(3) MICRO_CASE(4) MICRO_CASE(5) MICRO_CASE(6)
                        MICRO_CASE(7) MICRO_CASE(8) MICRO_CASE(9) MICRO_CASE(10) MICRO_CASE(11) MICRO_CASE(12)
                        MICRO_CASE(13) MICRO_CASE(14)
                    }
                }
            }
        }
    }
}

/* Per-token symmetric quantization of bf16 rows (the activations of W8A8 / W4A4), in the float32
 * operations of the torch backend (kernels/int8.py, _quantize_rows) and in its order, so the codes are
 * the same bit for bit: scale = (amax * clip) / qmax, inv = 1 / scale (0 for an all-zero row),
 * q = clamp(copysign(floor(|x * inv| + 0.5), x * inv), -qmax, qmax). One read for the maximum, one for
 * the codes; torch's version makes several passes with float32 temporaries. */
static inline __m512 bf16x16_to_ps(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* 16 values of row m from k (masked) as float32: bf16 rows (bf16 != 0) or float32 rows. */
static inline __m512 row_ps(const void *x, int bf16, int64_t m, int64_t K, int64_t k, __mmask16 mk) {
    return bf16 ? bf16x16_to_ps((const uint16_t *)x + m * K + k, mk) : _mm512_maskz_loadu_ps(mk, (const float *)x + m * K + k);
}

static void quantize_rows(const void *x, int bf16, int64_t M, int64_t K, float clip, float qmax, int8_t *q, float *scale) {
    const __m512 half = _mm512_set1_ps(0.5f), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int64_t m = 0; m < M; m++) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(row_ps(x, bf16, m, K, k, mk)));
        }
        const float s = (_mm512_reduce_max_ps(amax) * clip) / qmax;
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        scale[m] = s;
        const __m512 iv = _mm512_set1_ps(inv);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_mul_ps(row_ps(x, bf16, m, K, k, mk), iv);
            __m512 r = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(v), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            r = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(v), sign)));
            r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
            _mm_mask_storeu_epi8(q + m * K + k, mk, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
        }
    }
}

void qdlm_quantize_rows_bf16(const uint16_t *x, int64_t M, int64_t K, float clip, float qmax, int8_t *q, float *scale) {
    quantize_rows(x, 1, M, K, clip, qmax, q, scale);
}

/* The same for float32 rows (the loader's online transforms output float32). */
void qdlm_quantize_rows_f32(const float *x, int64_t M, int64_t K, float clip, float qmax, int8_t *q, float *scale) {
    quantize_rows(x, 0, M, K, clip, qmax, q, scale);
}

/* Write back and drop from every cache level the lines of [p, p + bytes): the benchmark's cold-weight
 * timing (a model's weights do not fit in cache, so each linear reads its weight from memory). Every
 * CPU with AVX-512 has CLFLUSHOPT. */
__attribute__((target("clflushopt"))) void qdlm_evict(void *p, int64_t bytes) {
    char *start = (char *)((uintptr_t)p & ~(uintptr_t)63);
    for (char *line = start; line < (char *)p + bytes; line += 64) _mm_clflushopt(line);
    _mm_sfence();
}

/* In place, each of `rows` contiguous float32 rows of p (a power of two) becomes x @ S_p (Sylvester,
 * unnormalised) by the butterflies of core/hadamard.py's reference, level h = 1, 2, ..., p/2:
 * x[j + i], x[j + i + h] <- x[j + i] + x[j + i + h], x[j + i] - x[j + i + h]. The same additions in the
 * same levels, so the same float32 results bit for bit; a row stays in the L1 cache for all its levels
 * where the reference makes log2(p) passes over memory. Levels 1-8 run inside 16-float vectors: the
 * partner of lane e is lane e ^ h, and a lane with bit h set takes partner - self (a - b). */
static void fwht_row(float *x, int64_t p) {
    if (p < 16) {
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t j = 0; j < p; j += 2 * h)
                for (int64_t i = j; i < j + h; i++) {
                    const float a = x[i], b = x[i + h];
                    x[i] = a + b;
                    x[i + h] = a - b;
                }
        return;
    }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t k = 0; k < p; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        for (int h = 1; h < 16; h *= 2) {
            const __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(h)), v);
            const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), upper, partner, v);
        }
        _mm512_storeu_ps(x + k, v);
    }
    for (int64_t h = 16; h < p; h *= 2)
        for (int64_t j = 0; j < p; j += 2 * h)
            for (int64_t i = j; i < j + h; i += 16) {
                const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + h);
                _mm512_storeu_ps(x + i, _mm512_add_ps(a, b));
                _mm512_storeu_ps(x + i + h, _mm512_sub_ps(a, b));
            }
}

void qdlm_fwht_rows_f32(float *x, int64_t rows, int64_t p) {
    for (int64_t r = 0; r < rows; r++) fwht_row(x + r * p, p);
}

/* ---------------------------------------------------------------------------------------------
 * W8A8 and W4A4 with few tokens on AVX512-VNNI (CPUs without AMX: AMD EPYC Zen 4/5, Xeons before
 * Sapphire Rapids), from the checkpoint's per-channel codes as they are stored:
 *
 *   y[m, n] = float(sum_k a[m, k] * (q[n, k] - z[n])) * a_scale[m] * b_scale[n]
 *
 * VPDPBUSD multiplies unsigned bytes by signed bytes, four products into each int32 lane, so the codes
 * go in as they are: sum_k a * q, then minus z[n] * sum_k a (once per token). Both sums wrap modulo
 * 2^32 and their difference is exact, since |sum a * (q - z)| <= 127 * 128 * K < 2^31 for K < 132 000;
 * the float32 products are the torch backend's, in its order, so the outputs agree bit for bit.
 * 8-bit codes are bytes (z = 128 for a symmetric weight). A byte of 4-bit codes holds inputs 2j (low
 * nibble) and 2j + 1 (high); a, prepared by the caller, holds each 128 inputs as their 64 even ones
 * then their 64 odd ones, so one mask (and one shift) gives the codes in a's order.
 * Each weight row is read once per call, 64 bytes at a time, with no layout made: a block of VNNI_NR
 * rows stays in L1 while every block of VNNI_MB tokens runs over it, and each of the
 * VNNI_NR x VNNI_MB sums is added across its 16 lanes at the end of the row. With hundreds of tokens
 * torch._int_mm (oneDNN) is faster; the caller picks.
 * ------------------------------------------------------------------------------------------- */
#define VNNI_NR 4   /* weight rows a block: 4 x 6 sums + 4 rows + 1 token = 29 zmm */
#define VNNI_MB 6   /* tokens a block */
#define VNNI_MAX_M 64 /* tokens a pass over the weight (the token sums live on the stack) */

int qdlm_vnni_ready(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
}

/* The 64 bytes of a row from byte `at` (masked to the row's `bytes`). */
__attribute__((target("avx512vnni,avx512bw"))) static inline __attribute__((always_inline)) __m512i
row_bytes(const uint8_t *row, int64_t at, int64_t bytes) {
    const __mmask64 mask = bytes - at >= 64 ? ~(__mmask64)0 : (~(__mmask64)0) >> (64 - (bytes - at));
    return _mm512_maskz_loadu_epi8(mask, row + at);
}

/* Sums of rows[r] . xs[t] for r < VNNI_NR, t < mb: 8-bit codes over K inputs, or 4-bit codes over
 * K inputs in steps of 128 (a's rows hold a multiple of 128, zero past K). */
__attribute__((target("avx512vnni,avx512bw"))) static inline __attribute__((always_inline)) void vnni_block(
    const uint8_t *const rows[VNNI_NR], const int8_t *const xs[VNNI_MB], int64_t K, const int bits,
    int32_t sums[VNNI_MB][VNNI_NR], const int mb) {
    __m512i acc[VNNI_MB][VNNI_NR];
    for (int t = 0; t < mb; t++)
        for (int r = 0; r < VNNI_NR; r++) acc[t][r] = _mm512_setzero_si512();
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const int64_t step = bits == 8 ? 64 : 128, row_len = bits == 8 ? K : (K + 1) / 2;
    for (int64_t k = 0; k < K; k += step)
        for (int half = 0; half < (bits == 8 ? 1 : 2); half++) { /* 4 bits: even inputs, then odd */
            __m512i w[VNNI_NR];
            for (int r = 0; r < VNNI_NR; r++) {
                const __m512i b = row_bytes(rows[r], bits == 8 ? k : k / 2, row_len);
                w[r] = bits == 8 ? b : _mm512_and_si512(half ? _mm512_srli_epi16(b, 4) : b, nibble);
            }
            for (int t = 0; t < mb; t++) {
                const __m512i xv = bits == 8 ? row_bytes((const uint8_t *)xs[t], k, K)
                                             : _mm512_loadu_si512(xs[t] + k + 64 * half);
                for (int r = 0; r < VNNI_NR; r++) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], w[r], xv);
            }
        }
    for (int t = 0; t < mb; t++)
        for (int r = 0; r < VNNI_NR; r++) sums[t][r] = _mm512_reduce_add_epi32(acc[t][r]);
}

#define VNNI_CASE(T) case T: \
    if (bits == 8) vnni_block(rows, xs, K, 8, sums, T); else vnni_block(rows, xs, K, 4, sums, T); break;

/* y[:, n_start : n_stop] (float32 [M, N]) as above. a: int8 [M, lda] (8 bits: lda = K; 4 bits: K
 * rounded up to 128, in the order above); codes: rows row_stride bytes apart; zeros: int8 [N], or NULL
 * for a symmetric weight; a_scale [M], b_scale [N]. A last block of fewer rows runs on a repeated row,
 * not stored; a last block of fewer tokens runs as a narrower block. */
__attribute__((target("avx512vnni,avx512bw"))) void qdlm_int_gemm_vnni(
    const int8_t *a, int64_t M, int64_t K, int64_t lda, const uint8_t *codes, int64_t row_stride, int64_t bits,
    const int8_t *zeros, int64_t N, const float *a_scale, const float *b_scale, float *y, int64_t n_start,
    int64_t n_stop) {
    const uint32_t symmetric_zero = bits == 8 ? 128u : 8u;
    for (int64_t p0 = 0; p0 < M; p0 += VNNI_MAX_M) {
        const int64_t pm = M - p0 < VNNI_MAX_M ? M - p0 : VNNI_MAX_M;
        uint32_t asum[VNNI_MAX_M];
        for (int64_t t = 0; t < pm; t++) {
            int64_t s = 0;
            for (int64_t k = 0; k < lda; k++) s += a[(p0 + t) * lda + k];
            asum[t] = (uint32_t)s;
        }
        for (int64_t n0 = n_start; n0 < n_stop; n0 += VNNI_NR) {
            const uint8_t *rows[VNNI_NR];
            for (int r = 0; r < VNNI_NR; r++) rows[r] = codes + (n0 + r < n_stop ? n0 + r : n0) * row_stride;
            if (n0 + 2 * VNNI_NR <= n_stop) /* the next block's rows, into L2 while this one runs */
                for (int r = 0; r < VNNI_NR; r++)
                    for (int64_t k = 0; k < K * bits / 8; k += 64)
                        _mm_prefetch((const char *)rows[r] + VNNI_NR * row_stride + k, _MM_HINT_T1);
            for (int64_t m0 = 0; m0 < pm; m0 += VNNI_MB) {
                const int mb = (int)(pm - m0 < VNNI_MB ? pm - m0 : VNNI_MB);
                const int8_t *xs[VNNI_MB];
                for (int t = 0; t < mb; t++) xs[t] = a + (p0 + m0 + t) * lda;
                int32_t sums[VNNI_MB][VNNI_NR];
                switch (mb) { VNNI_CASE(1) VNNI_CASE(2) VNNI_CASE(3) VNNI_CASE(4) VNNI_CASE(5) VNNI_CASE(6) }
                for (int t = 0; t < mb; t++)
                    for (int r = 0; r < VNNI_NR && n0 + r < n_stop; r++) {
                        const uint32_t z = zeros ? (uint32_t)(int32_t)zeros[n0 + r] : symmetric_zero;
                        const int32_t exact = (int32_t)((uint32_t)sums[t][r] - z * asum[m0 + t]);
                        y[(p0 + m0 + t) * N + n0 + r] = (float)exact * a_scale[p0 + m0 + t] * b_scale[n0 + r];
                    }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The blocked GEMM on AMX (Intel Xeon since Sapphire Rapids): the same bf16 panels, multiplied by the
 * tile unit (TDPBF16PS: a 16 x 32 bf16 block of x times a 32 x 16 block of W_hat.T per instruction)
 * instead of vdpbf16ps. On such CPUs the dense bf16 GEMM (oneDNN) runs on AMX, 3-8 times faster than
 * the AVX-512 loop above, so only AMX can keep an int4 GEMM near it. A panel is already the tile
 * unit's B layout: row p holds the pairs (W_hat[n, 2p], W_hat[n, 2p + 1]) of 16 outputs n.
 *
 * Tiles: 0-3 the float32 sums of 32 tokens x 32 outputs, 4-5 two 16-token blocks of x, 6-7 two
 * 16-output blocks of the panel. Linux hands out the tile registers per process on request
 * (arch_prctl), which qdlm_amx_ready makes.
 * ------------------------------------------------------------------------------------------- */
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12)
#include <cpuid.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MB 32 /* tokens per block: two tiles of 16 rows */
#ifndef AMX_MC
#define AMX_MC 128 /* tokens run over a slab's panels in turn (Xeon, 1 thread: 256 and 512 were 1.2-1.4x slower at M = 1024) */
#endif

int qdlm_amx_ready(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return 0; /* AMX-BF16, AMX-TILE */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

int64_t qdlm_int4_amx_scratch(int64_t M, int64_t K) {
    const int64_t mpad = (M + AMX_MB - 1) / AMX_MB * AMX_MB;
    return mpad * NC * 4 + NC * KC * 2 + AMX_MB * K * 2;
}

__attribute__((target("amx-tile"))) static void amx_config(void) {
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1; /* palette 1 */
    for (int t = 0; t < 8; t++) {
        ((uint16_t *)(cfg + 16))[t] = 64; /* every tile: 16 rows of 64 bytes */
        cfg[48 + t] = 16;
    }
    _tile_loadconfig(cfg);
}

/* sums[0:16 * mt, 0:16 * nt] (+)= x block . panel over kc inputs: mt token tiles of 16 (1 when the
 * block holds no more than 16 real tokens: a few-token call then does half the tile products), nt
 * panel tiles (1 or 2), x rows ldx apart */
__attribute__((target("amx-tile,amx-bf16"))) static void amx_block(
    const uint16_t *xb, int64_t ldx, const int32_t *panel, int64_t kc, int mt, int nt, float *c, int64_t ldc,
    int first) {
    const int64_t ldb = 64 * nt; /* bytes between panel rows */
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, c, ldc * 4);
        if (mt == 2) _tile_loadd(2, c + 16 * ldc, ldc * 4);
        if (nt == 2) _tile_loadd(1, c + 16, ldc * 4);
        if (nt == 2 && mt == 2) _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
    }
    for (int64_t kk = 0; kk < kc; kk += 32) {
        _tile_loadd(4, xb + kk, ldx * 2);
        _tile_loadd(6, panel + (kk / 2) * 16 * nt, ldb);
        _tile_dpbf16ps(0, 4, 6);
        if (mt == 2) {
            _tile_loadd(5, xb + 16 * ldx + kk, ldx * 2);
            _tile_dpbf16ps(2, 5, 6);
        }
        if (nt == 2) {
            _tile_loadd(7, panel + (kk / 2) * 16 * nt + 16, ldb);
            _tile_dpbf16ps(1, 4, 7);
            if (mt == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, ldc * 4);
    if (mt == 2) _tile_stored(2, c + 16 * ldc, ldc * 4);
    if (nt == 2) _tile_stored(1, c + 16, ldc * 4);
    if (nt == 2 && mt == 2) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* As qdlm_int4_gemm_blocked, on AMX: x is the bf16 [M, K] activations themselves (row-major), y bf16
 * [M, N]; scratch: qdlm_int4_amx_scratch(M, K) bytes, per thread. Same shape rules, and K % 32 == 0. */
__attribute__((target("amx-tile,amx-bf16"))) void qdlm_int4_gemm_amx(
    const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride, int64_t N, const float *s,
    const float *zs, int64_t group, uint16_t *y, int64_t n_start, int64_t n_stop, void *scratch) {
    const int64_t nc = NC, mpad = (M + AMX_MB - 1) / AMX_MB * AMX_MB, full = M / AMX_MB * AMX_MB;
    float *cbuf = (float *)scratch;
    int32_t *wbuf = (int32_t *)((char *)scratch + mpad * nc * 4);
    uint16_t *xtail = (uint16_t *)((char *)wbuf + nc * KC * 2); /* the last partial block, zero-padded */
    if (full < M) {
        memset(xtail, 0, AMX_MB * K * 2);
        memcpy(xtail, x + full * K, (M - full) * K * 2);
    }
    amx_config();
    for (int64_t nb = n_start; nb < n_stop; nb += nc) {
        const int64_t width = n_stop - nb < nc ? n_stop - nb : nc, tiles = width / 16;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            dequant_panels(codes, row_stride, N, s, zs, group, nb, tiles, k0, kc, wbuf);
            prefetch_next_slab(codes, row_stride, K, nb, k0, n_stop, nc);
            /* AMX_MC tokens at a time over all panels: their slab of x (AMX_MC x KC bf16) and sums stay in L2 */
            for (int64_t mc = 0; mc < mpad; mc += AMX_MC)
            for (int64_t pn = 0; pn < width; pn += PANEL_N) {
                const int nt = width - pn >= PANEL_N ? 2 : 1;
                const int32_t *panel = wbuf + (pn / PANEL_N) * kc * PANEL_N / 2;
                for (int64_t m0 = mc; m0 < mpad && m0 < mc + AMX_MC; m0 += AMX_MB) {
                    const uint16_t *xb = m0 < full ? x + m0 * K + k0 : xtail + k0;
                    amx_block(xb, K, panel, kc, M - m0 > 16 ? 2 : 1, nt, cbuf + m0 * nc + pn, nc, k0 == 0);
                }
            }
        }
        for (int64_t m = 0; m < M; m++) /* float32 sums to bf16 (round to nearest even) */
            for (int64_t j = 0; j < width; j += 16)
                _mm256_storeu_si256((__m256i *)(y + m * N + nb + j),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(cbuf + m * nc + j)));
    }
    _tile_release();
}

/* ---- few tokens on AMX: the codes themselves on the tiles, each group's scale on the tile sums ----
 *
 * With few tokens the blocked kernel's cost is the dequantization of every weight (float32 q * s - zs,
 * rounded to bf16), not the tile products. Here a code q becomes the bf16 number 128 + q by one OR
 * (0x4300 | q: exponent 2^7, q in the low mantissa bits), exact, and the product runs the other way
 * round: the weights are the tile unit's A operand (16 outputs x 32 inputs, one row per output, so a
 * row's codes need no transpose) and the activations its B operand (pairs of inputs x 16 tokens).
 * Per group g of inputs, with T[n, m] = sum_{k in g} (128 + q[n, k]) x[m, k] from the tiles:
 *
 *     y[m, n] = sum_g  s[g, n] T[n, m]  -  (zs[g, n] + 128 s[g, n]) xsum[m, g]
 *
 * Inside a tile row of 32 inputs the order is permuted so that one shift and one mask unpack it: the
 * 16 bytes of the row's codes, broadcast to the four 128-bit lanes and shifted by 4 * lane, give in
 * dword 4 * lane + c the codes of inputs 8c + lane (low half) and 8c + 4 + lane (high half).
 * qdlm_int4_amxi_prepare_x lays the activations out in the same order.
 *
 * Tiles: 0-3 the sums of 32 outputs x 32 tokens (output block a, token block t: tile 2a + t), 4-5 two
 * 16-output blocks of codes, 6-7 two 16-token blocks of x. */
#define AMXI_STEPS 4  /* 32-input steps unpacked at a time (8 KiB of bf16 codes for 32 outputs) */

int64_t qdlm_int4_amxi_x_words(int64_t M, int64_t K) { return (K / 32) * ((M + 15) / 16) * 256; }
int64_t qdlm_int4_amxi_scratch(int64_t M) { return 2 * AMXI_STEPS * 1024 + 4 * 1024 + 32 * ((M + 15) / 16 * 16) * 4; }

/* xb[((step * mt + t) * 16 + r) * 16 + lane] = the bf16 pair (x[16t + lane, 32 step + 8c + L],
 * x[16t + lane, 32 step + 8c + 4 + L]) with r = 4L + c, zero for padding tokens; xsum[g * 16 mt + m] =
 * the float32 sum of x[m, k] over group g. */
void qdlm_int4_amxi_prepare_x(const uint16_t *x, int64_t M, int64_t K, int64_t group, int32_t *xb, float *xsum) {
    const int64_t mt = (M + 15) / 16, steps = K / 32, G = K / group;
    for (int64_t st = 0; st < steps; st++)
        for (int64_t t = 0; t < mt; t++)
            for (int r = 0; r < 16; r++) {
                const int64_t k = 32 * st + 8 * (r % 4) + r / 4;
                int32_t *row = xb + ((st * mt + t) * 16 + r) * 16;
                for (int lane = 0; lane < 16; lane++) {
                    const int64_t m = 16 * t + lane;
                    row[lane] = m < M ? (int32_t)((uint32_t)x[m * K + k] | (uint32_t)x[m * K + k + 4] << 16) : 0;
                }
            }
    for (int64_t g = 0; g < G; g++)
        for (int64_t m = 0; m < 16 * mt; m++) {
            float acc = 0.0f;
            if (m < M)
                for (int64_t k = g * group; k < (g + 1) * group; k++) acc += bf16_to_float(x[m * K + k]);
            xsum[g * 16 * mt + m] = acc;
        }
}

/* One 32-input step of 16 outputs' codes as a tile of bf16 128 + q (rows 64 bytes apart). */
static inline __attribute__((always_inline)) void amxi_codes(const uint8_t *codes, int64_t row_stride, int32_t *tile) {
    const __m512i shift = _mm512_set_epi32(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i mask = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
    for (int r = 0; r < 16; r++) {
        const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(codes + r * row_stride)));
        /* (v >> shift) & mask | bias */
        _mm512_storeu_si512(tile + 16 * r, _mm512_ternarylogic_epi32(_mm512_srlv_epi32(v, shift), mask, bias, 0xEA));
    }
}

/* Cold weights (a model's do not fit in cache) are fetched for the next block of 32 outputs while this
 * one computes; on demand the reads did not overlap the tile work (4096 x 4096, M = 1: 0.96 ms warm,
 * 1.9 ms cold). Its codes go in memory order, a share per batch of this block (the L2 streamer follows
 * sequential misses, not the tile loop's 32 interleaved rows), and its scales, one group's N floats
 * apart and out of the streamer's reach, at the block's start. Cold with both: 1.65-1.75 ms. */

/* y[:, n_start : n_stop] of y = x @ W_hat.T, x from qdlm_int4_amxi_prepare_x;
 * scratch: qdlm_int4_amxi_scratch(M) bytes per thread. N, n_start, n_stop multiples of 16, group % 32 == 0.
 * Each batch of up to AMXI_STEPS steps is unpacked once and run for every pair of token tiles; its tile
 * sums are scaled by s into float32 sums right away (so a tile never spans batches), and the zero-point
 * term once per group. */
__attribute__((target("amx-tile,amx-bf16"))) void qdlm_int4_gemm_amxi(
    const int32_t *xb, const float *xsum, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride,
    int64_t N, const float *s, const float *zs, int64_t group, uint16_t *y, int64_t n_start, int64_t n_stop,
    void *scratch) {
    const int64_t mt = (M + 15) / 16, mp = 16 * mt, per_group = group / 32, steps = K / 32;
    int64_t batch = AMXI_STEPS; /* steps unpacked at a time: the most, up to AMXI_STEPS, that divide a group */
    while (per_group % batch) batch--;
    int32_t *wt = (int32_t *)scratch;                                  /* [step][output block][16][16] */
    float *sums = (float *)((char *)scratch + 2 * AMXI_STEPS * 1024); /* tile 2a + t: 16 x 16 */
    float *acc = sums + 4 * 256;                                       /* [32 outputs][mp tokens] */
    amx_config();
    for (int64_t n0 = n_start; n0 < n_stop; n0 += 32) {
        const int na = n_stop - n0 >= 32 ? 2 : 1, next = n0 + 32 < n_stop;
        memset(acc, 0, 32 * mp * 4);
        if (next) /* the next block's scales */
            for (int64_t gg = 0; gg < K / group; gg++) {
                _mm_prefetch((const char *)(s + gg * N + n0 + 32), _MM_HINT_T0);
                _mm_prefetch((const char *)(s + gg * N + n0 + 48), _MM_HINT_T0);
                _mm_prefetch((const char *)(zs + gg * N + n0 + 32), _MM_HINT_T0);
                _mm_prefetch((const char *)(zs + gg * N + n0 + 48), _MM_HINT_T0);
            }
        for (int64_t st0 = 0; st0 < steps; st0 += batch) {
            const int64_t g = st0 / per_group, group_ends = (st0 + batch) % per_group == 0;
            if (next) { /* this batch's share of the next block's code lines, in memory order */
                const int64_t lines = (K / 2 + 63) / 64, total = 32 * lines, per = (total * batch + steps - 1) / steps;
                const int64_t first = st0 / batch * per;
                for (int64_t l = first; l < first + per && l < total; l++)
                    _mm_prefetch((const char *)codes + (n0 + 32 + l / lines) * row_stride + (l % lines) * 64, _MM_HINT_T0);
            }
            for (int64_t i = 0; i < batch; i++)
                for (int a = 0; a < na; a++)
                    amxi_codes(codes + (n0 + 16 * a) * row_stride + (st0 + i) * 16, row_stride, wt + (2 * i + a) * 256);
            for (int64_t t0 = 0; t0 < mt; t0 += 2) {
                const int two = t0 + 1 < mt;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t i = 0; i < batch; i++) {
                    const int32_t *xs = xb + ((st0 + i) * mt + t0) * 256;
                    _tile_loadd(4, wt + 2 * i * 256, 64);
                    _tile_loadd(6, xs, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two) { _tile_loadd(7, xs + 256, 64); _tile_dpbf16ps(1, 4, 7); }
                    if (na == 2) {
                        _tile_loadd(5, wt + (2 * i + 1) * 256, 64);
                        _tile_dpbf16ps(2, 5, 6);
                        if (two) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, sums, 64);
                if (two) _tile_stored(1, sums + 256, 64);
                if (na == 2) _tile_stored(2, sums + 512, 64);
                if (na == 2 && two) _tile_stored(3, sums + 768, 64);
                for (int a = 0; a < na; a++)
                    for (int r = 0; r < 16; r++) {
                        const int64_t n = n0 + 16 * a + r;
                        const __m512 sv = _mm512_set1_ps(s[g * N + n]);
                        const __m512 zv = _mm512_set1_ps(group_ends ? zs[g * N + n] + 128.0f * s[g * N + n] : 0.0f);
                        for (int t = 0; t <= two; t++) {
                            float *o = acc + (16 * a + r) * mp + 16 * (t0 + t);
                            const __m512 v = _mm512_fmadd_ps(sv, _mm512_loadu_ps(sums + (2 * a + t) * 256 + 16 * r), _mm512_loadu_ps(o));
                            _mm512_storeu_ps(o, _mm512_fnmadd_ps(zv, _mm512_loadu_ps(xsum + g * mp + 16 * (t0 + t)), v));
                        }
                    }
            }
        }
        for (int a = 0; a < na; a++) /* [outputs][tokens] -> y[tokens][outputs], rounded to bf16 */
            for (int64_t t = 0; t < mt; t++) {
                __m512i r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(acc + (16 * a + i) * mp + 16 * t);
                transpose16(r);
                for (int i = 0; i < 16 && 16 * t + i < M; i++)
                    _mm256_storeu_si256((__m256i *)(y + (16 * t + i) * N + n0 + 16 * a),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
            }
    }
    _tile_release();
}

/* ---- W8A8 on AMX: int8 activations x int8 weights (TDPBSSD), int32 sums, then the two scales ----
 * y[m, n] = (sum_k a[m, k] b[n, k]) * a_scale[m] * b_scale[n]  as float32. Each call lays a slab of
 * b out for the tile unit (row p of a panel: the 4 bytes b[n, k0 + 4p .. + 3] of 16 outputs n, by a
 * 16 x 16 dword transpose), as the int4 kernel dequantizes its panels. */
#define I8_KC 1024 /* inputs per slab: a 32-output panel is 32 KiB */
/* Up to I8_SMALL_M tokens the weight is read in longer runs per row: slabs of I8_SMALL_KC inputs of
 * I8_SMALL_NC outputs (Xeon, 1 thread, M = 16 at 12288 x 4096: 3.9-4.3 ms against 4.6-4.8 ms with the
 * 256 x 1024 slabs, and a narrower spread; at M = 256 and above the wide slabs win by 10-25 %, their
 * activations being read once per 256 outputs). */
#define I8_SMALL_M 64
#define I8_SMALL_NC 64
#define I8_SMALL_KC 4096
static inline int64_t int8_nc(int64_t M) { return M <= I8_SMALL_M ? I8_SMALL_NC : NC; }
static inline int64_t int8_kc(int64_t M) { return M <= I8_SMALL_M ? I8_SMALL_KC : I8_KC; }

int qdlm_amx_int8_ready(void) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25)) && qdlm_amx_ready(); /* AMX-INT8 */
}

int64_t qdlm_int8_amx_scratch(int64_t M, int64_t K) {
    const int64_t mpad = (M + AMX_MB - 1) / AMX_MB * AMX_MB;
    return mpad * int8_nc(M) * 4 + int8_nc(M) * int8_kc(M) + AMX_MB * K;
}

/* 64 int4 codes (32 bytes, byte j = codes 2j | 2j+1 << 4) as 64 signed bytes q - zero, in input order. */
static inline __m512i int4_as_int8(const uint8_t *p, int8_t zero) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); /* byte j in word j */
    const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(0x000F));
    const __m512i hi = _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F00));
    return _mm512_sub_epi8(_mm512_or_si512(lo, hi), _mm512_set1_epi8(zero));
}

/* How int8_panels reads weight rows (row_bytes apart): */
#define ROWS_INT8 0    /* int8 values as they are */
#define ROWS_INT4 1    /* packed int4 codes, which become q - zero[n] (zero 8 where zeros is NULL) */
#define ROWS_UINT8 2   /* 8-bit codes q of a symmetric weight (zero 128): q - 128 is q with its top bit flipped */

static void int8_panels(const uint8_t *b, int64_t row_bytes, int rows, const int8_t *zeros, int64_t n0,
                        int64_t tiles, int64_t k0, int64_t kc, int32_t *panels) {
    for (int64_t tile = 0; tile < tiles; tile++) {
        int32_t *panel = panels + (tile / 2) * (kc / 4) * PANEL_N + (tile % 2) * 16;
        const int64_t width = (tile / 2) * 2 + 2 <= tiles ? 2 : 1;
        for (int64_t kk = 0; kk < kc; kk += 64) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                const int64_t n = n0 + tile * 16 + j;
                if (rows == ROWS_INT4)
                    r[j] = int4_as_int8(b + n * row_bytes + (k0 + kk) / 2, zeros ? zeros[n] : 8);
                else {
                    r[j] = _mm512_loadu_si512(b + n * row_bytes + k0 + kk);
                    if (rows == ROWS_UINT8) r[j] = _mm512_xor_si512(r[j], _mm512_set1_epi8((char)0x80));
                }
            }
            transpose16(r); /* r[c]: bytes kk + 4c .. + 3 of the 16 rows */
            for (int c = 0; c < 16; c++) _mm512_storeu_si512(panel + (kk / 4 + c) * 16 * width, r[c]);
        }
    }
}

__attribute__((target("amx-tile,amx-int8"))) static void amx_int8_block(
    const int8_t *ab, int64_t lda, const int32_t *panel, int64_t kc, int nt, int32_t *c, int64_t ldc, int first) {
    const int64_t ldb = 64 * nt;
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, c, ldc * 4); _tile_loadd(2, c + 16 * ldc, ldc * 4);
        if (nt == 2) { _tile_loadd(1, c + 16, ldc * 4); _tile_loadd(3, c + 16 * ldc + 16, ldc * 4); }
    }
    for (int64_t kk = 0; kk < kc; kk += 64) {
        _tile_loadd(4, ab + kk, lda);
        _tile_loadd(5, ab + 16 * lda + kk, lda);
        _tile_loadd(6, panel + (kk / 4) * 16 * nt, ldb);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(2, 5, 6);
        if (nt == 2) {
            _tile_loadd(7, panel + (kk / 4) * 16 * nt + 16, ldb);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(3, 5, 7);
        }
    }
    _tile_stored(0, c, ldc * 4); _tile_stored(2, c + 16 * ldc, ldc * 4);
    if (nt == 2) { _tile_stored(1, c + 16, ldc * 4); _tile_stored(3, c + 16 * ldc + 16, ldc * 4); }
}

/* y[:, n_start : n_stop] (float32 [M, N]) of the W8A8 product; a int8 [M, K], b int8 [N, K], both
 * row-major; K % 64 == 0, N, n_start and n_stop multiples of 16; scratch qdlm_int8_amx_scratch(M, K)
 * bytes per thread. */
__attribute__((target("amx-tile,amx-int8"))) static void int8_gemm_amx(
    const int8_t *a, int64_t M, int64_t K, const uint8_t *b, int64_t row_bytes, int rows, const int8_t *zeros,
    int64_t N, const float *a_scale, const float *b_scale, float *y, int64_t n_start, int64_t n_stop, void *scratch) {
    const int64_t nc = int8_nc(M), slab = int8_kc(M), mpad = (M + AMX_MB - 1) / AMX_MB * AMX_MB;
    const int64_t full = M / AMX_MB * AMX_MB;
    int32_t *cbuf = (int32_t *)scratch;
    int32_t *wbuf = (int32_t *)((char *)scratch + mpad * nc * 4);
    int8_t *atail = (int8_t *)wbuf + nc * slab;
    if (full < M) {
        memset(atail, 0, AMX_MB * K);
        memcpy(atail, a + full * K, (M - full) * K);
    }
    amx_config(); /* the same 16 x 64-byte tiles */
    for (int64_t nb = n_start; nb < n_stop; nb += nc) {
        const int64_t width = n_stop - nb < nc ? n_stop - nb : nc, tiles = width / 16;
        for (int64_t k0 = 0; k0 < K; k0 += slab) {
            const int64_t kc = K - k0 < slab ? K - k0 : slab;
            int8_panels(b, row_bytes, rows, zeros, nb, tiles, k0, kc, wbuf);
            for (int64_t mc = 0; mc < mpad; mc += AMX_MC)
            for (int64_t pn = 0; pn < width; pn += PANEL_N) {
                const int nt = width - pn >= PANEL_N ? 2 : 1;
                const int32_t *panel = wbuf + (pn / PANEL_N) * (kc / 4) * PANEL_N;
                for (int64_t m0 = mc; m0 < mpad && m0 < mc + AMX_MC; m0 += AMX_MB) {
                    const int8_t *ab = m0 < full ? a + m0 * K + k0 : atail + k0;
                    amx_int8_block(ab, K, panel, kc, nt, cbuf + m0 * nc + pn, nc, k0 == 0);
                }
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const __m512 as = _mm512_set1_ps(a_scale[m]);
            for (int64_t j = 0; j < width; j += 16) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(cbuf + m * nc + j));
                _mm512_storeu_ps(y + m * N + nb + j, _mm512_mul_ps(_mm512_mul_ps(v, as), _mm512_loadu_ps(b_scale + nb + j)));
            }
        }
    }
    _tile_release();
}

__attribute__((target("amx-tile,amx-int8"))) void qdlm_int8_gemm_amx(
    const int8_t *a, int64_t M, int64_t K, const int8_t *b, int64_t N, const float *a_scale, const float *b_scale,
    float *y, int64_t n_start, int64_t n_stop, void *scratch) {
    int8_gemm_amx(a, M, K, (const uint8_t *)b, K, ROWS_INT8, 0, N, a_scale, b_scale, y, n_start, n_stop, scratch);
}

/* As qdlm_int8_gemm_amx with a W4A4 weight: per-channel int4 codes as the checkpoint packs them (rows
 * row_stride bytes apart), zeros int8 [N] or NULL (symmetric: 8). The same scratch. */
__attribute__((target("amx-tile,amx-int8"))) void qdlm_int4a_gemm_amx(
    const int8_t *a, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride, const int8_t *zeros, int64_t N,
    const float *a_scale, const float *b_scale, float *y, int64_t n_start, int64_t n_stop, void *scratch) {
    int8_gemm_amx(a, M, K, codes, row_stride, ROWS_INT4, zeros, N, a_scale, b_scale, y, n_start, n_stop, scratch);
}

/* As qdlm_int8_gemm_amx with a W8A8 weight as the checkpoint packs it: symmetric per-channel 8-bit codes
 * (byte k of a row = code k, zero point 128; rows row_stride bytes apart). The same scratch. */
__attribute__((target("amx-tile,amx-int8"))) void qdlm_uint8_gemm_amx(
    const int8_t *a, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride, int64_t N,
    const float *a_scale, const float *b_scale, float *y, int64_t n_start, int64_t n_stop, void *scratch) {
    int8_gemm_amx(a, M, K, codes, row_stride, ROWS_UINT8, 0, N, a_scale, b_scale, y, n_start, n_stop, scratch);
}
#else
int qdlm_amx_int8_ready(void) { return 0; }
int64_t qdlm_int8_amx_scratch(int64_t M, int64_t K) { (void)M; (void)K; return 0; }
void qdlm_int8_gemm_amx(const int8_t *a, int64_t M, int64_t K, const int8_t *b, int64_t N, const float *a_scale,
                        const float *b_scale, float *y, int64_t n_start, int64_t n_stop, void *scratch) {
    (void)a; (void)M; (void)K; (void)b; (void)N; (void)a_scale; (void)b_scale; (void)y; (void)n_start;
    (void)n_stop; (void)scratch;
}
void qdlm_int4a_gemm_amx(const int8_t *a, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride,
                         const int8_t *zeros, int64_t N, const float *a_scale, const float *b_scale, float *y,
                         int64_t n_start, int64_t n_stop, void *scratch) {
    (void)a; (void)M; (void)K; (void)codes; (void)row_stride; (void)zeros; (void)N; (void)a_scale; (void)b_scale;
    (void)y; (void)n_start; (void)n_stop; (void)scratch;
}
void qdlm_uint8_gemm_amx(const int8_t *a, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride, int64_t N,
                         const float *a_scale, const float *b_scale, float *y, int64_t n_start, int64_t n_stop,
                         void *scratch) {
    (void)a; (void)M; (void)K; (void)codes; (void)row_stride; (void)N; (void)a_scale; (void)b_scale; (void)y;
    (void)n_start; (void)n_stop; (void)scratch;
}
int qdlm_amx_ready(void) { return 0; }
int64_t qdlm_int4_amxi_x_words(int64_t M, int64_t K) { (void)M; (void)K; return 0; }
int64_t qdlm_int4_amxi_scratch(int64_t M) { (void)M; return 0; }
void qdlm_int4_amxi_prepare_x(const uint16_t *x, int64_t M, int64_t K, int64_t group, int32_t *xb, float *xsum) {
    (void)x; (void)M; (void)K; (void)group; (void)xb; (void)xsum;
}
void qdlm_int4_gemm_amxi(const int32_t *xb, const float *xsum, int64_t M, int64_t K, const uint8_t *codes,
                         int64_t row_stride, int64_t N, const float *s, const float *zs, int64_t group, uint16_t *y,
                         int64_t n_start, int64_t n_stop, void *scratch) {
    (void)xb; (void)xsum; (void)M; (void)K; (void)codes; (void)row_stride; (void)N; (void)s; (void)zs; (void)group;
    (void)y; (void)n_start; (void)n_stop; (void)scratch;
}
int64_t qdlm_int4_amx_scratch(int64_t M, int64_t K) { (void)M; (void)K; return 0; }
void qdlm_int4_gemm_amx(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, int64_t row_stride,
                        int64_t N, const float *s, const float *zs, int64_t group, uint16_t *y, int64_t n_start,
                        int64_t n_stop, void *scratch) {
    (void)x; (void)M; (void)K; (void)codes; (void)row_stride; (void)N; (void)s; (void)zs; (void)group;
    (void)y; (void)n_start; (void)n_stop; (void)scratch;
}
#endif
