/* What every kernel source shares: the build's ISA clones, forced inlining, and reading and
 * writing elements of float32 or bfloat16 rows.
 *
 * A kernel is written once over `const void *` rows and a flag bf16 (0: float32, 1: bfloat16);
 * every helper is forced inline into exported functions that pass a constant flag, so each loop
 * compiles for one element type (and, through target_clones, once per ISA: a helper left out of
 * line would be compiled once, for the baseline ISA). bfloat16 values are widened to float32
 * for arithmetic and rounded back to nearest even, once, where a result is stored.
 */
#ifndef ADAPTERHUB_ELEMENTS_H
#define ADAPTERHUB_ELEMENTS_H

#include <stdint.h>

/* target_clones picks the widest vector ISA the running CPU has, so one build is portable
 * across x86-64 machines. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BGMV_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define INLINE static inline __attribute__((always_inline))

INLINE float widen_bf16(uint16_t h) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)h << 16};
    return c.f;
}

/* f rounded to bfloat16's precision (nearest even), still a float. NaN is not special-cased:
 * inputs are checked finite where they come from. */
INLINE float round_bf16(float f) {
    union { float f; uint32_t u; } c = {.f = f};
    c.u = (c.u + 0x7fffu + ((c.u >> 16) & 1u)) & 0xffff0000u;
    return c.f;
}

/* Element i of a row. */
INLINE float load(const void *p, int64_t i, int bf16) {
    return bf16 ? widen_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Element i of a row set to v (rounded, in bfloat16). */
INLINE void store(void *p, int64_t i, float v, int bf16) {
    if (bf16) {
        union { float f; uint32_t u; } c = {.f = round_bf16(v)};
        ((uint16_t *)p)[i] = (uint16_t)(c.u >> 16);
    } else {
        ((float *)p)[i] = v;
    }
}

/* The address i elements past p. */
INLINE const void *row(const void *p, int64_t i, int bf16) {
    return (const char *)p + i * (bf16 ? 2 : 4);
}

#endif
