/* factorllm's CPU MoE kernels (float32): one token through a routed block, and many tokens through the experts.
 *
 * One token. Why: at batch 1 each torch op costs 5-20 us of fixed overhead inside a model (dispatch, thread wake-up,
 * cold code), as much as the arithmetic of a small expert; the routed block is ~12 such ops. This kernel
 * does router, top-k, gating, the chosen experts and the weighted sum in one call, reading only the chosen
 * experts' weights. The reference it is tested against is factorllm's torch code (experts.naive_path).
 *
 * Layout (factorllm.experts.Experts, Mixtral's): w_in [E, m*I, D] (gate rows, then up rows when gated),
 * b_in [E, m*I] or NULL, w_out [E, D, I]; router weight [E, D], bias [E] or NULL.
 * Built with -fopenmp and loaded into a process that already holds torch's libgomp, so it shares torch's
 * OpenMP thread pool (and torch.set_num_threads).
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU_ERF = 2, ACT_RELU = 3 };
enum { GATE_SUM = 0, GATE_HARD = 1, GATE_SOFTMAX_RENORM = 2, GATE_SOFTMAX = 3 };
#define MAX_EXPERTS 1024

static float dot(const float *restrict a, const float *restrict b, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Four rows against one vector: four independent accumulator chains and four memory streams in flight. */
static void dot4(const float *restrict a, size_t stride, const float *restrict x, int n, float *restrict out) {
    const float *a0 = a, *a1 = a + stride, *a2 = a + 2 * stride, *a3 = a + 3 * stride;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < n; i++) {
        s0 += a0[i] * x[i];
        s1 += a1[i] * x[i];
        s2 += a2[i] * x[i];
        s3 += a3[i] * x[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* exp in float32 without libm: Cephes' range reduction and polynomial (within 2 ulp), written so that the
 * compiler vectorizes the loops that call it (a scalar expf call per neuron was 4% of TinyLlama's prefill; needs
 * -fno-math-errno -fno-trapping-math, see factorllm.native.FLAGS). x is clamped to [-87, 89]: 2^n stays a normal
 * float below (exp(-87) ~ 1.6e-38) and becomes +inf above, as expf overflows past 88.72.
 * NOTE: why +inf and not the largest float: GCC computes each clamped branch's constant result in every vector
 * lane and blends; with exp(88) ~ 1.65e38 as the top, silu's v / (1 + exp(88)) made a subnormal float in every
 * lane, each a ~100-cycle microcode assist, and the SiLU loop ran 8x slower (measured here: 0.25 against 0.03 ms
 * for 256 rows of 192 neurons; 0.5 ms of a SmolLM2 block's 3.3 at 512 tokens). v / inf is a plain zero. */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x; /* ternaries, not fminf: they vectorize */
    x = x > 89.0f ? 89.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f); /* -125 <= n <= 128 */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int i; float f; } scale = {.i = ((int)n + 127) << 23}; /* 2^n; n = 128: the exponent of +inf */
    return p * scale.f;
}

static inline float silu_f(float v) { return v / (1.0f + exp_f(-v)); }
static inline float gelu_tanh_f(float v) { /* tanh(u) = 1 - 2 / (exp(2u) + 1) */
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (2.0f - 2.0f / (exp_f(2.0f * u) + 1.0f));
}

/* One activation; factorllm.native checks each code against torch's modules with it. */
float factorllm_act(float v, int act) {
    switch (act) {
    case ACT_SILU: return silu_f(v);
    case ACT_GELU_TANH: return gelu_tanh_f(v);
    case ACT_GELU_ERF: return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    default: return v > 0.0f ? v : 0.0f;
    }
}

/* h[i] = scale * act(h[i]) * h[I + i] (gated) or scale * act(h[i]), i < I: the switch outside the loops, so each
 * loop vectorizes. */
static void act_rows(float *restrict h, int I, int gated, float scale, int act) {
    const float *up = h + I;
    switch (act) {
    case ACT_SILU:
        if (gated) {
#pragma omp simd
            for (int i = 0; i < I; i++) h[i] = scale * silu_f(h[i]) * up[i];
        } else {
#pragma omp simd
            for (int i = 0; i < I; i++) h[i] = scale * silu_f(h[i]);
        }
        return;
    case ACT_GELU_TANH:
#pragma omp simd
        for (int i = 0; i < I; i++) h[i] = scale * gelu_tanh_f(h[i]) * (gated ? up[i] : 1.0f);
        return;
    default:
        for (int i = 0; i < I; i++) h[i] = scale * factorllm_act(h[i], act) * (gated ? up[i] : 1.0f);
    }
}

