/* The converter's FP8 decodes as compiled loops: one pass over each element instead of torch's
 * five elementwise passes (see docs/conversion.md, "Compiled decode kernels"). Each function gives the
 * same bits as the torch path in conversion/formats.py, which stays the reference and the
 * fallback; conversion/kernels.py checks every argument before calling in, so pointers here are
 * trusted.
 *
 * Decode of an e4m3 byte, as ops/e4m3.py: sign-extended to int32, shifted left by 20 and masked
 * with 0x87F00000 it is the float32 of its value times 2^-120, exactly; the block's scale times
 * 2^120 (exact, a power of two) then gives float32(q) * scale rounded once. NaN codes (S.1111.111)
 * become a positive quiet NaN, as torch's masked_fill_(nan) leaves them. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 128 /* rows and columns per FP8 weight scale */
#define UNBIAS 1.329227995784916e36f /* 2^120 */

typedef union { float f; uint32_t u; int32_t i; } Bits;

/* The float32 bits of float32(code) * scale (scale already times 2^120), or 0x7FC00000 (a
 * positive quiet NaN) for a NaN code. */
static inline uint32_t decoded_bits(uint8_t code, float scale) {
    Bits b = {.i = ((int32_t)(int8_t)code * (1 << 20)) & (int32_t)0x87F00000u};
    b.f *= scale;
    const uint32_t nan = -(uint32_t)((code & 0x7F) == 0x7F);
    return (b.u & ~nan) | (0x7FC00000u & nan);
}

/* float32 bits -> BF16 bits, to nearest even as torch rounds; 0x7FC00000 gives 0x7FC0. */
static inline uint16_t bf16_of(uint32_t u) { return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }

/* round_half_even(x / scale): |x / scale| <= 127 * (1 + 2^-24) < 2^22, where adding and taking
 * away 1.5 * 2^23 rounds to an integer, to nearest even, in float32 (no libm call, so it
 * vectorises where rintf does not). */
static inline int8_t int8_of(float x, float scale) {
    const float magic = 12582912.0f;
    return (int8_t)(int32_t)((x / scale + magic) - magic);
}

static inline float int8_scale(uint32_t amax_bits) {
    const Bits amax = {.u = amax_bits};
    return (amax.f > 1e-8f ? amax.f : 1e-8f) / 127.0f;
}

/* Portable loops (any compiler, any CPU; the compiler vectorises what it can). Each row of `k`
 * codes has column c scaled by s_row[c / 128] * 2^120. */
static void decode_row_f32(const uint8_t *restrict q, const float *restrict s_row, int64_t k, uint32_t *restrict out) {
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {  /* a block's scale is a constant of the inner loop */
        const float s = s_row[c0 / BLOCK] * UNBIAS;
        const int n = k - c0 < BLOCK ? (int)(k - c0) : BLOCK;
        for (int c = 0; c < n; c++)
            out[c0 + c] = decoded_bits(q[c0 + c], s);
    }
}

static void decode_row_bf16(const uint8_t *restrict q, const float *restrict s_row, int64_t k, uint16_t *restrict out) {
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {
        const float s = s_row[c0 / BLOCK] * UNBIAS;
        const int n = k - c0 < BLOCK ? (int)(k - c0) : BLOCK;
        for (int c = 0; c < n; c++)
            out[c0 + c] = bf16_of(decoded_bits(q[c0 + c], s));
    }
}

/* Row-wise int8 of a row (as quant.quantize_int8 in float32): scale = max(amax, 1e-8) / 127,
 * q = round_half_even(x / scale); the row is decoded into `row` first (float32 bits, no NaN: the
 * caller sends rows with NaN codes to the contract). amax is taken on the bits of |x|, whose
 * integer order is their order as floats. |x| <= amax keeps |x| / scale <= 127 * (1 + 2^-24),
 * which rounds to at most 127, so no clamp. */
