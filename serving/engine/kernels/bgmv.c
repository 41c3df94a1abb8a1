/* Batched gathered matrix-vector LoRA for CPU (Punica's BGMV): every token carries its own
 * adapter's rows, so one call adds the deltas of any number of adapters of any ranks, with
 * no sort, no gather of x, no padding to a rank and no per-adapter launch.
 *
 *   y[t] += B_t^T (A_t x[t]) + bias_t      for each token t with rank r_t > 0
 *
 * where[4][T] gives, per token, the addresses of its adapter's A_t [r_t, d_in] and B_t^T
 * [r_t, d_out] (row-major, contiguous: the adapter store's flat layout, read in place from the
 * pool's pages), of its bias [d_out] (0: none) and r_t; order[T] is the visiting order (a
 * permutation of the tokens). x and y are row-major with leading dimensions ldx and ldy.
 * Float32 only.
 * Four rank rows are done at a time so each load of x (A side) and of y (B side) serves four
 * multiply-adds. target_clones picks the widest vector ISA the running CPU has, so one build
 * is portable across x86-64 machines.
 */
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BGMV_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define CHUNK 256 /* rank rows per pass: h stays on the stack for any rank */
#define GROUP 4   /* tokens of one adapter done together: its rows are read once for all */

/* h[g][j] = A[j] . x_g for the group's g tokens; four rows at a time, so each load of x
 * serves four multiply-adds and the four rows stay in L1 for every token of the group. */
static inline void shrink(int g, const float *const *xs, const float *restrict a, int64_t d_in,
                          int32_t r, float h[][CHUNK]) {
    int32_t j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *a0 = a + j * d_in, *a1 = a0 + d_in, *a2 = a1 + d_in, *a3 = a2 + d_in;
        for (int k = 0; k < g; k++) {
            const float *restrict xt = xs[k];
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < d_in; i++) {
                float xi = xt[i];
                s0 += xi * a0[i];
                s1 += xi * a1[i];
                s2 += xi * a2[i];
                s3 += xi * a3[i];
            }
            h[k][j] = s0, h[k][j + 1] = s1, h[k][j + 2] = s2, h[k][j + 3] = s3;
        }
    }
    for (; j < r; j++) {
        const float *aj = a + j * d_in;
        for (int k = 0; k < g; k++) {
            const float *restrict xt = xs[k];
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d_in; i++) s += xt[i] * aj[i];
            h[k][j] = s;
        }
    }
}

/* y_g += sum_j h[g][j] B^T[j] for the group's tokens, four rows of B^T at a time. */
static inline void expand(int g, float h[][CHUNK], const float *restrict b, int64_t d_out,
                          int32_t r, float *const *ys) {
    int32_t j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *b0 = b + j * d_out, *b1 = b0 + d_out, *b2 = b1 + d_out, *b3 = b2 + d_out;
        for (int k = 0; k < g; k++) {
            float *restrict yt = ys[k];
            float h0 = h[k][j], h1 = h[k][j + 1], h2 = h[k][j + 2], h3 = h[k][j + 3];
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++)
                yt[o] += h0 * b0[o] + h1 * b1[o] + h2 * b2[o] + h3 * b3[o];
        }
    }
    for (; j < r; j++) {
        const float *bj = b + j * d_out;
        for (int k = 0; k < g; k++) {
            float *restrict yt = ys[k];
            float hj = h[k][j];
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) yt[o] += hj * bj[o];
        }
    }
}

/* Tokens are visited in ``order`` (sorted by adapter), so up to GROUP consecutive tokens of
 * one adapter share each read of its rows: several sequences decoding on one adapter cost
 * one pass over its weights, not one each. */
CLONES
void bgmv_f32(int64_t num_tokens, const float *x, int64_t ldx, float *y, int64_t ldy,
              int64_t d_in, int64_t d_out, const int64_t *where, const int64_t *order) {
    const int64_t *a_at = where, *b_at = where + num_tokens, *bias_at = where + 2 * num_tokens,
                  *rank = where + 3 * num_tokens;
    float h[GROUP][CHUNK];
    const float *xs[GROUP];
    float *ys[GROUP];
    for (int64_t i = 0; i < num_tokens;) {
        int64_t t = order[i];
        int32_t r = (int32_t)rank[t];
        if (r <= 0) {
            i++;
            continue;
        }
        int g = 0;
        while (g < GROUP && i + g < num_tokens && a_at[order[i + g]] == a_at[t]
               && rank[order[i + g]] == r) {
            xs[g] = x + order[i + g] * ldx;
            ys[g] = y + order[i + g] * ldy;
            g++;
        }
        const float *a = (const float *)(intptr_t)a_at[t], *b = (const float *)(intptr_t)b_at[t];
        for (int32_t c = 0; c < r; c += CHUNK) {
            int32_t n = r - c < CHUNK ? r - c : CHUNK;
            shrink(g, xs, a + (int64_t)c * d_in, d_in, n, h);
            expand(g, h, b + (int64_t)c * d_out, d_out, n, ys);
        }
        if (bias_at[t]) {
            const float *bias = (const float *)(intptr_t)bias_at[t];
            for (int k = 0; k < g; k++) {
                float *restrict yt = ys[k];
#pragma omp simd
                for (int64_t o = 0; o < d_out; o++) yt[o] += bias[o];
            }
        }
        i += g;
    }
}

/* The ABI version the Python loader checks, so a stale build is never called. */
int bgmv_abi(void) { return 3; }