/* One expert's hidden row: h += b (the expert's input bias, or NULL), then act_rows. */
static void bias_act(float *restrict h, const float *b, int I, int gated, float scale, int act) {
    if (b)
        for (int i = 0; i < (gated ? 2 : 1) * I; i++) h[i] += b[i];
    act_rows(h, I, gated, scale, act);
}

/* Top-k of logits[E] (largest first; ties to the lower index, as torch.topk on CPU) and their weights. */
static void route(const float *logits, int E, int k, int gating, int *chosen, float *weights) {
    unsigned char taken[MAX_EXPERTS] = {0};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;
        taken[best] = 1;
        chosen[j] = best;
    }
    if (gating == GATE_SUM) {
        for (int j = 0; j < k; j++) weights[j] = 1.0f;
    } else if (gating == GATE_HARD) {
        for (int j = 0; j < k; j++) weights[j] = (float)E / (float)k;
    } else { /* softmax over the chosen (renorm) or over all E, shifted by the maximum, chosen[0] */
        float top = logits[chosen[0]], z = 0.0f;
        if (gating == GATE_SOFTMAX)
            for (int e = 0; e < E; e++) z += expf(logits[e] - top);
        else
            for (int j = 0; j < k; j++) z += expf(logits[chosen[j]] - top);
        for (int j = 0; j < k; j++) weights[j] = expf(logits[chosen[j]] - top) / z;
    }
}

typedef void (*sgemv_fn)(const char *trans, const int *m, const int *n, const float *alpha, const float *a,
                         const int *lda, const float *x, const int *incx, const float *beta, float *y, const int *incy);

/* A block's fixed arguments, bound once (factorllm.native.DecodeKernel): a call passes only x and out. */
typedef struct {
    const float *router_w, *router_b; /* [E, D], [E] or NULL */
    const float *w_in, *b_in, *w_out; /* [E, m*I, D], [E, m*I] or NULL, [E, D, I] */
    float *scratch;                   /* [k, m*I] hidden, then [k, D] partial outputs */
    int *chosen;                      /* [k]: the routing of the last call */
    float *weights;                   /* [k] */
    void *gemv;                       /* MKL's sgemv_, or NULL for the loops below */
    int D, E, k, I, gated, act, gating;
} DecodeArgs;

/* out[D] = sum over the k chosen experts of weight * expert(x). Returns 0, or -1 for unsupported sizes. */
int factorllm_moe_decode(const DecodeArgs *args, const float *x, float *out) {
    const float *router_w = args->router_w, *router_b = args->router_b, *w_in = args->w_in, *b_in = args->b_in,
                *w_out = args->w_out;
    float *scratch = args->scratch, *weights = args->weights;
    int *chosen = args->chosen;
    void *gemv_ptr = args->gemv;
    const int D = args->D, E = args->E, k = args->k, I = args->I, gated = args->gated, act = args->act,
              gating = args->gating;
    if (E > MAX_EXPERTS || k > E || k < 1) return -1;
    const int m = gated ? 2 : 1, mI = m * I;
    float logits[MAX_EXPERTS];
    for (int e = 0; e < E; e++) logits[e] = dot(router_w + (size_t)e * D, x, D) + (router_b ? router_b[e] : 0.0f);
    route(logits, E, k, gating, chosen, weights);
    const int threads = omp_get_max_threads();
    if (gemv_ptr && k % threads == 0) {
        /* Whole experts per thread, each a sequential GEMV pair into its own partial output, then one sum: one
         * fork/join instead of four threaded GEMVs' (SmolLM2 block, 2 threads, top-2: 0.32 of dense against
         * 0.34). MKL runs sequentially inside a parallel region. */
        sgemv_fn gemv = (sgemv_fn)gemv_ptr;
        float *part = scratch + (size_t)k * mI; /* [k, D] */
#pragma omp parallel for schedule(static)
        for (int j = 0; j < k; j++) {
            const int one = 1;
            const float f1 = 1.0f, f0 = 0.0f;
            size_t e = (size_t)chosen[j];
            float *h = scratch + (size_t)j * mI;
            gemv("T", &D, &mI, &f1, w_in + e * mI * D, &D, x, &one, &f0, h, &one);
            bias_act(h, b_in ? b_in + e * mI : NULL, I, gated, weights[j], act);
            gemv("T", &I, &D, &f1, w_out + e * D * I, &I, h, &one, &f0, part + (size_t)j * D, &one);
        }
        for (int d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) acc += part[(size_t)j * D + d];
            out[d] = acc;
        }
        return 0;
    }
    if (gemv_ptr) { /* k not a multiple of the threads: expert after expert, each GEMV threaded by MKL */
        sgemv_fn gemv = (sgemv_fn)gemv_ptr;
        const int one = 1;
        const float f1 = 1.0f, f0 = 0.0f;
        for (int j = 0; j < k; j++) {
            size_t e = (size_t)chosen[j];
            gemv("T", &D, &mI, &f1, w_in + e * mI * D, &D, x, &one, &f0, scratch + (size_t)j * mI, &one);
            bias_act(scratch + (size_t)j * mI, b_in ? b_in + e * mI : NULL, I, gated, weights[j], act);
        }
        for (int j = 0; j < k; j++) {
            size_t e = (size_t)chosen[j];
            gemv("T", &I, &D, &f1, w_out + e * D * I, &I, scratch + (size_t)j * mI, &one, j ? &f1 : &f0, out, &one);
        }
        return 0;
    }

    /* one parallel region, three work-shared loops (one fork/join instead of two) */
    const int blocks = (mI + 3) / 4, dblocks = (D + 3) / 4; /* rows in blocks of four; a short last block
                                                              runs row by row */
