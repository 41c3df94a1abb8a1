/* Attention read in place from the unified pool's KV pages (CPU, float32 or bfloat16).
 *
 * Each row is one query token attending to the first ctx_lens[i] positions of its sequence's
 * cache (its own K/V included, already written): a decode token to the whole context, a
 * prefill token to the positions up to its own, so one call serves a whole step. The torch
 * path gathers each sequence's pages into a padded copy, builds a mask and runs SDPA, per layer
 * and step; here each K/V row is read where it lies, for every query head of its group (GQA),
 * and only the positions a query sees are touched.
 *
 * Layout: a page is [2][block_size][kv_heads][head_dim] (K then V), pages page_stride elements
 * apart (one layer's slice of the pool view). tables[i * table_stride + b] is row i's
 * sequence's b-th page, ctx_lens[i] the positions it attends to. window > 0 keeps the last
 * window positions (HF's sliding window: key index > query index - window). Softmax is
 * two-pass per head (max, then exp-sum), with a vectorised exp within 2 ulp of libm's. Returns
 * 0, or -1 when the score buffer cannot be allocated.
 *
 * paged_decode_f32 takes q, out and the cache in float32; paged_decode_bf16 in bfloat16 (half
 * the bytes of K/V read), computing in float32: each query row is widened once, scores, softmax
 * and the weighted sum stay float32, and each output row is rounded once (to nearest even).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Its helpers are forced inline (elements.h): out of line, the scores loop ran as SSE, 0.41 vs
 * 0.36 ms a call. */
#include "elements.h"

/* s[j] = scale * q . k_j for n rows k_j = k + j * ld, four at a time (one load of q serves
 * four rows, and four independent sums hide the FMA latency). */
INLINE void scores(const float *restrict q, const void *restrict k, int64_t ld, int64_t n,
                   int64_t d, float scale, float *restrict s, int bf16) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const void *k0 = row(k, j * ld, bf16), *k1 = row(k0, ld, bf16);
        const void *k2 = row(k1, ld, bf16), *k3 = row(k2, ld, bf16);
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < d; i++) {
            float qi = q[i];
            s0 += qi * load(k0, i, bf16);
            s1 += qi * load(k1, i, bf16);
            s2 += qi * load(k2, i, bf16);
            s3 += qi * load(k3, i, bf16);
        }
        s[j] = s0 * scale, s[j + 1] = s1 * scale, s[j + 2] = s2 * scale, s[j + 3] = s3 * scale;
    }
    for (; j < n; j++) {
        const void *kj = row(k, j * ld, bf16);
        float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
        for (int64_t i = 0; i < d; i++) s0 += q[i] * load(kj, i, bf16);
        s[j] = s0 * scale;
    }
}

/* o += sum_j w[j] * v_j, four rows at a time (one load and store of o per four rows). */
INLINE void weighted(const float *restrict w, const void *restrict v, int64_t ld, int64_t n,
                     int64_t d, float *restrict o, int bf16) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const void *v0 = row(v, j * ld, bf16), *v1 = row(v0, ld, bf16);
        const void *v2 = row(v1, ld, bf16), *v3 = row(v2, ld, bf16);
        float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
#pragma omp simd
        for (int64_t i = 0; i < d; i++)
            o[i] += w0 * load(v0, i, bf16) + w1 * load(v1, i, bf16) + w2 * load(v2, i, bf16)
                  + w3 * load(v3, i, bf16);
    }
    for (; j < n; j++) {
        const void *vj = row(v, j * ld, bf16);
        float wj = w[j];
#pragma omp simd
        for (int64_t i = 0; i < d; i++) o[i] += wj * load(vj, i, bf16);
    }
}

/* e^x for x <= 0 (a score minus its row's max), vectorisable where libm's expf is a call per
 * element: Cephes' expf (degree-6 polynomial on x - n ln2, times 2^n), within 2 ulp; NaN stays
 * NaN, and below -87.3 (under float's normal range) it clamps to ~1e-38 instead of 0. */
INLINE float exp_nonpos(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return y * scale.f;
}

/* qbuf/obuf: heads * head_dim floats of scratch, used (bf16) to widen a query row and to
 * accumulate its output. */
