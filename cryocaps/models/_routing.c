/* Dynamic routing by agreement, voxel by voxel, for CPUs (cryocaps.models.native).
 *
 * Votes u[b, i, p, a, o] of I input capsule types for O output capsule types of
 * A atoms at P voxels: element (b, i, p, a, o) sits at
 *     b * stride_b + i * stride_i + p * stride_p + a * O + o
 * (the (A, O) block of a voxel is contiguous; the other axes may be strided:
 * the layout the capsule layers' vote convolution writes, with the output
 * capsule innermost). One voxel's votes (I * A * O values, a few kB) are read
 * once, widened to float32 and kept in cache while all routing iterations run
 * on them; that single read is the whole memory traffic of the forward pass.
 *
 * Per voxel, with s = sum_i c[i, o] u[i, :, o] + bias and v = squash(s):
 *   iteration 1: c = 1/O (so s is the mean vote plus bias)
 *   then, iterations - 1 times: logits[i, o] += <u[i, :, o], v[:, o]>,
 *   c = softmax over o of the logits, s recomputed.
 * Written out: the last pre-squash sums s (B, P, A, O) and coupling c
 * (B, I, P, O), both float32 and contiguous; the caller squashes s.
 *
 * Plain C99 and POSIX threads, no Python or torch headers: built at run time by
 * the system C compiler and loaded with ctypes. Both entry points return 0, or -1
 * if a worker could not allocate its buffers (a few kB per thread, forward pass
 * only; a thread that cannot start has its share done by the calling thread).
 * The caller raises MemoryError then: routing in PyTorch would need more memory.
 *
 * cryocaps_routing_abi() returns CRYOCAPS_ROUTING_ABI, which native.py compares
 * with its own ABI before it uses a library: bump both whenever an entry point's
 * arguments or meaning change.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CRYOCAPS_ROUTING_ABI 2

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

static inline float bf16_to_float(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

typedef struct {
    const void *votes;
    void *grad_votes;
    int dtype;
    int64_t batch, n_in, n_voxels, n_atoms, n_out;
    int64_t stride_b, stride_i, stride_p;
    const float *bias;
    int iterations;
    float *pre_squash;
    float *coupling;
    const float *grad_s;
    int64_t first, last; /* this worker's range of (b, p) pairs */
    int status;
} Job;

/* e^x for x <= 0 (softmax after subtracting the maximum), to ~2 ulp: x = n ln2 + r,
 * |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n into the exponent bits.
 * Written without a library call so that the compiler vectorizes the softmax loop. */
