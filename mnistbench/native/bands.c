/*
 * The first Linear layer's products over a batch's bands, for the CPU.
 *
 * With the convolution front every run has its own packed inputs, so each product is
 * small: a band of up to 128 examples by a few hundred windows, against 100 or so
 * hidden units (see mnistbench/windows.py for the packed layout). torch's batched
 * matmul took one call per seed and band, and past the first band it cost more in
 * calls, temporaries and extra passes than in arithmetic. These functions compute
 * every member's bands in one call per step: the layer's output, the gradient of its
 * packed inputs and its weight update.
 *
 * Each product sums its terms in a fixed order that depends only on the member's own
 * values and its band's shape: window by window, unit by unit, or example by example.
 * The hidden units are padded with zeros to whole vectors. An example's values
 * therefore do not depend on the other members of the stack, or on the other
 * examples of an evaluation chunk.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

#define BLOCK 4  /* examples or windows per block of a product */

/* The vector at p with its first `count` values, zeros past them. */
static inline vec load_part(const float *p, int64_t count) {
    if (count >= WIDTH) return load(p);
    float values[WIDTH] = {0};
    memcpy(values, p, sizeof(float) * count);
    return load(values);
}

/* Copy `rows` rows of `hidden` floats to rows of `padded` floats, zeros past `hidden`. */
static void pad_rows(float *out, const float *in, int64_t rows, int64_t hidden,
                     int64_t padded) {
    for (int64_t r = 0; r < rows; r++) {
        memcpy(out + r * padded, in + r * hidden, sizeof(float) * hidden);
        memset(out + r * padded + hidden, 0, sizeof(float) * (padded - hidden));
    }
}

/* One band of one member: where its packed block, its weight rows and its examples'
 * rows of the (batch, hidden) tensors lie. */
typedef struct {
    int64_t first, start, count;  /* first example, first window, windows */
    int64_t rows;                 /* examples: batch - first */
    int64_t offset;               /* the block's offset in the member's packed row */
} Band;

/* The arguments that locate every member's bands. */
typedef struct {
    const int64_t *bands, *offsets, *band_counts;
    int64_t max_bands, seeds, variants, batch;
} Bands;

/* Return band k of seed s. */
static Band band_of(const Bands *layout, int64_t s, int64_t k) {
    const int64_t *band = layout->bands + (s * layout->max_bands + k) * 3;
    Band out = {band[0], band[1], band[2] - band[1], layout->batch - band[0],
                layout->offsets[s * (layout->max_bands + 1) + k]};
    return out;
}

/* Return the largest window count of any band. */
static int64_t widest_band(const Bands *layout) {
    int64_t widest = 1;
    for (int64_t s = 0; s < layout->seeds; s++)
        for (int64_t k = 0; k < layout->band_counts[s]; k++) {
            Band band = band_of(layout, s, k);
            if (band.count > widest) widest = band.count;
        }
    return widest;
}

static int64_t padded(int64_t hidden) { return (hidden + WIDTH - 1) / WIDTH * WIDTH; }

/* Set acc[i][v] to the sum over t < terms of a[i * a_step + t * t_step] times the
 * vector at b + t * b_stride + v * WIDTH, in order of t, for ROWS values of i and
 * VECTORS vectors. */
static inline __attribute__((always_inline)) void accumulate(
        int ROWS, int VECTORS, const float *a, int64_t a_step, int64_t t_step, int64_t terms,
        const float *b, int64_t b_stride, vec acc[BLOCK][2]) {
    for (int i = 0; i < ROWS; i++)
        for (int v = 0; v < VECTORS; v++) acc[i][v] = splat(0.0f);
    for (int64_t t = 0; t < terms; t++) {
        const float *row = b + t * b_stride;
        vec b0 = load(row), b1 = VECTORS > 1 ? load(row + WIDTH) : b0;
        for (int i = 0; i < ROWS; i++) {
            vec ai = splat(a[i * a_step + t * t_step]);
            acc[i][0] = fused(ai, b0, acc[i][0]);
            if (VECTORS > 1) acc[i][1] = fused(ai, b1, acc[i][1]);
        }
    }
}

/* out rows r0.. += x rows r0.. @ w (or = with `assign`), for ROWS examples and VECTORS
 * vectors of units from unit h. x is (rows, n), and w is padded (n, padded hidden). */
static inline __attribute__((always_inline)) void forward_block(
        int ROWS, int VECTORS, const float *x, int64_t n, const float *w, int64_t stride,
        float *out, int64_t hidden, int64_t h, int assign) {
    vec acc[BLOCK][2];
    accumulate(ROWS, VECTORS, x, n, 1, n, w + h, stride, acc);
    for (int i = 0; i < ROWS; i++)
        for (int v = 0; v < VECTORS; v++) {
            int64_t at = h + v * WIDTH, count = hidden - at;
            float *o = out + i * hidden + at;
            store_part(o, assign ? acc[i][v] : load_part(o, count) + acc[i][v], count);
        }
}

