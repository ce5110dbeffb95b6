/* Compiled loops of utils.pruning.kernels: magnitude pruning of float32/float64 CPU arrays, each
 * job in one read, split over threads (POSIX threads, started per call, so nothing outlives a
 * call and a forked process can use them too).
 *
 * The loops compare bit patterns: with the sign bit cleared, the order of |x| is the order of
 * the bits as integers (infinities above every finite value, NaN above them), so |x| < v is
 * one integer compare with v's bits, which C compilers vectorise. The arrays are read through
 * unsigned-integer pointers; kernels.py builds this file with -fno-strict-aliasing.
 *
 * Built by kernels.py with the system's C compiler on first use, then loaded from a cache. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64
#define SUB 16384 /* elements per sub-block: counted, then gathered while still in cache */
#define GROUP 32  /* the band is gathered only from groups that hold some of it */

typedef struct {
    const void *x;        /* the array read */
    void *y;              /* zero: the same array, written; keep: the 0/1 flags */
    void *vals;           /* band: where this thread's values go */
    int64_t *pos;         /* band: where this thread's positions go */
    int64_t start, stop;  /* the range of this thread */
    uint64_t first, end;  /* keys: band first <= bits < end; zero/keep: bits < end */
    int64_t cap;          /* band: room for this thread's values and positions */
    int64_t below, count, nonfinite;
} job;

typedef void *(*runner)(void *);

/* Run `run` on each job (the first here, the others on threads of their own). */
static void run_all(runner run, job *jobs, int threads) {
    pthread_t t[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 1; k < threads; k++)
        started[k] = pthread_create(&t[k], NULL, run, &jobs[k]) == 0;
    run(&jobs[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k]) pthread_join(t[k], NULL);
        else run(&jobs[k]); /* no thread to be had: this one does it */
    }
}

/* `threads` (clamped to 1..MAX_THREADS) copies of `proto` over consecutive ranges of [0, n). */
static int split(const job *proto, int64_t n, int threads, job *jobs) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t step = (n + threads - 1) / threads;
    for (int k = 0; k < threads; k++) {
        jobs[k] = *proto;
        jobs[k].start = k * step < n ? k * step : n;
        jobs[k].stop = (k + 1) * step < n ? (k + 1) * step : n;
        jobs[k].below = jobs[k].count = jobs[k].nonfinite = 0;
    }
    return threads;
}

/* Run `run` over consecutive ranges of [0, n) on `threads` threads; the sum of their counts. */
static int64_t count_all(runner run, const job *proto, int64_t n, int threads) {
    job jobs[MAX_THREADS];
    threads = split(proto, n, threads, jobs);
    run_all(run, jobs, threads);
    int64_t total = 0;
    for (int k = 0; k < threads; k++) total += jobs[k].count;
    return total;
}