static inline float exp_nonpositive(float x) {
    if (x < -87.0f) x = -87.0f; /* e^-87 ~ 1.6e-38: still a normal float */
    const float n = floorf(x * 1.44269504f + 0.5f); /* nearest integer to x / ln2 */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f; /* ln2 in two parts */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n * (1 << 23);
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* v[a, o] = s[a, o] * sqrt(n) / (1 + n), n = sum_a s[a, o]^2 (clamped at eps under the root) */
static inline __attribute__((always_inline)) void squash_block(const float *restrict s, float *restrict v, float *restrict norm,
                         int64_t n_atoms, int64_t n_out) {
    for (int64_t o = 0; o < n_out; ++o) norm[o] = 0.0f;
    for (int64_t a = 0; a < n_atoms; ++a)
        for (int64_t o = 0; o < n_out; ++o) norm[o] += s[a * n_out + o] * s[a * n_out + o];
    for (int64_t o = 0; o < n_out; ++o) {
        float clamped = norm[o] > 1e-12f ? norm[o] : 1e-12f;
        norm[o] = sqrtf(clamped) / (1.0f + norm[o]);
    }
    for (int64_t a = 0; a < n_atoms; ++a)
        for (int64_t o = 0; o < n_out; ++o) v[a * n_out + o] = s[a * n_out + o] * norm[o];
}

static void load_votes(const Job *job, int64_t b, int64_t p, float *restrict u) {
    const int64_t block = job->n_atoms * job->n_out;
    for (int64_t i = 0; i < job->n_in; ++i) {
        int64_t offset = b * job->stride_b + i * job->stride_i + p * job->stride_p;
        float *row = u + i * block;
        if (job->dtype == DTYPE_BFLOAT16) {
            const uint16_t *src = (const uint16_t *)job->votes + offset;
            for (int64_t k = 0; k < block; ++k) row[k] = bf16_to_float(src[k]);
        } else {
            memcpy(row, (const float *)job->votes + offset, (size_t)block * sizeof(float));
        }
    }
}

/* All iterations for one voxel: u (I, A, O) -> s (A, O), c (I, O). Inlined into
 * route_range with the common output-capsule counts as constants, so that the
 * loops over o are fully unrolled SIMD code. */
static inline __attribute__((always_inline)) void route_voxel(
    const float *restrict u, float *restrict s, float *restrict v, float *restrict logits,
    float *restrict c, float *restrict scratch, const float *restrict bias, int iterations,
    const int64_t n_in, const int64_t n_atoms, const int64_t n_out) {
    const int64_t block = n_atoms * n_out;
    /* iteration 1: uniform coupling 1/O */
    for (int64_t k = 0; k < block; ++k) s[k] = 0.0f;
    for (int64_t i = 0; i < n_in; ++i)
        for (int64_t k = 0; k < block; ++k) s[k] += u[i * block + k];
    for (int64_t k = 0; k < block; ++k) s[k] = s[k] * (1.0f / (float)n_out) + (bias ? bias[k] : 0.0f);
    for (int64_t k = 0; k < n_in * n_out; ++k) logits[k] = 0.0f;
    for (int it = 1; it < iterations; ++it) {
        squash_block(s, v, scratch, n_atoms, n_out);
        for (int64_t i = 0; i < n_in; ++i) {
            float *row = logits + i * n_out;
            const float *ui = u + i * block;
            for (int64_t a = 0; a < n_atoms; ++a)
                for (int64_t o = 0; o < n_out; ++o) row[o] += ui[a * n_out + o] * v[a * n_out + o];
            float top = row[0];
            for (int64_t o = 1; o < n_out; ++o) top = row[o] > top ? row[o] : top;
            float total = 0.0f;
            for (int64_t o = 0; o < n_out; ++o) {
                c[i * n_out + o] = exp_nonpositive(row[o] - top);
                total += c[i * n_out + o];
            }
            for (int64_t o = 0; o < n_out; ++o) c[i * n_out + o] /= total;
        }
        for (int64_t k = 0; k < block; ++k) s[k] = bias ? bias[k] : 0.0f;
        for (int64_t i = 0; i < n_in; ++i) {
            const float *ui = u + i * block;
            const float *ci = c + i * n_out;
            for (int64_t a = 0; a < n_atoms; ++a)
                for (int64_t o = 0; o < n_out; ++o) s[a * n_out + o] += ci[o] * ui[a * n_out + o];
        }
    }
}

static void *route_range(void *argument) {
    Job *job = (Job *)argument;
    const int64_t n_in = job->n_in, n_atoms = job->n_atoms, n_out = job->n_out;
    const int64_t block = n_atoms * n_out;
    float *u = malloc((size_t)(n_in * block) * sizeof(float));
    float *s = malloc((size_t)block * sizeof(float));
    float *v = malloc((size_t)block * sizeof(float));
    float *logits = malloc((size_t)(n_in * n_out) * sizeof(float));
    float *c = malloc((size_t)(n_in * n_out) * sizeof(float));
    float *scratch = malloc((size_t)n_out * sizeof(float));
    if (!u || !s || !v || !logits || !c || !scratch) {
        job->status = -1;
        goto done;
    }
    for (int64_t pair = job->first; pair < job->last; ++pair) {
        const int64_t b = pair / job->n_voxels, p = pair % job->n_voxels;
        load_votes(job, b, p, u);
        switch (n_out) { /* constants for the capsule counts of 3D-UCaps' layers */
#define ROUTE_WITH(O) route_voxel(u, s, v, logits, c, scratch, job->bias, job->iterations, n_in, n_atoms, O)
            case 16: ROUTE_WITH(16); break;
            case 8: ROUTE_WITH(8); break;
            case 4: ROUTE_WITH(4); break;
            default: ROUTE_WITH(n_out);
#undef ROUTE_WITH
        }
        memcpy(job->pre_squash + pair * block, s, (size_t)block * sizeof(float));
        if (job->coupling && job->iterations > 1)
            for (int64_t i = 0; i < n_in; ++i)
                memcpy(job->coupling + ((b * n_in + i) * job->n_voxels + p) * n_out, c + i * n_out,
                       (size_t)n_out * sizeof(float));
    }
done:
    free(u);
    free(s);
    free(v);
    free(logits);
    free(c);
    free(scratch);
    return NULL;
}

/* dL/du[b, i, p, a, o] = c[b, i, p, o] * dL/ds[b, p, a, o] (c = 1/O if coupling is NULL),
 * written in the votes' dtype and layout. */
static void *gradient_range(void *argument) {
    Job *job = (Job *)argument;
    const int64_t n_in = job->n_in, n_atoms = job->n_atoms, n_out = job->n_out;
    const int64_t block = n_atoms * n_out;
    for (int64_t pair = job->first; pair < job->last; ++pair) {
        const int64_t b = pair / job->n_voxels, p = pair % job->n_voxels;
        const float *grad = job->grad_s + pair * block;
        for (int64_t i = 0; i < n_in; ++i) {
            const int64_t offset = b * job->stride_b + i * job->stride_i + p * job->stride_p;
            const float *c = job->coupling
                                 ? job->coupling + ((b * n_in + i) * job->n_voxels + p) * n_out
                                 : NULL;
            for (int64_t a = 0; a < n_atoms; ++a)
                for (int64_t o = 0; o < n_out; ++o) {
                    float value = grad[a * n_out + o] * (c ? c[o] : 1.0f / (float)n_out);
                    if (job->dtype == DTYPE_BFLOAT16)
                        ((uint16_t *)job->grad_votes)[offset + a * n_out + o] = float_to_bf16(value);
                    else
                        ((float *)job->grad_votes)[offset + a * n_out + o] = value;
                }
        }
    }
    return NULL;
}

/* Split the (b, p) pairs over `threads` workers (this thread is the first). */
static int run_split(Job *prototype, int threads, void *(*work)(void *)) {
    const int64_t pairs = prototype->batch * prototype->n_voxels;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (pairs < threads) threads = pairs > 0 ? (int)pairs : 1;
    Job jobs[64];
    pthread_t handles[64];
    int started[64] = {0};
    for (int t = 0; t < threads; ++t) {
        jobs[t] = *prototype;
        jobs[t].first = pairs * t / threads;
        jobs[t].last = pairs * (t + 1) / threads;
        jobs[t].status = 0;
    }
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&handles[t], NULL, work, &jobs[t]) == 0;
    int status = 0;
    for (int t = 1; t < threads; ++t)
        if (!started[t]) work(&jobs[t]); /* could not start a thread: do its share here */
    work(&jobs[0]);
    for (int t = 1; t < threads; ++t)
        if (started[t]) pthread_join(handles[t], NULL);
    for (int t = 0; t < threads; ++t)
        if (jobs[t].status) status = jobs[t].status;
    return status;
}

