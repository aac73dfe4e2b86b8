/*
 * The convolution front's element-wise work in one pass per step, for the CPU.
 *
 * mnistbench/native/__init__.py compiles this file on first use and calls it through
 * ctypes; mnistbench/windows.py describes the layout. Each seed's batch of windows
 * is uint8 (batch, pixels * count): entry k * count + j is pixel k of window j. A
 * seed's packing lists its bands, each a block of examples `first` to batch - 1 and
 * windows `start` to `stop` - 1, stored row-major from its offset in every member's
 * packed row.
 *
 * front_forward writes each member's convolution outputs for its seed's packed
 * windows; front_sums sums a member's gradient against its taps' inputs. A member's
 * numbers depend only on its own taps and gradient and its seed's windows and bands.
 * Neither the other members of the stack nor the padded row length changes them, so
 * a run gives the same bits alone and stacked. Every value is computed in vectors: a
 * row's last values are padded with zeros to a whole vector. Build with
 * -ffp-contract=off, so that the compiler fuses no multiply and add. Only the
 * sigmoid's e^x fuses them, explicitly.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

enum { MODE_PLAIN = 0, MODE_MAX = 1, MODE_PAIR = 2 };

#define MAX_PIXELS 4
#define TAPS 3

/* Where one seed's inputs and bands lie. */
typedef struct {
    const uint8_t *windows;  /* (batch, pixels * count) */
    const int64_t *bands;    /* (band_count, 3): first, start, stop */
    const int64_t *offsets;  /* (band_count + 1): each band's offset, then the length */
    int64_t band_count;
} Seed;

static Seed seed_at(const uint8_t *windows, int64_t seed_stride, const int64_t *bands,
                    const int64_t *offsets, const int64_t *band_counts, int64_t max_bands,
                    int64_t s) {
    Seed seed = {windows + s * seed_stride, bands + s * max_bands * 3,
                 offsets + s * (max_bands + 1), band_counts[s]};
    return seed;
}

/* One member's taps and bias, in vectors. */
typedef struct {
    vec w0, w1, w2, c;
} Taps;

static Taps taps_of(const float *taps, const float *bias, int64_t m) {
    Taps t = {splat(taps[m * TAPS]), splat(taps[m * TAPS + 1]), splat(taps[m * TAPS + 2]),
              splat(bias[m])};
    return t;
}

/* The pooled pair's even output reads pixels 0-2 and its odd output pixels 1-3. */
static inline vec even_of(Taps t, vec p0, vec p1, vec p2) {
    return t.w0 * p0 + t.w1 * p1 + t.w2 * p2 + t.c;
}

/* Round n up to whole steps. */
static int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* Convert n pixels of each of the window's rows to floats in [0, 1], then zeros up to a
 * whole step: rows of padded(n) floats. */
static void load_pixels(float *out, const uint8_t *row, int64_t count, int64_t pixels,
                        int64_t start, int64_t n) {
    const float scale = 1.0f / 255.0f;
    int64_t length = padded(n);
    for (int64_t k = 0; k < pixels; k++) {
        const uint8_t *in = row + k * count + start;
        float *values = out + k * length;
        for (int64_t j = 0; j < n; j++) values[j] = (float)in[j] * scale;
        for (int64_t j = n; j < length; j++) values[j] = 0.0f;
    }
}

static int64_t longest_band(const int64_t *bands, const int64_t *band_counts, int64_t seeds,
                            int64_t max_bands) {
    int64_t longest = 1;
    for (int64_t s = 0; s < seeds; s++)
        for (int64_t b = 0; b < band_counts[s]; b++) {
            const int64_t *band = bands + (s * max_bands + b) * 3;
            if (band[2] - band[1] > longest) longest = band[2] - band[1];
        }
    return longest;
}

/* The arguments that locate every seed's windows and bands, as both kernels take them. */
typedef struct {
    const uint8_t *windows;
    int64_t seed_stride, example_stride, pixels, count;
    const int64_t *bands, *offsets, *band_counts;
    int64_t max_bands, seeds, variants;
} Walk;

/* A callback for member m and one example's n windows in one band. `values` contains
 * their pixels as padded rows (see load_pixels), and the windows are stored from
 * offset `at`. */
typedef void (*RowVisitor)(void *context, int64_t m, const float *values, int64_t n,
                           int64_t at);

/* Visit every member's packed rows, seed by seed, band by band, example by example.
 * Returns 0, or -1 when memory runs out. */
