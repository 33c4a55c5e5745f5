/* Selective scan (S6) on the CPU, forward and backward, float32 and float64.
 *
 *   h[d,n] = exp(dt[l,d] * A[d,n]) * h[d,n] + dt[l,d] * u[l,d] * B[g,l,n];   y[l,d] = sum_n C[g,l,n] * h[d,n]
 *
 * The recurrence runs sequentially along L; SIMD lanes hold W consecutive channels d (which share B and C
 * within a group), so every lane does the same work with no horizontal sums in the forward. A "job" is one
 * (batch, block of W channels); each call runs jobs [job_begin, job_end), and the caller runs disjoint job
 * ranges on its own threads: Python threads (ctypes releases the GIL), or for float32 the *_omp drivers, which
 * exist only in the library's OpenMP build (SMT_OPENMP) and run on PyTorch's own libgomp team: a second OpenMP
 * runtime beside PyTorch's would make the two thread pools spin against each other.
 *
 * Layouts: u, dt: (batch, L, D) with strides (sb, sl, sd); y, dy, du, ddt: contiguous (batch, L, D);
 * A: (D, N); B, C: contiguous (batch, G, L, N) with D/G channels per group. When a block's W channels all lie
 * in one group (G == 1, or D/G a multiple of W) B and C are broadcast scalars; otherwise each lane reads its
 * own group's values (slower, same results). The backward recomputes a block's states into a buffer of
 * L * N * W values and accumulates dA, dB, dC into per-call buffers that the caller sums, so no two threads
 * write the same element. For training, the D skip term, softplus, delta_bias and the z gate are applied by
 * the caller in PyTorch (autograd handles them); scan_fwd_fused_f32, the inference forward, does them all
 * in the same pass and reads and writes mamba's (batch, D, L) layout directly. Built at first use by
 * smt/kernels/cpu_build.py.
 *
 * float32 is written with GCC/Clang vector extensions (portable; one vector = the W lanes) and its own exp;
 * float64 (used for exact checks against the reference) is the same algorithm in plain scalar loops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "exp2_taylor.h"

/* W: channels per SIMD block, one vector of float. The compiler says what this CPU has (-march=native, see
 * cpu_build.py): 16 lanes (512 bits) where AVX-512F is available, else 8 (256 bits; AVX2, or split by the
 * compiler on narrower units). Each lane's arithmetic is the same either way. */
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
#define MAXN 64   /* largest supported state size */

/* Job `job`: its batch b, first channel d0 and width nw (W, less in the last block). */
static inline void job_block(long job, long D, long *b, long *d0, long *nw) {
    long nblk = (D + W - 1) / W;
    *b = job / nblk;
    *d0 = (job % nblk) * W;
    *nw = D - *d0 < W ? D - *d0 : W;
}

/* Job `job` as job_block, and each lane's offset of its (b, group) slice of a contiguous (batch, G, L, N) B/C;
 * returns 1 when all lanes share one group. */
static inline int job_lanes(long job, long D, long G, long L, long N, long *b, long *d0, long *nw, long *off) {
    int shared = 1;
    job_block(job, D, b, d0, nw);
    for (long j = 0; j < W; ++j) {
        off[j] = (*b * G + (*d0 + (j < *nw ? j : 0)) / (D / G)) * L * N;
        shared &= off[j] == off[0];
    }
    return shared;
}

/* ---------------------------------------------------------------- float64, plain loops (exact checks) */
void scan_fwd_f64(const double *u, const double *dt, const double *A, const double *B, const double *C, double *y,
                  double *last, long batch, long D, long N, long L, long G, long sb, long sl, long sd,
                  long job_begin, long job_end) {
    for (long job = job_begin; job < job_end; ++job) {
        long b, d0, nw, off[W];
        job_lanes(job, D, G, L, N, &b, &d0, &nw, off);
        double h[MAXN][W] = {{0}};
        for (long l = 0; l < L; ++l) {
            for (long j = 0; j < nw; ++j) {
                long s = b * sb + l * sl + (d0 + j) * sd;
                double dtl = dt[s], xl = dtl * u[s], acc = 0;
                for (long n = 0; n < N; ++n) {
                    h[n][j] = exp(dtl * A[(d0 + j) * N + n]) * h[n][j] + xl * B[off[j] + l * N + n];
                    acc += C[off[j] + l * N + n] * h[n][j];
                }
                y[(b * L + l) * D + d0 + j] = acc;
            }
        }
        if (last)
            for (long j = 0; j < nw; ++j)
                for (long n = 0; n < N; ++n) last[(b * D + d0 + j) * N + n] = h[n][j];
    }
}

