/* loraq's CPU dequantization of NF4/FP4 and INT4 into fp32 or bf16, built once on the user's machine by
   quant/native.py (the system C compiler, -O3 -march=native -ffp-contract=off) and called through ctypes.

   Bit-exact with the PyTorch path (quant/nf4.py, quant/intk.py): the same float operations per value in the
   same order (code * absmax; code * scale then + offset, no FMA), then round-to-nearest-even to bf16 as
   torch's cast does (finite values). AVX-512 where the compiler targets it (a 16-entry table is one register:
   one permute per 16 values); elsewhere plain loops the compiler vectorizes as it can. Each call decodes
   [start, stop) of the value stream into out[0 : stop - start]; callers split a tensor across threads.
   At the end, two helpers of DoRA's step (column_dots_bf16, dora_group_norms). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's cast (finite values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
static inline void store16_f32(float *o, __m512 v) { _mm512_storeu_ps(o, v); }
static inline void store16_bf16(uint16_t *o, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(r));
}
/* 32 values from 16 bytes, in stream order (w0: values 0-15, w1: 16-31), from first[k] and second[k], the
   two values of byte k */
static inline void interleave(__m512 first, __m512 second, __m512 *w0, __m512 *w1) {
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    *w0 = _mm512_permutex2var_ps(first, lo_idx, second);
    *w1 = _mm512_permutex2var_ps(first, hi_idx, second);
}
/* NF4: code[nibble] * a, the high nibble first (the index's low 4 bits pick from the 16-entry table) */
static inline void nf4_chunk(const uint8_t *p, __m512 table, __m512 a, __m512 *w0, __m512 *w1) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), a);
    __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, table), a);
    interleave(high, low, w0, w1);
}
/* INT4: code * s, then + m (two roundings), the low nibble first */
static inline void int4_chunk(const uint8_t *p, __m512 s, __m512 m, __m512 *w0, __m512 *w1) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    interleave(_mm512_add_ps(_mm512_mul_ps(low, s), m), _mm512_add_ps(_mm512_mul_ps(high, s), m), w0, w1);
}
#endif

#define AS_FLOAT(v) (v)

/* NF4/FP4: values [start, stop) of the stream (start a multiple of blocksize): value i is
   code[nibble i] * absmax[i / blocksize], the high nibble of each byte first. */
#define NF4_FN(NAME, T, STORE, STORE16)                                                     \
    void NAME(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize, \
              int64_t start, int64_t stop, T *out) {                                         \
        for (int64_t b = start / blocksize; b * blocksize < stop; ++b) {                     \
            const float a = absmax[b];                                                       \
            const int64_t lo = b * blocksize, hi = lo + blocksize < stop ? lo + blocksize : stop; \
            const int64_t pairs = (hi - lo) / 2;                                             \
            const uint8_t *p = packed + lo / 2;                                              \
            T *o = out + (lo - start);                                                       \
            int64_t j = 0;                                                                   \
            VEC_NF4(STORE16)                                                                 \
            for (; j < pairs; ++j) {                                                         \
                const uint8_t byte = p[j];                                                   \
                o[2 * j] = STORE(code[byte >> 4] * a);                                       \
                o[2 * j + 1] = STORE(code[byte & 15] * a);                                   \
            }                                                                                \
            if ((hi - lo) & 1) o[hi - lo - 1] = STORE(code[p[pairs] >> 4] * a);              \
        }                                                                                    \
    }

#if defined(__AVX512F__)
#define VEC_NF4(STORE16)                                                                     \
    {                                                                                        \
        const __m512 table = _mm512_loadu_ps(code), av = _mm512_set1_ps(a);                  \
        for (; j + 16 <= pairs; j += 16) {                                                   \
            __m512 w0, w1;                                                                   \
            nf4_chunk(p + j, table, av, &w0, &w1);                                           \
            STORE16(o + 2 * j, w0);                                                          \
            STORE16(o + 2 * j + 16, w1);                                                     \
        }                                                                                    \
    }
#else
#define VEC_NF4(STORE16)
#endif

NF4_FN(nf4_f32, float, AS_FLOAT, store16_f32)
NF4_FN(nf4_bf16, uint16_t, to_bf16, store16_bf16)

/* INT4 (rows of whole groups): value i is code * scale[i / group] + offset[i / group], the low nibble of each
   byte first; a multiply then an add, two roundings (no FMA), as the PyTorch path. [start, stop) on groups. */
