/* Window attention for bfloat16 q, k, v on CPUs with AVX-512 BF16, with float32 scores.
 *
 *   o[b,h,i,:] = sum_j p[i,j] v[b,h,j,:] / sum_j p[i,j],   p[i,j] = exp(s[i,j] - max_j s[i,j]),
 *   s[i,j] = scale * (q[b,h,i,:] . k[b,h,j,:]) + bias[b,h,i,j]
 *
 * i.e. softmax(scale q k^T + bias) v, as PyTorch's scaled_dot_product_attention with a float mask. Why a kernel:
 * PyTorch's CPU flash attention runs these small problems (n = 256 queries, 256 or 576 keys, heads 30 or 32
 * wide) no faster in bf16 than in float32, and bf16 matmuls through torch would round the scores to bf16.
 * (A float32 version of this kernel, FMAs in place of VDPBF16PS, ran HAT-L and MambaIRv2-L within 3% of
 * PyTorch's float32 flash kernel, so float32 stays with PyTorch.)
 *
 * Both products use VDPBF16PS, pairs of bf16 products summed into float32 lanes. A task is one (batch, head):
 * its keys are packed in pairs along the head dimension (kp[dp][j] holds k[j][2dp], k[j][2dp+1]) and its values
 * in pairs along the keys (vp[jp][d] holds v[2jp][d], v[2jp+1][d]), so every product step is one broadcast and
 * one vector load. Queries run 4 rows at a time through both products, their scores in an L1-sized buffer, where
 * the softmax takes them in log2 units ((scale q.k + bias) log2(e), max subtracted, then 2^x: the same
 * probabilities, with a cheaper exponential).
 * q . k and p v accumulate in float32; the scores, bias, max, exp and sum are float32; only p is rounded to bf16
 * (to nearest even) for the second product, as PyTorch's bf16 flash kernel does; the output is normalised in
 * float32, then rounded to bf16.
 *
 * Layouts: q, k, v, o (batch, heads, rows, D) with any strides but unit stride in D, D even and at most 64;
 * bias (batch, heads, n, m) likewise, float32, strides may be 0 (broadcast). attn_bf16 runs tasks [task_begin,
 * task_end); the OpenMP build (SMT_OPENMP, see selective_scan.c) adds attn_bf16_omp, which splits all tasks over
 * PyTorch's own thread team. Where the compiler has no AVX-512 BF16 (-march=native on another CPU)
 * attn_bf16_available() returns 0 and attn_bf16 returns -2: the caller uses PyTorch's attention.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp2_taylor.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

int attn_bf16_available(void) { return HAVE_BF16_DOT; }

#define ROWS 4  /* query rows per tile */
#define MAXD 64 /* head dimension bound: ROWS * MAXD / 16 = 16 accumulators in the p v product */

#if HAVE_BF16_DOT
static inline __mmask16 tail16(long left) {
    return left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
}

/* 2^x for x <= 0 (scores in log2 units minus their row maximum): x = n + f, n = x rounded to nearest,
 * |f| <= 1/2; 2^f = exp(f ln2) by its degree-5 Taylor polynomial (relative error < 2.4e-6, a thousandth of
 * the bf16 rounding p gets next), times 2^n by scalef. Below -126 (2^x < 1.2e-38) it returns about 1e-38 instead of
 * a subnormal: negligible against the row's sum, which is at least 1. */
static inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(EXP2_T5);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_T4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_T3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_T2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_T1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_T0));
    return _mm512_scalef_ps(p, n);
}

static inline uint32_t load_pair(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __m512bh bcast_pair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int)pair); }

/* s[r][j] = q_r . k_j for `rows` (<= ROWS) rows and j < mpad, from kp (dpairs x mpad pairs, zero past m). */
static void qk_rows_bf16(const uint16_t *q, long qn, int rows, const uint32_t *kp, long dpairs, long mpad,
                         float *s) {
    long nv16 = mpad / 16, j = 0;
    if (rows == ROWS)
        for (; j + 4 <= nv16; j += 4) { /* 4 rows x 4 vectors of keys: 16 accumulators */
            __m512 acc[ROWS][4];
            for (int r = 0; r < ROWS; ++r)
                for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
            for (long dp = 0; dp < dpairs; ++dp) {
                /* each key vector loaded once per step and the 4 query pairs broadcast once (loading the keys
                 * inside the row loop, as the compiler did with the loops the other way round, made the loads
                 * the bottleneck) */
                __m512bh qb[ROWS];
                for (int r = 0; r < ROWS; ++r) qb[r] = bcast_pair(load_pair(q + r * qn + 2 * dp));
                for (int c = 0; c < 4; ++c) {
                    __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + dp * mpad + (j + c) * 16);
                    for (int r = 0; r < ROWS; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb[r], kv);
                }
            }
            for (int r = 0; r < ROWS; ++r)
                for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * mpad + (j + c) * 16, acc[r][c]);
        }
    for (; j < nv16; ++j) /* leftover key vectors, or a short tile of rows */
        for (int r = 0; r < rows; ++r) {
            __m512 acc = _mm512_setzero_ps();
            for (long dp = 0; dp < dpairs; ++dp)
                acc = _mm512_dpbf16_ps(acc, bcast_pair(load_pair(q + r * qn + 2 * dp)),
                                       (__m512bh)_mm512_loadu_si512(kp + dp * mpad + j * 16));
            _mm512_storeu_ps(s + r * mpad + j * 16, acc);
        }
}

