/* Gathered LoRA for a batch whose rows use different adapters (Punica's BGMV, on the CPU).

   y[t] += w[t] * (x[t] @ A[slot[t]]) @ B[slot[t]]   for every token t, in place,

   with the stacks A [S, in, r] and B [S, r, out] (the engine's layout: A and B transposed) in
   float32, bfloat16 or float16, and x, y, w in float32. Tokens are visited in `order` (sorted by
   slot), and up to GROUP consecutive tokens with the same slot and weight share one pass over
   their adapter: decode rows that share an adapter, or a prompt's tokens in a prefill, read its
   weights once. With many distinct adapters a step is bound by streaming their bytes from
   memory, so the pass is fused (x @ A, then the product with B, with only r floats in between)
   and prefetches ahead of its loads: B while it reads A, and the start of the next token's A
   while it reads B, so that no adapter starts on a cold miss (7-14% less time per mixed batch
   than prefetching within each matrix alone, measured side by side on a Zen 3 core).

   Plain C with GCC/Clang vector extensions and no PyTorch headers, so it builds without torch
   in the build environment. On x86-64 each kernel is compiled for the baseline ISA, x86-64-v3
   (AVX2, FMA, F16C) and x86-64-v4 (AVX-512), and the best the CPU has is picked at import.
   The caller (serve/bgmv.py) checks every shape, dtype and index; this file trusts them. The GIL
   is released while it runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86 1
#include <immintrin.h>
#endif

#define GROUP 4
#define MAX_RANK 1024
/* prefetch distances, measured on an AMD EPYC (Zen 4) core: A rows ahead, B elements ahead */
#define AHEAD_A 64
#define AHEAD_B 256
#define PREFETCH(p) __builtin_prefetch((p), 0, 2)
#define INLINE static inline __attribute__((always_inline))

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { PORTABLE = 0, V3 = 1, V4 = 2 };
static const char *ISA_NAMES[] = {"portable", "x86-64-v3", "x86-64-v4"};

INLINE float one_f32(const float *p) { return *p; }
INLINE float one_bf16(const uint16_t *p) { uint32_t u = (uint32_t)*p << 16; float f; memcpy(&f, &u, 4); return f; }
INLINE float one_f16(const uint16_t *p) { /* as load_f16 below, one value */
    uint32_t h = *p, sign = (h & 0x8000) << 16, em = h & 0x7fff, bits;
    if (em < 0x400) { float f = (float)em * 0x1p-24f; memcpy(&bits, &f, 4); }
    else bits = ((em << 13) + ((127 - 15) << 23)) | (em >= 0x7c00 ? 0x7f800000 : 0);
    bits |= sign;
    float f; memcpy(&f, &bits, 4); return f;
}

/* Vectors of L floats (as many as one register holds: 4 SSE, 8 AVX2, 16 AVX-512) and their
   loads. bfloat16 is the top half of a float32; float16 without F16C moves the fields of normals
   and converts subnormals as an integer times 2^-24, keeping inf and nan (exact for all 65536
   values; the tests check every one). */
#define VECTORS(L)                                                                                     \
typedef float vf##L __attribute__((vector_size(4 * L)));                                              \
typedef uint16_t vu16_##L __attribute__((vector_size(2 * L)));                                        \
typedef uint32_t vu32_##L __attribute__((vector_size(4 * L)));                                        \
typedef int32_t vi32_##L __attribute__((vector_size(4 * L)));                                         \
INLINE vf##L load_f32_##L(const float *p) { vf##L v; memcpy(&v, p, sizeof v); return v; }             \
INLINE void store_f32_##L(float *p, vf##L v) { memcpy(p, &v, sizeof v); }                             \
INLINE vf##L load_bf16_##L(const uint16_t *p) {                                                        \
    vu16_##L u; memcpy(&u, p, sizeof u);                                                               \
    vu32_##L w = __builtin_convertvector(u, vu32_##L) << 16;                                           \
    vf##L f; memcpy(&f, &w, sizeof f); return f;                                                       \
}                                                                                                      \
INLINE vf##L load_f16_##L(const uint16_t *p) {                                                         \
    vu16_##L u; memcpy(&u, p, sizeof u);                                                               \
    vu32_##L h = __builtin_convertvector(u, vu32_##L);                                                 \
    vu32_##L sign = (h & 0x8000) << 16, em = h & 0x7fff;                                               \
    vu32_##L normal = ((em << 13) + ((127 - 15) << 23)) | ((vu32_##L)(em >= 0x7c00) & 0x7f800000);     \
    vf##L sub = __builtin_convertvector((vi32_##L)em, vf##L) * 0x1p-24f;                               \
    vu32_##L sub_bits; memcpy(&sub_bits, &sub, sizeof sub);                                            \
    vu32_##L tiny = (vu32_##L)(em < 0x400);                                                            \
    vu32_##L bits = (sub_bits & tiny) | (normal & ~tiny) | sign;                                       \
    vf##L f; memcpy(&f, &bits, sizeof f); return f;                                                    \
}