static float quantize_row_int8(const uint8_t *restrict q, const float *restrict s_row, int64_t k, uint32_t *restrict row,
                               int8_t *restrict out) {
    decode_row_f32(q, s_row, k, row);
    uint32_t amax = 0;
    for (int64_t c = 0; c < k; c++)
        amax = (row[c] & 0x7FFFFFFFu) > amax ? row[c] & 0x7FFFFFFFu : amax;
    const float scale = int8_scale(amax);
    const float *x = (const float *)row;
    for (int64_t c = 0; c < k; c++)
        out[c] = int8_of(x[c], scale);
    return scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* AVX2 versions, 16 codes at a time (32 for the int8 stores); the loader uses them where the CPU
 * has AVX2 (`have_avx2`). Same operations, same order, same bits; a block's last < 16 columns
 * go through the portable helpers. Callers can ask for the portable loops (`simd` false), so
 * they are tested on machines that have AVX2 too. */
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2")))

static int have_avx2;

/* 16 codes' float32 products, 8 in each of lo and hi (NaN codes come out finite: see nan16). */
AVX2 static inline void decode16(__m128i codes, __m256 scale, __m256 *lo, __m256 *hi) {
    const __m256i mask = _mm256_set1_epi32((int32_t)0x87F00000u);
    const __m256i a = _mm256_slli_epi32(_mm256_cvtepi8_epi32(codes), 20);
    const __m256i b = _mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)), 20);
    *lo = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(a, mask)), scale);
    *hi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(b, mask)), scale);
}

/* 0xFF in each byte whose code is a NaN code. */
AVX2 static inline __m128i nan16(__m128i codes) {
    const __m128i x7f = _mm_set1_epi8(0x7F);
    return _mm_cmpeq_epi8(_mm_and_si128(codes, x7f), x7f);
}

AVX2 static inline __m256i bf16_round(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

AVX2 static void decode_row_bf16_avx2(const uint8_t *q, const float *s_row, int64_t k, uint16_t *out) {
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {
        const float s = s_row[c0 / BLOCK] * UNBIAS;
        const __m256 scale = _mm256_set1_ps(s);
        const int64_t end = c0 + (k - c0 < BLOCK ? k - c0 : BLOCK);
        int64_t c = c0;
        for (; c + 16 <= end; c += 16) {
            const __m128i codes = _mm_loadu_si128((const __m128i *)(q + c));
            __m256 lo, hi;
            decode16(codes, scale, &lo, &hi);
            /* packus interleaves the 128-bit lanes; the permute puts them back in order */
            __m256i bf = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_round(lo), bf16_round(hi)), 0xD8);
            const __m128i nan = nan16(codes);
            if (_mm_movemask_epi8(nan))
                bf = _mm256_blendv_epi8(bf, _mm256_set1_epi16(0x7FC0), _mm256_cvtepi8_epi16(nan));
            _mm256_storeu_si256((__m256i *)(out + c), bf);
        }
        for (; c < end; c++)
            out[c] = bf16_of(decoded_bits(q[c], s));
    }
}

/* Decodes a row into float32 bits; returns the largest |x| bits seen (for int8 rows). */
AVX2 static uint32_t decode_row_f32_avx2(const uint8_t *q, const float *s_row, int64_t k, uint32_t *out) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
    __m256i amax = _mm256_setzero_si256();
    uint32_t amax_tail = 0;
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {
        const float s = s_row[c0 / BLOCK] * UNBIAS;
        const __m256 scale = _mm256_set1_ps(s);
        const int64_t end = c0 + (k - c0 < BLOCK ? k - c0 : BLOCK);
        int64_t c = c0;
        for (; c + 16 <= end; c += 16) {
            const __m128i codes = _mm_loadu_si128((const __m128i *)(q + c));
            __m256 lo, hi;
            decode16(codes, scale, &lo, &hi);
            const __m128i is_nan = nan16(codes);
            if (_mm_movemask_epi8(is_nan)) {
                lo = _mm256_blendv_ps(lo, nan, _mm256_castsi256_ps(_mm256_cvtepi8_epi32(is_nan)));
                hi = _mm256_blendv_ps(hi, nan, _mm256_castsi256_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(is_nan, 8))));
            }
            _mm256_storeu_ps((float *)(out + c), lo);
            _mm256_storeu_ps((float *)(out + c + 8), hi);
            amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(lo), abs_mask));
            amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(hi), abs_mask));
        }
        for (; c < end; c++) {
            out[c] = decoded_bits(q[c], s);
            amax_tail = (out[c] & 0x7FFFFFFFu) > amax_tail ? out[c] & 0x7FFFFFFFu : amax_tail;
        }
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, amax);
    for (int i = 0; i < 8; i++)
        amax_tail = lanes[i] > amax_tail ? lanes[i] : amax_tail;
    return amax_tail;
}

AVX2 static inline __m256i int8_round(const float *x, __m256 scale) {
    return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), scale),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

