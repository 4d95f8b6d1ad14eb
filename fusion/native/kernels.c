/* Three kernels of the batched decoding step on CPU, each one call where the torch path takes
 * many small kernels; built and loaded by `fusion/native/build.py`, and `fusion/native/`
 * says why and what they save.
 * - table_apply: the low-rank products of one batch table (`batch_layout.Table`) for a step's
 *   few rows; each row multiplies only the ranks it uses (its coefficient is not 0), where the
 *   torch path computes every rank for every row and multiplies the unused ones by 0.
 * - picked_mixture: MixLoRA's routing and routed FFN (`mixlora_ffn.expert_mixture`), each pick
 *   reading only its own expert, with SiLU as the activation; in two phases where the first
 *   runs beside the base projections it does not need.
 * - flow_scales: LoRA-Flow's gates of one layer and every row's per-rank scales. */
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
/* one build for every x86-64 CPU: the loader picks the widest vector unit this CPU has */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))
#define MAX_ROWS 64

struct table_call {
    int rows, din, width, members;
    const float *x; /* (rows, din), row stride x_stride */
    long x_stride;
    const float *A; /* (width, din), contiguous */
    const float *scale; /* (rows, width), row stride scale_stride */
    long scale_stride;
    const int *start, *end, *dout; /* per member: its ranks [start, end) and output width */
    const float *const *Bt; /* per member: (end - start, dout), contiguous */
    float *const *y; /* per member: (rows, dout), row stride y_stride[m], added to */
    const long *y_stride;
    float *h; /* (rows, width) scratch */
};

