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
 * dense GEMM wins although it reads four times the bytes. Here codes become exact bf16 integers in
 * registers and meet the activations in the same dot-product instruction (vdpbf16ps); each group's
 * scale is applied once to the float32 partial sums. For many tokens, dequant_rows writes bf16 W_hat
 * rows in one fused pass and the GEMM is left to torch.
 *
 * No threads here: the caller splits tiles (or rows) across its threads.
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

/* The activations in the layout the tile loop reads: token blocks of TILE_M, each [K/2][TILE_M]
 * dwords (the bf16 pair x[m, 2p], x[m, 2p+1]), zero-padded; xsum[m, g] = sum of x[m, k] over group g.
 * Rows of x are 2K bytes apart and would all fall in one L1 set; interleaved, the TILE_M broadcasts
 * of one pair read one cache line. */
void qdlm_int4_prepare_x(const uint16_t *x, int64_t M, int64_t K, int64_t group, int32_t *xpairs, float *xsum) {
    const int64_t G = K / group, pairs = K / 2;
    const int64_t blocks = (M + TILE_M - 1) / TILE_M;
    for (int64_t i = 0; i < blocks * pairs * TILE_M; i++) xpairs[i] = 0;
    for (int64_t m = 0; m < M; m++) {
        const int32_t *row = (const int32_t *)(x + m * K);
        int32_t *dst = xpairs + (m / TILE_M) * pairs * TILE_M + m % TILE_M;
        for (int64_t p = 0; p < pairs; p++) dst[p * TILE_M] = row[p];
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) acc += bf16_to_float(x[m * K + k]);
            xsum[m * G + g] = acc;
        }
    }
}

/* 16 lanes of 4 code bytes -> each lane's bf16 code pair (k, k+1) of byte `b`, as one dword. */
static inline __m512i code_pair(__m512i dwords, int b, __m512i bf16_of_code) {
    const __m512i sh = _mm512_srli_epi32(dwords, 8 * b);
    const __m512i lo = _mm512_and_si512(sh, _mm512_set1_epi32(0x0F));
    const __m512i hi = _mm512_and_si512(_mm512_slli_epi32(sh, 12), _mm512_set1_epi32(0x000F0000));
    /* each 16-bit half holds a code 0..15 now: look its exact bf16 value up */
    return _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), bf16_of_code);
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

/* Outputs n0..n0+15 of tokens 0..tm-1 of one token block. */
static inline __attribute__((always_inline)) void gemm_tile(
    const int32_t *xpairs, const float *xsum, int64_t K, int64_t G, const uint8_t *codes, int64_t row_stride,
    int64_t N, int64_t n0, const float *s, const float *zs, int64_t group, uint16_t *y, const int tm) {
    uint16_t table[32];
    for (int i = 0; i < 32; i++) {
        union { float f; uint32_t u; } v = {.f = (float)(i & 15)};
        table[i] = (uint16_t)(v.u >> 16); /* small integers are exact in bf16 */
    }
    const __m512i bf16_of_code = _mm512_loadu_si512(table);
    const uint8_t *tile_codes = codes + n0 * row_stride;
    __m512 out[TILE_M], acc[TILE_M];
    for (int t = 0; t < tm; t++) out[t] = acc[t] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += CHUNK_K) {
        /* 64 bytes of each of the tile's 16 rows, turned so that dword c holds codes
         * k0 + 8c .. k0 + 8c + 7 of all 16 rows */
        __m512i chunk[16];
        for (int j = 0; j < 16; j++) chunk[j] = _mm512_loadu_si512(tile_codes + j * row_stride + k0 / 2);
        transpose16(chunk);
        for (int c = 0; c < 16; c++) {
            for (int b = 0; b < 4; b++) {
                const __m512bh wv = (__m512bh)code_pair(chunk[c], b, bf16_of_code);
                const int32_t *xpair = xpairs + ((k0 + 8 * c + 2 * b) / 2) * TILE_M;
                for (int t = 0; t < tm; t++) dp_broadcast(&acc[t], wv, xpair + t);
            }
            const int64_t k_end = k0 + 8 * c + 8;
            if (k_end % group == 0) { /* a group ends: out += s * acc - zs * (sum of x over the group) */
                const int64_t g = k_end / group - 1;
                const __m512 sv = _mm512_loadu_ps(s + g * N + n0);
                const __m512 zv = _mm512_loadu_ps(zs + g * N + n0);
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
    case T: gemm_tile(xp, xs, K, G, codes, row_stride, N, n0, s, zs, group, yb, T); break;

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
            switch (tm) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
                TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
                TILE_CASE(13) TILE_CASE(14) TILE_CASE(15) TILE_CASE(16)
            }
        }
    }
}

/* out (bf16 [stop - start, K]) = W_hat[start:stop]; needs K % 32 == 0 and group % 32 == 0. */
void qdlm_int4_dequant_rows(const uint8_t *codes, int64_t row_stride, int64_t K, int64_t N, const float *s,
                            const float *zs, int64_t group, int64_t start, int64_t stop, uint16_t *out) {
    const int64_t G = K / group;
    for (int64_t n = start; n < stop; n++) {
        const uint8_t *row = codes + n * row_stride;
        uint16_t *dst = out + (n - start) * K;
        for (int64_t g = 0; g < G; g++) {
            const __m512 sv = _mm512_set1_ps(s[g * N + n]);
            const __m512 zv = _mm512_set1_ps(zs[g * N + n]);
            for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
                /* 32 codes in k order as 16-bit words: low nibble = code k, high nibble = code k + 1 */
                const __m512i words = _mm512_or_si512(
                    _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)),
                    _mm512_and_si512(_mm512_slli_epi32(bytes, 12), _mm512_set1_epi32(0x000F0000)));
                const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)));
                const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)));
                const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_fmsub_ps(q1, sv, zv), _mm512_fmsub_ps(q0, sv, zv));
                _mm512_storeu_si512(dst + k, (__m512i)v);
            }
        }
    }
}
