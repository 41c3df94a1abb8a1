/* RMSNorm and rotary embedding of a decoder layer, one call each (CPU, float32).
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

/* The ABI version the Python loader checks, so a stale build is never called. */
int pointwise_abi(void) { return 1; }