void scan_bwd_f64(const double *u, const double *dt, const double *A, const double *B, const double *C,
                  const double *dy, double *du, double *ddt, double *dA_part, double *dB_part, double *dC_part,
                  long batch, long D, long N, long L, long G, long sb, long sl, long sd,
                  long job_begin, long job_end) {
    {
        double *hs = (double *)malloc(sizeof(double) * (size_t)(L * N * W));
        for (long job = job_begin; job < job_end; ++job) {
            long b, d0, nw, off[W];
            job_lanes(job, D, G, L, N, &b, &d0, &nw, off);
            double *dBt = dB_part, *dCt = dC_part;
            double *dA = dA_part;
            double h[MAXN][W] = {{0}}, dh[MAXN][W] = {{0}};
            for (long l = 0; l < L; ++l)  /* recompute this block's states */
                for (long j = 0; j < nw; ++j) {
                    long s = b * sb + l * sl + (d0 + j) * sd;
                    for (long n = 0; n < N; ++n) {
                        h[n][j] = exp(dt[s] * A[(d0 + j) * N + n]) * h[n][j] + dt[s] * u[s] * B[off[j] + l * N + n];
                        hs[(l * N + n) * W + j] = h[n][j];
                    }
                }
            for (long l = L - 1; l >= 0; --l)
                for (long j = 0; j < nw; ++j) {
                    long s = b * sb + l * sl + (d0 + j) * sd, o = (b * L + l) * D + d0 + j;
                    double dtl = dt[s], ul = u[s], g = dy[o], du_acc = 0, ddt_acc = 0;
                    for (long n = 0; n < N; ++n) {
                        double a = A[(d0 + j) * N + n], bn = B[off[j] + l * N + n];
                        double dhn = dh[n][j] + g * C[off[j] + l * N + n];
                        double e = exp(dtl * a);
                        double de = l > 0 ? dhn * hs[((l - 1) * N + n) * W + j] * e : 0.0;
                        dCt[off[j] + l * N + n] += g * hs[(l * N + n) * W + j];
                        dBt[off[j] + l * N + n] += dhn * dtl * ul;
                        du_acc += dhn * dtl * bn;
                        ddt_acc += dhn * bn * ul + de * a;
                        dA[(d0 + j) * N + n] += de * dtl;
                        dh[n][j] = dhn * e;  /* carried to l-1 through exp(dt_l * a) */
                    }
                    du[o] = du_acc;
                    ddt[o] = ddt_acc;
                }
        }
        free(hs);
    }
}

/* ---------------------------------------------------------------- float32, explicit vectors */
typedef float vw __attribute__((vector_size(4 * W)));
typedef int32_t vwi __attribute__((vector_size(4 * W)));

static inline vw vsel(vwi m, vw a, vw b) { return (vw)((m & (vwi)a) | (~m & (vwi)b)); }
static inline vw vsplat(float x) { return (vw){0} + x; }

/* exp of W floats: Cody-Waite reduction x = k*ln2 + r (|r| <= ln2/2), degree-7 Taylor polynomial, 2^k
 * written into the exponent bits. Max relative error 8e-8 (measured against double exp). Inputs are
 * clamped to [-87, 88]; exp(-87) = 1.6e-38 stands in for smaller values, which only ever multiply states. */