VECTORS(4)
VECTORS(8)
VECTORS(16)

/* horizontal sums as a tree of halves (a fixed order, fewer steps than lane by lane) */
INLINE float hsum_4(vf4 v) {
    vf4 h = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
    return h[0] + h[1];
}
INLINE float hsum_8(vf8 v) { return hsum_4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7)); }
INLINE float hsum_16(vf16 v) {
    return hsum_8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

#ifdef X86
#define TARGET_V3 __attribute__((target("avx2,fma,f16c")))
#define TARGET_V4 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
static inline __attribute__((always_inline)) TARGET_V3 vf8 load_f16c_8(const uint16_t *p) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    vf8 f; memcpy(&f, &v, sizeof f); return f;
}
static inline __attribute__((always_inline)) TARGET_V4 vf16 load_f16c_16(const uint16_t *p) {
    __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    vf16 f; memcpy(&f, &v, sizeof f); return f;
}
#endif

/* One group of G tokens (rows `tok` of x and y) sharing the adapter (a, b); G is a constant at
   every call, so the accumulators stay in registers. */
#define GROUP_KERNEL(NAME, T, L, U, LOAD, ONE, TARGET)                                                    \
static inline __attribute__((always_inline)) TARGET void NAME##_group(                                \
        const float *x, const T *a, const T *b, const int64_t *tok, const int G, float wt, float *y,  \
        int64_t in, int64_t r, int64_t out, int64_t ldy, const T *next_a) {                            \
    float h[GROUP][MAX_RANK];                                                                          \
    const float *xs[GROUP];                                                                            \
    for (int k = 0; k < G; k++) xs[k] = x + tok[k] * in;                                               \
    int64_t r0 = 0;                                                                                    \
    /* U and C accumulator chains per token (FMA latency, not throughput, would bound a lone token); \
       U is fixed per kernel, so a token's sums never depend on the tokens it is grouped with */      \
    const int C = G == 1 ? 4 : G == 2 ? 2 : 1;                                                         \
    for (; r0 + L <= r; r0 += L) { /* h = x @ A, L rank columns at a time, U rows of A per pass */    \
        vf##L acc[GROUP][4];                                                                           \
        for (int k = 0; k < G; k++) for (int u = 0; u < U; u++) acc[k][u] = (vf##L){0};                \
        int64_t i = 0;                                                                                 \
        /* the first pass also prefetches B, spread evenly over A's rows (16.16 fixed point) */       \
        const char *pb = (const char *)b;                                                              \
        const int64_t b_step = r0 ? 0 : (int64_t)((r * out * (int64_t)sizeof(T)) << 16) / (in ? in : 1) * U; \
        int64_t b_due = 0;                                                                             \
        for (; i + U <= in; i += U) {                                                                  \
            for (b_due += b_step; (pb - (const char *)b) << 16 < b_due; pb += 64) PREFETCH(pb);        \
            for (int u = 0; u < U; u++) {                                                              \
                const T *row = a + (i + u) * r + r0;                                                   \
                PREFETCH(row + AHEAD_A * r);                                                           \
                vf##L v = LOAD(row);                                                                   \
                for (int k = 0; k < G; k++) acc[k][u] += xs[k][i + u] * v;                             \
            }                                                                                          \
        }                                                                                              \
        for (; i < in; i++) {                                                                          \
            vf##L v = LOAD(a + i * r + r0);                                                            \
            for (int k = 0; k < G; k++) acc[k][0] += xs[k][i] * v;                                     \
        }                                                                                              \
        for (int k = 0; k < G; k++) {                                                                  \
            for (int u = 1; u < U; u++) acc[k][0] += acc[k][u];                                        \
            store_f32_##L(h[k] + r0, acc[k][0] * wt);                                                  \
        }                                                                                              \
    }                                                                                                  \
    for (; r0 < r; r0++) /* the rest of a rank that is not a multiple of L */                          \
        for (int k = 0; k < G; k++) {                                                                  \
            float s = 0;                                                                               \
            for (int64_t i = 0; i < in; i++) s += xs[k][i] * ONE(a + i * r + r0);                     \
            h[k][r0] = s * wt;                                                                         \
        }                                                                                              \
    /* meanwhile the start of the next adapter's A, which its own prefetches do not cover */          \
    const char *pn = (const char *)next_a, *pn_end = pn + (next_a ? AHEAD_A * r * (int64_t)sizeof(T) : 0); \
    const int64_t lines_per_block = (AHEAD_A * r * (int64_t)sizeof(T) / 64) / (out / (C * L) + 1) + 1; \
    int64_t o = 0;                                                                                     \
    for (; o + C * L <= out; o += C * L) { /* y += h @ B, C * L outputs at a time */                   \
        for (int64_t l = 0; l < lines_per_block && pn < pn_end; l++, pn += 64) PREFETCH(pn);           \
        vf##L acc[GROUP][4];                                                                           \
        for (int k = 0; k < G; k++) for (int c = 0; c < C; c++) acc[k][c] = load_f32_##L(y + tok[k] * ldy + o + c * L); \
        for (int64_t j = 0; j < r; j++) {                                                              \
            const T *row = b + j * out + o;                                                            \
            PREFETCH(row + AHEAD_B);                                                                   \
            for (int c = 0; c < C; c++) {                                                              \
                vf##L v = LOAD(row + c * L);                                                           \
                for (int k = 0; k < G; k++) acc[k][c] += h[k][j] * v;                                  \
            }                                                                                          \
        }                                                                                              \
        for (int k = 0; k < G; k++) for (int c = 0; c < C; c++) store_f32_##L(y + tok[k] * ldy + o + c * L, acc[k][c]); \
    }                                                                                                  \
    for (; o + L <= out; o += L) {                                                                     \
        vf##L acc[GROUP];                                                                              \
        for (int k = 0; k < G; k++) acc[k] = load_f32_##L(y + tok[k] * ldy + o);                       \
        for (int64_t j = 0; j < r; j++) {                                                              \
            vf##L v = LOAD(b + j * out + o);                                                           \
            for (int k = 0; k < G; k++) acc[k] += h[k][j] * v;                                         \
        }                                                                                              \
        for (int k = 0; k < G; k++) store_f32_##L(y + tok[k] * ldy + o, acc[k]);                       \
    }                                                                                                  \
    for (; o < out; o++)                                                                               \
        for (int k = 0; k < G; k++) {                                                                  \
            float s = y[tok[k] * ldy + o];                                                             \
            for (int64_t j = 0; j < r; j++) s += h[k][j] * ONE(b + j * out + o);                       \
            y[tok[k] * ldy + o] = s;                                                                   \
        }                                                                                              \
}                                                                                                      \
                                                                                                       \
static TARGET void NAME(const float *x, const void *A_, const void *B_, const int64_t *slot,          \
                        const float *w, const int64_t *order, float *y, int64_t n, int64_t in,         \
                        int64_t r, int64_t out, int64_t ldy) {                                         \
    const T *A = A_, *B = B_;                                                                          \
    for (int64_t t = 0; t < n;) {                                                                      \
        int64_t first = order[t], s = slot[first];                                                     \
        float wt = w ? w[first] : 1.0f;                                                                \
        int g = 1;                                                                                     \
        while (g < GROUP && t + g < n && slot[order[t + g]] == s && (!w || w[order[t + g]] == wt)) g++; \
        const T *a = A + s * in * r, *b = B + s * r * out;                                             \
        const T *next_a = t + g < n ? A + slot[order[t + g]] * in * r : NULL;                          \
        switch (g) {                                                                                   \
        case 1: NAME##_group(x, a, b, order + t, 1, wt, y, in, r, out, ldy, next_a); break;            \
        case 2: NAME##_group(x, a, b, order + t, 2, wt, y, in, r, out, ldy, next_a); break;            \
        case 3: NAME##_group(x, a, b, order + t, 3, wt, y, in, r, out, ldy, next_a); break;            \
        default: NAME##_group(x, a, b, order + t, 4, wt, y, in, r, out, ldy, next_a);                  \
        }                                                                                              \
        t += g;                                                                                        \
    }                                                                                                  \
}

typedef void (*kernel_fn)(const float *, const void *, const void *, const int64_t *, const float *,
                          const int64_t *, float *, int64_t, int64_t, int64_t, int64_t, int64_t);

/* name, stack element, lanes, chains over A's rows, vector load, scalar load, instruction set
   (16 registers for SSE and AVX2: 2 chains x 4 tokens; AVX-512 has 32: 4 x 4) */
GROUP_KERNEL(lora_f32, float, 4, 2, load_f32_4, one_f32, )
GROUP_KERNEL(lora_bf16, uint16_t, 4, 2, load_bf16_4, one_bf16, )
GROUP_KERNEL(lora_f16, uint16_t, 4, 2, load_f16_4, one_f16, )
#ifdef X86
GROUP_KERNEL(lora_f32_v3, float, 8, 2, load_f32_8, one_f32, TARGET_V3)
GROUP_KERNEL(lora_bf16_v3, uint16_t, 8, 2, load_bf16_8, one_bf16, TARGET_V3)
GROUP_KERNEL(lora_f16_v3, uint16_t, 8, 2, load_f16c_8, one_f16, TARGET_V3)
GROUP_KERNEL(lora_f32_v4, float, 16, 4, load_f32_16, one_f32, TARGET_V4)
GROUP_KERNEL(lora_bf16_v4, uint16_t, 16, 4, load_bf16_16, one_bf16, TARGET_V4)
GROUP_KERNEL(lora_f16_v4, uint16_t, 16, 4, load_f16c_16, one_f16, TARGET_V4)
static const kernel_fn KERNELS[3][3] = {
    {lora_f32, lora_bf16, lora_f16}, {lora_f32_v3, lora_bf16_v3, lora_f16_v3}, {lora_f32_v4, lora_bf16_v4, lora_f16_v4}};
#else
static const kernel_fn KERNELS[1][3] = {{lora_f32, lora_bf16, lora_f16}};
#endif

/* The slot write of a LoRA adapter: float32 `src [rows, cols]` (a file's A [r, in] or B [out, r])
   times `scale` into `dst [cols, rows]` (row stride `stride`) of the stack's dtype, transposed in 16 x 16 blocks
   that stay in L1 (PyTorch's strided copy of these skinny matrices is ~3x slower). bfloat16 and
   float16 round to nearest even, as PyTorch's conversions do. */
INLINE uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* nan stays a quiet nan */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
INLINE uint16_t to_f16(float f) { _Float16 h = (_Float16)f; uint16_t u; memcpy(&u, &h, 2); return u; }
INLINE float to_f32(float f) { return f; }

#define TRANSPOSE(NAME, T, CONVERT, TARGET)                                                            \
static TARGET void NAME(const float *src, void *dst_, int64_t rows, int64_t cols, int64_t stride, float scale) { \
    T *dst = dst_;                                                                                     \
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {                                                        \
        int64_t ni = rows - i0 < 16 ? rows - i0 : 16;                                                  \
        for (int64_t j0 = 0; j0 < cols; j0 += 16) {                                                    \
            int64_t nj = cols - j0 < 16 ? cols - j0 : 16;                                              \
            for (int64_t j = j0; j < j0 + nj; j++)                                                     \
                for (int64_t i = i0; i < i0 + ni; i++) dst[j * stride + i] = CONVERT(src[i * cols + j] * scale); \
        }                                                                                              \
    }                                                                                                  \
}

typedef void (*transpose_fn)(const float *, void *, int64_t, int64_t, int64_t, float);

TRANSPOSE(transpose_f32, float, to_f32, )
TRANSPOSE(transpose_bf16, uint16_t, to_bf16, )
TRANSPOSE(transpose_f16, uint16_t, to_f16, )
#ifdef X86
TRANSPOSE(transpose_f16_v3, uint16_t, to_f16, TARGET_V3) /* F16C converts instead of a libgcc call */

/* AVX-512: each 16 x 16 block is loaded as 16 rows (masked at the edges), transposed in registers
   (four rounds of unpacks and lane shuffles) and stored as 16 rows of the target, converted on
   the way (bfloat16: round to nearest even, nan kept quiet, as to_bf16). Whole aligned rows are
   stored non-temporally: a slot being written is cold, and a plain store would first read every
   line it writes (0.95 -> 0.41 ms for a 3.6 MB adapter into a 400 MB stack). */
#define PD(v) _mm512_castps_pd(v)
#define PS(v) _mm512_castpd_ps(v)
INLINE TARGET_V4 void transpose_16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) { t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]); t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]); }
    for (int i = 0; i < 16; i += 4) {
        r[i] = PS(_mm512_unpacklo_pd(PD(t[i]), PD(t[i + 2])));     r[i + 1] = PS(_mm512_unpackhi_pd(PD(t[i]), PD(t[i + 2])));
        r[i + 2] = PS(_mm512_unpacklo_pd(PD(t[i + 1]), PD(t[i + 3]))); r[i + 3] = PS(_mm512_unpackhi_pd(PD(t[i + 1]), PD(t[i + 3])));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}
