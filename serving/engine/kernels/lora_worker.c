/* A second thread for the LoRA deltas: while the engine's thread runs a module's base GEMM
 * (oneDNN, compute-bound), a worker thread computes the module's per-token LoRA deltas (the
 * BGMV kernel's work, bound by reading each token's adapter rows from memory) into a float32
 * buffer; the engine's thread then adds them into the GEMM's output. With many adapters a decode
 * step reads more adapter bytes than base weights, and one thread can only do the two one after
 * the other; two cores do them at once.
 *
 * A job covers the modules that read the same x (q, k and v; gate and up), so the worker
 * computes k's and v's deltas during q's GEMM too, where k's and v's own GEMMs are short.
 *
 * The engine's thread never waits on a worker that has not started: work is split into chunks
 * of tokens that either thread claims (a compare-and-swap on a ticket tagged with the job's
 * generation), so in lora_join the engine's thread computes every chunk the worker has not
 * taken and waits only for chunks in progress. Each job's description sits in one of two slots
 * (by generation): a worker holding a stale ticket can read a slot being rewritten, but can
 * never claim a chunk of it, because the engine posts job g + 2 only after every chunk of job g
 * was claimed and done.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lora_rows.h"

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN 20000      /* pauses (roughly 0.1-0.5 ms) an idle worker spins before it sleeps */
#define CHUNK_TOKENS 2  /* tokens per claim: fine enough to balance, a CAS per two tokens */
#define MAX_MODULES 4   /* modules per job */

typedef struct {
    int64_t tokens, ldx, d_in, modules, per_module, chunks; /* chunks: module after module */
    const void *x;
    const int64_t *where[MAX_MODULES];
    int64_t d_out[MAX_MODULES];
    float *delta[MAX_MODULES]; /* [tokens, d_out] float32, written whole (zero: no rank) */
    _Atomic int64_t done[MAX_MODULES];
} Job;

typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pid_t owner; /* a forked child has no worker thread: it must not join one */
    int bf16;
    _Atomic uint64_t ticket; /* generation << 32 | next chunk */
    _Atomic int sleeping, stop;
    Job jobs[2];
    float *xbuf; /* the engine thread's scratch for widening x (bf16) */
    int64_t xcap;
    _Atomic int64_t chunks_worker, chunks_caller; /* who did the work, for stats */
} Worker;

/* Claim the next chunk of generation gen if it lies before `limit`, else -1 (none left, a later
 * module's, or the job moved on). */
static int64_t claim(Worker *w, uint64_t gen, int64_t limit) {
    uint64_t t = atomic_load(&w->ticket);
    while ((t >> 32) == gen && (int64_t)(t & 0xffffffffu) < limit) {
        if (atomic_compare_exchange_weak(&w->ticket, &t, t + 1)) return (int64_t)(t & 0xffffffffu);
    }
    return -1;
}

/* Scratch of at least n floats in *buf (capacity *cap); -1 when it cannot be had. */
static int grow(float **buf, int64_t *cap, int64_t n) {
    if (n <= *cap) return 0;
    float *b = realloc(*buf, sizeof(float) * (size_t)n);
    if (!b) return -1;
    *buf = b;
    *cap = n;
    return 0;
}

/* No job past `seen` has been posted, and the worker is not stopping. */
static int idle(Worker *w, uint64_t seen) {
    return (atomic_load(&w->ticket) >> 32) == seen && !atomic_load(&w->stop);
}

