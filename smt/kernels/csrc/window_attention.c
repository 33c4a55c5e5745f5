/* Window attention for bfloat16 q, k, v on CPUs with AVX-512 BF16 dot products, scores in float32.
 *
 *   o[b,h,i,:] = sum_j p[i,j] v[b,h,j,:] / sum_j p[i,j],   p[i,j] = exp(s[i,j] - max_j s[i,j]),
 *   s[i,j] = scale * (q[b,h,i,:] . k[b,h,j,:]) + bias[b,h,i,j]
 *
 * i.e. softmax(scale q k^T + bias) v, as PyTorch's scaled_dot_product_attention with a float mask. Why a kernel:
 * PyTorch's CPU flash attention runs these small problems (n = 256 queries, 256 or 576 keys, heads 32 wide) no
 * faster in bf16 than in float32, and bf16 matmuls through torch round the scores to bf16. Here both products
 * use VDPBF16PS (pairs of bf16 products summed into float32 lanes): q . k and p v accumulate in float32, the
 * scores, bias, max, exp and sum are float32, and only p is rounded to bf16 (round to nearest even) for the
 * second product, as PyTorch's bf16 flash kernel does; the output is normalised in float32 and rounded to bf16.
 *
 * A task is one (batch, head): its keys are packed into pairs of bf16 along the head dimension (kp[dp][j] holds
 * k[j][2dp], k[j][2dp+1]), its values into pairs along the keys (vp[jp][d] holds v[2jp][d], v[2jp+1][d]), so
 * every dot product is one broadcast and one vector load per pair. Queries run 4 rows at a time. Layouts: q, k,
 * v, o (batch, heads, rows, D) with any strides but unit stride in D; bias (batch, heads, n, m) likewise, float32,
 * strides may be 0 (broadcast). D must be a multiple of 16 and at most 64. attn_bf16 runs tasks
 * [task_begin, task_end); the OpenMP build (SMT_OPENMP, see selective_scan.c) adds attn_bf16_omp, which splits
 * all tasks over PyTorch's own thread team. Where the compiler has no AVX-512 BF16 (-march=native on another
 * CPU) attn_bf16_available() returns 0 and the entry points return -2: the caller uses PyTorch's attention.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

int attn_bf16_available(void) { return HAVE_BF16_DOT; }

#if HAVE_BF16_DOT
#define ROWS 4  /* query rows per tile */
#define MAXD 64 /* head dimension bound: ROWS * MAXD / 16 = 16 accumulators in the p v product */

/* exp(x) for x <= 0 (scores minus their row maximum): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6
 * Taylor polynomial (relative error < 2e-7), times 2^n by scalef. Below -87 (exp < 1.7e-38) it returns about
 * 1e-38 instead of a subnormal: negligible against the row's sum, which is at least 1. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x); /* ln2 split in two parts */
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline uint32_t load_pair(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __m512bh bcast_pair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int)pair); }

/* scores of `rows` (<= ROWS) query rows against all keys: s[r][j] = q_r . k_j for j < mpad (keys >= m are zero
 * pairs), from nv16 = mpad / 16 vectors of packed keys kp (dpairs x mpad). */
static void qk_rows(const uint16_t *q, long qn, int rows, const uint32_t *kp, long dpairs, long mpad, float *s) {
    long nv16 = mpad / 16, j = 0;
    if (rows == ROWS) {
        for (; j + 4 <= nv16; j += 4) { /* 4 rows x 4 vectors of keys: 16 accumulators */
            __m512 acc[ROWS][4];
            for (int r = 0; r < ROWS; ++r)
                for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
            for (long dp = 0; dp < dpairs; ++dp) {
                const uint32_t *krow = kp + dp * mpad + j * 16;
                __m512bh kv[4];
                for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(krow + 16 * c);
                for (int r = 0; r < ROWS; ++r) {
                    __m512bh qb = bcast_pair(load_pair(q + r * qn + 2 * dp));
                    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
                }
            }
            for (int r = 0; r < ROWS; ++r)
                for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * mpad + (j + c) * 16, acc[r][c]);
        }
    }
    for (; j < nv16; ++j) /* leftover key vectors, or a short tile of rows: one vector at a time */
        for (int r = 0; r < rows; ++r) {
            __m512 acc = _mm512_setzero_ps();
            for (long dp = 0; dp < dpairs; ++dp)
                acc = _mm512_dpbf16_ps(acc, bcast_pair(load_pair(q + r * qn + 2 * dp)),
                                       (__m512bh)_mm512_loadu_si512(kp + dp * mpad + j * 16));
            _mm512_storeu_ps(s + r * mpad + j * 16, acc);
        }
}

