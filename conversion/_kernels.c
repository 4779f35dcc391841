/* The converter's FP8 decodes as compiled loops: one pass over each element instead of torch's
 * five elementwise passes (see docs/conversion.md, "Compiled kernels"). Each function gives the
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 128 /* rows and columns per FP8 weight scale */
#define UNBIAS 1.329227995784916e36f /* 2^120 */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One build for any x86-64 machine: the loader picks the widest variant the CPU runs. */
#define VECTORISED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORISED
#endif

typedef union { float f; uint32_t u; int32_t i; } Bits;

/* The float32 bits of float32(code) * scale (scale already times 2^120), or of a positive quiet
 * NaN for a NaN code; no branch, so the loops vectorise. */
static inline uint32_t decoded_bits(uint8_t code, float scale) {
    Bits b = {.i = ((int32_t)(int8_t)code * (1 << 20)) & (int32_t)0x87F00000u};
    b.f *= scale;
    const uint32_t nan = -(uint32_t)((code & 0x7F) == 0x7F);
    return (b.u & ~nan) | (0x7FC00000u & nan);
}

/* One row of `k` codes, column c scaled by s_row[c / 128] * 2^120, into float32 bits. */
VECTORISED static void decode_row_f32(const uint8_t *restrict q, const float *restrict s_row, int64_t k,
                                      uint32_t *restrict out) {
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {
        const float scale = s_row[c0 / BLOCK] * UNBIAS;
        const int n = k - c0 < BLOCK ? (int)(k - c0) : BLOCK;
        for (int c = 0; c < n; c++)
            out[c0 + c] = decoded_bits(q[c0 + c], scale);
    }
}

/* The same rounded to BF16 bits, to nearest even as torch rounds (a NaN stays 0x7FC0). */
VECTORISED static void decode_row_bf16(const uint8_t *restrict q, const float *restrict s_row, int64_t k,
                                       uint16_t *restrict out) {
    for (int64_t c0 = 0; c0 < k; c0 += BLOCK) {
        const float scale = s_row[c0 / BLOCK] * UNBIAS;
        const int n = k - c0 < BLOCK ? (int)(k - c0) : BLOCK;
        for (int c = 0; c < n; c++) {
            const uint32_t u = decoded_bits(q[c0 + c], scale);
            const uint32_t nan = -(uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
            const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            out[c0 + c] = (uint16_t)((rounded & ~nan) | (0x7FC0u & nan));
        }
    }
}

/* Row-wise int8 of a decoded row (float32 bits, no NaN), as quant.quantize_int8 in float32:
 * scale = max(amax, 1e-8) / 127, q = round_half_even(x / scale). amax is taken on the bits of
 * |x|, whose integer order is their order as floats. |x| <= amax keeps |x| / scale <= 127 *
 * (1 + 2^-24), which rounds to at most 127, so no clamp. */
VECTORISED static float quantize_row_int8(const uint32_t *restrict x_bits, int64_t k, int8_t *restrict out) {
    uint32_t amax_bits = 0;
    for (int64_t c = 0; c < k; c++) {
        const uint32_t a = x_bits[c] & 0x7FFFFFFFu;
        amax_bits = a > amax_bits ? a : amax_bits;
    }
    const Bits amax = {.u = amax_bits};
    const float scale = (amax.f > 1e-8f ? amax.f : 1e-8f) / 127.0f;
    const float *x = (const float *)x_bits;
    for (int64_t c = 0; c < k; c++)
        out[c] = (int8_t)(int32_t)rintf(x[c] / scale);
    return scale;
}

typedef struct {
    unsigned long long q, s, out, row_scale;
    Py_ssize_t rows, k, s_stride;
} RowsArgs;

static int parse(PyObject *args, RowsArgs *a, int with_row_scale) {
    if (with_row_scale)
        return PyArg_ParseTuple(args, "KKnnnKK", &a->q, &a->s, &a->s_stride, &a->rows, &a->k, &a->out, &a->row_scale);
    return PyArg_ParseTuple(args, "KKnnnK", &a->q, &a->s, &a->s_stride, &a->rows, &a->k, &a->out);
}

static PyObject *fp8_rows(PyObject *args, int bf16) {
    RowsArgs a;
    if (!parse(args, &a, 0))
        return NULL;
    const uint8_t *q = (const uint8_t *)(uintptr_t)a.q;
    const float *s = (const float *)(uintptr_t)a.s;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < a.rows; r++) {
        const float *s_row = s + (r / BLOCK) * a.s_stride;
        if (bf16)
            decode_row_bf16(q + r * a.k, s_row, a.k, (uint16_t *)(uintptr_t)a.out + r * a.k);
        else
            decode_row_f32(q + r * a.k, s_row, a.k, (uint32_t *)(uintptr_t)a.out + r * a.k);
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
        decode_row_f32(q + r * a.k, s + (r / BLOCK) * a.s_stride, a.k, row);
        row_scale[r] = quantize_row_int8(row, a.k, out + r * a.k);
    }
    Py_END_ALLOW_THREADS
    free(row);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fp8_rows_bf16", fp8_rows_bf16, METH_VARARGS, "(q, s, s_stride, rows, k, out): e4m3 rows x 128x128 block scales -> BF16"},
    {"fp8_rows_f32", fp8_rows_f32, METH_VARARGS, "(q, s, s_stride, rows, k, out): e4m3 rows x 128x128 block scales -> float32"},
    {"fp8_rows_int8", fp8_rows_int8, METH_VARARGS,
     "(q, s, s_stride, rows, k, out, row_scale): decoded rows -> row-wise int8 and their scales"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