#define INT4_FN(NAME, T, STORE, STORE16)                                                     \
    void NAME(const uint8_t *packed, const float *scale, const float *offset, int64_t group,  \
              int64_t start, int64_t stop, T *out) {                                         \
        for (int64_t g = start / group; g * group < stop; ++g) {                             \
            const float s = scale[g], m = offset[g];                                         \
            const uint8_t *p = packed + g * group / 2;                                       \
            T *o = out + (g * group - start);                                                \
            int64_t j = 0;                                                                   \
            VEC_INT4(STORE16)                                                                \
            for (; j < group / 2; ++j) {                                                     \
                const uint8_t byte = p[j];                                                   \
                float v0 = (float)(byte & 15) * s, v1 = (float)(byte >> 4) * s;              \
                v0 = v0 + m;                                                                 \
                v1 = v1 + m;                                                                 \
                o[2 * j] = STORE(v0);                                                        \
                o[2 * j + 1] = STORE(v1);                                                    \
            }                                                                                \
        }                                                                                    \
    }

#if defined(__AVX512F__)
#define VEC_INT4(STORE16)                                                                    \
    {                                                                                        \
        const __m512 sv = _mm512_set1_ps(s), mv = _mm512_set1_ps(m);                         \
        for (; j + 16 <= group / 2; j += 16) {                                               \
            __m512 w0, w1;                                                                   \
            int4_chunk(p + j, sv, mv, &w0, &w1);                                             \
            STORE16(o + 2 * j, w0);                                                          \
            STORE16(o + 2 * j + 16, w1);                                                     \
        }                                                                                    \
    }
#else
#define VEC_INT4(STORE16)
#endif

INT4_FN(int4_f32, float, AS_FLOAT, store16_f32)
INT4_FN(int4_bf16, uint16_t, to_bf16, store16_bf16)

/* Few rows (decoding a token at a time): y[r, o] = sum_i x[r, i] * W[o, i] for output rows [o_start, o_stop),
   the weight decoded 32 values at a time in registers and never written. x is fp32 (rows, in), y fp32 with row
   stride `out`. Each 32-value chunk lies in one NF4 block or INT4 group (in, blocksize / group multiples of 32):
   the values are exactly the dequantized weight's; only the order of the sums differs from a matmul. */
#define MAX_ROWS 16

static inline void dot_chunk(const float *w, const float *x, int64_t in, int64_t rows, float *acc) {
    for (int64_t r = 0; r < rows; ++r) {
        float s = 0.0f;
        for (int k = 0; k < 32; ++k) s += w[k] * x[r * in + k];
        acc[r] += s;
    }
}

#if defined(__AVX512F__)
/* acc[r] += w0·x[r, 0:16] + w1·x[r, 16:32], in 16 lanes per row, reduced at the end of the row */
#define GEMV_ROWS(w0, w1, xs)                                                                \
    for (int64_t r = 0; r < rows; ++r) {                                                     \
        lanes[r] = _mm512_fmadd_ps((w0), _mm512_loadu_ps((xs) + r * in), lanes[r]);          \
        lanes[r] = _mm512_fmadd_ps((w1), _mm512_loadu_ps((xs) + r * in + 16), lanes[r]);     \
    }
#endif

void nf4_gemv(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize, int64_t in,
              const float *x, int64_t rows, int64_t o_start, int64_t o_stop, float *y, int64_t out) {
    for (int64_t o = o_start; o < o_stop; ++o) {
        const int64_t row = o * in;
#if defined(__AVX512F__)
        __m512 lanes[MAX_ROWS];
        for (int64_t r = 0; r < rows; ++r) lanes[r] = _mm512_setzero_ps();
        const __m512 table = _mm512_loadu_ps(code);
        for (int64_t i = 0; i < in; i += 32) {
            __m512 w0, w1;
            nf4_chunk(packed + (row + i) / 2, table, _mm512_set1_ps(absmax[(row + i) / blocksize]), &w0, &w1);
            GEMV_ROWS(w0, w1, x + i)
        }
        for (int64_t r = 0; r < rows; ++r) y[r * out + o] = _mm512_reduce_add_ps(lanes[r]);
#else
        float acc[MAX_ROWS] = {0}, w[32];
        for (int64_t i = 0; i < in; i += 32) {
            const float a = absmax[(row + i) / blocksize];
            const uint8_t *p = packed + (row + i) / 2;
            for (int k = 0; k < 16; ++k) {
                w[2 * k] = code[p[k] >> 4] * a;
                w[2 * k + 1] = code[p[k] & 15] * a;
            }
            dot_chunk(w, x + i, in, rows, acc);
        }
        for (int64_t r = 0; r < rows; ++r) y[r * out + o] = acc[r];
#endif
    }
}