#pragma omp parallel
    {
        /* gate/up rows of every chosen expert */
#pragma omp for schedule(static)
        for (int b = 0; b < k * blocks; b++) {
            int j = b / blocks, row = (b % blocks) * 4;
            size_t e = (size_t)chosen[j];
            float *h = scratch + (size_t)j * mI + row;
            const float *w = w_in + (e * mI + row) * D;
            if (row + 4 <= mI)
                dot4(w, (size_t)D, x, D, h);
            else
                for (int r = 0; row + r < mI; r++) h[r] = dot(w + (size_t)r * D, x, D);
            if (b_in)
                for (int r = 0; r < 4 && row + r < mI; r++) h[r] += b_in[e * mI + row + r];
        }
        /* the activation, scaled by the routing weight, into the first I entries of each expert's rows */
#pragma omp for schedule(static)
        for (int n = 0; n < k * I; n++) {
            int j = n / I, i = n % I;
            float *h = scratch + (size_t)j * mI;
            h[i] = weights[j] * factorllm_act(h[i], act) * (gated ? h[I + i] : 1.0f);
        }
        /* down projection: each output row reads the chosen experts' rows of w_out */
#pragma omp for schedule(static)
        for (int b = 0; b < dblocks; b++) {
            int d = b * 4;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, part[4];
            for (int j = 0; j < k; j++) {
                const float *w = w_out + ((size_t)chosen[j] * D + d) * I, *a = scratch + (size_t)j * mI;
                if (d + 4 <= D) {
                    dot4(w, (size_t)I, a, I, part);
                    for (int r = 0; r < 4; r++) acc[r] += part[r];
                } else {
                    for (int r = 0; d + r < D; r++) acc[r] += dot(w + (size_t)r * I, a, I);
                }
            }
            for (int r = 0; r < 4 && d + r < D; r++) out[d + r] = acc[r];
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Many tokens (prefill): the sorted path of factorllm.experts in one call.
 *
 * Slots (token, j) are grouped by expert; each expert gathers its tokens, runs its two GEMMs on weights
 * pre-packed by MKL (factorllm.mkl), applies the activation and routing weight in place, writes its output rows
 * over its own gathered input rows (dead after the first GEMM: one [T*k, D] buffer less to touch), and each
 * token sums its k rows back. Small experts run in parallel, one per OpenMP thread, each GEMM single-threaded
 * (MKL runs sequentially inside a parallel region): their GEMMs split over threads lose more to synchronisation
 * than they gain (measured here, 576x1536: 0.35-0.40 of dense against 0.43). Large experts run one after
 * another with MKL threading each GEMM, which balances better than whole experts per thread (2048x5632:
 * 0.29 against 0.30-0.33).
 */
typedef void (*sgemm_compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                                 const float *b, int ldb, float beta, float *c, int ldc);
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_PACKED = 151 };

/* Expert e on its sorted rows: xs = w * expert(xs), in place; `threaded`: the activation loop runs on all
 * threads. */
static void expert_rows(int e, const long long *start, float *xs, float *h, const float *w_sorted,
                        int D, int I, int gated, int act, const float *const *packed_in, const float *const *packed_out,
                        const float *b_in, sgemm_compute_fn gemm, int threaded) {
    const int mI = (gated ? 2 : 1) * I, n = (int)(start[e + 1] - start[e]);
    if (n == 0) return;
    float *he = h + (size_t)start[e] * mI;
    gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, n, mI, D, xs + (size_t)start[e] * D, D, packed_in[e], D, 0.0f,
         he, mI);
#pragma omp parallel for schedule(static) if (threaded)
    for (int r = 0; r < n; r++) { /* activation, times the routing weight, into the first I columns */
        bias_act(he + (size_t)r * mI, b_in ? b_in + (size_t)e * mI : NULL, I, gated, w_sorted[start[e] + r], act);
    }
    gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, n, D, I, he, mI, packed_out[e], I, 0.0f,
         xs + (size_t)start[e] * D, D);
}

