/*
 * Vectors and element-wise formulas that the kernels share.
 *
 * Every value is computed in a whole vector, a row's last values in one padded with
 * zeros, so that a value never depends on where it sits in a tensor.
 */

#ifndef MNISTBENCH_VECTORS_H
#define MNISTBENCH_VECTORS_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SIGMOID = 2, ACT_TANH = 3 };

#define WIDTH 8            /* floats per vector */
#define LANES (2 * WIDTH)  /* floats per step of a loop: two vectors */

/* GCC's and Clang's portable vectors, compiled to AVX2 where the flags allow. */
typedef float vec __attribute__((vector_size(WIDTH * sizeof(float))));
typedef int32_t mask __attribute__((vector_size(WIDTH * sizeof(float))));
typedef uint32_t bits __attribute__((vector_size(WIDTH * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

static inline vec splat(float x) { return (vec){x, x, x, x, x, x, x, x}; }

static inline vec blend(mask m, vec a, vec b) {
    return (vec)((m & (mask)a) | (~m & (mask)b));
}

/* Store the first `count` values of v (all of them when count >= WIDTH). */
static inline void store_part(float *p, vec v, int64_t count) {
    if (count >= WIDTH) {
        store(p, v);
    } else if (count > 0) {
        float values[WIDTH];
        store(values, v);
        memcpy(p, values, sizeof(float) * count);
    }
}

/* a * b + c, fused into one rounding where the machine has FMA instructions. The band
 * products and e^x use it. Everywhere else a product and a sum round separately. */
static inline vec fused(vec a, vec b, vec c) {
#if defined(__FMA__) && WIDTH == 8
    return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* Return x limited to [low, high], with NaN kept as NaN. */
static inline vec clamp(vec x, float low, float high) {
#if defined(__AVX__) && WIDTH == 8
    /* Where an operand is NaN, vminps and vmaxps return their second one. */
    x = (vec)_mm256_min_ps(_mm256_set1_ps(high), (__m256)x);
    return (vec)_mm256_max_ps(_mm256_set1_ps(low), (__m256)x);
#else
    x = blend(x > high, splat(high), x);
    return blend(x < low, splat(low), x);
#endif
}

/* Return e^x for x in [-87, 88], clamped there, with NaN kept as NaN. It is within
 * 1.2e-7 of the exact value relative to it. x = n ln 2 + r with integer n and |r| <= ln(2) / 2, so
 * e^x = 2^n e^r. The polynomial for e^r was fitted to it on that interval, to a
 * relative error of 2e-8: a weighted least-squares fit, its weights raised where the
 * error peaked. */
static inline vec exp_of(vec x) {
    const float magic = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    x = clamp(x, -87.0f, 88.0f);
    vec z = fused(x, splat(1.44269504f), splat(magic));
    vec n = z - magic;
    /* ln 2 in two parts; the first has 12 bits, so n times it is exact. */
    vec r = fused(n, splat(-0.693115234f), x);
    r = fused(n, splat(-3.19461849e-5f), r);
    vec p = splat(1.38368458e-3f);
    p = fused(p, r, splat(8.37481581e-3f));
    p = fused(p, r, splat(4.16682251e-2f));
    p = fused(p, r, splat(1.66664198e-1f));
    p = fused(p, r, splat(4.99999911e-1f));
    p = fused(p, r, splat(1.0f));
    p = fused(p, r, splat(1.0f));
    /* z's low bits hold n; shifted into a float's exponent field they make 2^n. */
    bits scale = ((bits)z << 23) + (127u << 23);
    return p * (vec)scale;
}

/* The activations that the kernels apply themselves. ReLU is exact as torch computes
 * it. The sigmoid is 1 / (1 + e^-x), within 2e-7 of the exact value relative to it.
 * Both keep NaN. */
static inline vec activate(int activation, vec x) {
    if (activation == ACT_RELU) return blend((x > 0.0f) | (x != x), x, splat(0.0f));
    if (activation == ACT_SIGMOID) return 1.0f / (1.0f + exp_of(-x));
    return x;
}

#endif