static inline vw vexp(vw x) {
    x = vsel(x < -87.0f, (vw){0} - 87.0f, x);
    x = vsel(x > 88.0f, (vw){0} + 88.0f, x);
    vwi ki = __builtin_convertvector(x * LOG2E + 128.5f, vwi);  /* k + 128 > 0: trunc = floor */
    vw kf = __builtin_convertvector(ki, vw) - 128.0f;
    vw r = x - kf * 0.693145751953125f;
    r = r - kf * 1.428606765330187045e-06f;
    vw p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vw)((ki - 1) << 23);  /* (k + 127) << 23 is 2^k */
}

/* 2^x of W floats: the inference forward's exp(dt A) as 2^(dt A log2(e)), A pre-multiplied by log2(e). x = k + f,
 * k = x rounded to nearest, |f| <= 1/2; 2^f = exp(f ln2) by its degree-6 Taylor polynomial (relative error
 * 1.2e-7 at |f| = 1/2, falling to float rounding near f = 0, where the slowly decaying states are), times 2^k.
 * Inputs are clamped to [-126, 126] (2^-126 = 1.2e-38 stands in for smaller values, as in vexp). Cheaper than
 * vexp: no Cody-Waite steps, one polynomial term less; with AVX-512F the rounding and the 2^k are one
 * instruction each. Both branches compute the same values (round to nearest even; 2^k is exact). */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
static inline vw vexp2(vw x) {
#if defined(__AVX512F__) && W == 16
    __m512 v = _mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vw f = (vw)_mm512_sub_ps(v, k);
#else
    x = vsel(x < -126.0f, vsplat(-126.0f), x);
    x = vsel(x > 126.0f, vsplat(126.0f), x);
    vw k = (x + 12582912.0f) - 12582912.0f; /* + 1.5 * 2^23 rounds to an integer, to nearest even */
    vw f = x - k;
#endif
    vw p = f * EXP2_T6 + EXP2_T5;
    p = p * f + EXP2_T4;
    p = p * f + EXP2_T3;
    p = p * f + EXP2_T2;
    p = p * f + EXP2_T1;
    p = p * f + EXP2_T0;
#if defined(__AVX512F__) && W == 16
    return (vw)_mm512_scalef_ps((__m512)p, k);
#else
    return p * (vw)((__builtin_convertvector(k, vwi) + 127) << 23);
#endif
}

/* W channels starting at p, `stride` elements apart (1 for channel-last tensors: one vector load). */
static inline vw vload(const float *p, long stride, long nw) {
    vw v;
    if (nw == W && stride == 1) {
        __builtin_memcpy(&v, p, sizeof v);
        return v;
    }
    float t[W] = {0};
    for (long j = 0; j < nw; ++j) t[j] = p[j * stride];
    __builtin_memcpy(&v, t, sizeof v);
    return v;
}

/* W bfloat16 values starting at p, `stride` elements apart, widened to float: exact (a bfloat16 is the upper
 * half of a float's bits), as torch's .float() widens them. */
typedef uint16_t vhw __attribute__((vector_size(2 * W)));
static inline vw vload_bf16(const uint16_t *p, long stride, long nw) {
    vhw v;
    if (nw == W && stride == 1) {
        __builtin_memcpy(&v, p, sizeof v);
    } else {
        uint16_t t[W] = {0};
        for (long j = 0; j < nw; ++j) t[j] = p[j * stride];
        __builtin_memcpy(&v, t, sizeof v);
    }
    return (vw)(__builtin_convertvector(v, vwi) << 16);
}

static inline void vstore(float *p, vw v, long nw) {
    if (nw == W) {
        __builtin_memcpy(p, &v, sizeof v);
        return;
    }
    float t[W];
    __builtin_memcpy(t, &v, sizeof v);
    for (long j = 0; j < nw; ++j) p[j] = t[j];
}

static inline float vsum(vw v) {
    float t[W], s = 0;
    __builtin_memcpy(t, &v, sizeof v);
    for (long j = 0; j < W; ++j) s += t[j];
    return s;
}

static inline vw vgather(const float *base, const long *off, long k) {
    float t[W];
    for (long j = 0; j < W; ++j) t[j] = base[off[j] + k];
    vw v;
    __builtin_memcpy(&v, t, sizeof v);
    return v;
}