/* Returns 0, or -1 for an expert index out of range.
 * x [T, D]; indices [T, k] (int64); weights [T, k]; packed_in[e] packs w_in[e] [m*I, D], packed_out[e] packs
 * w_out[e] [D, I]; b_in [E, m*I] or NULL. Scratch (caller-owned, reused across calls): xs [T*k, D], h [T*k, m*I],
 * w_sorted [T*k], slot [T*k] and start [E + 1] (int64). out [T, D] is overwritten.
 * parallel_experts: experts run one per thread (small experts) or one at a time on all threads (large ones). */
int factorllm_moe_prefill(const float *x, int T, int D, const long long *indices, const float *weights, int k, int E,
                          int I, int gated, int act, const float *const *packed_in, const float *const *packed_out,
                          const float *b_in, void *compute, float *out, float *xs, float *h, float *w_sorted,
                          long long *slot, long long *start, int parallel_experts) {
    sgemm_compute_fn gemm = (sgemm_compute_fn)compute;
    const int m = gated ? 2 : 1, mI = m * I, S = T * k;
    /* counting sort of the slots by expert: start[e] .. start[e+1] are expert e's rows */
    for (int e = 0; e <= E; e++) start[e] = 0;
    for (int s = 0; s < S; s++) {
        if (indices[s] < 0 || indices[s] >= E) return -1;
        start[indices[s] + 1]++;
    }
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    {
        long long fill[MAX_EXPERTS];
        for (int e = 0; e < E; e++) fill[e] = start[e];
        for (int s = 0; s < S; s++) slot[s] = fill[indices[s]]++; /* row of slot s in the sorted order */
    }
    /* gather: sorted row slot[s] holds token s / k, scaled later by weights[s] */
#pragma omp parallel for schedule(static)
    for (int s = 0; s < S; s++) {
        const float *src = x + (size_t)(s / k) * D;
        float *dst = xs + (size_t)slot[s] * D;
        for (int i = 0; i < D; i++) dst[i] = src[i];
    }
    for (int s = 0; s < S; s++) w_sorted[slot[s]] = weights[s];

    if (parallel_experts) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int e = 0; e < E; e++)
            expert_rows(e, start, xs, h, w_sorted, D, I, gated, act, packed_in, packed_out, b_in, gemm, 0);
    } else { /* large experts: one at a time, each GEMM threaded by MKL */
        for (int e = 0; e < E; e++)
            expert_rows(e, start, xs, h, w_sorted, D, I, gated, act, packed_in, packed_out, b_in, gemm, 1);
    }
    /* each token sums its k rows: no two threads write one token */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float *dst = out + (size_t)t * D;
        const float *first = xs + (size_t)slot[(size_t)t * k] * D; /* expert outputs, see expert_rows */
        for (int i = 0; i < D; i++) dst[i] = first[i];
        for (int j = 1; j < k; j++) {
            const float *src = xs + (size_t)slot[(size_t)t * k + j] * D;
            for (int i = 0; i < D; i++) dst[i] += src[i];
        }
    }
    return 0;
}

/* The whole routed block on many tokens: a linear router's logits, top-k and gating per token (as the batch-1
 * kernel routes), then factorllm_moe_prefill. Why: the router in torch is four ops (linear, top-k, gating,
 * dtype/contiguity) plus the Python between them, 0.15-0.3 ms of a SmolLM2 layer's ~3.4 ms at 512 tokens.
 * router_w [E, D], router_b [E] or NULL; indices [T, k] (int64) and weights [T, k] are written (the routing,
 * kept for inspection); the other arguments as factorllm_moe_prefill's. Returns 0, or -1 for unsupported sizes. */