/* The softmax's first pass, in place for `rows` rows of s (row stride mpad, holding q . k): the scores in log2
 * units, (scale s + bias) log2(e), for j < m, and smax[r] = the row's maximum. */
static void score_rows(float *s, long mpad, long m, int rows, const float *bias, long bn, float scale,
                       float *smax) {
    const __m512 vscale2 = _mm512_set1_ps(scale * LOG2E), vlog2e = _mm512_set1_ps(LOG2E);
    for (int r = 0; r < rows; ++r) {
        float *sr = s + r * mpad;
        const float *br = bias + r * bn;
        __m512 vmax = _mm512_set1_ps(-__builtin_inff());
        for (long j = 0; j < m; j += 16) {
            __mmask16 k = tail16(m - j);
            __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sr + j), vscale2,
                                       _mm512_mul_ps(_mm512_maskz_loadu_ps(k, br + j), vlog2e));
            _mm512_mask_storeu_ps(sr + j, k, x);
            vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
        }
        smax[r] = _mm512_reduce_max_ps(vmax);
    }
}

/* The softmax's second pass for `rows` rows of s (log2-unit scores, row maxima smax): p_r (mpad / 2 pairs of
 * bf16) = 2^(s - max) rounded to bf16, 0 past m; inv[r] = 1 / the float32 sum of the row's 2^(s - max). */
static void exp_rows_bf16(const float *s, long mpad, long m, int rows, const float *smax, uint32_t *p, float *inv) {
    for (int r = 0; r < rows; ++r) {
        const float *sr = s + r * mpad;
        uint16_t *pr = (uint16_t *)(p + r * (mpad / 2));
        __m512 vm = _mm512_set1_ps(smax[r]), vsum = _mm512_setzero_ps();
        for (long j = 0; j < mpad; j += 16) {
            __m512 e = _mm512_maskz_mov_ps(tail16(m - j), exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm)));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
}

/* o_r = (sum_jp p_r[jp] . vp[jp]) * inv[r], rounded to bf16: p (rows x mpad / 2 pairs), vp (mpairs x 16 NV
 * pairs, zero past D); NV a constant per instance. */
static inline __attribute__((always_inline)) void pv_rows_bf16(const uint32_t *p, long pstride, long mpairs,
                                                              int rows, const uint32_t *vp, const float *inv,
                                                              uint16_t *o, long on, long D, const int NV) {
    __m512 acc[ROWS][MAXD / 16];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
    for (long jp = 0; jp < mpairs; ++jp) {
        __m512bh vv[MAXD / 16];
        for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * 16 * NV + 16 * c);
        for (int r = 0; r < rows; ++r) {
            __m512bh pb = bcast_pair(p[r * pstride + jp]);
            for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < NV; ++c) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
            _mm256_mask_storeu_epi16(o + r * on + 16 * c, tail16(D - 16 * c), (__m256i)h);
        }
}