static int walk_rows(const Walk *w, RowVisitor visit, void *context) {
    int64_t longest = longest_band(w->bands, w->band_counts, w->seeds, w->max_bands);
    float *values = malloc(sizeof(float) * MAX_PIXELS * padded(longest));
    if (values == NULL) return -1;
    for (int64_t s = 0; s < w->seeds; s++) {
        Seed seed = seed_at(w->windows, w->seed_stride, w->bands, w->offsets, w->band_counts,
                            w->max_bands, s);
        for (int64_t b = 0; b < seed.band_count; b++) {
            int64_t first = seed.bands[b * 3], start = seed.bands[b * 3 + 1];
            int64_t n = seed.bands[b * 3 + 2] - start;
            int64_t rows = n ? (seed.offsets[b + 1] - seed.offsets[b]) / n : 0;
            for (int64_t r = 0; r < rows; r++) {
                load_pixels(values, seed.windows + (first + r) * w->example_stride, w->count,
                            w->pixels, start, n);
                for (int64_t v = 0; v < w->variants; v++)
                    visit(context, s * w->variants + v, values, n, seed.offsets[b] + r * n);
            }
        }
    }
    free(values);
    return 0;
}

/* One member's output vector at j: the activated output, or with MODE_PAIR the even
 * one, and the odd one in *odd. */
static inline __attribute__((always_inline)) vec output_at(
        Taps t, const float *p0, const float *p1, const float *p2, const float *p3,
        int64_t j, int mode, int activation, vec *odd) {
    vec x1 = load(p1 + j), x2 = load(p2 + j);
    vec e = even_of(t, load(p0 + j), x1, x2);
    if (mode == MODE_PLAIN) return activate(activation, e);
    vec o = even_of(t, x1, x2, load(p3 + j));
    if (mode == MODE_MAX) return activate(activation, blend((e >= o) | (e != e), e, o));
    *odd = o;
    return e;
}

/* One member's outputs for one example's windows in one band. */
static inline __attribute__((always_inline)) void forward_row(
        Taps t, const float *p, int64_t n, int mode, int activation, float *a, float *d) {
    int64_t length = padded(n), whole = n - n % WIDTH;
    const float *p0 = p, *p1 = p + length, *p2 = p + 2 * length, *p3 = p + 3 * length;
    vec odd;
    for (int64_t j = 0; j < whole; j += WIDTH) {
        store(a + j, output_at(t, p0, p1, p2, p3, j, mode, activation, &odd));
        if (mode == MODE_PAIR) store(d + j, odd);
    }
    if (whole < n) {
        store_part(a + whole, output_at(t, p0, p1, p2, p3, whole, mode, activation, &odd),
                   n - whole);
        if (mode == MODE_PAIR) store_part(d + whole, odd, n - whole);
    }
}

/* forward_row compiled once for each mode and activation, so that no loop branches on
 * them. */
#define FORWARD_ROW(mode, activation) forward_row(t, p, n, mode, activation, a, d)

static void forward_row_of(Taps t, const float *p, int64_t n, int mode, int activation,
                           float *a, float *d) {
    switch (mode * 4 + activation) {
    case MODE_PLAIN * 4 + ACT_RELU: FORWARD_ROW(MODE_PLAIN, ACT_RELU); break;
    case MODE_PLAIN * 4 + ACT_SIGMOID: FORWARD_ROW(MODE_PLAIN, ACT_SIGMOID); break;
    case MODE_MAX * 4 + ACT_NONE: FORWARD_ROW(MODE_MAX, ACT_NONE); break;
    case MODE_MAX * 4 + ACT_RELU: FORWARD_ROW(MODE_MAX, ACT_RELU); break;
    case MODE_MAX * 4 + ACT_SIGMOID: FORWARD_ROW(MODE_MAX, ACT_SIGMOID); break;
    case MODE_PAIR * 4 + ACT_NONE: FORWARD_ROW(MODE_PAIR, ACT_NONE); break;
    default: FORWARD_ROW(MODE_PLAIN, ACT_NONE); break;
    }
}

typedef struct {
    const float *taps, *bias;
    int mode, activation;
    float *out0, *out1;
    int64_t stride;
} ForwardContext;

static void visit_forward(void *context, int64_t m, const float *values, int64_t n,
                          int64_t at) {
    const ForwardContext *c = context;
    forward_row_of(taps_of(c->taps, c->bias, m), values, n, c->mode, c->activation,
                   c->out0 + m * c->stride + at, c->out1 ? c->out1 + m * c->stride + at : NULL);
}

