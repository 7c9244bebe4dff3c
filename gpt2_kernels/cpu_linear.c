/* Few-row linear layers for CPU decoding (AVX2 + FMA, or AVX-512), built and loaded by gpt2_kernels/cpu_linear.py.

   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] + bias[n]     (bias NULL: 0)

   x (M, K) fp32 rows with stride ldx, w (N, K) int8 (linear_i8) or fp32 (linear_f32, scale NULL),
   y (M, N) fp32. Decoding a token reads every weight once, so the loop is built to stream w: a tile
   of NB weight rows times MB rows of x walks the whole reduction, each weight vector loaded once
   (int8: sign-extended and converted to fp32, exact) and multiplied into the MB rows' accumulators,
   so a batch of rows reads the weights once.
   NB * MB is 6-8 independent FMA chains, enough to cover the FMA latency. The sum over k is in fp32
   (VL lanes, then the lanes added), the scale applied once per output (it is constant along k).
   Each step also prefetches the next tile into L2 (see the tile's loop).
   Threads split the output rows (OpenMP, static: each thread streams one contiguous part).

   Built with -mavx512f where the CPU has it (VL = 16 lanes: half the instructions per weight byte,
   which is what bounds one thread's speed once the weights stream from memory), else AVX2 (VL = 8). */

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VL 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
#else
#define VL 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One tile: NB weight rows from w (row stride K) times MB rows of x, the whole reduction; out[j][i]
   = the raw sum of weight row j times x row i. NB and MB are constants in each instantiation, so the
   accumulators live in registers. */
#define DEFINE_TILE(T, NB, MB)                                                                          \
    static void tile_##T##_##NB##_##MB(const float *x, int64_t ldx, const T *w, int64_t K,            \
                                       float out[NB][MB]) {                                            \
        vec acc[NB][MB];                                                                               \
        for (int j = 0; j < NB; j++)                                                                   \
            for (int i = 0; i < MB; i++) acc[j][i] = vzero();                                          \
        int64_t k = 0;                                                                                 \
        /* The NB rows are one contiguous block and the next block follows it: each step fetches as   \
           many bytes of the next block as it reads of this one, so it is in cache when its turn comes  \
           (rows of 768 bytes are too short for the hardware prefetcher to follow 8 of them at once).   \
           Into L2, not L1: one thread then has more reads in flight (fp32 at one row: ~10% faster). */ \
        const char *next = (const char *)(w + NB * K);                                                 \
        for (; k + VL <= K; k += VL) {                                                                 \
            for (int p = 0; p < NB * VL * (int)sizeof(T); p += 64)                                     \
                _mm_prefetch(next + k * NB * (int64_t)sizeof(T) + p, _MM_HINT_T1);                     \
            vec xv[MB];                                                                                \
            for (int i = 0; i < MB; i++) xv[i] = vload_f32(x + i * ldx + k);                           \
            for (int j = 0; j < NB; j++) {                                                             \
                vec wv = vload_##T(w + j * K + k);                                                     \
                for (int i = 0; i < MB; i++) acc[j][i] = vfma(wv, xv[i], acc[j][i]);                   \
            }                                                                                          \
        }                                                                                              \
        for (int j = 0; j < NB; j++)                                                                   \
            for (int i = 0; i < MB; i++) {                                                             \
                float s = hsum(acc[j][i]);                                                             \
                for (int64_t kk = k; kk < K; kk++) s += (float)w[j * K + kk] * x[i * ldx + kk];        \
                out[j][i] = s;                                                                         \
            }                                                                                          \
    }

typedef int8_t i8;
typedef float f32;

#define DEFINE_TILES(T)                                                                                 \
    DEFINE_TILE(T, 8, 1)                                                                               \
    DEFINE_TILE(T, 4, 2)                                                                               \
    DEFINE_TILE(T, 2, 4)                                                                               \
    DEFINE_TILE(T, 2, 3)                                                                               \
    DEFINE_TILE(T, 1, 1)                                                                               \
    DEFINE_TILE(T, 1, 2)                                                                               \
    DEFINE_TILE(T, 1, 3)                                                                               \
    DEFINE_TILE(T, 1, 4)

DEFINE_TILES(i8)
DEFINE_TILES(f32)

/* Computes and writes the outputs of weight rows n..n+NB-1 for x rows m0..m0+MB-1. */
#define CALL(T, NB, MB, n)                                                                              \
    {                                                                                                  \
        float out[NB][MB];                                                                             \
        tile_##T##_##NB##_##MB(x + (m0) * ldx, ldx, w + (n) * K, K, out);                              \
        for (int j = 0; j < NB; j++)                                                                   \
            for (int i = 0; i < MB; i++) {                                                             \
                float v = out[j][i];                                                                   \
                if (scale) v *= scale[(n) + j];                                                        \
                if (bias) v += bias[(n) + j];                                                          \
                y[((m0) + i) * ldy + (n) + j] = v;                                                     \
            }                                                                                          \
    }

/* Every x row times the weight rows n0..n0+nb-1 (nb: the block size of this M, or fewer at the end). */
#define DEFINE_BLOCK(T)                                                                                 \
    static void block_##T(const float *x, int64_t ldx, int64_t M, const T *w, int64_t K, int64_t n0,   \
                          int nb, const float *scale, const float *bias, float *y, int64_t ldy) {      \
        const int64_t m0 = 0;                                                                          \
        if (M == 1 && nb == 8) CALL(T, 8, 1, n0)                                                       \
        else if (M == 2 && nb == 4) CALL(T, 4, 2, n0)                                                  \
        else if (M <= 2) {                                                                             \
            for (int64_t n = n0; n < n0 + nb; n++)                                                     \
                if (M == 1) CALL(T, 1, 1, n) else CALL(T, 1, 2, n)                                     \
        } else {                                                                                       \
            for (int64_t mc = 0; mc < M; mc += 4) {                                                    \
                const int64_t m0 = mc, mb = M - mc < 4 ? M - mc : 4;                                   \
                if (nb == 2 && mb == 4) CALL(T, 2, 4, n0)                                              \
                else if (nb == 2 && mb == 3) CALL(T, 2, 3, n0)                                         \
                else for (int64_t n = n0; n < n0 + nb; n++) {                                          \
                    if (mb == 4) CALL(T, 1, 4, n)                                                      \
                    else if (mb == 3) CALL(T, 1, 3, n)                                                 \
                    else if (mb == 2) CALL(T, 1, 2, n)                                                 \
                    else CALL(T, 1, 1, n)                                                              \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }

DEFINE_BLOCK(i8)
DEFINE_BLOCK(f32)

#define DEFINE_LINEAR(T)                                                                                \
    void linear_##T(const float *x, int64_t ldx, int64_t M, const T *w, int64_t N, int64_t K,         \
                    const float *scale, const float *bias, float *y, int64_t ldy, int threads) {       \
        int nb = M == 1 ? 8 : M == 2 ? 4 : 2;                                                          \
        int64_t blocks = (N + nb - 1) / nb;                                                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")             \
        for (int64_t b = 0; b < blocks; b++) {                                                         \
            int64_t n0 = b * nb;                                                                       \
            int rows = N - n0 < nb ? (int)(N - n0) : nb;                                               \
            block_##T(x, ldx, M, w, K, n0, rows, scale, bias, y, ldy);                                 \
        }                                                                                              \
    }

DEFINE_LINEAR(i8)
DEFINE_LINEAR(f32)