AVX2 static float quantize_row_int8_avx2(const uint8_t *q, const float *s_row, int64_t k, uint32_t *row, int8_t *out) {
    const float s = int8_scale(decode_row_f32_avx2(q, s_row, k, row));
    const __m256 scale = _mm256_set1_ps(s);
    const float *x = (const float *)row;
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        const __m256i ab = _mm256_packs_epi32(int8_round(x + c, scale), int8_round(x + c + 8, scale));
        const __m256i cd = _mm256_packs_epi32(int8_round(x + c + 16, scale), int8_round(x + c + 24, scale));
        /* the two packs interleave 4-byte groups across lanes; the permute restores the order */
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(out + c), bytes);
    }
    for (; c < k; c++)
        out[c] = int8_of(x[c], s);
    return s;
}
#endif

static void decode_row(const uint8_t *q, const float *s_row, int64_t k, void *out, int bf16, int simd) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd && have_avx2) {
        if (bf16)
            decode_row_bf16_avx2(q, s_row, k, out);
        else
            decode_row_f32_avx2(q, s_row, k, out);
        return;
    }
#endif
    if (bf16)
        decode_row_bf16(q, s_row, k, out);
    else
        decode_row_f32(q, s_row, k, out);
}

static float int8_row(const uint8_t *q, const float *s_row, int64_t k, uint32_t *row, int8_t *out, int simd) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd && have_avx2)
        return quantize_row_int8_avx2(q, s_row, k, row, out);
#endif
    return quantize_row_int8(q, s_row, k, row, out);
}

typedef struct {
    unsigned long long q, s, out, row_scale;
    Py_ssize_t rows, k, s_stride;
    int simd;
} RowsArgs;

static int parse(PyObject *args, RowsArgs *a, int with_row_scale) {
    if (with_row_scale)
        return PyArg_ParseTuple(args, "KKnnnKKp", &a->q, &a->s, &a->s_stride, &a->rows, &a->k, &a->out, &a->row_scale, &a->simd);
    return PyArg_ParseTuple(args, "KKnnnKp", &a->q, &a->s, &a->s_stride, &a->rows, &a->k, &a->out, &a->simd);
}

static PyObject *fp8_rows(PyObject *args, int bf16) {
    RowsArgs a;
    if (!parse(args, &a, 0))
        return NULL;
    const uint8_t *q = (const uint8_t *)(uintptr_t)a.q;
    const float *s = (const float *)(uintptr_t)a.s;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < a.rows; r++) {
        const size_t width = bf16 ? sizeof(uint16_t) : sizeof(uint32_t);
        decode_row(q + r * a.k, s + (r / BLOCK) * a.s_stride, a.k, (char *)(uintptr_t)a.out + r * a.k * width, bf16, a.simd);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fp8_rows_bf16(PyObject *self, PyObject *args) { return fp8_rows(args, 1); }
static PyObject *fp8_rows_f32(PyObject *self, PyObject *args) { return fp8_rows(args, 0); }

static PyObject *fp8_rows_int8(PyObject *self, PyObject *args) {
    RowsArgs a;
    if (!parse(args, &a, 1))
        return NULL;
    uint32_t *row = malloc((size_t)(a.k > 0 ? a.k : 1) * sizeof(uint32_t));
    if (!row)
        return PyErr_NoMemory();
    const uint8_t *q = (const uint8_t *)(uintptr_t)a.q;
    const float *s = (const float *)(uintptr_t)a.s;
    int8_t *out = (int8_t *)(uintptr_t)a.out;
    float *row_scale = (float *)(uintptr_t)a.row_scale;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < a.rows; r++) {
        row_scale[r] = int8_row(q + r * a.k, s + (r / BLOCK) * a.s_stride, a.k, row, out + r * a.k, a.simd);
    }
    Py_END_ALLOW_THREADS
    free(row);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fp8_rows_bf16", fp8_rows_bf16, METH_VARARGS, "(q, s, s_stride, rows, k, out, simd): e4m3 rows x 128x128 block scales -> BF16"},
    {"fp8_rows_f32", fp8_rows_f32, METH_VARARGS, "(q, s, s_stride, rows, k, out, simd): e4m3 rows x 128x128 block scales -> float32"},
    {"fp8_rows_int8", fp8_rows_int8, METH_VARARGS,
     "(q, s, s_stride, rows, k, out, row_scale, simd): decoded rows -> row-wise int8 and their scales"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
