#include <stdint.h>
#include <math.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QATKIT_AVX2 1
#endif

/* A weight's per-channel fake-quant with a folded BatchNorm factor, forward and backward, each one pass
   (qatkit/quant/weight_kernel.py builds and loads this file).

   Forward (the range and qparams come from the caller): for every element of channel c (K values each),
       q  = nearbyint((w * f[c]) * inv[c]) + zp[c]       (w alone where f is NULL; 2**63 and more: -inf, as below)
       c' = min(max(q, qmin), qmax)                      (NaN -> qmin, as fmax/fmin in PyTorch's kernels)
       y  = c' == zp[c] ? 0.0f : (c' - zp[c]) * scale[c]
   qatkit.quant.fake_quant_math.fake_quantize_math's float32 operations in its order: PyTorch's output bit for bit.

   Backward, for y = fake_quant(w * f):
       q  = nearbyint((w * f[c]) * inv[c]) + zp[c]       (an x86 int64 cast turns q >= 2**63 into qmin: q = -inf)
       g  = grad * (qmin <= q <= qmax ? 1.0f : 0.0f)     (the straight-through mask; NaN compares false)
       gw = g * f[c]                                     (the weight's gradient, written)
       gf[c] += g * w                                    (the factor's gradient: float32 products, summed per
                                                          channel in float64, rounded once to float32)
   The same float32 operations in the same order as qatkit.quant.fake_quant_math.weight_scaled_grad, so gw is
   autograd's bit for bit; gf is at least as accurate as torch's float32 sum (last bits differ). Built without
   unsafe-math flags and with -ffp-contract=off. */

/* A value's code on a channel's grid, as qatkit.quant.fake_quant_math.codes computes it: nearbyint(x * inv) + zp;
   with overflow_to_min, 2**63 and more (where the x86 int64 cast overflows) become -inf, which clamps to qmin. */
static inline float code_scalar(float x, float ic, float zc, int32_t overflow_to_min) {
    float q = nearbyintf(x * ic) + zc;
    return (overflow_to_min && q >= 9223372036854775808.0f) ? -INFINITY : q;
}

#if defined(QATKIT_AVX2)
__attribute__((target("avx2")))
static inline __m256 code_avx2(__m256 x, __m256 vi, __m256 vz, int32_t overflow_to_min) {
    __m256 q = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(x, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                             vz);
    if (!overflow_to_min) return q;
    return _mm256_blendv_ps(q, _mm256_set1_ps(-INFINITY),
                            _mm256_cmp_ps(q, _mm256_set1_ps(9223372036854775808.0f), _CMP_GE_OQ));
}
#endif

static double channel_scalar(const float *g, const float *w, int64_t n, float fc, float ic, float zc, float qmin,
                             float qmax, int32_t overflow_to_min, float *gw) {
    double acc = 0.0;
    for (int64_t k = 0; k < n; k++) {
        float q = code_scalar(w[k] * fc, ic, zc, overflow_to_min);
        float m = (q >= qmin && q <= qmax) ? 1.0f : 0.0f;
        float v = g[k] * m;
        gw[k] = v * fc;
        acc += (double)(v * w[k]);
    }
    return acc;
}

#if defined(QATKIT_AVX2)
__attribute__((target("avx2")))
static double channel_avx2(const float *g, const float *w, int64_t n, float fc, float ic, float zc, float qmin,
                           float qmax, int32_t overflow_to_min, float *gw) {
    const __m256 vf = _mm256_set1_ps(fc), vi = _mm256_set1_ps(ic), vz = _mm256_set1_ps(zc),
                 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax), one = _mm256_set1_ps(1.0f);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 vw = _mm256_loadu_ps(w + k);
        __m256 q = code_avx2(_mm256_mul_ps(vw, vf), vi, vz, overflow_to_min);
        __m256 inside = _mm256_and_ps(_mm256_cmp_ps(q, lo, _CMP_GE_OQ), _mm256_cmp_ps(q, hi, _CMP_LE_OQ));
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(g + k), _mm256_and_ps(inside, one));
        _mm256_storeu_ps(gw + k, _mm256_mul_ps(v, vf));
        __m256 p = _mm256_mul_ps(v, vw);
        acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
        acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
    double acc = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    return acc + channel_scalar(g + k, w + k, n - k, fc, ic, zc, qmin, qmax, overflow_to_min, gw + k);
}
#endif

