/* One token's LoRA delta over float32 sums, shared by the BGMV kernel (bgmv.c) and the LoRA
 * worker thread (lora_worker.c):
 *
 *   acc += B^T (A x) + bias      (A [r, d_in], B^T [r, d_out], rows of float32 or bfloat16)
 *
 * x and acc are float32 (a bf16 caller widens x first); see bgmv.c for why rows are read this
 * way.
 */
#ifndef ADAPTERHUB_LORA_ROWS_H
#define ADAPTERHUB_LORA_ROWS_H

#include <stdint.h>

#include "elements.h"

#define CHUNK 256 /* rank rows per pass: h stays on the stack for any rank */

/* h[j] = A_j . x, row after row: one sequential stream through A, which the hardware prefetcher
 * follows best when A comes from DRAM (an idle adapter's rows usually do). */
INLINE void shrink(const float *restrict xt, const void *restrict a, int64_t d_in, int32_t r,
                   float *restrict h, int bf16) {
    for (int32_t j = 0; j < r; j++) {
        const void *aj = row(a, j * d_in, bf16);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d_in; i++) s += xt[i] * load(aj, i, bf16);
        h[j] = s;
    }
}

/* y += sum_j h[j] B_j, eight rows at a time: each load and store of y serves eight rows. */
INLINE void expand(const float *restrict h, const void *restrict b, int64_t d_out, int32_t r,
                   float *restrict yt, int bf16) {
    int32_t j = 0;
    for (; j + 8 <= r; j += 8) {
        const void *b0 = row(b, j * d_out, bf16), *b1 = row(b0, d_out, bf16);
        const void *b2 = row(b1, d_out, bf16), *b3 = row(b2, d_out, bf16);
        const void *b4 = row(b3, d_out, bf16), *b5 = row(b4, d_out, bf16);
        const void *b6 = row(b5, d_out, bf16), *b7 = row(b6, d_out, bf16);
        float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
        float h4 = h[j + 4], h5 = h[j + 5], h6 = h[j + 6], h7 = h[j + 7];
#pragma omp simd
        for (int64_t o = 0; o < d_out; o++)
            yt[o] += h0 * load(b0, o, bf16) + h1 * load(b1, o, bf16) + h2 * load(b2, o, bf16)
                   + h3 * load(b3, o, bf16) + h4 * load(b4, o, bf16) + h5 * load(b5, o, bf16)
                   + h6 * load(b6, o, bf16) + h7 * load(b7, o, bf16);
    }
    for (; j < r; j++) {
        const void *bj = row(b, j * d_out, bf16);
        float hj = h[j];
#pragma omp simd
        for (int64_t o = 0; o < d_out; o++) yt[o] += hj * load(bj, o, bf16);
    }
}

/* acc += B^T (A xt) + bias for one token of rank r. */
INLINE void token_delta(const float *restrict xt, const void *a, const void *b, const void *bias,
                        int32_t r, int64_t d_in, int64_t d_out, float *restrict acc, int bf16) {
    float h[CHUNK];
    for (int32_t c = 0; c < r; c += CHUNK) {
        int32_t n = r - c < CHUNK ? r - c : CHUNK;
        shrink(xt, row(a, (int64_t)c * d_in, bf16), d_in, n, h, bf16);
        expand(h, row(b, (int64_t)c * d_out, bf16), d_out, n, acc, bf16);
    }
    if (bias) {
#pragma omp simd
        for (int64_t o = 0; o < d_out; o++) acc[o] += load(bias, o, bf16);
    }
}

#endif