int factorllm_moe_prefill_routed(const float *router_w, const float *router_b, int gating, const float *x, int T,
                                 int D, long long *indices, float *weights, int k, int E, int I, int gated, int act,
                                 const float *const *packed_in, const float *const *packed_out, const float *b_in,
                                 void *compute, float *out, float *xs, float *h, float *w_sorted, long long *slot,
                                 long long *start, int parallel_experts) {
    if (E > MAX_EXPERTS || k > E || k < 1) return -1;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float logits[MAX_EXPERTS], w[MAX_EXPERTS];
        int chosen[MAX_EXPERTS];
        const float *xt = x + (size_t)t * D;
        int e = 0;
        for (; e + 4 <= E; e += 4) dot4(router_w + (size_t)e * D, (size_t)D, xt, D, logits + e);
        for (; e < E; e++) logits[e] = dot(router_w + (size_t)e * D, xt, D);
        if (router_b)
            for (e = 0; e < E; e++) logits[e] += router_b[e];
        route(logits, E, k, gating, chosen, w);
        for (int j = 0; j < k; j++) indices[(size_t)t * k + j] = chosen[j], weights[(size_t)t * k + j] = w[j];
    }
    return factorllm_moe_prefill(x, T, D, indices, weights, k, E, I, gated, act, packed_in, packed_out, b_in, compute,
                                 out, xs, h, w_sorted, slot, start, parallel_experts);
}

/* ---------------------------------------------------------------------------------------------------------
 * Activation sparsity (factorllm.sparsity.SparseFFN), a few tokens: each token reads only its kept weights.
 *
 * Why: decoding is bound by reading the weights; a token that keeps a share p of its input channels and n of its
 * neurons needs (2p + n) / 3 of a gated FFN's weights, but masks on dense products (the torch path) read them
 * all. The weights are stored transposed here, so that a kept input channel or neuron is one contiguous row:
 * w_in_t [D, m*F] (row j: channel j's weight into each gate neuron, then each up neuron), w_out_t [F, D].
 * Per token: score the channels |x_j| * col[j], keep the keep_in largest; h = b_in + sum over kept j of
 * x_j * w_in_t[j]; the activation; score the neurons |h_i| * out_norm[i], keep the keep_h largest;
 * out = b_out + sum over kept i of h_i * w_out_t[i]. The sums are split over threads by output columns, so each
 * thread streams its slice of every kept row and no two threads write one output. With `exact`, the input-sparse
 * h only chooses the neurons: each kept neuron's value is computed again from its rows of the input projections
 * on the whole input (SparsityConfig.exact_neurons).
 * The reference it is tested against is SparseFFN's torch forward.
 */
typedef struct {
    const float *w_in_t, *b_in, *col;      /* [D, m*F], [m*F] or NULL, [D] */
    const float *w_out_t, *out_norm, *b_out; /* [F, D], [F], [D] or NULL */
    const float *w_gate, *w_up;            /* exact: the input projections' rows [F, D] (w_up NULL if plain) */
    float *h, *score;                      /* scratch: [m*F], [2 * max(D, F)] */
    int *kept;                             /* scratch: [max(D, F)] */
    int D, F, gated, act, exact;
} SparseArgs;