static inline void vscatter_add(float *base, const long *off, long k, vw v, long nw) {
    float t[W];
    __builtin_memcpy(t, &v, sizeof v);
    for (long j = 0; j < nw; ++j) base[off[j] + k] += t[j];
}

static void load_a(const float *A, long d0, long nw, long N, vw *a) {
    for (long n = 0; n < N; ++n) {
        float t[W] = {0};
        for (long j = 0; j < nw; ++j) t[j] = A[(d0 + j) * N + n];
        __builtin_memcpy(&a[n], t, sizeof(vw));
    }
}

/* u, dt: (batch, L, D) with strides (sb, sl, sd) given in elements; y: contiguous (batch, L, D). */
void scan_fwd_f32(const float *u, const float *dt, const float *A, const float *B, const float *C, float *y,
                  float *last, long batch, long D, long N, long L, long G, long sb, long sl, long sd,
                  long job_begin, long job_end) {
    for (long job = job_begin; job < job_end; ++job) {
        long b, d0, nw, off[W];
        int shared = job_lanes(job, D, G, L, N, &b, &d0, &nw, off);
        const float *Bg = B + off[0], *Cg = C + off[0];
        vw a[MAXN], h[MAXN];
        load_a(A, d0, nw, N, a);
        for (long n = 0; n < N; ++n) h[n] = (vw){0};
        for (long l = 0; l < L; ++l) {
            long o = (b * L + l) * D + d0, soff = b * sb + l * sl + d0 * sd;
            vw dtv = vload(dt + soff, sd, nw), xv = dtv * vload(u + soff, sd, nw), acc = {0};
            const float *Bl = Bg + l * N, *Cl = Cg + l * N;
            if (shared)
                for (long n = 0; n < N; ++n) {
                    h[n] = vexp(dtv * a[n]) * h[n] + xv * Bl[n];
                    acc += Cl[n] * h[n];
                }
            else
                for (long n = 0; n < N; ++n) {
                    h[n] = vexp(dtv * a[n]) * h[n] + xv * vgather(B, off, l * N + n);
                    acc += vgather(C, off, l * N + n) * h[n];
                }
            vstore(y + o, acc, nw);
        }
        if (last)
            for (long n = 0; n < N; ++n) {
                float t[W];
                __builtin_memcpy(t, &h[n], sizeof t);
                for (long j = 0; j < nw; ++j) last[(b * D + d0 + j) * N + n] = t[j];
            }
    }
}

/* softplus as torch computes it (beta 1, threshold 20), written as max(x, 0) + log1p(exp(-|x|)) so that the log
 * argument e = exp(-|x|) lies in (0, 1]: log1p(e) = 2 atanh(s) with s = e / (2 + e) in (0, 1/3], summed to
 * s^17 (truncation < 1e-9 relative; no cancellation for tiny e, where it tends to e). Above the threshold torch
 * returns x itself, and so does this (the added log1p(exp(-x)) < 2.1e-9 vanishes in float32 next to x > 20). */
static inline vw vsoftplus(vw x) {
    vw ax = vsel(x < 0.0f, 0.0f - x, x);
    vw e = vexp(0.0f - ax);
    vw s = e / (e + 2.0f), z = s * s;
    vw p = z * (1.0f / 17.0f) + 1.0f / 15.0f;
    p = p * z + 1.0f / 13.0f;
    p = p * z + 1.0f / 11.0f;
    p = p * z + 1.0f / 9.0f;
    p = p * z + 1.0f / 7.0f;
    p = p * z + 1.0f / 5.0f;
    p = p * z + 1.0f / 3.0f;
    p = p * z + 1.0f;
    vw pos = vsel(x > 0.0f, x, (vw){0});
    return pos + 2.0f * s * p;
}

static inline void vstore_strided(float *p, long stride, vw v, long nw) {
    if (stride == 1) {
        vstore(p, v, nw);
        return;
    }
    float t[W];
    __builtin_memcpy(t, &v, sizeof v);
    for (long j = 0; j < nw; ++j) p[j * stride] = t[j];
}

/* One job (channel block) of scan_fwd_fused_f32: where it reads and writes, its constants, and its state
 * between chunks of steps. */