/* four rows' products with one A row, which is read once for them */
INLINE void dots4(const float *restrict a, const float *x0, const float *x1, const float *x2, const float *x3,
                  int n, float *out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < n; i++) {
        float v = a[i];
        s0 += v * x0[i];
        s1 += v * x1[i];
        s2 += v * x2[i];
        s3 += v * x3[i];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

INLINE float dot1(const float *restrict a, const float *restrict b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

INLINE void axpy(float *restrict y, float a, const float *restrict x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* h[n, r] = scale[n, r] <x[n], A[r]> where scale[n, r] != 0, else 0; then for every member m
 * and row n: y_m[n] += sum over r in [start_m, end_m) of h[n, r] Bt_m[r - start_m].
 * Returns 0, or -1 if there are more than MAX_ROWS rows (nothing is written then). */
CLONES int table_apply(const struct table_call *c) {
    const int N = c->rows, din = c->din, R = c->width;
    if (N > MAX_ROWS) return -1;
    int used[MAX_ROWS];
    for (int r = 0; r < R; r++) {
        const float *a = c->A + (size_t)r * din;
        int k = 0;
        for (int n = 0; n < N; n++) {
            if (c->scale[(size_t)n * c->scale_stride + r] != 0.0f)
                used[k++] = n;
            else
                c->h[(size_t)n * R + r] = 0.0f;
        }
        int j = 0;
        float d[4];
        for (; j + 4 <= k; j += 4) {
            dots4(a, c->x + used[j] * c->x_stride, c->x + used[j + 1] * c->x_stride, c->x + used[j + 2] * c->x_stride,
                  c->x + used[j + 3] * c->x_stride, din, d);
            for (int q = 0; q < 4; q++) {
                int n = used[j + q];
                c->h[(size_t)n * R + r] = d[q] * c->scale[(size_t)n * c->scale_stride + r];
            }
        }
        for (; j < k; j++) {
            int n = used[j];
            c->h[(size_t)n * R + r] = dot1(a, c->x + n * c->x_stride, din) * c->scale[(size_t)n * c->scale_stride + r];
        }
    }
    for (int m = 0; m < c->members; m++) {
        const int d = c->dout[m];
        for (int n = 0; n < N; n++) memset(c->y[m] + n * c->y_stride[m], 0, d * sizeof(float));
        for (int r = c->start[m]; r < c->end[m]; r++) {
            const float *b = c->Bt[m] + (size_t)(r - c->start[m]) * d;
            for (int n = 0; n < N; n++) {
                float v = c->h[(size_t)n * R + r];
                if (v != 0.0f) axpy(c->y[m] + n * c->y_stride[m], v, b, d);
            }
        }
    }
    return 0;
}

/* out_m[n] += y_m[n] for every member m and row n, out_m (rows, dout_m) contiguous: a table's
 * products, computed apart (beside the base projections, `helper.c`), added to the
 * projections' outputs once those exist. */
CLONES void table_add(const struct table_call *c, float *const *out) {
    for (int m = 0; m < c->members; m++)
        for (int n = 0; n < c->rows; n++) {
            float *restrict o = out[m] + (size_t)n * c->dout[m];
            const float *restrict y = c->y[m] + n * c->y_stride[m];
#pragma omp simd
            for (int i = 0; i < c->dout[m]; i++) o[i] += y[i];
        }
}

/* exp(x) for float, vectorizable (no libm call, no branch): Cephes' expf polynomial after
 * reduction by ln 2, rounding by the 1.5 * 2^23 trick, 2^n built from its bits; within 1.4 ulp
 * of the exact value on [-87, 88]. Inputs are clamped to [-87.3, 88.3], where 2^n stays normal. */
INLINE float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float t = x * 1.44269504088896341f + 12582912.0f; /* n + 1.5 * 2^23: n = round(x / ln 2) */
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000 + 127) * (1 << 23); /* the low bits of t hold n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

struct picked_call {
    int tokens, picks, din, f, rank, has_gate, has_up, has_down, experts;
    const float *x; /* (tokens, din), row stride x_stride */
    long x_stride;
    const float *gate, *up; /* (tokens, f): W_gate x and W_up x, row strides below */
    long gate_stride, up_stride;
    const float *router; /* (experts, din), or NULL: chosen and weights are given */
    float *logits, *probs; /* (tokens, experts), written when routing */
    int64_t *chosen; /* (tokens, picks): expert of each pick; written when routing */
    float *weights; /* (tokens, picks): its router weight, normalised over the picks; likewise */
    const float *A_in; /* (E, P rank, din): gate's ranks, then up's, of the P that carry experts */
    const float *B_gate, *B_up; /* (E, rank, f) each, where present */
    const float *A_down; /* (E, rank, f) */
    const float *B_down; /* (E, rank, din) */
    float *mixed; /* (tokens, f), written: sum over picks of w * m */
    float *down; /* (tokens, din), written: sum over picks of w * B_down (A_down m), if has_down */
    float *scratch; /* 2 rank floats */
    float *deltas; /* per token (picks, 2, f): each pick's gate and up deltas, then its m */
    long deltas_stride; /* between tokens' deltas; 0: one token's, reused */
    int phase; /* PICK_IN, PICK_OUT or both */
};

#define PICK_IN 1 /* routing (if a router is given) and the picks' gate and up deltas */
#define PICK_OUT 2 /* from those deltas: each pick's m, the mixture and the down deltas */

/* MixLoRA's router for one token: logits = router x, probs = softmax(logits), the top `picks`
 * experts by probability (the lower index first among equals) and their probabilities
 * normalised to sum 1. */
INLINE void route(const struct picked_call *c, int n, const float *x) {
    const int E = c->experts, k = c->picks;
    float *logits = c->logits + (size_t)n * E, *probs = c->probs + (size_t)n * E;
    int64_t *chosen = c->chosen + (size_t)n * k;
    float *weights = c->weights + (size_t)n * k;
    float top = -3.4e38f, total = 0.0f, picked = 0.0f;
    for (int e = 0; e < E; e++) {
        logits[e] = dot1(c->router + (size_t)e * c->din, x, c->din);
        top = logits[e] > top ? logits[e] : top;
    }
    for (int e = 0; e < E; e++) total += probs[e] = exp_approx(logits[e] - top);
    for (int e = 0; e < E; e++) probs[e] /= total;
    for (int p = 0; p < k; p++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < p; q++) taken |= chosen[q] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        chosen[p] = best;
        weights[p] = probs[best];
        picked += probs[best];
    }
    for (int p = 0; p < k; p++) weights[p] /= picked;
}

/* Token n's picks' deltas dg = B_gate_e A_gate_e x[n] and du likewise (0 where the experts
 * carry no such module), into d (picks, 2, f); routed first if a router is given. */
INLINE void pick_in(const struct picked_call *c, int n, float *d) {
    const int f = c->f, din = c->din, r = c->rank, P = c->has_gate + c->has_up;
    const float *x = c->x + n * c->x_stride;
    float *t = c->scratch;
    if (c->router) route(c, n, x);
    for (int p = 0; p < c->picks; p++) {
        const int64_t e = c->chosen[n * c->picks + p];
        float *dg = d + (size_t)p * 2 * f, *du = dg + f;
        memset(dg, 0, 2 * f * sizeof(float));
        const float *A = c->A_in + (size_t)e * P * r * din;
        for (int j = 0; j < P * r; j++) t[j] = dot1(A + (size_t)j * din, x, din);
        int q = 0;
        if (c->has_gate) {
            const float *B = c->B_gate + (size_t)e * r * f;
            for (int j = 0; j < r; j++) axpy(dg, t[j], B + (size_t)j * f, f);
            q = r;
        }
        if (c->has_up) {
            const float *B = c->B_up + (size_t)e * r * f;
            for (int j = 0; j < r; j++) axpy(du, t[q + j], B + (size_t)j * f, f);
        }
    }
}