#define KERNELS(SUFFIX, UINT, FLOAT, MASK, INF)                                                   \
    static void *band_run_##SUFFIX(void *p) {                                                     \
        job *j = p;                                                                               \
        const UINT *x = j->x;                                                                     \
        FLOAT *vals = j->vals;                                                                    \
        int64_t *pos = j->pos;                                                                    \
        const UINT first = (UINT)j->first, width = (UINT)(j->end - j->first);                     \
        const int64_t stop = j->stop, cap = j->cap;                                               \
        int64_t below = 0, inside = 0, nonfinite = 0;                                             \
        int32_t groups[SUB / GROUP]; /* band counts per group of GROUP elements */               \
        for (int64_t a = j->start; a < stop; a += SUB) {                                          \
            const int64_t e = a + SUB < stop ? a + SUB : stop;                                    \
            int64_t any = 0;                                                                      \
            for (int64_t g = a; g < e; g += GROUP) { /* count: narrow sums that vectorise */      \
                const int64_t ge = g + GROUP < e ? g + GROUP : e;                                 \
                int32_t b1 = 0, b2 = 0, b3 = 0;                                                   \
                for (int64_t i = g; i < ge; i++) {                                                \
                    const UINT m = x[i] & MASK;                                                   \
                    b1 += m < first;                                                              \
                    b2 += (UINT)(m - first) < width; /* unsigned: below first wraps round */      \
                    b3 += m >= INF;                  /* infinite or NaN */                        \
                }                                                                                 \
                below += b1;                                                                      \
                nonfinite += b3;                                                                  \
                groups[(g - a) / GROUP] = b2;                                                     \
                any += b2;                                                                        \
            }                                                                                     \
            for (int64_t g = a; any && g < e; g += GROUP) { /* gather, in order, from cache */    \
                if (!groups[(g - a) / GROUP]) continue;                                           \
                const int64_t ge = g + GROUP < e ? g + GROUP : e;                                 \
                for (int64_t i = g; i < ge; i++) {                                                \
                    const UINT m = x[i] & MASK;                                                   \
                    if ((UINT)(m - first) < width) {                                              \
                        if (inside < cap) {                                                       \
                            memcpy(&vals[inside], &m, sizeof m);                                  \
                            pos[inside] = i;                                                      \
                        }                                                                         \
                        inside++;                                                                 \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        j->below = below;                                                                         \
        j->count = inside;                                                                        \
        j->nonfinite = nonfinite;                                                                 \
        return NULL;                                                                              \
    }                                                                                             \
    /* The number with bits < first, and the positions and |values| with first <= bits < end:   \
     * thread k writes its range's, in order, from offsets[k] on, at most offsets[k + 1] -      \
     * offsets[k] of them. Per thread (below, found, not finite) in res. */                     \
    void band_##SUFFIX(const UINT *x, int64_t n, UINT first, UINT end, int threads,              \
                       const int64_t *offsets, int64_t *pos, FLOAT *vals, int64_t *res) {         \
        job proto = {0}, jobs[MAX_THREADS];                                                       \
        proto.x = x;                                                                              \
        proto.first = first;                                                                      \
        proto.end = end > first ? end : first; /* an empty band, never a wrapped one */           \
        threads = split(&proto, n, threads, jobs);                                                \
        for (int k = 0; k < threads; k++) {                                                       \
            jobs[k].pos = pos + offsets[k];                                                       \
            jobs[k].vals = vals + offsets[k];                                                     \
            jobs[k].cap = offsets[k + 1] - offsets[k];                                            \
        }                                                                                         \
        run_all(band_run_##SUFFIX, jobs, threads);                                                \
        for (int k = 0; k < threads; k++) {                                                       \
            res[3 * k] = jobs[k].below;                                                           \
            res[3 * k + 1] = jobs[k].count;                                                       \
            res[3 * k + 2] = jobs[k].nonfinite;                                                   \
        }                                                                                         \
    }                                                                                             \
    static void *zero_run_##SUFFIX(void *p) {                                                     \
        job *j = p;                                                                               \
        UINT *x = j->y;                                                                           \
        const UINT end = (UINT)j->end;                                                            \
        const int64_t stop = j->stop;                                                             \
        int64_t zeroed = 0;                                                                       \
        for (int64_t i = j->start; i < stop; i++) {                                               \
            const UINT small = (x[i] & MASK) < end;                                               \
            x[i] &= small ? (UINT) ~(UINT)MASK : (UINT) ~(UINT)0; /* keep the sign: -0.0 */      \
            zeroed += small;                                                                      \
        }                                                                                         \
        j->count = zeroed;                                                                        \
        return NULL;                                                                              \
    }                                                                                             \
    /* Zero in place the entries with bits < end (sign kept); their number. */                   \
    int64_t zero_##SUFFIX(UINT *x, int64_t n, UINT end, int threads) {                            \
        job proto = {0};                                                                          \
        proto.y = x;                                                                              \
        proto.end = end;                                                                          \
        return count_all(zero_run_##SUFFIX, &proto, n, threads);                                  \
    }                                                                                             \
    static void *keep_run_##SUFFIX(void *p) {                                                     \
        job *j = p;                                                                               \
        const UINT *x = j->x;                                                                     \
        FLOAT *out = j->y;                                                                        \
        const UINT end = (UINT)j->end;                                                            \
        const int64_t stop = j->stop;                                                             \
        int64_t kept = 0;                                                                         \
        for (int64_t i = j->start; i < stop; i++) {                                               \
            const UINT big = (x[i] & MASK) >= end;                                                \
            out[i] = (FLOAT)big;                                                                  \
            kept += big;                                                                          \
        }                                                                                         \
        j->count = kept;                                                                          \
        return NULL;                                                                              \
    }                                                                                             \
    /* Write 1 into out where bits >= end, else 0; the number of ones. */                        \
    int64_t keep_##SUFFIX(const UINT *x, int64_t n, UINT end, FLOAT *out, int threads) {         \
        job proto = {0};                                                                          \
        proto.x = x;                                                                              \
        proto.y = out;                                                                            \
        proto.end = end;                                                                          \
        return count_all(keep_run_##SUFFIX, &proto, n, threads);                                  \
    }

KERNELS(f32, uint32_t, float, 0x7FFFFFFFu, 0x7F800000u)
KERNELS(f64, uint64_t, double, 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ull)