typedef struct {
    vw a[MAXN], h[MAXN], bias, dskip;  /* a: A times log2(e) (see vexp2) */
    const char *u, *delta, *z;           /* at step 0 of this block: float32, or bfloat16 (in_bf16) */
    const float *B, *C;                  /* at step 0 (lane 0's group when shared) */
    const long *rows;                    /* this batch's rows in step order, or NULL (row l = step l) */
    float *y;
    long nw, boff[W], coff[W];           /* lanes' B/C offsets from B and C when not shared */
    int shared;                          /* all lanes read one B/C group: B[n], C[n] are broadcast scalars */
} fused_job;

enum { FUSED_CHUNK = 256, FUSED_PREFETCH = 4 };  /* steps per chunk; rows prefetched ahead (measured) */

/* Element e of u, delta or z, whose elements are float32, or bfloat16 when in_bf16. */
static inline const char *in_elem(const void *p, long e, int in_bf16) {
    return (const char *)p + e * (in_bf16 ? 2 : 4);
}

/* Row r of u, delta or z (element strides sl, sd) as W floats: float32, or bfloat16 widened (in_bf16). */
static inline __attribute__((always_inline)) vw load_row(const char *p, long r, long sl, long sd, long nw,
                                                         int in_bf16) {
    if (in_bf16) return vload_bf16((const uint16_t *)in_elem(p, r * sl, 1), sd, nw);
    return vload((const float *)in_elem(p, r * sl, 0), sd, nw);
}

/* Steps [l0, l1) of one job. Always inlined, so that with constant N and in_bf16 (the wrappers below) the n
 * loop is unrolled, the state h stays in registers within the chunk, and the loads are of one type. */
static inline __attribute__((always_inline)) void fused_steps(
        fused_job *jb, const float *B, const float *C, long N, int softplus, int in_bf16, long l0, long l1,
        long L, long sl, long sd, long yl, long yd, long bn, long bl, long cn, long cl) {
    vw h[MAXN];
    long nw = jb->nw;
    for (long n = 0; n < N; ++n) h[n] = jb->h[n];
    for (long l = l0; l < l1; ++l) {
        if (l + FUSED_PREFETCH < L) {  /* step l + FUSED_PREFETCH's rows: their cache lines are on their way */
            long rp = jb->rows ? jb->rows[l + FUSED_PREFETCH] : l + FUSED_PREFETCH;
            __builtin_prefetch(in_elem(jb->u, rp * sl, in_bf16));
            __builtin_prefetch(in_elem(jb->delta, rp * sl, in_bf16));
            __builtin_prefetch(jb->y + rp * yl, 1);
        }
        long r = jb->rows ? jb->rows[l] : l;  /* the row step l reads and writes */
        vw uv = load_row(jb->u, r, sl, sd, nw, in_bf16), acc = {0};
        vw dtv = load_row(jb->delta, r, sl, sd, nw, in_bf16) + jb->bias;
        if (softplus) dtv = vsoftplus(dtv);
        vw xv = dtv * uv;
        if (jb->shared) {
            const float *Bl = jb->B + r * bl, *Cl = jb->C + l * cl;
#pragma GCC unroll 16
            for (long n = 0; n < N; ++n) {
                h[n] = vexp2(dtv * jb->a[n]) * h[n] + xv * Bl[n * bn];
                acc += Cl[n * cn] * h[n];
            }
        } else {
            for (long n = 0; n < N; ++n) {
                h[n] = vexp2(dtv * jb->a[n]) * h[n] + xv * vgather(B, jb->boff, n * bn + r * bl);
                acc += vgather(C, jb->coff, n * cn + l * cl) * h[n];
            }
        }
        acc += jb->dskip * uv;
        if (jb->z) {
            vw zv = load_row(jb->z, r, sl, sd, nw, in_bf16);
            acc *= zv / (1.0f + vexp(0.0f - zv));
        }
        vstore_strided(jb->y + r * yl, yd, acc, nw);
    }
    for (long n = 0; n < N; ++n) jb->h[n] = h[n];
}

