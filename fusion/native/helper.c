/* A helper thread that runs kernel calls beside its caller (`fusion/native/helper.py` says why):
 * the caller posts calls (up to SLOTS at once, run in order), goes on with its own work (the base
 * projections, in torch, on the other core) and then waits for all of them to end.
 *
 * After each call the helper waits for the next one awake for SPIN_US, yielding its core to any
 * other runnable thread after the first PAUSE_US, before it sleeps on a condition variable: the
 * calls of a decoding step come a fraction of a millisecond apart, and waking a sleeping thread
 * costs more than that on a virtual machine (with a 200 us window, posting a call took 26 us on
 * average on the 2-core host; with 5 ms, under 6 us). Between requests it sleeps. The caller
 * spins while it waits: calls last tens of microseconds and usually end before the caller's own
 * work does. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define SPIN_US 5000
#define PAUSE_US 50
#define SLOTS 8

typedef int (*job_fn)(const void *);

struct helper {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint posted; /* calls posted so far (written by the caller) */
    atomic_uint done; /* calls ended so far (written by the helper) */
    atomic_int quit;
    int sleeping; /* under mu */
    job_fn fn[SLOTS];
    const void *arg[SLOTS];
};

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int idle(struct helper *w, unsigned done) {
    return atomic_load_explicit(&w->posted, memory_order_acquire) == done &&
           !atomic_load_explicit(&w->quit, memory_order_acquire);
}

static void *loop(void *p) {
    struct helper *w = p;
    unsigned done = 0;
    for (;;) {
        const long long begun = now_us();
        while (idle(w, done)) {
            const long long waited = now_us() - begun;
            if (waited < PAUSE_US) {
                relax();
                continue;
            }
            if (waited < SPIN_US) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&w->mu);
            while (idle(w, done)) {
                w->sleeping = 1;
                pthread_cond_wait(&w->cv, &w->mu);
            }
            w->sleeping = 0;
            pthread_mutex_unlock(&w->mu);
        }
        if (atomic_load_explicit(&w->quit, memory_order_acquire)) return NULL;
        const unsigned posted = atomic_load_explicit(&w->posted, memory_order_acquire);
        for (; done != posted; done++) {
            w->fn[done % SLOTS](w->arg[done % SLOTS]);
            atomic_store_explicit(&w->done, done + 1, memory_order_release);
        }
    }
}

static void wake(struct helper *w) {
    pthread_mutex_lock(&w->mu);
    if (w->sleeping) pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* A new helper thread, or NULL if one cannot be started. */
struct helper *helper_new(void) {
    struct helper *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    atomic_init(&w->posted, 0);
    atomic_init(&w->done, 0);
    atomic_init(&w->quit, 0);
    if (pthread_create(&w->thread, NULL, loop, w) != 0) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return NULL;
    }
    return w;
}

/* Queue fn(arg) on the helper, after the calls posted before it. Returns 0, or -1 if SLOTS calls
 * are still running or waiting (nothing posted). Only one thread may post to a helper. */
int helper_post(struct helper *w, job_fn fn, const void *arg) {
    const unsigned posted = atomic_load_explicit(&w->posted, memory_order_relaxed);
    if (posted - atomic_load_explicit(&w->done, memory_order_acquire) >= SLOTS) return -1;
    w->fn[posted % SLOTS] = fn;
    w->arg[posted % SLOTS] = arg;
    atomic_store_explicit(&w->posted, posted + 1, memory_order_release);
    wake(w);
    return 0;
}

/* Wait for every posted call to end. */
void helper_wait(struct helper *w) {
    const unsigned posted = atomic_load_explicit(&w->posted, memory_order_relaxed);
    unsigned spins = 0;
    while (atomic_load_explicit(&w->done, memory_order_acquire) != posted) {
        if (++spins < 1u << 16)
            relax();
        else
            sched_yield(); /* the helper was descheduled: let it run */
    }
}

/* Wait for the posted calls, stop the thread and free it. */
void helper_free(struct helper *w) {
    if (!w) return;
    helper_wait(w);
    atomic_store_explicit(&w->quit, 1, memory_order_release);
    wake(w);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