/* o_r = (sum_jp p_r[jp] . vp[jp]) * inv[r] for `rows` rows: p (rows x mpairs pairs of bf16), vp (mpairs x D
 * pairs), NV = D / 16 output vectors per row (a compile-time constant in each instance). */
static inline __attribute__((always_inline)) void pv_rows(const uint32_t *p, long mpairs, int rows,
                                                         const uint32_t *vp, const float *inv, uint16_t *o,
                                                         long on, const int NV) {
    long D = 16L * NV;
    __m512 acc[ROWS][MAXD / 16];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
    if (rows == ROWS) {
        for (long jp = 0; jp < mpairs; ++jp) {
            __m512bh vv[MAXD / 16];
            for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * D + 16 * c);
            for (int r = 0; r < ROWS; ++r) {
                __m512bh pb = bcast_pair(p[r * mpairs + jp]);
                for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
            }
        }
    } else {
        for (long jp = 0; jp < mpairs; ++jp)
            for (int r = 0; r < rows; ++r) {
                __m512bh pb = bcast_pair(p[r * mpairs + jp]);
                for (int c = 0; c < NV; ++c)
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, (__m512bh)_mm512_loadu_si512(vp + jp * D + 16 * c));
            }
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < NV; ++c) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
            _mm256_storeu_si256((__m256i *)(o + r * on + 16 * c), (__m256i)h);
        }
}

/* p_r = exp(scale s_r + bias_r - max) as pairs of bf16 (zero past m), inv[r] = 1 / sum of the float32 values. */
static void softmax_rows(float *s, long mpad, long m, int rows, const float *bias, long bn, float scale,
                         uint32_t *p, long mpairs, float *inv) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < rows; ++r) {
        float *sr = s + r * mpad;
        const float *br = bias + r * bn;
        __m512 vmax = _mm512_set1_ps(-__builtin_inff());
        long j = 0;
        for (; j + 16 <= m; j += 16) {
            __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(sr + j), vscale, _mm512_loadu_ps(br + j));
            _mm512_storeu_ps(sr + j, x);
            vmax = _mm512_max_ps(vmax, x);
        }
        if (j < m) {
            __mmask16 k = (__mmask16)((1u << (m - j)) - 1);
            __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sr + j), vscale, _mm512_maskz_loadu_ps(k, br + j));
            _mm512_mask_storeu_ps(sr + j, k, x);
            vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
        }
        __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        uint16_t *pr = (uint16_t *)(p + r * mpairs);
        for (j = 0; j < 2 * mpairs; j += 32) { /* 32 floats -> 32 bf16 per step; past m: zeros */
            __m512 e[2];
            for (int h = 0; h < 2; ++h) {
                long jj = j + 16 * h;
                long left = m - jj;
                __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                e[h] = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sr + jj), vm)));
                vsum = _mm512_add_ps(vsum, e[h]);
            }
            __m512bh both = _mm512_cvtne2ps_pbh(e[1], e[0]); /* low half: e[0] */
            long left = 2 * mpairs - j;
            __mmask32 k = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
            _mm512_mask_storeu_epi16(pr + j, k, (__m512i)both);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
}

/* One (batch, head): see the file comment. Scratch: kp (D/2 x mpad), vp (mpairs x D), s (ROWS x mpad),
 * p (ROWS x mpairs). */