#define FUSED_STEPS_ARGS fused_job *jb, const float *B, const float *C, long N, int softplus, long l0, long l1, \
    long L, long sl, long sd, long yl, long yd, long bn, long bl, long cn, long cl
#define FUSED_STEPS_CALL(NCONST, BF16) \
    fused_steps(jb, B, C, NCONST, softplus, BF16, l0, l1, L, sl, sd, yl, yd, bn, bl, cn, cl)
static void fused_steps_n16(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(16, 0); }
static void fused_steps_n8(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(8, 0); }
static void fused_steps_any(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(N, 0); }
static void fused_steps_n16_bf16(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(16, 1); }
static void fused_steps_n8_bf16(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(8, 1); }
static void fused_steps_any_bf16(FUSED_STEPS_ARGS) { FUSED_STEPS_CALL(N, 1); }

/* Inference forward with everything element-wise fused:
 *   dt = softplus(delta + bias) (each optional);  y = (scan(u, dt) + Dskip * u) * silu(z)  (each optional).
 * u, delta, z share strides (sb, sl, sd); y has its own (yb, yl, yd): both may be mamba's (batch, D, L).
 * B and C are read in place as (batch, G, N, L) through strides (bb, bg, bn, bl) and (cb, cg, cn, cl): a
 * time-invariant (D, N) matrix is G = D with zero batch and length strides, so nothing is expanded or copied.
 * bias, Dskip, z may be NULL. u, delta and z are float32, or bfloat16 when in_bf16 (widened exactly as they
 * are read: no float32 copies; the arithmetic is float32 either way). rows (batch, L), or NULL: step l of
 * batch b reads row rows[b, l] of u, delta, z and B and writes row rows[b, l] of y, while C is read in step
 * order -- a scan over a permutation of the sequence without permuted copies (MambaIRv2's semantic sort, whose
 * prompt joins C in step order).
 *
 * The jobs of the range advance together, FUSED_CHUNK steps at a time, each carrying its state from chunk
 * to chunk: a chunk's rows of u, delta and y (whole cache lines shared by neighbouring channel blocks) then
 * come from memory once for all the range's blocks, where one block at a time over all of L streamed every
 * row's lines from memory again for each block (channel-last rows are D floats apart). A job's arithmetic
 * does not depend on the chunking or on the other jobs. Returns -1, having written nothing, if the jobs'
 * state cannot be allocated; else 0. */
int scan_fwd_fused_f32(const void *u, const void *delta, const float *bias, int softplus, int in_bf16,
                       const float *A, const float *B, const float *C, const float *Dskip, const void *z, float *y,
                       float *last, const long *rows, long batch, long D, long N, long L, long G, long sb,
                       long sl, long sd, long yb, long yl, long yd, long bb, long bg, long bn, long bl,
                       long cb, long cg, long cn, long cl, long job_begin, long job_end) {
    long njob = job_end - job_begin;
    if (njob <= 0) return 0;
    fused_job *jobs = aligned_alloc(sizeof(vw), sizeof(fused_job) * (size_t)njob);
    if (!jobs) return -1;
    for (long i = 0; i < njob; ++i) {
        fused_job *jb = &jobs[i];
        long b, d0, nw;
        job_block(job_begin + i, D, &b, &d0, &nw);
        jb->shared = 1;
        for (long j = 0; j < W; ++j) {
            long g = (d0 + (j < nw ? j : 0)) / (D / G);
            jb->boff[j] = b * bb + g * bg;
            jb->coff[j] = b * cb + g * cg;
            jb->shared &= jb->boff[j] == jb->boff[0] && jb->coff[j] == jb->coff[0];
        }
        long soff = b * sb + d0 * sd;
        jb->u = in_elem(u, soff, in_bf16);
        jb->delta = in_elem(delta, soff, in_bf16);
        jb->z = z ? in_elem(z, soff, in_bf16) : NULL;
        jb->y = y + b * yb + d0 * yd;
        jb->rows = rows ? rows + b * L : NULL;
        jb->B = B + jb->boff[0];
        jb->C = C + jb->coff[0];
        jb->nw = nw;
        jb->bias = bias ? vload(bias + d0, 1, nw) : (vw){0};
        jb->dskip = Dskip ? vload(Dskip + d0, 1, nw) : (vw){0};
        load_a(A, d0, nw, N, jb->a);
        for (long n = 0; n < N; ++n) {
            jb->a[n] *= LOG2E; /* the steps take exp(dt A) as 2^(dt A log2(e)) */
            jb->h[n] = (vw){0};
        }
    }
    void (*steps)(FUSED_STEPS_ARGS) = in_bf16 ? (N == 16 ? fused_steps_n16_bf16 : N == 8 ? fused_steps_n8_bf16
                                                                                : fused_steps_any_bf16)
                                              : (N == 16 ? fused_steps_n16 : N == 8 ? fused_steps_n8
                                                                                    : fused_steps_any);
    for (long l0 = 0; l0 < L; l0 += FUSED_CHUNK) {
        long l1 = l0 + FUSED_CHUNK < L ? l0 + FUSED_CHUNK : L;
        for (long i = 0; i < njob; ++i)
            steps(&jobs[i], B, C, N, softplus, l0, l1, L, sl, sd, yl, yd, bn, bl, cn, cl);
    }
    if (last)
        for (long i = 0; i < njob; ++i) {
            long b, d0, nw;
            job_block(job_begin + i, D, &b, &d0, &nw);
            for (long n = 0; n < N; ++n) {
                float t[W];
                __builtin_memcpy(t, &jobs[i].h[n], sizeof t);
                for (long j = 0; j < nw; ++j) last[(b * D + d0 + j) * N + n] = t[j];
            }
        }
    free(jobs);
    return 0;
}


