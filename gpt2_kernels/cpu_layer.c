/* GPT-2's transformer blocks for one decoding step on a CPU, in one call: built into the library of
   cpu_linear.c and cpu_attention.c by gpt2_kernels/cpu_linear.py, driven by gpt2_kernels/cpu_decode.py.

   For each block, x (B, C) being the residual stream of the step's rows (updated in place):
       h = LayerNorm_1(x);  qkv = h W_qkv;  a = attention(q, cache + (k, v));  x += a W_proj
       h = LayerNorm_2(x);  f = GELU(h W_fc);                                   x += f W_out
   with the products of cpu_linear.c (int8 with per-output scales, or fp32) and the attention of
   cpu_attention.c. Eagerly in PyTorch a block is ~25 calls of 2-10 us of dispatch each; here it is
   none, which is most of what a step costs beyond reading the weights.

   The LayerNorm sums in LANES partial sums (then added), as a vectorised reduction does; GELU is the
   tanh approximation with a rational tanh (Eigen's, as PyTorch's vectorised CPU kernels use it:
   within a few ulp of tanhf), written as plain arithmetic so that the compiler vectorises it. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

void linear_i8(const float *x, int64_t ldx, int64_t M, const int8_t *w, int64_t N, int64_t K,
               const float *scale, const float *bias, float *y, int64_t ldy, int threads);
void linear_f32(const float *x, int64_t ldx, int64_t M, const float *w, int64_t N, int64_t K,
                const float *scale, const float *bias, float *y, int64_t ldy, int threads);
int attend_one_f32(const float *q, const float *k_new, const float *v_new, int64_t sb, int64_t sh,
                   float *k_cache, float *v_cache, int64_t csb, int64_t csh, int64_t csl,
                   float *out, int64_t osb, int64_t osh, int64_t B, int64_t H, int64_t L, int64_t D,
                   float scale, int threads);

/* One product: weight (out, in), int8 with scale (out,) or fp32 with scale NULL; bias (out,) or NULL. */
typedef struct {
    const void *weight;
    const float *scale;
    const float *bias;
} product_t;

/* One block's tensors (bias pointers may be NULL) and its caches (B, H, Lmax, D), unit stride along D. */
typedef struct {
    const float *ln_1_weight, *ln_1_bias;
    product_t c_attn, attn_proj;
    const float *ln_2_weight, *ln_2_bias;
    product_t c_fc, mlp_proj;
    float *k_cache, *v_cache;
    int64_t cache_strides[3];
} block_t;

#define LANES 16

static void layer_norm(const float *x, int64_t C, const float *weight, const float *bias, float eps, float *y) {
    float part[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= C; c += LANES)
        for (int j = 0; j < LANES; j++) part[j] += x[c + j];
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += part[j];
    for (; c < C; c++) sum += x[c];
    const float mean = sum / (float)C;
    for (int j = 0; j < LANES; j++) part[j] = 0.0f;
    for (c = 0; c + LANES <= C; c += LANES)
        for (int j = 0; j < LANES; j++) {
            const float d = x[c + j] - mean;
            part[j] += d * d;
        }
    float squares = 0.0f;
    for (int j = 0; j < LANES; j++) squares += part[j];
    for (; c < C; c++) squares += (x[c] - mean) * (x[c] - mean);
    const float rstd = 1.0f / sqrtf(squares / (float)C + eps);
    for (c = 0; c < C; c++) y[c] = (x[c] - mean) * rstd * weight[c] + (bias ? bias[c] : 0.0f);
}

static inline float rational_tanh(float u) {
    const float limit = 7.90531110763549805f;  /* tanh is 1 in fp32 beyond it */
    u = u > limit ? limit : u < -limit ? -limit : u;
    const float u2 = u * u;
    float p = -2.76076847742355e-16f;
    p = p * u2 + 2.00018790482477e-13f;
    p = p * u2 - 8.60467152213735e-11f;
    p = p * u2 + 5.12229709037114e-08f;
    p = p * u2 + 1.48572235717979e-05f;
    p = p * u2 + 6.37261928875436e-04f;
    p = p * u2 + 4.89352455891786e-03f;
    p = p * u;
    float q = 1.19825839466702e-06f;
    q = q * u2 + 1.18534705686654e-04f;
    q = q * u2 + 2.26843463243900e-03f;
    q = q * u2 + 4.89352518554385e-03f;
    return p / q;
}

void gelu_tanh_f32(float *x, int64_t n) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + rational_tanh(k * (v + 0.044715f * v * v * v)));
    }
}

static void product(int int8, const float *x, int64_t M, int64_t K, const product_t *p, int64_t N, float *y, int threads) {
    if (int8)
        linear_i8(x, K, M, (const int8_t *)p->weight, N, K, p->scale, p->bias, y, N, threads);
    else
        linear_f32(x, K, M, (const float *)p->weight, N, K, NULL, p->bias, y, N, threads);
}

/* Every block of a step: x (B, C) in place; the step's position is L - 1. ``work`` holds 9 * B * C
   floats (h, qkv, attention output, f). Returns 0, or -1 when the attention's scratch memory could
   not be allocated. */
int decode_blocks(const block_t *blocks, int64_t n_blocks, int int8, float *x, int64_t B, int64_t C, int64_t H,
                  int64_t L, float eps, float *work, int threads) {
    const int64_t D = C / H;
    float *h = work, *qkv = h + B * C, *att = qkv + 3 * B * C, *f = att + B * C;
    for (int64_t i = 0; i < n_blocks; i++) {
        const block_t *blk = &blocks[i];
        for (int64_t b = 0; b < B; b++) layer_norm(x + b * C, C, blk->ln_1_weight, blk->ln_1_bias, eps, h + b * C);
        product(int8, h, B, C, &blk->c_attn, 3 * C, qkv, threads);
        if (attend_one_f32(qkv, qkv + C, qkv + 2 * C, 3 * C, D, blk->k_cache, blk->v_cache, blk->cache_strides[0],
                           blk->cache_strides[1], blk->cache_strides[2], att, C, D, B, H, L, D,
                           1.0f / sqrtf((float)D), threads) != 0)
            return -1;
        product(int8, att, B, C, &blk->attn_proj, C, h, threads);
        for (int64_t j = 0; j < B * C; j++) x[j] += h[j];
        for (int64_t b = 0; b < B; b++) layer_norm(x + b * C, C, blk->ln_2_weight, blk->ln_2_bias, eps, h + b * C);
        product(int8, h, B, C, &blk->c_fc, 4 * C, f, threads);
        gelu_tanh_f32(f, B * 4 * C);
        product(int8, f, B, 4 * C, &blk->mlp_proj, C, h, threads);
        for (int64_t j = 0; j < B * C; j++) x[j] += h[j];
    }
    return 0;
}
