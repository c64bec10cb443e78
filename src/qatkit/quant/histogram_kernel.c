#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QATKIT_AVX2 1
#endif
#define BLOCK 512

/* qatkit's histogram pass (qatkit/quant/histogram_kernel.py builds and loads this file).

   One read of x gives the histogram of x (|x| if absolute) over [lo, hi] as torch.histc bins it on the CPU
   (float32 ((v - lo) * bins) / (hi - lo), truncated; v == hi in the last bin) together with the min and max of x
   (signed) and whether x holds a NaN. Values outside [lo, hi] land in the end bins: the caller keeps the counts
   only if min and max lie inside. Built without unsafe-math flags and with -ffp-contract=off: every operation is
   the IEEE float32 operation histc performs, in the same order. */

/* Bin indices of one block of at most BLOCK values into idx; min, max and NaN updated. */
static void bin_block(const float *p, int64_t m, float lo, float fbins, float width, float flast, int absolute,
                      int32_t *idx, float *mn, float *mx, int32_t *nan) {
    int64_t k = 0;
#if defined(__SSE2__)
    __m128 vmn = _mm_set1_ps(*mn), vmx = _mm_set1_ps(*mx), bad = _mm_setzero_ps();
    const __m128 vlo = _mm_set1_ps(lo), vb = _mm_set1_ps(fbins), vw = _mm_set1_ps(width),
                 vlast = _mm_set1_ps(flast), zero = _mm_setzero_ps(), sign = _mm_set1_ps(-0.0f);
    for (; k + 4 <= m; k += 4) {
        __m128 v = _mm_loadu_ps(p + k);
        bad = _mm_or_ps(bad, _mm_cmpunord_ps(v, v));
        vmn = _mm_min_ps(vmn, v);
        vmx = _mm_max_ps(vmx, v);
        __m128 a = absolute ? _mm_andnot_ps(sign, v) : v;
        __m128 t = _mm_div_ps(_mm_mul_ps(_mm_sub_ps(a, vlo), vb), vw);
        t = _mm_min_ps(_mm_max_ps(t, zero), vlast);  /* NaN -> 0 (max_ps returns its second operand) */
        _mm_storeu_si128((__m128i *)(idx + k), _mm_cvttps_epi32(t));
    }
    float lanes[4];
    _mm_storeu_ps(lanes, vmn);
    for (int j = 0; j < 4; j++) *mn = lanes[j] < *mn ? lanes[j] : *mn;
    _mm_storeu_ps(lanes, vmx);
    for (int j = 0; j < 4; j++) *mx = lanes[j] > *mx ? lanes[j] : *mx;
    *nan |= _mm_movemask_ps(bad) != 0;
#endif
    for (; k < m; k++) {
        float v = p[k];
        *nan |= (v != v);
        *mn = v < *mn ? v : *mn;
        *mx = v > *mx ? v : *mx;
        float a = absolute ? fabsf(v) : v;
        float t = ((a - lo) * fbins) / width;
        t = t >= 0.0f ? t : 0.0f;
        t = t < flast ? t : flast;
        idx[k] = (int32_t)t;
    }
}

/* Adds the histogram of x[0..n) to counts[0..bins); minmax[0..1] and nan_seen get x's extremes and NaN flag.
   Returns 0, or 1 if memory for the sub-histograms could not be allocated. */
#if defined(QATKIT_AVX2)
/* bin_block's vector loop on 8 lanes, for CPUs with AVX2 (chosen at run time); the same IEEE operations. */
__attribute__((target("avx2")))
static int64_t bin_block_avx2(const float *p, int64_t m, float lo, float fbins, float width, float flast,
                              int absolute, int32_t *idx, float *mn, float *mx, int32_t *nan) {
    __m256 vmn = _mm256_set1_ps(*mn), vmx = _mm256_set1_ps(*mx), bad = _mm256_setzero_ps();
    const __m256 vlo = _mm256_set1_ps(lo), vb = _mm256_set1_ps(fbins), vw = _mm256_set1_ps(width),
                 vlast = _mm256_set1_ps(flast), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    int64_t k = 0;
    for (; k + 8 <= m; k += 8) {
        __m256 v = _mm256_loadu_ps(p + k);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmn = _mm256_min_ps(vmn, v);
        vmx = _mm256_max_ps(vmx, v);
        __m256 a = absolute ? _mm256_andnot_ps(sign, v) : v;
        __m256 t = _mm256_div_ps(_mm256_mul_ps(_mm256_sub_ps(a, vlo), vb), vw);
        t = _mm256_min_ps(_mm256_max_ps(t, zero), vlast);
        _mm256_storeu_si256((__m256i *)(idx + k), _mm256_cvttps_epi32(t));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmn);
    for (int j = 0; j < 8; j++) *mn = lanes[j] < *mn ? lanes[j] : *mn;
    _mm256_storeu_ps(lanes, vmx);
    for (int j = 0; j < 8; j++) *mx = lanes[j] > *mx ? lanes[j] : *mx;
    *nan |= _mm256_movemask_ps(bad) != 0;
    return k;
}
#endif

int qatkit_bin_counts(const float *x, int64_t n, float lo, float hi, int32_t bins, int32_t absolute,
                      int64_t *counts, float *minmax, int32_t *nan_seen) {
    const float width = hi - lo, fbins = (float)bins, flast = (float)(bins - 1);
    uint32_t *sub = (uint32_t *)calloc((size_t)4 * (size_t)bins, sizeof(uint32_t));
    if (!sub) return 1;
    float mn = INFINITY, mx = -INFINITY;
    int32_t nan = 0, idx[BLOCK];
#if defined(QATKIT_AVX2)
    const int avx2 = __builtin_cpu_supports("avx2") && !getenv("QATKIT_HISTOGRAM_SSE2");  /* (the tests' switch) */
#endif
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = n - start < BLOCK ? n - start : BLOCK;
        int64_t done = 0;
#if defined(QATKIT_AVX2)
        if (avx2)
            done = bin_block_avx2(x + start, m, lo, fbins, width, flast, absolute, idx, &mn, &mx, &nan);
#endif
        bin_block(x + start + done, m - done, lo, fbins, width, flast, absolute, idx + done, &mn, &mx, &nan);
        int64_t k = 0;
        for (; k + 4 <= m; k += 4) {  /* four sub-histograms: repeated bins do not wait on each other */
            sub[idx[k]]++;
            sub[bins + idx[k + 1]]++;
            sub[2 * bins + idx[k + 2]]++;
            sub[3 * bins + idx[k + 3]]++;
        }
        for (; k < m; k++) sub[idx[k]]++;
    }
    for (int32_t b = 0; b < bins; b++)
        counts[b] += (int64_t)sub[b] + sub[bins + b] + sub[2 * bins + b] + sub[3 * bins + b];
    free(sub);
    minmax[0] = mn;
    minmax[1] = mx;
    *nan_seen = nan;
    return 0;
}