INLINE void run_chunk(const Job *j, int64_t c, float *restrict xbuf, int bf16) {
    int64_t m = c / j->per_module, T = j->tokens, d_in = j->d_in, d_out = j->d_out[m];
    int64_t t0 = (c % j->per_module) * CHUNK_TOKENS, t1 = t0 + CHUNK_TOKENS < T ? t0 + CHUNK_TOKENS : T;
    const int64_t *a_at = j->where[m], *b_at = a_at + T, *bias_at = a_at + 2 * T,
                  *rank = a_at + 3 * T;
    for (int64_t t = t0; t < t1; t++) {
        float *acc = j->delta[m] + t * d_out;
        memset(acc, 0, sizeof(float) * (size_t)d_out);
        int32_t r = (int32_t)rank[t];
        if (r <= 0) continue;
        const float *xt = (const float *)row(j->x, t * j->ldx, bf16);
        if (bf16) {
            for (int64_t i = 0; i < d_in; i++) xbuf[i] = load(xt, i, 1);
            xt = xbuf;
        }
        token_delta(xt, (const void *)(intptr_t)a_at[t], (const void *)(intptr_t)b_at[t],
                    (const void *)(intptr_t)bias_at[t], r, d_in, d_out, acc, bf16);
    }
}

/* Every chunk of generation gen before `limit` this thread can claim; returns how many it ran.
 * The claim checks gen, so j's fields are job gen's whenever a chunk is run. */
INLINE int64_t work(Worker *w, uint64_t gen, int64_t limit, float *xbuf, int bf16) {
    Job *j = &w->jobs[gen & 1];
    int64_t n = 0;
    for (int64_t c; (c = claim(w, gen, limit)) >= 0; n++) {
        run_chunk(j, c, xbuf, bf16);
        atomic_fetch_add(&j->done[c / j->per_module], 1);
    }
    return n;
}

/* The worker thread's entry points into the kernel, one per element type and ISA clone. */
CLONES
int64_t lora_worker_run_f32(Worker *w, uint64_t gen, float *xbuf) {
    return work(w, gen, w->jobs[gen & 1].chunks, xbuf, 0);
}

CLONES
int64_t lora_worker_run_bf16(Worker *w, uint64_t gen, float *xbuf) {
    return work(w, gen, w->jobs[gen & 1].chunks, xbuf, 1);
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    float *xbuf = NULL;
    int64_t xcap = 0;
    uint64_t seen = atomic_load(&w->ticket) >> 32;
    while (!atomic_load(&w->stop)) {
        uint64_t gen = atomic_load(&w->ticket) >> 32;
        if (gen == seen) {
            for (int spun = 0; idle(w, seen) && spun < SPIN; spun++) CPU_RELAX();
            if (idle(w, seen)) {
                pthread_mutex_lock(&w->mu);
                atomic_store(&w->sleeping, 1);
                while (idle(w, seen)) pthread_cond_wait(&w->cv, &w->mu);
                atomic_store(&w->sleeping, 0);
                pthread_mutex_unlock(&w->mu);
            }
            continue;
        }
        seen = gen;
        Job *j = &w->jobs[gen & 1];
        /* A stale d_in is harmless (claims check the gen); without scratch the engine's
         * thread does this job. */
        if (w->bf16 && grow(&xbuf, &xcap, j->d_in) != 0) continue;
        int64_t n = w->bf16 ? lora_worker_run_bf16(w, gen, xbuf) : lora_worker_run_f32(w, gen, xbuf);
        atomic_fetch_add(&w->chunks_worker, n);
    }
    free(xbuf);
    return NULL;
}

/* A worker for float32 (bf16 = 0) or bfloat16 rows; NULL if its thread cannot start. */
void *lora_worker_open(int bf16) {
    Worker *w = calloc(1, sizeof(Worker));
    if (!w) return NULL;
    w->bf16 = bf16;
    w->owner = getpid();
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        free(w);
        return NULL;
    }
    return w;
}

/* Post, for `modules` modules reading the same x [tokens, d_in], delta_m[t] = B_t^T (A_t x[t])
 * + bias_t for every token (where[m]: the BGMV kernel's [4, T] table; delta[m]: [tokens,
 * d_out[m]] float32, contiguous), and return at once; lora_join adds module m's deltas to its
 * y. Everything passed must stay as it is until the last lora_join. Returns 0, or -1 (nothing
 * posted) for more than MAX_MODULES modules or when scratch rows cannot be allocated. */