static void attend_task(const uint16_t *q, long qn, const uint16_t *k, long km, const uint16_t *v, long vm,
                        const float *bias, long bn, uint16_t *o, long on, long n, long m, long D, float scale,
                        uint32_t *kp, uint32_t *vp, float *s, uint32_t *p) {
    long mpad = (m + 15) / 16 * 16, mpairs = (m + 1) / 2, dpairs = D / 2;
    for (long dp = 0; dp < dpairs; ++dp) {
        for (long j = 0; j < m; ++j) kp[dp * mpad + j] = load_pair(k + j * km + 2 * dp);
        for (long j = m; j < mpad; ++j) kp[dp * mpad + j] = 0;
    }
    for (long jp = 0; jp < mpairs; ++jp) {
        const uint16_t *v0 = v + 2 * jp * vm, *v1 = 2 * jp + 1 < m ? v0 + vm : NULL;
        for (long d = 0; d < D; ++d) vp[jp * D + d] = (uint32_t)v0[d] | (v1 ? (uint32_t)v1[d] << 16 : 0u);
    }
    float inv[ROWS];
    for (long i = 0; i < n; i += ROWS) {
        int rows = n - i < ROWS ? (int)(n - i) : ROWS;
        qk_rows(q + i * qn, qn, rows, kp, dpairs, mpad, s);
        softmax_rows(s, mpad, m, rows, bias + i * bn, bn, scale, p, mpairs, inv);
        switch (D / 16) {
        case 1: pv_rows(p, mpairs, rows, vp, inv, o + i * on, on, 1); break;
        case 2: pv_rows(p, mpairs, rows, vp, inv, o + i * on, on, 2); break;
        case 3: pv_rows(p, mpairs, rows, vp, inv, o + i * on, on, 3); break;
        default: pv_rows(p, mpairs, rows, vp, inv, o + i * on, on, 4); break;
        }
    }
}
#endif

/* Tasks [task_begin, task_end) of (batch, heads): task t is batch t / heads, head t % heads. Returns 0, -1 when
 * scratch memory cannot be had, -2 when this build has no AVX-512 BF16 or D is unsupported. */
int attn_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *bias, uint16_t *o, long heads,
              long n, long m, long D, float scale, long qb, long qh, long qn, long kb, long kh, long km, long vb,
              long vh, long vm, long bb, long bh, long bn, long ob, long oh, long on, long task_begin,
              long task_end) {
#if HAVE_BF16_DOT
    if (D <= 0 || D % 16 || D > MAXD || m <= 0) return -2;
    long mpad = (m + 15) / 16 * 16, mpairs = (m + 1) / 2;
    uint32_t *kp = malloc(sizeof(uint32_t) * (D / 2 * mpad + mpairs * D + ROWS * mpairs));
    float *s = malloc(sizeof(float) * ROWS * mpad);
    if (!kp || !s) {
        free(kp);
        free(s);
        return -1;
    }
    uint32_t *vp = kp + D / 2 * mpad, *p = vp + mpairs * D;
    for (long t = task_begin; t < task_end; ++t) {
        long b = t / heads, h = t % heads;
        attend_task(q + b * qb + h * qh, qn, k + b * kb + h * kh, km, v + b * vb + h * vh, vm,
                    bias + b * bb + h * bh, bn, o + b * ob + h * oh, on, n, m, D, scale, kp, vp, s, p);
    }
    free(kp);
    free(s);
    return 0;
#else
    (void)q; (void)k; (void)v; (void)bias; (void)o; (void)heads; (void)n; (void)m; (void)D; (void)scale;
    (void)qb; (void)qh; (void)qn; (void)kb; (void)kh; (void)km; (void)vb; (void)vh; (void)vm; (void)bb; (void)bh;
    (void)bn; (void)ob; (void)oh; (void)on; (void)task_begin; (void)task_end;
    return -2;
#endif
}

#ifdef SMT_OPENMP
/* attn_bf16 over all ntasks, in nthreads contiguous ranges on PyTorch's OpenMP team; the statuses OR-ed. */
int attn_bf16_omp(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *bias, uint16_t *o,
                  long heads, long n, long m, long D, float scale, long qb, long qh, long qn, long kb, long kh,
                  long km, long vb, long vh, long vm, long bb, long bh, long bn, long ob, long oh, long on,
                  long ntasks, int nthreads) {
    int status = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(| : status)
    for (int i = 0; i < nthreads; ++i)
        status |= attn_bf16(q, k, v, bias, o, heads, n, m, D, scale, qb, qh, qn, kb, kh, km, vb, vh, vm, bb, bh,
                            bn, ob, oh, on, ntasks * i / nthreads, ntasks * (i + 1) / nthreads);
    return status;
}
#endif
