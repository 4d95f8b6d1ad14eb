/* A helper thread that runs one kernel call at a time beside its caller (`fusion/native/helper.py`
 * says why): the caller posts a call, goes on with its own work (the base projections, in torch,
 * on the other core) and then waits for the call to end.
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

typedef int (*job_fn)(const void *);

enum { IDLE, POSTED, DONE, QUIT };

struct helper {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int state;
    int sleeping; /* under mu */
    job_fn fn;
    const void *arg;
    int result;
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

static void *loop(void *p) {
    struct helper *w = p;
    for (;;) {
        int s;
        const long long begun = now_us();
        while ((s = atomic_load_explicit(&w->state, memory_order_acquire)) != POSTED && s != QUIT) {
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
            while ((s = atomic_load_explicit(&w->state, memory_order_acquire)) != POSTED && s != QUIT) {
                w->sleeping = 1;
                pthread_cond_wait(&w->cv, &w->mu);
            }
            w->sleeping = 0;
            pthread_mutex_unlock(&w->mu);
        }
        if (s == QUIT) return NULL;
        w->result = w->fn(w->arg);
        atomic_store_explicit(&w->state, DONE, memory_order_release);
    }
}

static void wake(struct helper *w, int state) {
    pthread_mutex_lock(&w->mu);
    atomic_store_explicit(&w->state, state, memory_order_release);
    if (w->sleeping) pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* A new helper thread, or NULL if one cannot be started. */
struct helper *helper_new(void) {
    struct helper *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    atomic_init(&w->state, IDLE);
    if (pthread_create(&w->thread, NULL, loop, w) != 0) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return NULL;
    }
    return w;
}

/* Start fn(arg) on the helper. Returns 0, or -1 if a call is still running (nothing posted). */
int helper_post(struct helper *w, job_fn fn, const void *arg) {
    if (atomic_load_explicit(&w->state, memory_order_acquire) == POSTED) return -1;
    w->fn = fn;
    w->arg = arg;
    wake(w, POSTED);
    return 0;
}

/* Wait for the posted call to end and return its result (0 if nothing was posted). */
int helper_wait(struct helper *w) {
    int s;
    unsigned spins = 0;
    while ((s = atomic_load_explicit(&w->state, memory_order_acquire)) == POSTED) {
        if (++spins < 1u << 16)
            relax();
        else
            sched_yield(); /* the helper was descheduled: let it run */
    }
    int result = s == DONE ? w->result : 0;
    atomic_store_explicit(&w->state, IDLE, memory_order_release);
    return result;
}

/* Wait for any posted call, stop the thread and free it. */
void helper_free(struct helper *w) {
    if (!w) return;
    helper_wait(w);
    wake(w, QUIT);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