/*
 * Write each member's convolution outputs at its seed's packed windows, and zeros
 * from its seed's length to `width`.
 *
 * MODE_PLAIN: out0 = act(w0 p0 + w1 p1 + w2 p2 + b).
 * MODE_MAX: the pooled pair's even output e (pixels 0-2) and odd output o (pixels
 *   1-3); out0 = act(max(e, o)), NaN if either is NaN.
 * MODE_PAIR: out0 = e, out1 = o, with no activation.
 * act is ReLU, the sigmoid or none (ACT_NONE). Member m's rows start at
 * out0 + m * stride and out1 + m * stride.
 * Returns 0, or -1 when memory runs out.
 */
int front_forward(const uint8_t *windows, int64_t seed_stride, int64_t example_stride,
                  int64_t pixels, int64_t count, const int64_t *bands,
                  const int64_t *offsets, const int64_t *band_counts, int64_t max_bands,
                  int64_t seeds, int64_t variants, const float *taps, const float *bias,
                  int mode, int activation, float *out0, float *out1, int64_t stride,
                  int64_t width) {
    Walk walk = {windows, seed_stride, example_stride, pixels, count, bands, offsets,
                 band_counts, max_bands, seeds, variants};
    ForwardContext context = {taps, bias, mode, activation, out0, out1, stride};
    if (walk_rows(&walk, visit_forward, &context) != 0) return -1;
    for (int64_t m = 0; m < seeds * variants; m++) {
        int64_t s = m / variants;
        int64_t length = offsets[s * (max_bands + 1) + band_counts[s]];
        memset(out0 + m * stride + length, 0, sizeof(float) * (width - length));
        if (out1) memset(out1 + m * stride + length, 0, sizeof(float) * (width - length));
    }
    return 0;
}

/* A member's running sums: for the three taps and the bias, two vectors of lanes. */
typedef struct {
    vec sum[4][2];
} Sums;

/* Add one vector of gradient g against the inputs q0-q2 of the three taps. */
static inline void add_vector(Sums *acc, int h, vec g, vec q0, vec q1, vec q2) {
    acc->sum[0][h] += g * q0;
    acc->sum[1][h] += g * q1;
    acc->sum[2][h] += g * q2;
    acc->sum[3][h] += g;
}

/* The gradient before the activation, from the gradient g after it and its output y,
 * in the formulas of PyTorch's backward kernels; ACT_NONE passes g on. */
static inline vec derivative(int activation, vec g, vec y) {
    switch (activation) {
    case ACT_RELU:
        return blend(y > 0.0f, g, splat(0.0f));
    case ACT_SIGMOID:
        return g * (1.0f - y) * y;
    case ACT_TANH:
        return g * (1.0f - y * y);
    default:
        return g;
    }
}

/* Copy the last n < LANES values of a row into a zero-padded step. */
static const float *padded_tail(float *tail, const float *values, int64_t n) {
    memset(tail, 0, sizeof(float) * LANES);
    memcpy(tail, values, sizeof(float) * n);
    return tail;
}

/* One member's gradient g (and `other`) for one example's windows in one band; with an
 * activation, g is the gradient of its output y. */
static inline __attribute__((always_inline)) void sums_row(
        Sums *acc, Taps t, const float *p, int64_t n, int mode, int activation, const float *g,
        const float *y, const float *other) {
    int64_t length = padded(n);
    const float *p0 = p, *p1 = p + length, *p2 = p + 2 * length, *p3 = p + 3 * length;
    float g_tail[LANES], y_tail[LANES], other_tail[LANES];
    Sums local = *acc;
    for (int64_t j = 0; j < length; j += LANES) {
        const float *gj = g + j, *yj = y ? y + j : NULL, *oj = other ? other + j : NULL;
        if (j + LANES > n) {  /* the row's last values, padded with zeros */
            gj = padded_tail(g_tail, gj, n - j);
            if (y) yj = padded_tail(y_tail, yj, n - j);
            if (other) oj = padded_tail(other_tail, oj, n - j);
        }
        for (int h = 0; h < 2; h++) {
            int64_t i = j + h * WIDTH;
            vec x0 = load(p0 + i), x1 = load(p1 + i), x2 = load(p2 + i), x3 = load(p3 + i);
            vec gv = load(gj + h * WIDTH);
            if (y) gv = derivative(activation, gv, load(yj + h * WIDTH));
            if (mode == MODE_PLAIN) {
                add_vector(&local, h, gv, x0, x1, x2);
            } else if (mode == MODE_MAX) {
                /* The pooled unit's gradient goes to the larger output of its pair:
                 * the odd one where o - e > 0, as the forward pass computed them. */
                vec e = even_of(t, x0, x1, x2), o = even_of(t, x1, x2, x3);
                mask odd = (o - e) > 0.0f;
                add_vector(&local, h, gv, blend(odd, x1, x0), blend(odd, x2, x1),
                           blend(odd, x3, x2));
            } else {
                add_vector(&local, h, gv, x0, x1, x2);
                add_vector(&local, h, load(oj + h * WIDTH), x1, x2, x3);
            }
        }
    }
    *acc = local;
}

