/*
 * The hidden layer's element-wise work in the forward pass, for the CPU: the bias, the
 * activation and dropout in one pass over the first Linear's output, where torch's
 * operations took four.
 *
 * Each value depends only on its own inputs, and a row's last values are computed in
 * a vector padded with zeros, so a run's numbers do not depend on the runs stacked
 * with it. The dropout mask and its product round as torch's operations do.
 */

#include <stdint.h>
#include <string.h>

#include "vectors.h"

/* One vector of a row: activate x + c, then drop where u < p. */
static inline __attribute__((always_inline)) void hidden_vector(
        int activation, vec x, vec c, const float *u, vec p, vec scale, float *y, float *k,
        float *d, int64_t count) {
    vec out = activate(activation, x + c);
    store_part(y, out, count);
    if (u == NULL) return;
    vec keep = blend(load(u) >= p, splat(1.0f), splat(0.0f)) * scale;
    store_part(k, keep, count);
    store_part(d, out * keep, count);
}

/* One example's row of `hidden` units; u, k and d are NULL without dropout. */
static inline __attribute__((always_inline)) void hidden_row(
        int activation, float *x, const float *c, const float *u, vec p, vec scale, float *k,
        float *d, int64_t hidden) {
    int64_t whole = hidden - hidden % WIDTH;
    for (int64_t j = 0; j < whole; j += WIDTH)
        hidden_vector(activation, load(x + j), load(c + j), u ? u + j : NULL, p, scale, x + j,
                      k ? k + j : NULL, d ? d + j : NULL, WIDTH);
    if (whole == hidden) return;
    int64_t rest = hidden - whole;
    float x_tail[WIDTH] = {0}, c_tail[WIDTH] = {0}, u_tail[WIDTH] = {0};
    memcpy(x_tail, x + whole, sizeof(float) * rest);
    memcpy(c_tail, c + whole, sizeof(float) * rest);
    if (u) memcpy(u_tail, u + whole, sizeof(float) * rest);
    hidden_vector(activation, load(x_tail), load(c_tail), u ? u_tail : NULL, p, scale,
                  x + whole, k ? k + whole : NULL, d ? d + whole : NULL, rest);
}

/* Run hidden_row, compiled once for each activation so that no loop branches on it. */
static void hidden_row_of(int activation, float *x, const float *c, const float *u, vec p,
                          vec scale, float *k, float *d, int64_t hidden) {
    switch (activation) {
    case ACT_RELU: hidden_row(ACT_RELU, x, c, u, p, scale, k, d, hidden); break;
    case ACT_SIGMOID: hidden_row(ACT_SIGMOID, x, c, u, p, scale, k, d, hidden); break;
    default: hidden_row(ACT_NONE, x, c, u, p, scale, k, d, hidden); break;
    }
}

/*
 * For member m = s * variants + v, example b and unit h:
 *   pre[m][b][h] = act(pre[m][b][h] + bias[m][h]), in place;
 *   with `uniform` (seeds, batch, hidden), each seed's draws:
 *   keep[m][b][h] = scale[m] where uniform[s][b][h] >= drop[m], else 0, and
 *   dropped[m][b][h] = pre[m][b][h] * keep[m][b][h].
 * scale[m] is 1 / (1 - drop[m]), computed by the caller. Without `uniform`, keep and
 * dropped are not written.
 */
void hidden_forward(float *pre, const float *bias, int64_t members, int64_t batch,
                    int64_t hidden, int activation, const float *uniform, int64_t variants,
                    const float *drop, const float *scale, float *keep, float *dropped) {
    for (int64_t m = 0; m < members; m++) {
        vec p = splat(uniform ? drop[m] : 0.0f), factor = splat(uniform ? scale[m] : 1.0f);
        for (int64_t b = 0; b < batch; b++) {
            int64_t row = (m * batch + b) * hidden;
            const float *u = uniform ? uniform + ((m / variants) * batch + b) * hidden : NULL;
            hidden_row_of(activation, pre + row, bias + m * hidden, u, p, factor,
                          uniform ? keep + row : NULL, uniform ? dropped + row : NULL, hidden);
        }
    }
}