/* u, dt as in the forward (strided); dy, du, ddt: contiguous (batch, L, D). */
void scan_bwd_f32(const float *u, const float *dt, const float *A, const float *B, const float *C,
                  const float *dy, float *du, float *ddt, float *dA_part, float *dB_part, float *dC_part,
                  long batch, long D, long N, long L, long G, long sb, long sl, long sd,
                  long job_begin, long job_end) {
    {
        vw *hs = (vw *)aligned_alloc(sizeof(vw), sizeof(vw) * (size_t)(L * N));
        for (long job = job_begin; job < job_end; ++job) {
            long b, d0, nw, off[W];
            int shared = job_lanes(job, D, G, L, N, &b, &d0, &nw, off);
            float *dBt = dB_part, *dCt = dC_part;
            float *dA = dA_part;
            vw a[MAXN], h[MAXN], dh[MAXN], da[MAXN];
            load_a(A, d0, nw, N, a);
            for (long n = 0; n < N; ++n) h[n] = dh[n] = da[n] = (vw){0};
            for (long l = 0; l < L; ++l) {  /* recompute this block's states */
                long soff = b * sb + l * sl + d0 * sd;
                vw dtv = vload(dt + soff, sd, nw), xv = dtv * vload(u + soff, sd, nw);
                for (long n = 0; n < N; ++n) {
                    vw bv = shared ? (vw){0} + B[off[0] + l * N + n] : vgather(B, off, l * N + n);
                    h[n] = vexp(dtv * a[n]) * h[n] + xv * bv;
                    hs[l * N + n] = h[n];
                }
            }
            for (long l = L - 1; l >= 0; --l) {
                long o = (b * L + l) * D + d0, soff = b * sb + l * sl + d0 * sd;
                vw dtv = vload(dt + soff, sd, nw), uv = vload(u + soff, sd, nw), gv = vload(dy + o, 1, nw);
                vw du_acc = {0}, ddt_acc = {0}, dtu = dtv * uv;
                for (long n = 0; n < N; ++n) {
                    long k = l * N + n;
                    vw bv = shared ? (vw){0} + B[off[0] + k] : vgather(B, off, k);
                    vw cv = shared ? (vw){0} + C[off[0] + k] : vgather(C, off, k);
                    vw dhn = dh[n] + gv * cv;
                    vw e = vexp(dtv * a[n]);
                    vw hp = l > 0 ? hs[k - N] : (vw){0};
                    vw de = dhn * hp * e;
                    if (shared) {
                        dCt[off[0] + k] += vsum(gv * hs[k]);
                        dBt[off[0] + k] += vsum(dhn * dtu);
                    } else {
                        vscatter_add(dCt, off, k, gv * hs[k], nw);
                        vscatter_add(dBt, off, k, dhn * dtu, nw);
                    }
                    du_acc += dhn * dtv * bv;
                    ddt_acc += dhn * uv * bv + de * a[n];
                    da[n] += de * dtv;
                    dh[n] = dhn * e;  /* carried to l-1 through exp(dt_l * a) */
                }
                vstore(du + o, du_acc, nw);
                vstore(ddt + o, ddt_acc, nw);
            }
            for (long n = 0; n < N; ++n) {
                float t[W];
                __builtin_memcpy(t, &da[n], sizeof t);
                for (long j = 0; j < nw; ++j) dA[(d0 + j) * N + n] += t[j];
            }
        }
        free(hs);
    }
}

