/* One query's attention for CPU decoding, built into the same library as cpu_linear.c by
   gpt2_kernels/cpu_linear.py.

   For each row b and head h: the new key and value (position L - 1) are written into the caches,
   then out[b, h] = softmax(q[b, h] . keys[b, h, :L] * scale) @ values[b, h, :L], in fp32.

   q, k_new, v_new, out: (B, H, D) with strides (sb, sh) and unit stride along D.
   k_cache, v_cache: (B, H, Lmax, D) with strides (csb, csh, csl) and unit stride along D.

   A decoding step is one query per head over a few hundred cached positions: PyTorch's attention
   spends ~50 us per call on dispatch and its flash kernel's set-up, for ~1 us of arithmetic here.
   The scores are the max-subtracted exponentials, summed in fp32 as PyTorch's CPU softmax does. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16  /* partial sums of a dot product: the compiler keeps them in one or two vector registers */

static inline float dot(const float *a, const float *b, int64_t D) {
    float part[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int j = 0; j < LANES; j++) part[j] += a[d + j] * b[d + j];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += part[j];
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

static void attend_head(const float *q, const float *keys, const float *values, int64_t csl, int64_t L,
                        int64_t D, float scale, float *scores, float *out) {
    float max = -INFINITY;
    for (int64_t l = 0; l < L; l++) {
        const float s = dot(q, keys + l * csl, D) * scale;
        scores[l] = s;
        if (s > max) max = s;
    }
    float total = 0.0f;
    for (int64_t l = 0; l < L; l++) {
        scores[l] = expf(scores[l] - max);
        total += scores[l];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t l = 0; l < L; l++) {
        const float p = scores[l] * inv;
        const float *value = values + l * csl;
        for (int64_t d = 0; d < D; d++) out[d] += p * value[d];
    }
}

/* Returns 0, or -1 when the scratch memory (L floats per thread) cannot be allocated. */
int attend_one_f32(const float *q, const float *k_new, const float *v_new, int64_t sb, int64_t sh,
                   float *k_cache, float *v_cache, int64_t csb, int64_t csh, int64_t csl,
                   float *out, int64_t osb, int64_t osh, int64_t B, int64_t H, int64_t L, int64_t D,
                   float scale, int threads) {
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && B * H > 1)")
    {
        float *scores = malloc((size_t)L * sizeof(float));
        if (scores == NULL) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (scores == NULL) continue;
            const int64_t b = bh / H, h = bh % H;
            float *keys = k_cache + b * csb + h * csh, *values = v_cache + b * csb + h * csh;
            memcpy(keys + (L - 1) * csl, k_new + b * sb + h * sh, (size_t)D * sizeof(float));
            memcpy(values + (L - 1) * csl, v_new + b * sb + h * sh, (size_t)D * sizeof(float));
            attend_head(q + b * sb + h * sh, keys, values, csl, L, D, scale, scores, out + b * osb + h * osh);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
