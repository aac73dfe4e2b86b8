/*
 * The first Linear layer's constant windows, for the CPU.
 *
 * Where a window's pixels are all zero, the first Linear's input is each run's
 * constant c = act(b), and the packed products leave it out (see mnistbench/windows.py).
 * A "tail row" group is examples first to last - 1 of a seed's batch, packed up to
 * window `stop`. A "tail column" range is windows start to stop - 1, which contain the
 * constant for the batch's first `examples` examples. These functions add the
 * constant's share to the layer's output, its weight update and the bias's gradient,
 * in one call per step where torch took several operations per seed and band.
 *
 * Every sum runs in a fixed order that depends only on the run's own weights, batch
 * and bands: a weight row sum from the last row down to `stop`, a gradient sum from
 * the first example up. An evaluation chunk that drops a band therefore gets the same
 * bits for the bands it keeps.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The tail row groups of one seed: (first, last, stop) per band. */
static void tail_rows(const int64_t *bands, int64_t band_count, int64_t batch, int64_t k,
                      int64_t *first, int64_t *last, int64_t *stop) {
    *first = bands[k * 3];
    *last = k + 1 < band_count ? bands[(k + 1) * 3] : batch;
    *stop = bands[k * 3 + 2];
}

/*
 * Sum each member's weight rows past each band's stop into tails[m][k], from the last
 * row down to stop_k. Then add c_m * tails[m][k] to out[m][b] for the examples b of
 * group k.
 *
 * weight: (M, windows, hidden); out: (M, batch, hidden); tails: (M, max_bands, hidden),
 * zero for the bands a seed lacks.
 */
void first_layer_tails(const float *weight, int64_t windows, int64_t hidden,
                       const int64_t *bands, const int64_t *band_counts, int64_t max_bands,
                       int64_t seeds, int64_t variants, int64_t batch, const float *constant,
                       float *out, float *tails) {
    for (int64_t s = 0; s < seeds; s++) {
        const int64_t *seed_bands = bands + s * max_bands * 3;
        int64_t count = band_counts[s];
        for (int64_t v = 0; v < variants; v++) {
            int64_t m = s * variants + v;
            const float *w = weight + m * windows * hidden;
            float *sums = tails + m * max_bands * hidden;
            memset(sums, 0, sizeof(float) * max_bands * hidden);
            /* Stops rise with the band, so one sweep down the rows fills every sum. */
            float *running = sums + (count - 1) * hidden;
            int64_t row = windows;
            for (int64_t k = count - 1; k >= 0; k--) {
                int64_t first, last, stop;
                tail_rows(seed_bands, count, batch, k, &first, &last, &stop);
                float *sum = sums + k * hidden;
                if (sum != running) memcpy(sum, running, sizeof(float) * hidden);
                for (; row > stop; row--) {
                    const float *r = w + (row - 1) * hidden;
                    for (int64_t h = 0; h < hidden; h++) sum[h] += r[h];
                }
                running = sum;
                float c = constant[m];
                for (int64_t b = first; b < last; b++) {
                    float *o = out + (m * batch + b) * hidden;
                    for (int64_t h = 0; h < hidden; h++) o[h] += c * sum[h];
                }
            }
        }
    }
}

/*
 * Add alpha * c_m * (the sum of g[m][b] over the range's examples) to the weight rows of
 * each tail column range of member m: the weight update's share of the constant.
 * Gradients are summed from the first example up.
 *
 * out: (M, windows, hidden); g: (M, batch, hidden). Returns 0, or -1 when memory runs
 * out.
 */
int first_layer_weight_tails(float *out, int64_t windows, int64_t hidden, const int64_t *bands,
                             const int64_t *band_counts, int64_t max_bands, int64_t seeds,
                             int64_t variants, int64_t batch, const float *g,
                             const float *constant, float alpha) {
    float *summed = malloc(sizeof(float) * hidden);
    float *scaled = malloc(sizeof(float) * hidden);
    if (summed == NULL || scaled == NULL) {
        free(summed);
        free(scaled);
        return -1;
    }
    for (int64_t s = 0; s < seeds; s++) {
        const int64_t *seed_bands = bands + s * max_bands * 3;
        int64_t count = band_counts[s];
        for (int64_t v = 0; v < variants; v++) {
            int64_t m = s * variants + v;
            const float *gm = g + m * batch * hidden;
            float *w = out + m * windows * hidden;
            float c = constant[m];
            memset(summed, 0, sizeof(float) * hidden);
            int64_t example = 0;
            /* The range after band k's stop contains the constant for the examples
             * before band k + 1's first, and after the last band for all of them. */
            for (int64_t k = 0; k < count; k++) {
                int64_t start = seed_bands[k * 3 + 2];
                int64_t stop = k + 1 < count ? seed_bands[(k + 1) * 3 + 2] : windows;
                int64_t examples = k + 1 < count ? seed_bands[(k + 1) * 3] : batch;
                for (; example < examples; example++) {
                    const float *r = gm + example * hidden;
                    for (int64_t h = 0; h < hidden; h++) summed[h] += r[h];
                }
                if (start >= stop) continue;
                for (int64_t h = 0; h < hidden; h++) scaled[h] = c * summed[h];
                for (int64_t row = start; row < stop; row++) {
                    float *r = w + row * hidden;
                    for (int64_t h = 0; h < hidden; h++) r[h] += alpha * scaled[h];
                }
            }
        }
    }
    free(summed);
    free(scaled);
    return 0;
}

/*
 * Compute the gradient with respect to each member's constant: every example's
 * output gradient grad[m][b] against the tails of its group, summed group by group.
 *
 * grad: (M, batch, hidden); tails: as first_layer_tails wrote them; out: (M,).
 * Returns 0, or -1 when memory runs out.
 */
int constant_gradient(const float *grad, int64_t hidden, const int64_t *bands,
                      const int64_t *band_counts, int64_t max_bands, int64_t seeds,
                      int64_t variants, int64_t batch, const float *tails, float *out) {
    float *group = malloc(sizeof(float) * hidden);
    if (group == NULL) return -1;
    for (int64_t s = 0; s < seeds; s++) {
        const int64_t *seed_bands = bands + s * max_bands * 3;
        int64_t count = band_counts[s];
        for (int64_t v = 0; v < variants; v++) {
            int64_t m = s * variants + v;
            float total = 0.0f;
            for (int64_t k = 0; k < count; k++) {
                int64_t first, last, stop;
                tail_rows(seed_bands, count, batch, k, &first, &last, &stop);
                memset(group, 0, sizeof(float) * hidden);
                for (int64_t b = first; b < last; b++) {
                    const float *r = grad + (m * batch + b) * hidden;
                    for (int64_t h = 0; h < hidden; h++) group[h] += r[h];
                }
                const float *tail = tails + (m * max_bands + k) * hidden;
                for (int64_t h = 0; h < hidden; h++) total += group[h] * tail[h];
            }
            out[m] = total;
        }
    }
    free(group);
    return 0;
}