INLINE TARGET_V4 void store_row_f32(void *dst, __mmask16 m, __m512 v) {
    if (m == 0xffff && ((uintptr_t)dst & 63) == 0) _mm512_stream_ps(dst, v);
    else _mm512_mask_storeu_ps(dst, m, v);
}
INLINE TARGET_V4 void store_row_16(void *dst, __mmask16 m, __m256i v) {
    if (m == 0xffff && ((uintptr_t)dst & 31) == 0) _mm256_stream_si256(dst, v);
    else _mm256_mask_storeu_epi16(dst, m, v);
}
INLINE TARGET_V4 void store_row_f16(void *dst, __mmask16 m, __m512 v) {
    store_row_16(dst, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
INLINE TARGET_V4 void store_row_bf16(void *dst, __mmask16 m, __m512 v) {
    __m512i u = _mm512_castps_si512(v), high = _mm512_srli_epi32(u, 16);
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                         _mm512_and_si512(high, _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    store_row_16(dst, m, _mm512_cvtepi32_epi16(rounded));
}
#define TRANSPOSE_V4(NAME, T, STORE)                                                                   \
static TARGET_V4 void NAME(const float *src, void *dst_, int64_t rows, int64_t cols, int64_t stride, float scale) { \
    T *dst = dst_;                                                                                     \
    __m512 r[16], k = _mm512_set1_ps(scale);                                                           \
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {                                                        \
        int ni = rows - i0 < 16 ? (int)(rows - i0) : 16;                                               \
        for (int64_t j0 = 0; j0 < cols; j0 += 16) {                                                    \
            int nj = cols - j0 < 16 ? (int)(cols - j0) : 16;                                           \
            __mmask16 in = (__mmask16)((1u << nj) - 1), out = (__mmask16)((1u << ni) - 1);             \
            for (int i = 0; i < 16; i++)                                                               \
                r[i] = i < ni ? _mm512_mul_ps(_mm512_maskz_loadu_ps(in, src + (i0 + i) * cols + j0), k) : _mm512_setzero_ps(); \
            transpose_16x16(r);                                                                        \
            for (int j = 0; j < nj; j++) STORE(dst + (j0 + j) * stride + i0, out, r[j]);               \
        }                                                                                              \
    }                                                                                                  \
}
TRANSPOSE_V4(transpose_f32_v4, float, store_row_f32)
TRANSPOSE_V4(transpose_bf16_v4, uint16_t, store_row_bf16)
TRANSPOSE_V4(transpose_f16_v4, uint16_t, store_row_f16)
static const transpose_fn TRANSPOSES[3][3] = {{transpose_f32, transpose_bf16, transpose_f16},
                                              {transpose_f32, transpose_bf16, transpose_f16_v3},
                                              {transpose_f32_v4, transpose_bf16_v4, transpose_f16_v4}};
#else
static const transpose_fn TRANSPOSES[1][3] = {{transpose_f32, transpose_bf16, transpose_f16}};
#endif

static int best_isa(void) {
#ifdef X86
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return v4 ? V4 : v3 ? V3 : PORTABLE;
#else
    return PORTABLE;
#endif
}

static int BEST;

/* One lora_add call: the kernel for its ISA and dtype, and its pointers and sizes. */
typedef struct {
    kernel_fn fn;
    const float *x; const void *a, *b; const int64_t *slot; const float *w; const int64_t *order; float *y;
    int64_t n, in, r, out, ldy;
} lora_job;

static int parse_lora_job(PyObject *args, const char *name, lora_job *job) {
    unsigned long long x, a, b, slot, w, order, y;
    long long n, in, r, out, ldy;
    int dtype, isa = -1;
    if (!PyArg_ParseTuple(args, "KKKKKKKLLLLLi|i", &x, &a, &b, &slot, &w, &order, &y, &n, &in, &r, &out, &ldy,
                          &dtype, &isa))
        return 0;
    if (isa < 0) isa = BEST;
    if (isa > BEST || dtype < F32 || dtype > F16 || r > MAX_RANK || n < 0 || in < 0 || r < 0 || out < 0) {
        PyErr_Format(PyExc_ValueError, "%s: isa %d (this CPU has up to %d), dtype %d, rank %lld (at most %d)",
                     name, isa, BEST, dtype, r, MAX_RANK);
        return 0;
    }
    *job = (lora_job){KERNELS[isa][dtype], (const float *)(uintptr_t)x, (const void *)(uintptr_t)a,
                      (const void *)(uintptr_t)b, (const int64_t *)(uintptr_t)slot, w ? (const float *)(uintptr_t)w : NULL,
                      (const int64_t *)(uintptr_t)order, (float *)(uintptr_t)y, n, in, r, out, ldy};
    return 1;
}

static PyObject *lora_add(PyObject *self, PyObject *args) {
    (void)self;
    lora_job job;
    if (!parse_lora_job(args, "lora_add", &job)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    job.fn(job.x, job.a, job.b, job.slot, job.w, job.order, job.y, job.n, job.in, job.r, job.out, job.ldy);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* A worker thread for lora_add_async: the gathers of a mixed batch are bound by memory, the base
   layer's matrix product by arithmetic, so with a core to spare the engine queues a module's
   LoRA here before the base layer runs and waits for it after. Jobs run one at a time, in the
   order queued; tickets count them. Waking a sleeping thread takes 0.05-0.5 ms on a virtual
   machine, as long as a small job: two wake-ups per module (the worker for the job, the caller
   for its end) cost a mixed batch at N=8 more than the overlap saved. So while any forward pass
   that queued work is running (lora_busy(1) .. lora_busy(0)) the worker spins between jobs
   instead of sleeping, and a caller waiting for a job spins until it is done (bounded by
   WAIT_SPIN_NS, for a worker the OS descheduled); otherwise the worker spins SPIN_NS, then sleeps.
   Spinning threads hold the cores other work needs: while an adapter loads on other threads
   (lora_yield(1) .. lora_yield(0)) both go back to sleeping after SPIN_NS, or the load's threads
   would wait for time slices and stretch the running requests' steps more than the wake-ups do.
   The worker is restarted in a forked child. */
#include <pthread.h>
#include <time.h>

#define QUEUE 64
#define SPIN_NS 100000 /* how long the worker spins for a job before it sleeps, outside busy passes */
#define WAIT_SPIN_NS 20000000 /* how long a caller spins for its job before it sleeps */
#define BUSY_SPIN_NS 50000000 /* how long the worker spins for a job while a pass is busy (a bound, should one never end) */
#ifdef X86
#define RELAX() __builtin_ia32_pause()
#else
#define RELAX() ((void)0)
#endif
static lora_job queue_[QUEUE];
static uint64_t queued, taken, finished; /* changed under mu; queued and finished also read without it */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_ready = PTHREAD_COND_INITIALIZER, job_done = PTHREAD_COND_INITIALIZER;
static int worker_running;
static int busy; /* forward passes between lora_busy(1) and lora_busy(0); read without mu */
static int yielding; /* loads between lora_yield(1) and lora_yield(0); read without mu */

static int keep_spinning(void) {
    return __atomic_load_n(&busy, __ATOMIC_RELAXED) > 0 && __atomic_load_n(&yielding, __ATOMIC_RELAXED) == 0;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* spin until *counter >= at_least, for at most `ns`, or up to BUSY_SPIN_NS while `hold()` says so
   (when given); whether it got there */
static int spin_until(const uint64_t *counter, uint64_t at_least, int64_t ns, int (*hold)(void)) {
    int64_t start = now_ns();
    for (int i = 1;; i++) {
        if (__atomic_load_n(counter, __ATOMIC_ACQUIRE) >= at_least) return 1;
        if (i % 64 == 0) {
            int64_t spun = now_ns() - start;
            if (spun > ns && (!hold || !hold() || spun > BUSY_SPIN_NS)) return 0;
        }
        RELAX();
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    for (;;) {
        spin_until(&queued, taken + 1, SPIN_NS, keep_spinning);
        pthread_mutex_lock(&mu);
        while (queued == taken) pthread_cond_wait(&job_ready, &mu);
        lora_job job = queue_[taken % QUEUE];
        taken++;
        pthread_mutex_unlock(&mu);
        job.fn(job.x, job.a, job.b, job.slot, job.w, job.order, job.y, job.n, job.in, job.r, job.out, job.ldy);
        pthread_mutex_lock(&mu);
        __atomic_store_n(&finished, finished + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&job_done);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void forked_child(void) { /* the child has no worker; whatever the parent queued is not its own */
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&job_ready, NULL);
    pthread_cond_init(&job_done, NULL);
    queued = taken = finished = 0;
    worker_running = 0;
    busy = yielding = 0;
}

static PyObject *lora_add_async(PyObject *self, PyObject *args) {
    (void)self;
    lora_job job;
    if (!parse_lora_job(args, "lora_add_async", &job)) return NULL;
    uint64_t ticket;
    int err;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&mu);
    err = 0;
    if (!worker_running) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        err = pthread_create(&thread, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        worker_running = !err;
    }
    if (!err) {
        while (queued - finished >= QUEUE) pthread_cond_wait(&job_done, &mu);
        queue_[queued % QUEUE] = job;
        ticket = __atomic_add_fetch(&queued, 1, __ATOMIC_RELEASE);
        pthread_cond_signal(&job_ready);
    }
    pthread_mutex_unlock(&mu);
    Py_END_ALLOW_THREADS
    if (err) return PyErr_Format(PyExc_RuntimeError, "lora_add_async: could not start the worker thread (error %d)", err);
    return PyLong_FromUnsignedLongLong(ticket);
}

static PyObject *lora_wait(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long ticket;
    if (!PyArg_ParseTuple(args, "K", &ticket)) return NULL;
    if (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < ticket) {
        Py_BEGIN_ALLOW_THREADS
        int64_t spin = __atomic_load_n(&yielding, __ATOMIC_RELAXED) ? SPIN_NS : WAIT_SPIN_NS;
        if (!spin_until(&finished, ticket, spin, NULL)) {
            pthread_mutex_lock(&mu);
            while (finished < ticket) pthread_cond_wait(&job_done, &mu);
            pthread_mutex_unlock(&mu);
        }
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* count(1) / count(0) on a counter that must not go below zero; the count after */
static PyObject *count_spell(int *counter, const char *name, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    int now = __atomic_add_fetch(counter, on ? 1 : -1, __ATOMIC_RELAXED);
    if (now < 0) {
        __atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
        return PyErr_Format(PyExc_RuntimeError, "%s(0) without a %s(1) before it", name, name);
    }
    return PyLong_FromLong(now);
}

static PyObject *lora_busy(PyObject *self, PyObject *args) { (void)self; return count_spell(&busy, "lora_busy", args); }
static PyObject *lora_yield(PyObject *self, PyObject *args) { (void)self; return count_spell(&yielding, "lora_yield", args); }
static PyObject *lora_yielding(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(__atomic_load_n(&yielding, __ATOMIC_RELAXED) > 0);
}

/* Attention of one new token per row (a decode step) over its cached keys and values:

   out[b, h] = softmax_t(scale * q[b, h] . k[b, h / G, t], t where mask[b, t]) @ v[b, h / G, t]

   with G query heads per key/value head (GQA), keys and values read in place from the cache's
   strided buffers, float32 throughout. PyTorch's scaled_dot_product_attention spends most of a
   decode step's attention on per-(row, head) dispatch of tiny matrix products; this is one pass
   over the cache (its bytes bound it). exp is a degree-6 polynomial after range reduction, within
   2 ulp of expf, applied to max-subtracted scores; masked positions weigh exactly 0. */
#define ATTENTION(NAME, L, TARGET)                                                                     \
INLINE TARGET vf##L NAME##_exp(vf##L x) { /* x <= 0 here (max subtracted) */                        \
    vi32_##L low = (vi32_##L)(x < -87.0f), xb, floor_b;                                                \
    vf##L floor = (vf##L){0} - 87.0f;                                                                  \
    memcpy(&xb, &x, sizeof x); memcpy(&floor_b, &floor, sizeof floor);                                 \
    xb = (xb & ~low) | (floor_b & low);                                                                \
    memcpy(&x, &xb, sizeof x);                                                                         \
    vf##L t = x * 1.44269504088896341f;                                                                \
    vf##L n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */                     \
    vf##L r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;                               \
    vf##L p = (vf##L){0} + 1.0f / 720;                                                                 \
    p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6; p = p * r + 0.5f;            \
    p = p * r + 1.0f; p = p * r + 1.0f;                                                                \
    vi32_##L e = (__builtin_convertvector(n, vi32_##L) + 127) << 23;                                   \
    vf##L two; memcpy(&two, &e, sizeof two);                                                           \
    return p * two;                                                                                    \
}                                                                                                      \
                                                                                                       \
static TARGET void NAME(const float *q, const float *k, const float *v, const uint8_t *mask, float *out, \
                        float *scores, int64_t B, int64_t H, int64_t KV, int64_t T, int64_t D,         \
                        const int64_t *st, float scale) {                                              \
    /* st: q (b, h), k (b, kv, t), v (b, kv, t), mask (b), out (b, h) strides in elements */          \
    int64_t G = H / KV;                                                                                \
    for (int64_t b = 0; b < B; b++)                                                                    \
        for (int64_t h = 0; h < H; h++) {                                                              \
            const float *qh = q + b * st[0] + h * st[1];                                               \
            const float *kb = k + b * st[2] + (h / G) * st[3], *vb = v + b * st[5] + (h / G) * st[6];  \
            const uint8_t *mb = mask ? mask + b * st[8] : NULL;                                        \
            float best = -INFINITY;                                                                    \
            for (int64_t t = 0; t < T; t++) {                                                          \
                if (mb && !mb[t]) { scores[t] = -INFINITY; continue; }                                 \
                const float *kt = kb + t * st[4];                                                      \
                vf##L acc = {0};                                                                       \
                int64_t d = 0;                                                                         \
                for (; d + L <= D; d += L) acc += load_f32_##L(qh + d) * load_f32_##L(kt + d);         \
                float s = hsum_##L(acc);                                                               \
                for (; d < D; d++) s += qh[d] * kt[d];                                                 \
                s *= scale;                                                                            \
                scores[t] = s;                                                                         \
                best = s > best ? s : best;                                                            \
            }                                                                                          \
            float total = 0;                                                                           \
            int64_t t = 0;                                                                             \
            for (; t + L <= T; t += L) {                                                               \
                vf##L x = load_f32_##L(scores + t) - best;                                             \
                vf##L e = NAME##_exp(x);                                                               \
                for (int l = 0; l < L; l++) { float w = scores[t + l] == -INFINITY ? 0 : e[l]; scores[t + l] = w; total += w; } \
            }                                                                                          \
            for (; t < T; t++) {                                                                       \
                vf##L x = {0}; x[0] = scores[t] - best;                                                \
                float w = scores[t] == -INFINITY ? 0 : NAME##_exp(x)[0];                               \
                scores[t] = w; total += w;                                                             \
            }                                                                                          \
            float inv = total > 0 ? 1.0f / total : 0.0f;                                               \
            float *oh = out + b * st[9] + h * st[10];                                                  \
            int64_t d = 0;                                                                             \
            for (; d + L <= D; d += L) {                                                               \
                vf##L acc = {0};                                                                       \
                for (int64_t t2 = 0; t2 < T; t2++)                                                     \
                    if (scores[t2] != 0) acc += scores[t2] * load_f32_##L(vb + t2 * st[7] + d);        \
                store_f32_##L(oh + d, acc * inv);                                                      \
            }                                                                                          \
            for (; d < D; d++) {                                                                       \
                float a = 0;                                                                           \
                for (int64_t t2 = 0; t2 < T; t2++) a += scores[t2] * vb[t2 * st[7] + d];               \
                oh[d] = a * inv;                                                                       \
            }                                                                                          \
        }                                                                                              \
}

typedef void (*attention_fn)(const float *, const float *, const float *, const uint8_t *, float *, float *,
                             int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t *, float);
ATTENTION(attention, 4, )
#ifdef X86
ATTENTION(attention_v3, 8, TARGET_V3)
ATTENTION(attention_v4, 16, TARGET_V4)
static const attention_fn ATTENTIONS[3] = {attention, attention_v3, attention_v4};
#else
static const attention_fn ATTENTIONS[1] = {attention};
#endif

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, mask, out;
    long long B, H, KV, T, D;
    long long st[11];
    float scale;
    int isa = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLL(LLLLLLLLLLL)f|i", &q, &k, &v, &mask, &out, &B, &H, &KV, &T, &D, &st[0], &st[1],
                          &st[2], &st[3], &st[4], &st[5], &st[6], &st[7], &st[8], &st[9], &st[10], &scale, &isa))
        return NULL;
    if (isa < 0) isa = BEST;
    if (isa > BEST || KV <= 0 || H % KV || B < 0 || T < 0 || D < 0) {
        PyErr_Format(PyExc_ValueError, "decode_attention: isa %d (this CPU has up to %d), heads %lld / %lld", isa, BEST, H, KV);
        return NULL;
    }
    float *scores = PyMem_RawMalloc(sizeof(float) * (T ? T : 1));
    if (!scores) return PyErr_NoMemory();
    int64_t strides[11];
    for (int i = 0; i < 11; i++) strides[i] = st[i];
    attention_fn fn = ATTENTIONS[isa];
    Py_BEGIN_ALLOW_THREADS
    fn((const float *)(uintptr_t)q, (const float *)(uintptr_t)k, (const float *)(uintptr_t)v,
       mask ? (const uint8_t *)(uintptr_t)mask : NULL, (float *)(uintptr_t)out, scores, B, H, KV, T, D, strides, scale);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scores);
    Py_RETURN_NONE;
}

typedef struct { unsigned long long src, dst; long long rows, cols, stride; float scale; } transpose_job;

static PyObject *transpose_into(PyObject *self, PyObject *args) {
    PyObject *items, *seq;
    int dtype, isa = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oi|i", &items, &dtype, &isa)) return NULL;
    if (isa < 0) isa = BEST;
    if (isa > BEST || dtype < F32 || dtype > F16) {
        PyErr_Format(PyExc_ValueError, "transpose_into: isa %d (this CPU has up to %d), dtype %d", isa, BEST, dtype);
        return NULL;
    }
    if (!(seq = PySequence_Fast(items, "transpose_into: jobs must be a sequence"))) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    transpose_job *jobs = PyMem_Malloc(sizeof(transpose_job) * (n ? n : 1));
    if (!jobs) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t k = 0; k < n; k++) {
        transpose_job *j = &jobs[k];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "KKLLLf", &j->src, &j->dst, &j->rows, &j->cols, &j->stride, &j->scale)) {
            PyMem_Free(jobs); Py_DECREF(seq); return NULL;
        }
    }
    transpose_fn fn = TRANSPOSES[isa][dtype];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n; k++)
        fn((const float *)(uintptr_t)jobs[k].src, (void *)(uintptr_t)jobs[k].dst, jobs[k].rows, jobs[k].cols, jobs[k].stride,
           jobs[k].scale);
#ifdef X86
    _mm_sfence(); /* the non-temporal stores are seen before the slot is used */
#endif
    Py_END_ALLOW_THREADS
    PyMem_Free(jobs);
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lora_add", lora_add, METH_VARARGS,
     "lora_add(x, A, B, slot, w, order, y, n, in, r, out, ldy, dtype[, isa]): y[t] += w[t] (x[t] A[slot[t]]) "
     "B[slot[t]] for t in order (data pointers; serve/bgmv.py checks them)"},
    {"lora_add_async", lora_add_async, METH_VARARGS,
     "lora_add_async(same arguments as lora_add) -> ticket: queue the job on the worker thread; the pointers must "
     "stay valid until lora_wait(ticket) returned"},
    {"lora_wait", lora_wait, METH_VARARGS, "lora_wait(ticket): until the job of that ticket (and every earlier one) ran"},
    {"lora_busy", lora_busy, METH_VARARGS,
     "lora_busy(on) -> passes now busy: a forward pass that queues jobs begins (1) or ends (0); while any is busy "
     "the worker spins between jobs instead of sleeping"},
    {"lora_yielding", lora_yielding, METH_NOARGS, "lora_yielding() -> whether a load wants the cores now"},
    {"lora_yield", lora_yield, METH_VARARGS,
     "lora_yield(on) -> loads now running: work on other threads wants the cores (1) or is done (0); meanwhile "
     "the worker and waiting callers sleep after a short spin"},
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(q, k, v, mask, out, B, H, KV, T, D, strides, scale[, isa]): one query token per row over its "
     "cached keys and values (data pointers; serve/attention.py checks them)"},
    {"transpose_into", transpose_into, METH_VARARGS,
     "transpose_into(jobs, dtype[, isa]): for each (src, dst, rows, cols, stride, scale), dst[j * stride + i] = "
     "scale * src[i * cols + j] from float32 to dtype (data pointers; serve/bgmv.py checks them)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_bgmv", .m_doc = "Gathered LoRA matmuls for mixed batches.", .m_size = -1,
    .m_methods = methods};

PyMODINIT_FUNC PyInit__bgmv(void) {
    BEST = best_isa();
    pthread_atfork(NULL, NULL, forked_child);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *names = PyTuple_New(BEST + 1);
    for (int i = 0; i <= BEST; i++) PyTuple_SET_ITEM(names, i, PyUnicode_FromString(ISA_NAMES[i]));
    if (PyModule_AddObject(m, "ISAS", names) < 0) { Py_DECREF(names); Py_DECREF(m); return NULL; }
    return m;
}