/* The shape and layout of the votes (B, I, P, A, O), common to both entry points. */
static Job vote_job(int dtype, int64_t batch, int64_t n_in, int64_t n_voxels, int64_t n_atoms,
                    int64_t n_out, int64_t stride_b, int64_t stride_i, int64_t stride_p) {
    Job job = {0};
    job.dtype = dtype;
    job.batch = batch;
    job.n_in = n_in;
    job.n_voxels = n_voxels;
    job.n_atoms = n_atoms;
    job.n_out = n_out;
    job.stride_b = stride_b;
    job.stride_i = stride_i;
    job.stride_p = stride_p;
    return job;
}

int cryocaps_route(const void *votes, int dtype, int64_t batch, int64_t n_in, int64_t n_voxels,
                   int64_t n_atoms, int64_t n_out, int64_t stride_b, int64_t stride_i,
                   int64_t stride_p, const float *bias, int iterations, float *pre_squash,
                   float *coupling, int threads) {
    Job job = vote_job(dtype, batch, n_in, n_voxels, n_atoms, n_out, stride_b, stride_i, stride_p);
    job.votes = votes;
    job.bias = bias;
    job.iterations = iterations;
    job.pre_squash = pre_squash;
    job.coupling = coupling;
    return run_split(&job, threads, route_range);
}

int cryocaps_route_backward(void *grad_votes, int dtype, int64_t batch, int64_t n_in,
                            int64_t n_voxels, int64_t n_atoms, int64_t n_out, int64_t stride_b,
                            int64_t stride_i, int64_t stride_p, const float *coupling,
                            const float *grad_s, int threads) {
    Job job = vote_job(dtype, batch, n_in, n_voxels, n_atoms, n_out, stride_b, stride_i, stride_p);
    job.grad_votes = grad_votes;
    job.coupling = (float *)coupling; /* read only here */
    job.grad_s = grad_s;
    return run_split(&job, threads, gradient_range);
}

int cryocaps_routing_abi(void) { return CRYOCAPS_ROUTING_ABI; }