/* The k-th largest of v[n] (1 <= k <= n), by quickselect on tmp (v is left as it is). */
static float kth_largest(const float *v, int n, int k, float *tmp) {
    for (int i = 0; i < n; i++) tmp[i] = v[i];
    int lo = 0, hi = n - 1, want = k - 1; /* position in descending order */
    while (lo < hi) {
        const float pivot = tmp[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > pivot) i++;
            while (tmp[j] < pivot) j--;
            if (i <= j) {
                float t = tmp[i];
                tmp[i] = tmp[j], tmp[j] = t;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break; /* tmp[j+1 .. i-1] all equal the pivot */
    }
    return tmp[want];
}

/* Indices of the k largest of score[n] into kept (ascending order; ties at the threshold to the lower index). */
static void top_indices(const float *score, int n, int k, float *tmp, int *kept) {
    if (k >= n) {
        for (int i = 0; i < n; i++) kept[i] = i;
        return;
    }
    const float thr = kth_largest(score, n, k, tmp);
    int above = 0;
    for (int i = 0; i < n; i++) above += score[i] > thr;
    int ties = k - above, c = 0;
    for (int i = 0; i < n && c < k; i++)
        if (score[i] > thr || (score[i] == thr && ties-- > 0)) kept[c++] = i;
}

/* dst[c0:c1] += sum over r < nrows of a[r] * rows[idx[r]][c0:c1], rows of stride `stride`; four rows at a time,
 * so dst is loaded and stored once per four rows. */
static void gather_axpy(float *restrict dst, const float *restrict rows, size_t stride, const int *idx,
                        const float *a, int nrows, int c0, int c1) {
    int r = 0;
    for (; r + 4 <= nrows; r += 4) {
        const float *w0 = rows + idx[r] * stride, *w1 = rows + idx[r + 1] * stride, *w2 = rows + idx[r + 2] * stride,
                    *w3 = rows + idx[r + 3] * stride;
        const float a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
#pragma omp simd
        for (int c = c0; c < c1; c++) dst[c] += a0 * w0[c] + a1 * w1[c] + a2 * w2[c] + a3 * w3[c];
    }
    for (; r < nrows; r++) {
        const float *w = rows + idx[r] * stride;
        const float a0 = a[r];
#pragma omp simd
        for (int c = c0; c < c1; c++) dst[c] += a0 * w[c];
    }
}

/* x [T, D] -> out [T, D], token by token; keep_in of D channels and keep_h of F neurons per token.
 * Returns 0, or -1 for keeps outside [1, D] and [1, F]. */
int factorllm_sparse_ffn(const SparseArgs *args, const float *x, int T, int keep_in, int keep_h, float *out) {
    const int D = args->D, F = args->F, m = args->gated ? 2 : 1, mF = m * F;
    if (keep_in < 1 || keep_in > D || keep_h < 1 || keep_h > F) return -1;
    float *h = args->h, *score = args->score, *tmp = args->score + (D > F ? D : F), *a = tmp;
    int *kept = args->kept;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * D;
        float *ot = out + (size_t)t * D;
#pragma omp parallel
        {
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
#pragma omp single
            {
                for (int j = 0; j < D; j++) score[j] = fabsf(xt[j]) * args->col[j];
                top_indices(score, D, keep_in, tmp, kept);
                for (int r = 0; r < keep_in; r++) a[r] = xt[kept[r]]; /* tmp is free again: the coefficients */
            }
            { /* gate/up: this thread's columns of every kept channel's row, in chunks of 16 floats (64 B) */
                const int chunks = (mF + 15) / 16, c0 = (int)((long)chunks * id / nt) * 16,
                          c1 = (int)((long)chunks * (id + 1) / nt) * 16;
                const int e0 = c0 < mF ? c0 : mF, e1 = c1 < mF ? c1 : mF;
                for (int c = e0; c < e1; c++) h[c] = args->b_in ? args->b_in[c] : 0.0f;
                gather_axpy(h, args->w_in_t, (size_t)mF, kept, a, keep_in, e0, e1);
            }
#pragma omp barrier
#pragma omp single
            {
                act_rows(h, F, args->gated, 1.0f, args->act);
                for (int i = 0; i < F; i++) score[i] = fabsf(h[i]) * args->out_norm[i];
                top_indices(score, F, keep_h, tmp, kept);
                if (!args->exact)
                    for (int r = 0; r < keep_h; r++) a[r] = h[kept[r]];
            }
            if (args->exact) { /* the kept neurons on the whole input: one row of each input projection each */
#pragma omp for schedule(static)
                for (int r = 0; r < keep_h; r++) {
                    const int i = kept[r];
                    const float pre = dot(args->w_gate + (size_t)i * D, xt, D) + (args->b_in ? args->b_in[i] : 0.0f);
                    float v = factorllm_act(pre, args->act);
                    if (args->gated)
                        v *= dot(args->w_up + (size_t)i * D, xt, D) + (args->b_in ? args->b_in[F + i] : 0.0f);
                    a[r] = v;
                }
            }
            { /* down: this thread's output columns of every kept neuron's row */
                const int chunks = (D + 15) / 16, c0 = (int)((long)chunks * id / nt) * 16,
                          c1 = (int)((long)chunks * (id + 1) / nt) * 16;
                const int e0 = c0 < D ? c0 : D, e1 = c1 < D ? c1 : D;
                for (int c = e0; c < e1; c++) ot[c] = args->b_out ? args->b_out[c] : 0.0f;
                gather_axpy(ot, args->w_out_t, (size_t)D, kept, a, keep_h, e0, e1);
            }
        }
    }
    return 0;
}