void int4_gemv(const uint8_t *packed, const float *scale, const float *offset, int64_t group, int64_t in,
               const float *x, int64_t rows, int64_t o_start, int64_t o_stop, float *y, int64_t out) {
    for (int64_t o = o_start; o < o_stop; ++o) {
        const int64_t row = o * in;
#if defined(__AVX512F__)
        __m512 lanes[MAX_ROWS];
        for (int64_t r = 0; r < rows; ++r) lanes[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 32) {
            const int64_t g = (row + i) / group;
            __m512 w0, w1;
            int4_chunk(packed + (row + i) / 2, _mm512_set1_ps(scale[g]), _mm512_set1_ps(offset[g]), &w0, &w1);
            GEMV_ROWS(w0, w1, x + i)
        }
        for (int64_t r = 0; r < rows; ++r) y[r * out + o] = _mm512_reduce_add_ps(lanes[r]);
#else
        float acc[MAX_ROWS] = {0}, w[32];
        for (int64_t i = 0; i < in; i += 32) {
            const int64_t g = (row + i) / group;
            const float s = scale[g], m = offset[g];
            const uint8_t *p = packed + (row + i) / 2;
            for (int k = 0; k < 16; ++k) {
                float v0 = (float)(p[k] & 15) * s, v1 = (float)(p[k] >> 4) * s;
                w[2 * k] = v0 + m;
                w[2 * k + 1] = v1 + m;
            }
            dot_chunk(w, x + i, in, rows, acc);
        }
        for (int64_t r = 0; r < rows; ++r) y[r * out + o] = acc[r];
#endif
    }
}

/* DoRA's magnitude gradient: out[c] = Σ_r a[r, c]·b[r, c] for columns [c_start, c_stop) of bf16 (rows, cols) a and
   b, products and sums in fp32, in one pass that writes nothing else (PyTorch's a * b then sum writes the
   products, rounded to bf16, and reads them again). Plain loops: the compiler vectorizes along the columns. */
void column_dots_bf16(const uint16_t *a, const uint16_t *b, int64_t rows, int64_t cols, int64_t c_start,
                      int64_t c_stop, float *out) {
    for (int64_t c = c_start; c < c_stop; ++c) out[c] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *ar = a + r * cols, *br = b + r * cols;
        for (int64_t c = c_start; c < c_stop; ++c) {
            const uint32_t ua = (uint32_t)ar[c] << 16, ub = (uint32_t)br[c] << 16;
            float fa, fb;
            memcpy(&fa, &ua, 4);
            memcpy(&fb, &ub, 4);
            out[c] += fa * fb;
        }
    }
}

static inline float from_fp16(uint16_t h) { /* IEEE half to float, exactly (normals, subnormals, inf, nan) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    uint32_t u;
    if (exponent == 0x1Fu) {
        u = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent) {
        u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa · 2^-24, exact in float */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* DoRA's row norms over an INT-k base under an A pooled over its groups (QA-LoRA), for rows [o_start, o_stop):
   norm[o] = sqrt(max(0, base_sq[o] + Σ_g d·(2·(scale·sums + L·offset) + L·d))), d[g] = c·Σ_r B[o, r]·A[r, g]: the
   norm of the adapted row without forming it (core/lora.py, _dora_norm_by_groups, is the same in PyTorch).
   B fp32 (out, rank), A fp32 (rank, groups), scale and offset fp16 bits and the groups' code sums int16, each
   (out, groups). One call instead of a dozen small PyTorch ops, which cost more than their arithmetic. */
void dora_group_norms(const float *b, const float *a, int64_t rank, int64_t groups, float c, const uint16_t *scale,
                      const uint16_t *offset, const int16_t *sums, int64_t group, const float *base_sq,
                      int64_t o_start, int64_t o_stop, float *norm) {
    enum { TILE = 256 };
    float d[TILE];
    for (int64_t o = o_start; o < o_stop; ++o) {
        float total = 0.0f;
        for (int64_t g0 = 0; g0 < groups; g0 += TILE) {
            const int64_t n = groups - g0 < TILE ? groups - g0 : TILE;
            for (int64_t g = 0; g < n; ++g) d[g] = 0.0f;
            for (int64_t r = 0; r < rank; ++r) {
                const float br = b[o * rank + r];
                const float *ar = a + r * groups + g0;
                for (int64_t g = 0; g < n; ++g) d[g] += br * ar[g];
            }
            const int64_t row = o * groups + g0;
            for (int64_t g = 0; g < n; ++g) {
                const float dg = c * d[g];
                const float sum = from_fp16(scale[row + g]) * (float)sums[row + g] + (float)group * from_fp16(offset[row + g]);
                total += dg * (2.0f * sum + (float)group * dg);
            }
        }
        const float sq = base_sq[o] + total;
        norm[o] = sq > 0.0f ? sqrtf(sq) : 0.0f;
    }
}