/* Token n from its picks' deltas d: m = silu(gate[n] + dg) * (up[n] + du) per pick (kept in dg),
 * mixed[n] = sum_p w m, down[n] = sum_p w B_down_e (A_down_e m). */
INLINE void pick_out(const struct picked_call *c, int n, float *d) {
    const int f = c->f, din = c->din, r = c->rank;
    const float *gate = c->gate + n * c->gate_stride, *up = c->up + n * c->up_stride;
    float *mixed = c->mixed + (size_t)n * f;
    float *down = c->has_down ? c->down + (size_t)n * din : NULL;
    memset(mixed, 0, f * sizeof(float));
    if (down) memset(down, 0, din * sizeof(float));
    for (int p = 0; p < c->picks; p++) {
        const int64_t e = c->chosen[n * c->picks + p];
        const float w = c->weights[n * c->picks + p];
        float *m = d + (size_t)p * 2 * f;
        const float *du = m + f;
#pragma omp simd
        for (int i = 0; i < f; i++) {
            float g = gate[i] + m[i];
            m[i] = g / (1.0f + exp_approx(-g)) * (up[i] + du[i]);
        }
        axpy(mixed, w, m, f);
        if (down) {
            const float *A = c->A_down + (size_t)e * r * f, *B = c->B_down + (size_t)e * r * din;
            for (int j = 0; j < r; j++) axpy(down, w * dot1(A + (size_t)j * f, m, f), B + (size_t)j * din, din);
        }
    }
}

/* The phases asked for, token after token. PICK_IN alone can run beside the computation of
 * W_gate x and W_up x (`helper.c`), which PICK_OUT reads. Returns 0. */
CLONES int picked_mixture(const struct picked_call *c) {
    for (int n = 0; n < c->tokens; n++) {
        float *d = c->deltas + n * c->deltas_stride;
        if (c->phase & PICK_IN) pick_in(c, n, d);
        if (c->phase & PICK_OUT) pick_out(c, n, d);
    }
    return 0;
}

struct flow_call {
    int rows, flow, slots, din, width; /* N rows, of which `flow` LoRA-Flow ones; S gate slots */
    const float *x; /* (rows, din), row stride x_stride: the residual stream entering the layer */
    long x_stride;
    const int64_t *flow_rows; /* (flow,): each LoRA-Flow row's index among the rows */
    const float *W, *b; /* (flow, S, din), (flow, S): each LoRA-Flow row's gate at this layer */
    const float *mask; /* (flow, S): -inf on a row's padding slots, else 0; or NULL */
    const float *temps; /* (flow,): softmax temperatures, or NULL (all 1) */
    const float *coef; /* (rows, width), row stride coef_stride: each rank's fixed coefficient */
    long coef_stride;
    const int64_t *slot; /* (rows, width), row stride slot_stride: 0, or 1 + the gate slot scaling the
                            rank; NULL when the layer has no table */
    long slot_stride;
    float *weights; /* (flow, S), written: softmax(W x / t + mask) + b */
    float *scales; /* (rows, width) contiguous, written: coef times the weight of the rank's slot */
};

/* LoRA-Flow's gates of one decoding step's layer and every row's per-rank scales
 * (`batch_layout.Layout.gate` and `LayerTables.scales`, one token per row). */
CLONES void flow_scales(const struct flow_call *c) {
    const int S = c->slots, W = c->width;
    for (int j = 0; j < c->flow; j++) {
        const float *x = c->x + c->flow_rows[j] * c->x_stride;
        float *w = c->weights + (size_t)j * S, top = -3.4e38f, total = 0.0f;
        for (int s = 0; s < S; s++) {
            float logit = dot1(c->W + ((size_t)j * S + s) * c->din, x, c->din);
            if (c->temps) logit /= c->temps[j];
            if (c->mask) logit += c->mask[(size_t)j * S + s];
            w[s] = logit;
            top = logit > top ? logit : top;
        }
        for (int s = 0; s < S; s++) total += w[s] = w[s] < -3.4e38f ? 0.0f : exp_approx(w[s] - top);
        for (int s = 0; s < S; s++) w[s] = w[s] / total + c->b[(size_t)j * S + s];
    }
    if (!c->slot) return;
    for (int n = 0; n < c->rows; n++) {
        const float *coef = c->coef + n * c->coef_stride;
        float *out = c->scales + (size_t)n * W;
        const float *w = NULL;
        for (int j = 0; j < c->flow; j++)
            if (c->flow_rows[j] == n) w = c->weights + (size_t)j * S;
        if (!w) {
            memcpy(out, coef, W * sizeof(float));
            continue;
        }
        const int64_t *slot = c->slot + n * c->slot_stride;
        for (int i = 0; i < W; i++) out[i] = slot[i] ? coef[i] * w[slot[i] - 1] : coef[i];
    }
}