INLINE int paged_decode(int64_t n, const void *q, void *out, const void *kv, int64_t page_stride,
                        int64_t block_size, int64_t kv_heads, int64_t heads, int64_t head_dim,
                        int64_t window, const int64_t *tables, int64_t table_stride,
                        const int64_t *ctx_lens, float scale, int bf16) {
    const int64_t group = heads / kv_heads, row_len = kv_heads * head_dim;
    const int64_t v_off = block_size * row_len, q_len = heads * head_dim;
    int64_t max_ctx = 0;
    for (int64_t i = 0; i < n; i++) max_ctx = ctx_lens[i] > max_ctx ? ctx_lens[i] : max_ctx;
    float *buf = malloc(sizeof(float) * (size_t)(group * max_ctx + 1 + 2 * q_len));
    if (!buf) return -1;
    float *qbuf = buf + group * max_ctx + 1, *obuf = qbuf + q_len;
    for (int64_t i = 0; i < n; i++) {
        const int64_t ctx = ctx_lens[i];
        const int64_t lo = window > 0 && ctx > window ? ctx - window : 0;
        const int64_t *table = tables + i * table_stride;
        const float *qi = (const float *)row(q, i * q_len, bf16);
        float *oi = (float *)row(out, i * q_len, bf16);
        if (bf16) {
            for (int64_t d = 0; d < q_len; d++) qbuf[d] = load(qi, d, 1);
            qi = qbuf, oi = obuf;
        }
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *qg = qi + g * group * head_dim;
            float *og = oi + g * group * head_dim;
            /* Page by page: positions [p, e) of page b, rows `row_len` elements apart. */
            for (int64_t p = lo; p < ctx;) {
                const int64_t b = p / block_size, off = p - b * block_size;
                const int64_t e = (b + 1) * block_size < ctx ? (b + 1) * block_size : ctx;
                const void *k = row(kv, table[b] * page_stride + off * row_len + g * head_dim,
                                     bf16);
                for (int64_t h = 0; h < group; h++)
                    scores(qg + h * head_dim, k, row_len, e - p, head_dim, scale,
                           buf + h * max_ctx + p, bf16);
                p = e;
            }
            for (int64_t h = 0; h < group; h++) {
                float *s = buf + h * max_ctx, m = -INFINITY, sum = 0.f;
                for (int64_t p = lo; p < ctx; p++) m = s[p] > m ? s[p] : m;
#pragma omp simd reduction(+ : sum)
                for (int64_t p = lo; p < ctx; p++) sum += (s[p] = exp_nonpos(s[p] - m));
                const float inv = 1.f / sum;
                for (int64_t p = lo; p < ctx; p++) s[p] *= inv;
                float *o = og + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.f;
            }
            for (int64_t p = lo; p < ctx;) {
                const int64_t b = p / block_size, off = p - b * block_size;
                const int64_t e = (b + 1) * block_size < ctx ? (b + 1) * block_size : ctx;
                const void *v = row(kv, table[b] * page_stride + v_off + off * row_len
                                    + g * head_dim, bf16);
                for (int64_t h = 0; h < group; h++)
                    weighted(buf + h * max_ctx + p, v, row_len, e - p, head_dim,
                             og + h * head_dim, bf16);
                p = e;
            }
        }
        if (bf16) {
            void *os = (void *)row(out, i * q_len, 1);
            for (int64_t d = 0; d < q_len; d++) store(os, d, obuf[d], 1);
        }
    }
    free(buf);
    return 0;
}

CLONES
int paged_decode_f32(int64_t n, const float *q, float *out, const float *kv, int64_t page_stride,
                     int64_t block_size, int64_t kv_heads, int64_t heads, int64_t head_dim,
                     int64_t window, const int64_t *tables, int64_t table_stride,
                     const int64_t *ctx_lens, float scale) {
    return paged_decode(n, q, out, kv, page_stride, block_size, kv_heads, heads, head_dim,
                        window, tables, table_stride, ctx_lens, scale, 0);
}

CLONES
int paged_decode_bf16(int64_t n, const uint16_t *q, uint16_t *out, const uint16_t *kv,
                      int64_t page_stride, int64_t block_size, int64_t kv_heads, int64_t heads,
                      int64_t head_dim, int64_t window, const int64_t *tables,
                      int64_t table_stride, const int64_t *ctx_lens, float scale) {
    return paged_decode(n, q, out, kv, page_stride, block_size, kv_heads, heads, head_dim,
                        window, tables, table_stride, ctx_lens, scale, 1);
}

/* The ABI version the Python loader checks, so a stale build is never called. */
int paged_decode_abi(void) { return 2; }