/* sums_row compiled once for each mode and activation, so that no loop branches on them. */
#define SUMS_ROW(mode, activation) \
    sums_row(acc, t, p, n, mode, activation, g, y, other)

static void sums_row_of(Sums *acc, Taps t, const float *p, int64_t n, int mode,
                        int activation, const float *g, const float *y, const float *other) {
    switch (mode * 4 + (y ? activation : ACT_NONE)) {
    case MODE_PLAIN * 4 + ACT_RELU: SUMS_ROW(MODE_PLAIN, ACT_RELU); break;
    case MODE_PLAIN * 4 + ACT_SIGMOID: SUMS_ROW(MODE_PLAIN, ACT_SIGMOID); break;
    case MODE_PLAIN * 4 + ACT_TANH: SUMS_ROW(MODE_PLAIN, ACT_TANH); break;
    case MODE_MAX * 4 + ACT_NONE: SUMS_ROW(MODE_MAX, ACT_NONE); break;
    case MODE_MAX * 4 + ACT_RELU: SUMS_ROW(MODE_MAX, ACT_RELU); break;
    case MODE_MAX * 4 + ACT_SIGMOID: SUMS_ROW(MODE_MAX, ACT_SIGMOID); break;
    case MODE_MAX * 4 + ACT_TANH: SUMS_ROW(MODE_MAX, ACT_TANH); break;
    case MODE_PAIR * 4 + ACT_NONE: SUMS_ROW(MODE_PAIR, ACT_NONE); break;
    default: SUMS_ROW(MODE_PLAIN, ACT_NONE); break;
    }
}

typedef struct {
    Sums *acc;
    const float *taps, *bias;
    int mode, activation;
    const float *g0, *output, *other;
    int64_t stride;
} SumsContext;

static void visit_sums(void *context, int64_t m, const float *values, int64_t n, int64_t at) {
    const SumsContext *c = context;
    int64_t row = m * c->stride + at;
    sums_row_of(&c->acc[m], taps_of(c->taps, c->bias, m), values, n, c->mode, c->activation,
                c->g0 + row, c->output ? c->output + row : NULL,
                c->other ? c->other + row : NULL);
}

/*
 * Sum each member's gradient with respect to its convolution outputs against their
 * inputs: sums[m] = (dL/dw0, dL/dw1, dL/dw2, dL/db), over its seed's packed windows.
 *
 * MODE_PLAIN: g0 is the gradient of the outputs.
 * MODE_MAX: g0 is the gradient of the pooled output; the pairs are computed again from
 *   the taps and bias to route it.
 * MODE_PAIR: g0 and other are the gradients of the even and the odd outputs.
 * With an activation other than ACT_NONE, g0 is the gradient of the activation's
 * output, and `output` contains that output (MODE_PLAIN and MODE_MAX).
 * Returns 0, or -1 when memory runs out.
 */
int front_sums(const uint8_t *windows, int64_t seed_stride, int64_t example_stride,
               int64_t pixels, int64_t count, const int64_t *bands, const int64_t *offsets,
               const int64_t *band_counts, int64_t max_bands, int64_t seeds,
               int64_t variants, const float *taps, const float *bias, int mode,
               int activation, const float *g0, const float *output, const float *other,
               int64_t stride, float *sums) {
    int64_t members = seeds * variants;
    Sums *acc = aligned_alloc(sizeof(vec), sizeof(Sums) * (size_t)members);
    if (acc == NULL) return -1;
    memset(acc, 0, sizeof(Sums) * (size_t)members);
    Walk walk = {windows, seed_stride, example_stride, pixels, count, bands, offsets,
                 band_counts, max_bands, seeds, variants};
    SumsContext context = {acc, taps, bias, mode, activation, g0, output, other, stride};
    if (walk_rows(&walk, visit_sums, &context) != 0) {
        free(acc);
        return -1;
    }
    for (int64_t m = 0; m < members; m++)
        for (int k = 0; k < 4; k++) {
            float lanes[LANES], total = 0.0f;
            store(lanes, acc[m].sum[k][0]);
            store(lanes + WIDTH, acc[m].sum[k][1]);
            for (int l = 0; l < LANES; l++) total += lanes[l];
            sums[m * 4 + k] = total;
        }
    free(acc);
    return 0;
}