static void forward_band(const float *x, const float *w, int64_t n, int64_t rows,
                         float *out, int64_t hidden, int assign) {
    int64_t stride = padded(hidden), r = 0;
    for (; r + BLOCK <= rows; r += BLOCK) {
        int64_t h = 0;
        for (; h + 2 * WIDTH <= stride; h += 2 * WIDTH)
            forward_block(BLOCK, 2, x + r * n, n, w, stride, out + r * hidden, hidden, h,
                          assign);
        if (h < stride)
            forward_block(BLOCK, 1, x + r * n, n, w, stride, out + r * hidden, hidden, h,
                          assign);
    }
    for (; r < rows; r++) {
        int64_t h = 0;
        for (; h + 2 * WIDTH <= stride; h += 2 * WIDTH)
            forward_block(1, 2, x + r * n, n, w, stride, out + r * hidden, hidden, h,
                          assign);
        if (h < stride)
            forward_block(1, 1, x + r * n, n, w, stride, out + r * hidden, hidden, h,
                          assign);
    }
}

/*
 * Write each member's first layer output from its bands: out[m] = packed block of band
 * 0 (batch, n) @ weight[m][start:stop], then out[m][first + r] += packed block
 * (rows, n) @ weight[m][start:stop] for each later band.
 *
 * packed: (M, stride) rows of packed inputs; weight: (M, windows, hidden);
 * out: (M, batch, hidden). Returns 0, or -1 when memory runs out.
 */
int bands_forward(const float *packed, int64_t stride, const float *weight, int64_t windows,
                  int64_t hidden, const int64_t *bands, const int64_t *offsets,
                  const int64_t *band_counts, int64_t max_bands, int64_t seeds,
                  int64_t variants, int64_t batch, float *out) {
    Bands layout = {bands, offsets, band_counts, max_bands, seeds, variants, batch};
    float *w = malloc(sizeof(float) * widest_band(&layout) * padded(hidden));
    if (w == NULL) return -1;
    for (int64_t m = 0; m < seeds * variants; m++) {
        int64_t s = m / variants;
        for (int64_t k = 0; k < band_counts[s]; k++) {
            Band band = band_of(&layout, s, k);
            pad_rows(w, weight + (m * windows + band.start) * hidden, band.count, hidden,
                     padded(hidden));
            forward_band(packed + m * stride + band.offset, w, band.count, band.rows,
                         out + (m * batch + band.first) * hidden, hidden, k == 0);
        }
    }
    free(w);
    return 0;
}

/* Copy the n rows of `hidden` floats at w to its transpose: hidden rows of `stride`
 * floats, zeros past n. */
static void transpose_rows(float *out, const float *w, int64_t n, int64_t hidden,
                           int64_t stride) {
    for (int64_t h = 0; h < hidden; h++) {
        for (int64_t j = 0; j < n; j++) out[h * stride + j] = w[j * hidden + h];
        memset(out + h * stride + n, 0, sizeof(float) * (stride - n));
    }
}

/* out rows r0.. = g rows r0.. @ wt, for ROWS examples and VECTORS vectors of windows
 * from window c. g is (rows, hidden), and out is (rows, n). wt contains the band's
 * weight rows transposed, (hidden, stride). */
static inline __attribute__((always_inline)) void gradient_block(
        int ROWS, int VECTORS, const float *g, int64_t hidden, const float *wt, int64_t stride,
        float *out, int64_t n, int64_t c) {
    vec acc[BLOCK][2];
    accumulate(ROWS, VECTORS, g, hidden, 1, hidden, wt + c, stride, acc);
    for (int i = 0; i < ROWS; i++)
        for (int v = 0; v < VECTORS; v++) {
            int64_t at = c + v * WIDTH;
            store_part(out + i * n + at, acc[i][v], n - at);
        }
}

static void gradient_band(const float *g, int64_t hidden, const float *wt, int64_t n,
                          int64_t rows, float *out) {
    int64_t stride = padded(n), r = 0;
    for (; r + BLOCK <= rows; r += BLOCK) {
        int64_t c = 0;
        for (; c + 2 * WIDTH <= stride; c += 2 * WIDTH)
            gradient_block(BLOCK, 2, g + r * hidden, hidden, wt, stride, out + r * n, n, c);
        if (c < stride)
            gradient_block(BLOCK, 1, g + r * hidden, hidden, wt, stride, out + r * n, n, c);
    }
    for (; r < rows; r++) {
        int64_t c = 0;
        for (; c + 2 * WIDTH <= stride; c += 2 * WIDTH)
            gradient_block(1, 2, g + r * hidden, hidden, wt, stride, out + r * n, n, c);
        if (c < stride)
            gradient_block(1, 1, g + r * hidden, hidden, wt, stride, out + r * n, n, c);
    }
}

