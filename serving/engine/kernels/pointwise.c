/* RMSNorm and rotary embedding of a decoder layer, one call each (CPU, float32 or bfloat16).
 *
 * In torch each is five or six elementwise ops (RMSNorm: square, mean, add, rsqrt, two
 * multiplies; RoPE: slice, negate, concatenate, two multiplies, add), each a pass over memory
 * and a dispatch of several microseconds: 0.38 s of a 6.4 s forward in bench/serving.py's
 * full n=100 run. Here each row is read once and written once.
 *
 * rmsnorm: out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)), HF's LlamaRMSNorm.
 * rope: HF's rotate-half RoPE, out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t]
 * for x [rows, heads, head_dim] and cos/sin [rows, head_dim]; out may be x.
 * The _bf16 functions take bfloat16 tensors and round where HF's bf16 ops do: RMSNorm
 * normalises in float32 and rounds before the weight's multiply; RoPE rounds each product and
 * their sum.
 */
#include <math.h>
#include <stdint.h>

#include "elements.h"

INLINE void rmsnorm(int64_t rows, const void *x, int64_t ldx, const void *w, void *out,
                    int64_t ldo, int64_t dim, float eps, int bf16) {
    for (int64_t t = 0; t < rows; t++) {
        const void *xt = row(x, t * ldx, bf16);
        void *ot = (void *)row(out, t * ldo, bf16);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dim; i++) s += load(xt, i, bf16) * load(xt, i, bf16);
        float inv = 1.f / sqrtf(s / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) {
            float v = load(xt, i, bf16) * inv;
            store(ot, i, load(w, i, bf16) * (bf16 ? round_bf16(v) : v), bf16);
        }
    }
}

INLINE void rope(int64_t rows, int64_t heads, int64_t head_dim, const void *x, void *out,
                 const void *cos, const void *sin, int bf16) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < rows; t++) {
        const void *c = row(cos, t * head_dim, bf16), *s = row(sin, t * head_dim, bf16);
        for (int64_t h = 0; h < heads; h++) {
            const void *xh = row(x, (t * heads + h) * head_dim, bf16);
            void *oh = (void *)row(out, (t * heads + h) * head_dim, bf16);
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = load(xh, i, bf16), b = load(xh, i + half, bf16);  /* before out (== x) */
                float ac = a * load(c, i, bf16), bs = b * load(s, i, bf16);
                float bc = b * load(c, i + half, bf16), as = a * load(s, i + half, bf16);
                if (bf16) ac = round_bf16(ac), bs = round_bf16(bs), bc = round_bf16(bc),
                          as = round_bf16(as);
                store(oh, i, ac - bs, bf16);
                store(oh, i + half, bc + as, bf16);
            }
        }
    }
}

CLONES
void rmsnorm_f32(int64_t rows, const float *x, int64_t ldx, const float *w, float *out,
                 int64_t ldo, int64_t dim, float eps) {
    rmsnorm(rows, x, ldx, w, out, ldo, dim, eps, 0);
}

CLONES
void rmsnorm_bf16(int64_t rows, const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *out,
                  int64_t ldo, int64_t dim, float eps) {
    rmsnorm(rows, x, ldx, w, out, ldo, dim, eps, 1);
}

CLONES
void rope_f32(int64_t rows, int64_t heads, int64_t head_dim, const float *x, float *out,
              const float *cos, const float *sin) {
    rope(rows, heads, head_dim, x, out, cos, sin, 0);
}

CLONES
void rope_bf16(int64_t rows, int64_t heads, int64_t head_dim, const uint16_t *x, uint16_t *out,
               const uint16_t *cos, const uint16_t *sin) {
    rope(rows, heads, head_dim, x, out, cos, sin, 1);
}

/* The ABI version the Python loader checks, so a stale build is never called. */
int pointwise_abi(void) { return 2; }