#ifdef SMT_OPENMP
/* The float32 entry points over jobs [0, njobs) in nthreads fixed contiguous ranges (the Python driver's split:
 * the same results), run by an OpenMP team. Built only as the OpenMP variant of this library, loaded only into
 * a process whose PyTorch already runs on libgomp (cpu_build.py): the team is then PyTorch's own, whose worker
 * threads spin-wait for work after each parallel region. Python threads running the ranges instead compete
 * with those spinning workers for the cores (measured: 0.52 vs 0.93 s of MambaIRv2-L's 54 scans at 64 px on
 * two cores). */
#define RANGE_BEGIN (njobs * i / nthreads)
#define RANGE_END (njobs * (i + 1) / nthreads)

/* scan_fwd_fused_f32's ranges; returns their status, OR-ed. */
int scan_fwd_fused_f32_omp(const void *u, const void *delta, const float *bias, int softplus, int in_bf16,
                           const float *A, const float *B, const float *C, const float *Dskip, const void *z,
                           float *y, float *last, const long *rows, long batch, long D, long N, long L, long G, long sb,
                           long sl, long sd, long yb, long yl, long yd, long bb, long bg, long bn, long bl,
                           long cb, long cg, long cn, long cl, long njobs, int nthreads) {
    int status = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(| : status)
    for (int i = 0; i < nthreads; ++i)
        status |= scan_fwd_fused_f32(u, delta, bias, softplus, in_bf16, A, B, C, Dskip, z, y, last, rows, batch,
                                     D, N, L, G, sb, sl, sd, yb, yl, yd, bb, bg, bn, bl, cb, cg, cn, cl,
                                     RANGE_BEGIN, RANGE_END);
    return status;
}

/* scan_fwd_f32's ranges (training's forward). */
void scan_fwd_f32_omp(const float *u, const float *dt, const float *A, const float *B, const float *C, float *y,
                      float *last, long batch, long D, long N, long L, long G, long sb, long sl, long sd,
                      long njobs, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int i = 0; i < nthreads; ++i)
        scan_fwd_f32(u, dt, A, B, C, y, last, batch, D, N, L, G, sb, sl, sd, RANGE_BEGIN, RANGE_END);
}

/* scan_bwd_f32's ranges; range i accumulates into the i-th of nthreads consecutive dA, dB, dC buffers
 * ((D, N), and B's and C's (batch, G, L, N) each), which the caller sums. */
void scan_bwd_f32_omp(const float *u, const float *dt, const float *A, const float *B, const float *C,
                      const float *dy, float *du, float *ddt, float *dA_parts, float *dB_parts, float *dC_parts,
                      long batch, long D, long N, long L, long G, long sb, long sl, long sd, long njobs,
                      int nthreads) {
    long bc = batch * G * L * N;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int i = 0; i < nthreads; ++i)
        scan_bwd_f32(u, dt, A, B, C, dy, du, ddt, dA_parts + i * D * N, dB_parts + i * bc, dC_parts + i * bc,
                     batch, D, N, L, G, sb, sl, sd, RANGE_BEGIN, RANGE_END);
}
#endif

int scan_max_state(void) { return MAXN; }

int scan_block_width(void) { return W; }