int lora_submit(void *h, int64_t tokens, const void *x, int64_t ldx, int64_t d_in,
                int64_t modules, const int64_t *where, const int64_t *d_out,
                const int64_t *delta) {
    Worker *w = h;
    if (modules < 1 || modules > MAX_MODULES) return -1;
    /* lora_join's scratch, allocated here so a join cannot fail */
    if (w->bf16 && grow(&w->xbuf, &w->xcap, d_in) != 0) return -1;
    uint64_t gen = (atomic_load(&w->ticket) >> 32) + 1;
    Job *j = &w->jobs[gen & 1];
    j->tokens = tokens;
    j->ldx = ldx;
    j->d_in = d_in;
    j->modules = modules;
    j->per_module = (tokens + CHUNK_TOKENS - 1) / CHUNK_TOKENS;
    j->chunks = modules * j->per_module;
    j->x = x;
    for (int64_t m = 0; m < modules; m++) {
        j->where[m] = (const int64_t *)(intptr_t)where[m];
        j->d_out[m] = d_out[m];
        j->delta[m] = (float *)(intptr_t)delta[m];
        atomic_store(&j->done[m], 0);
    }
    atomic_store(&w->ticket, gen << 32); /* publishes the job */
    if (atomic_load(&w->sleeping)) {
        pthread_mutex_lock(&w->mu);
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    return 0;
}

INLINE void join(Worker *w, int64_t m, void *y, int64_t ldy, int bf16) {
    uint64_t gen = atomic_load(&w->ticket) >> 32;
    Job *j = &w->jobs[gen & 1];
    int64_t limit = y ? (m + 1) * j->per_module : j->chunks, d_out = j->d_out[m];
    atomic_fetch_add(&w->chunks_caller, work(w, gen, limit, w->xbuf, bf16));
    if (!y) { /* drop the job: wait for every chunk the worker is running */
        for (int64_t k = 0; k < j->modules; k++)
            while (atomic_load(&j->done[k]) < j->per_module) CPU_RELAX();
        return;
    }
    while (atomic_load(&j->done[m]) < j->per_module) CPU_RELAX(); /* chunks the worker runs */
    for (int64_t t = 0; t < j->tokens; t++) {
        const float *d = j->delta[m] + t * d_out;
        void *yt = (void *)row(y, t * ldy, bf16);
        if (bf16) {
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) store(yt, o, load(yt, o, 1) + d[o], 1);
        } else {
#pragma omp simd
            for (int64_t o = 0; o < d_out; o++) ((float *)yt)[o] += d[o];
        }
    }
}

/* Finish module m of the posted job (running its chunks the worker has not claimed, waiting for
 * those it runs) and add its deltas into y [tokens, d_out[m]] (float32 or bf16, as the worker
 * was opened; bf16 rounded once). With y NULL, finish every module and drop the deltas. */
CLONES
void lora_join(void *h, int64_t module, void *y, int64_t ldy) {
    Worker *w = h;
    if (w->bf16)
        join(w, module, y, ldy, 1);
    else
        join(w, module, y, ldy, 0);
}

/* out[2]: chunks run by the worker thread, and by the engine's thread in lora_join. */
void lora_worker_stats(void *h, int64_t *out) {
    Worker *w = h;
    out[0] = atomic_load(&w->chunks_worker);
    out[1] = atomic_load(&w->chunks_caller);
}

/* Stop and join the worker thread. No job may be outstanding (lora_join returned). */
void lora_worker_close(void *h) {
    Worker *w = h;
    pthread_mutex_lock(&w->mu);
    atomic_store(&w->stop, 1);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    if (getpid() == w->owner) {
        pthread_join(w->thread, NULL);
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        free(w->xbuf);
        free(w);
    } /* in a forked child the thread does not exist: leak the struct rather than join */
}

/* The ABI version the Python loader checks, so a stale build is never called. */
int lora_worker_abi(void) { return 1; }
