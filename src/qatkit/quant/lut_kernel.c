#include <stdint.h>
#include <math.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QATKIT_AVX2 1
#endif

/* A function of a fake-quantized input, as a table of its values on the input's grid
   (qatkit/quant/lut_kernel.py builds and loads this file).

   For every element: the input quantizer's code, as qatkit.quant.fake_quant_math.codes and fake_quantize_math
   compute it (per tensor, no int64 overflow rule),
       q = nearbyint(x * inv) + zp;  c = q >= qmin ? q : qmin;  c = c <= qmax ? c : qmax   (NaN -> qmin)
   then y = table[c - qmin]. The caller fills the table with the function's value at each code's grid value, so
   y is what the function gives on the fake-quantized x, bit for bit. Built without unsafe-math flags. */

static void lookup_scalar(const float *x, int64_t n, float inv, float zp, float qmin, float qmax,
                          const float *table, float *y) {
    for (int64_t k = 0; k < n; k++) {
        float q = nearbyintf(x[k] * inv) + zp;
        float c = q >= qmin ? q : qmin;
        c = c <= qmax ? c : qmax;
        y[k] = table[(int32_t)(c - qmin)];
    }
}

#if defined(QATKIT_AVX2)
__attribute__((target("avx2")))
static void lookup_avx2(const float *x, int64_t n, float inv, float zp, float qmin, float qmax,
                        const float *table, float *y) {
    const __m256 vi = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zp), lo = _mm256_set1_ps(qmin),
                 hi = _mm256_set1_ps(qmax);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 q = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vi),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
        __m256 c = _mm256_blendv_ps(lo, q, _mm256_cmp_ps(q, lo, _CMP_GE_OQ));
        c = _mm256_blendv_ps(hi, c, _mm256_cmp_ps(c, hi, _CMP_LE_OQ));
        __m256i idx = _mm256_cvttps_epi32(_mm256_sub_ps(c, lo));
        _mm256_storeu_ps(y + k, _mm256_i32gather_ps(table, idx, 4));
    }
    lookup_scalar(x + k, n - k, inv, zp, qmin, qmax, table, y + k);
}
#endif

/* y[k] = table[code(x[k]) - qmin] for k in [0, n); the table holds qmax - qmin + 1 values. Returns 0. */
int qatkit_lookup(const float *x, int64_t n, float inv, float zp, float qmin, float qmax, const float *table,
                  float *y) {
#if defined(QATKIT_AVX2)
    if (__builtin_cpu_supports("avx2")) {
        lookup_avx2(x, n, inv, zp, qmin, qmax, table, y);
        return 0;
    }
#endif
    lookup_scalar(x, n, inv, zp, qmin, qmax, table, y);
    return 0;
}
