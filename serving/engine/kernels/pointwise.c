/* RMSNorm and rotary embedding of a decoder layer, one call each (CPU, float32 or bfloat16).
 *
 * In torch each is five or six elementwise ops (RMSNorm: square, mean, add, rsqrt, two
 * multiplies; RoPE: slice, negate, concatenate, two multiplies, add), each a pass over memory
 * and a dispatch of several microseconds: 0.38 s of a 6.4 s forward in bench/serving.py's
 * full n=100 run. Here each row is read once and written once.
 *
 * rmsnorm_f32: out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)), HF's LlamaRMSNorm in float32.
 * rope_f32: HF's rotate-half RoPE, out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t]
 * for x [rows, heads, head_dim] and cos/sin [rows, head_dim]; out may be x.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BGMV_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define INLINE static inline __attribute__((always_inline))

CLONES
void rmsnorm_f32(int64_t rows, const float *x, int64_t ldx, const float *w, float *out,
                 int64_t ldo, int64_t dim, float eps) {
    for (int64_t t = 0; t < rows; t++) {
        const float *xt = x + t * ldx;
        float *ot = out + t * ldo;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) s += xt[i] * xt[i];
        float inv = 1.f / sqrtf(s / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) ot[i] = w[i] * (xt[i] * inv);
    }
}

CLONES
void rope_f32(int64_t rows, int64_t heads, int64_t head_dim, const float *x, float *out,
              const float *cos, const float *sin) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + (t * heads + h) * head_dim;
            float *oh = out + (t * heads + h) * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = xh[i], b = xh[i + half];  /* both read before out (== x) is written */
                oh[i] = a * c[i] - b * s[i];
                oh[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* bfloat16 storage: a value widened to float32, and float32 rounded to nearest even. */
INLINE float bf(uint16_t h) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)h << 16};
    return c.f;
}

INLINE float round_bf(float f) {
    union { float f; uint32_t u; } c = {.f = f};
    c.u = (c.u + 0x7fffu + ((c.u >> 16) & 1u)) & 0xffff0000u;
    return c.f;
}

INLINE uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } c = {.f = round_bf(f)};
    return (uint16_t)(c.u >> 16);
}

/* HF's LlamaRMSNorm on bf16: normalised in float32, rounded to bf16, times the weight (one
 * more rounding), the same casts in the same order. */
CLONES
void rmsnorm_bf16(int64_t rows, const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *out,
                  int64_t ldo, int64_t dim, float eps) {
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *xt = x + t * ldx;
        uint16_t *ot = out + t * ldo;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) s += bf(xt[i]) * bf(xt[i]);
        float inv = 1.f / sqrtf(s / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) ot[i] = to_bf16(bf(w[i]) * round_bf(bf(xt[i]) * inv));
    }
}

/* rope_f32 on bf16 x, cos and sin, rounding where torch's bf16 ops do: each product, then
 * their sum. */
CLONES
void rope_bf16(int64_t rows, int64_t heads, int64_t head_dim, const uint16_t *x, uint16_t *out,
               const uint16_t *cos, const uint16_t *sin) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *xh = x + (t * heads + h) * head_dim;
            uint16_t *oh = out + (t * heads + h) * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = bf(xh[i]), b = bf(xh[i + half]);
                oh[i] = to_bf16(round_bf(a * bf(c[i])) - round_bf(b * bf(s[i])));
                oh[i + half] = to_bf16(round_bf(b * bf(c[i + half]))
                                       + round_bf(a * bf(s[i + half])));
            }
        }
    }
}

/* The ABI version the Python loader checks, so a stale build is never called. */
int pointwise_abi(void) { return 2; }