/* One (batch, head) in bf16. Scratch: kp (D/2 x mpad), vp (mpairs x dpad), s (ROWS x mpad), p (ROWS x mpad/2). */
static void attend_task_bf16(const uint16_t *q, long qn, const uint16_t *k, long km, const uint16_t *v, long vm,
                             const float *bias, long bn, uint16_t *o, long on, long n, long m, long D, float scale,
                             uint32_t *kp, uint32_t *vp, float *s, uint32_t *p) {
    long mpad = (m + 15) / 16 * 16, mpairs = (m + 1) / 2, dpairs = D / 2, dpad = (D + 15) / 16 * 16;
    for (long dp = 0; dp < dpairs; ++dp) {
        for (long j = 0; j < m; ++j) kp[dp * mpad + j] = load_pair(k + j * km + 2 * dp);
        for (long j = m; j < mpad; ++j) kp[dp * mpad + j] = 0;
    }
    for (long jp = 0; jp < mpairs; ++jp) {
        const uint16_t *v0 = v + 2 * jp * vm, *v1 = 2 * jp + 1 < m ? v0 + vm : NULL;
        for (long d = 0; d < D; ++d) vp[jp * dpad + d] = (uint32_t)v0[d] | (v1 ? (uint32_t)v1[d] << 16 : 0u);
        for (long d = D; d < dpad; ++d) vp[jp * dpad + d] = 0;
    }
    float inv[ROWS], smax[ROWS];
    for (long i = 0; i < n; i += ROWS) {
        int rows = n - i < ROWS ? (int)(n - i) : ROWS;
        qk_rows_bf16(q + i * qn, qn, rows, kp, dpairs, mpad, s);
        score_rows(s, mpad, m, rows, bias + i * bn, bn, scale, smax);
        exp_rows_bf16(s, mpad, m, rows, smax, p, inv);
        /* NV and, for whole tiles, the row count as constants: the accumulators then stay in registers (with
         * a run-time row count the compiler kept them on the stack, a store and a load per product) */
#define PV_ROWS(NVC) (rows == ROWS ? pv_rows_bf16(p, mpad / 2, mpairs, ROWS, vp, inv, o + i * on, on, D, NVC) \
                                   : pv_rows_bf16(p, mpad / 2, mpairs, rows, vp, inv, o + i * on, on, D, NVC))
        switch (dpad / 16) {
        case 1: PV_ROWS(1); break;
        case 2: PV_ROWS(2); break;
        case 3: PV_ROWS(3); break;
        default: PV_ROWS(4); break;
        }
#undef PV_ROWS
    }
}
#endif

/* The entry points: tasks [task_begin, task_end) of (batch, heads), task t is batch t / heads, head t % heads.
 * They return 0, -1 when scratch memory cannot be had, -2 when this build lacks the instructions or D is
 * unsupported (odd, or over 64). */
#define ATTN_PARAMS                                                                                             \
    const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *bias, uint16_t *o, long heads, long n,   \
        long m, long D, float scale, long qb, long qh, long qn, long kb, long kh, long km, long vb, long vh,       \
        long vm, long bb, long bh, long bn, long ob, long oh, long on
#define ATTN_ARGS q, k, v, bias, o, heads, n, m, D, scale, qb, qh, qn, kb, kh, km, vb, vh, vm, bb, bh, bn, ob, oh, on
#define UNUSED_ATTN_ARGS                                                                                        \
    (void)q; (void)k; (void)v; (void)bias; (void)o; (void)heads; (void)n; (void)m; (void)D; (void)scale;       \
    (void)qb; (void)qh; (void)qn; (void)kb; (void)kh; (void)km; (void)vb; (void)vh; (void)vm; (void)bb; (void)bh; \
    (void)bn; (void)ob; (void)oh; (void)on; (void)task_begin; (void)task_end

int attn_bf16(ATTN_PARAMS, long task_begin, long task_end) {
#if HAVE_BF16_DOT
    if (D <= 0 || D % 2 || D > MAXD || m <= 0) return -2;
    long mpad = (m + 15) / 16 * 16, mpairs = (m + 1) / 2, dpad = (D + 15) / 16 * 16;
    uint32_t *kp = malloc(sizeof(uint32_t) * (D / 2 * mpad + mpairs * dpad + ROWS * mpad / 2));
    float *s = malloc(sizeof(float) * ROWS * mpad);
    if (!kp || !s) {
        free(kp);
        free(s);
        return -1;
    }
    uint32_t *vp = kp + D / 2 * mpad, *p = vp + mpairs * dpad;
    for (long t = task_begin; t < task_end; ++t) {
        long b = t / heads, h = t % heads;
        attend_task_bf16(q + b * qb + h * qh, qn, k + b * kb + h * kh, km, v + b * vb + h * vh, vm,
                         bias + b * bb + h * bh, bn, o + b * ob + h * oh, on, n, m, D, scale, kp, vp, s, p);
    }
    free(kp);
    free(s);
    return 0;
#else
    UNUSED_ATTN_ARGS;
    return -2;
#endif
}

#ifdef SMT_OPENMP
/* attn_bf16 over all ntasks, in nthreads contiguous ranges on PyTorch's OpenMP team; the statuses OR-ed. */
int attn_bf16_omp(ATTN_PARAMS, long ntasks, int nthreads) {
    int status = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(| : status)
    for (int i = 0; i < nthreads; ++i)
        status |= attn_bf16(ATTN_ARGS, ntasks * i / nthreads, ntasks * (i + 1) / nthreads);
    return status;
}
#endif