/* Channels [0, channels) of a [channels, k] weight; inv, zp, f and gf hold one value per channel. Returns 0. */
int qatkit_weight_grad(const float *grad, const float *w, const float *f, const float *inv, const float *zp,
                       float qmin, float qmax, int32_t overflow_to_min, int64_t channels, int64_t k, float *gw,
                       float *gf) {
#if defined(QATKIT_AVX2)
    const int avx2 = __builtin_cpu_supports("avx2");
#endif
    for (int64_t c = 0; c < channels; c++) {
        const int64_t at = c * k;
#if defined(QATKIT_AVX2)
        if (avx2) {
            gf[c] = (float)channel_avx2(grad + at, w + at, k, f[c], inv[c], zp[c], qmin, qmax, overflow_to_min,
                                        gw + at);
            continue;
        }
#endif
        gf[c] = (float)channel_scalar(grad + at, w + at, k, f[c], inv[c], zp[c], qmin, qmax, overflow_to_min, gw + at);
    }
    return 0;
}

static void forward_scalar(const float *w, int64_t n, float fc, int32_t scaled, float ic, float sc, float zc,
                           float qmin, float qmax, int32_t overflow_to_min, float *y) {
    for (int64_t k = 0; k < n; k++) {
        float q = code_scalar(scaled ? w[k] * fc : w[k], ic, zc, overflow_to_min);
        float c = q >= qmin ? q : qmin;
        c = c <= qmax ? c : qmax;
        y[k] = c == zc ? 0.0f : (c - zc) * sc;
    }
}

#if defined(QATKIT_AVX2)
__attribute__((target("avx2")))
static void forward_avx2(const float *w, int64_t n, float fc, int32_t scaled, float ic, float sc, float zc,
                         float qmin, float qmax, int32_t overflow_to_min, float *y) {
    const __m256 vf = _mm256_set1_ps(fc), vi = _mm256_set1_ps(ic), vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(zc),
                 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax), zero = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 x = _mm256_loadu_ps(w + k);
        __m256 q = code_avx2(scaled ? _mm256_mul_ps(x, vf) : x, vi, vz, overflow_to_min);
        __m256 c = _mm256_blendv_ps(lo, q, _mm256_cmp_ps(q, lo, _CMP_GE_OQ));
        c = _mm256_blendv_ps(hi, c, _mm256_cmp_ps(c, hi, _CMP_LE_OQ));
        __m256 v = _mm256_mul_ps(_mm256_sub_ps(c, vz), vs);
        _mm256_storeu_ps(y + k, _mm256_blendv_ps(v, zero, _mm256_cmp_ps(c, vz, _CMP_EQ_OQ)));
    }
    forward_scalar(w + k, n - k, fc, scaled, ic, sc, zc, qmin, qmax, overflow_to_min, y + k);
}
#endif

/* Channels [0, channels) of a [channels, k] weight into y; f (NULL: no factor), inv, scale and zp hold one value
   per channel. Returns 0. */
int qatkit_weight_fake_quant(const float *w, const float *f, const float *inv, const float *scale, const float *zp,
                             float qmin, float qmax, int32_t overflow_to_min, int64_t channels, int64_t k,
                             float *y) {
#if defined(QATKIT_AVX2)
    const int avx2 = __builtin_cpu_supports("avx2");
#endif
    for (int64_t c = 0; c < channels; c++) {
        const int64_t at = c * k;
        const float fc = f ? f[c] : 1.0f;
#if defined(QATKIT_AVX2)
        if (avx2) {
            forward_avx2(w + at, k, fc, f != 0, inv[c], scale[c], zp[c], qmin, qmax, overflow_to_min, y + at);
            continue;
        }
#endif
        forward_scalar(w + at, k, fc, f != 0, inv[c], scale[c], zp[c], qmin, qmax, overflow_to_min, y + at);
    }
    return 0;
}