/*
 * Write the gradient of each member's packed inputs: packed block (rows, n) =
 * grad[m][first:] @ weight[m][start:stop]^T for each band, and zeros from the seed's
 * packed length to `width`.
 *
 * grad: (M, batch, hidden), the gradient of the first layer's output; packed: (M,
 * stride). Returns 0, or -1 when memory runs out.
 */
int bands_input_gradient(const float *grad, const float *weight, int64_t windows,
                         int64_t hidden, const int64_t *bands, const int64_t *offsets,
                         const int64_t *band_counts, int64_t max_bands, int64_t seeds,
                         int64_t variants, int64_t batch, float *packed, int64_t stride,
                         int64_t width) {
    Bands layout = {bands, offsets, band_counts, max_bands, seeds, variants, batch};
    float *wt = malloc(sizeof(float) * hidden * padded(widest_band(&layout)));
    if (wt == NULL) return -1;
    for (int64_t m = 0; m < seeds * variants; m++) {
        int64_t s = m / variants;
        for (int64_t k = 0; k < band_counts[s]; k++) {
            Band band = band_of(&layout, s, k);
            transpose_rows(wt, weight + (m * windows + band.start) * hidden, band.count,
                           hidden, padded(band.count));
            gradient_band(grad + (m * batch + band.first) * hidden, hidden, wt, band.count,
                          band.rows, packed + m * stride + band.offset);
        }
        int64_t length = offsets[s * (max_bands + 1) + band_counts[s]];
        memset(packed + m * stride + length, 0, sizeof(float) * (width - length));
    }
    free(wt);
    return 0;
}

/* w rows c0.. += alpha * (x columns c0..)^T @ g, for COLUMNS windows and VECTORS
 * vectors of units from unit h. x is (rows, n), g padded (rows, stride), w (n, hidden). */
static inline __attribute__((always_inline)) void update_block(
        int COLUMNS, int VECTORS, const float *x, int64_t n, int64_t rows, const float *g,
        int64_t stride, float *w, int64_t hidden, int64_t h, float alpha) {
    vec acc[BLOCK][2];
    accumulate(COLUMNS, VECTORS, x, 1, n, rows, g + h, stride, acc);
    for (int c = 0; c < COLUMNS; c++)
        for (int v = 0; v < VECTORS; v++) {
            int64_t at = h + v * WIDTH, count = hidden - at;
            float *o = w + c * hidden + at;
            store_part(o, load_part(o, count) + splat(alpha) * acc[c][v], count);
        }
}

static void update_band(const float *x, const float *g, int64_t stride, int64_t n,
                        int64_t rows, float *w, int64_t hidden, float alpha) {
    int64_t c = 0;
    for (; c + BLOCK <= n; c += BLOCK) {
        int64_t h = 0;
        for (; h + 2 * WIDTH <= stride; h += 2 * WIDTH)
            update_block(BLOCK, 2, x + c, n, rows, g, stride, w + c * hidden, hidden, h, alpha);
        if (h < stride)
            update_block(BLOCK, 1, x + c, n, rows, g, stride, w + c * hidden, hidden, h, alpha);
    }
    for (; c < n; c++) {
        int64_t h = 0;
        for (; h + 2 * WIDTH <= stride; h += 2 * WIDTH)
            update_block(1, 2, x + c, n, rows, g, stride, w + c * hidden, hidden, h, alpha);
        if (h < stride)
            update_block(1, 1, x + c, n, rows, g, stride, w + c * hidden, hidden, h, alpha);
    }
}

/*
 * Add alpha times each member's weight gradient inside its bands to out:
 * out[m][start:stop] += alpha * (packed block (rows, n))^T @ grad[m][first:].
 *
 * out: (M, windows, hidden). Returns 0, or -1 when memory runs out.
 */
int bands_weight_gradient(const float *packed, int64_t stride, const float *grad, float *out,
                          int64_t windows, int64_t hidden, const int64_t *bands,
                          const int64_t *offsets, const int64_t *band_counts,
                          int64_t max_bands, int64_t seeds, int64_t variants, int64_t batch,
                          float alpha) {
    Bands layout = {bands, offsets, band_counts, max_bands, seeds, variants, batch};
    int64_t width = padded(hidden);
    float *g = malloc(sizeof(float) * batch * width);
    if (g == NULL) return -1;
    for (int64_t m = 0; m < seeds * variants; m++) {
        int64_t s = m / variants;
        /* Every band reads rows of the same gradient, so it is padded once per member. */
        pad_rows(g, grad + m * batch * hidden, batch, hidden, width);
        for (int64_t k = 0; k < band_counts[s]; k++) {
            Band band = band_of(&layout, s, k);
            update_band(packed + m * stride + band.offset, g + band.first * width, width,
                        band.count, band.rows, out + (m * windows + band.start) * hidden,
                        hidden, alpha);
        }
    }
    free(g);
    return 0;
}
