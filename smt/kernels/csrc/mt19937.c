/* PyTorch's CPU random generator (MT19937, 32-bit) stepped in bulk, for MambaIRv2's Gumbel route draws.
 *
 * PyTorch's CPU exponential_() draws, per element and serially, random64() = (w1 << 32) | w2 from two
 * successive MT19937 words and maps its low 53 bits to u in [0, 1). mt_neg_uniform53 writes -u for n such
 * draws and leaves the generator where n draws leave it, so the caller (smt/kernels/cpu_generator.py) gets the
 * same values and the same generator state as PyTorch, without its per-element serial loop: here the state is
 * regenerated 624 words at a time by loops the compiler vectorises, and tempering and the conversion are
 * element-wise.
 *
 * The generator as PyTorch keeps it (at::mt19937): 624 state words, `left` and `next`. A draw decrements
 * `left`; at 0 it regenerates the state ("twist") and sets left = 624, next = 0; it returns word `next++`
 * tempered. The caller passes these three fields from the generator's get_state() bytes (where the words are
 * stored as 64-bit integers) and writes the results back with set_state().
 */
#include <stdint.h>

#define MT_N 624
#define MT_M 397
#define MT_UPPER 0x80000000u
#define MT_LOWER 0x7fffffffu
#define MT_MATRIX_A 0x9908b0dfu

static inline uint32_t mix(uint32_t a, uint32_t b, uint32_t far) {
    uint32_t y = (a & MT_UPPER) | (b & MT_LOWER);
    return far ^ (y >> 1) ^ ((0u - (y & 1u)) & MT_MATRIX_A);
}

/* The standard in-place regeneration, as three loops whose reads are either ahead of the writes (0 <= i < 227:
 * words i + 1 and i + 397 are still old) or far enough behind them (227 <= i < 623: word i - 227 was written
 * 227 steps earlier), so each vectorises; word 623 wraps to the new word 0. */
static void twist(uint32_t *mt) {
    for (int i = 0; i < MT_N - MT_M; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + MT_M]);
    for (int i = MT_N - MT_M; i < MT_N - 1; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + MT_M - MT_N]);
    mt[MT_N - 1] = mix(mt[MT_N - 1], mt[0], mt[MT_M - 1]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* count tempered words into out, as `count` successive draws. */
static void draw_words(uint32_t *mt, int64_t *left, int64_t *next, long count, uint32_t *out) {
    while (count > 0) {
        if (*left <= 1) { /* the next draw regenerates the state */
            twist(mt);
            *left = MT_N + 1;
            *next = 0;
        }
        long chunk = *left - 1 < count ? *left - 1 : count;
        const uint32_t *src = mt + *next;
        for (long i = 0; i < chunk; ++i) out[i] = temper(src[i]);
        out += chunk;
        count -= chunk;
        *next += chunk;
        *left -= chunk;
    }
}

enum { BLOCK = 2048 }; /* draws converted per pass (two words each) */

/* out[i] = -((w1 << 32 | w2) & (2^53 - 1)) * 2^-53 for n successive random64() draws (w1, w2). state: the 624
 * words; left, next: the generator's fields; all three are advanced in place. Returns 0, or -1 if left or next
 * are out of range (a state this code does not understand; nothing is changed). */
int mt_neg_uniform53(uint32_t *state, int64_t *left, int64_t *next, long n, double *out) {
    if (*left < 1 || *left > MT_N || *next < 0 || *next + *left - 1 > MT_N) return -1;
    uint32_t words[2 * BLOCK];
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long m = n - i0 < BLOCK ? n - i0 : BLOCK;
        draw_words(state, left, next, 2 * m, words);
        for (long i = 0; i < m; ++i) {
            uint64_t bits = ((uint64_t)words[2 * i] << 32 | words[2 * i + 1]) & ((UINT64_C(1) << 53) - 1);
            out[i0 + i] = (double)bits * -0x1p-53;
        }
    }
    return 0;
}
