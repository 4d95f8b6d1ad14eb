/* A helper thread that runs kernel calls beside its caller (`fusion/native/helper.py` says why):
 * the caller posts calls (up to SLOTS at once, independent of each other), goes on with its own
 * work (the base projections, in torch, on the other core) and then waits for all of them to
 * end, running any the helper has not taken yet itself.
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
    atomic_uint posted; /* calls posted so far (only the caller posts) */
    atomic_uint claimed; /* calls taken so far, by the helper or by the waiting caller */
    atomic_uint finished; /* calls ended so far */
    atomic_int busy[SLOTS]; /* a slot's call is posted and has not ended */
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

/* Take the next posted call nobody has taken and run it. Returns 0 if there was none. */
static int run_one(struct helper *w) {
    unsigned c = atomic_load_explicit(&w->claimed, memory_order_acquire);
    while (c != atomic_load_explicit(&w->posted, memory_order_acquire)) {
        if (atomic_compare_exchange_weak_explicit(&w->claimed, &c, c + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            const unsigned s = c % SLOTS;
            w->fn[s](w->arg[s]);
            atomic_store_explicit(&w->busy[s], 0, memory_order_release);
            atomic_fetch_add_explicit(&w->finished, 1, memory_order_release);
            return 1;
        }
    }
    return 0;
}

static int idle(struct helper *w) {
    return atomic_load_explicit(&w->claimed, memory_order_acquire) ==
               atomic_load_explicit(&w->posted, memory_order_acquire) &&
           !atomic_load_explicit(&w->quit, memory_order_acquire);
}

static void *loop(void *p) {
    struct helper *w = p;
    for (;;) {
        const long long begun = now_us();
        while (idle(w)) {
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
            while (idle(w)) {
                w->sleeping = 1;
                pthread_cond_wait(&w->cv, &w->mu);
            }
            w->sleeping = 0;
            pthread_mutex_unlock(&w->mu);
        }
        if (atomic_load_explicit(&w->quit, memory_order_acquire)) return NULL;
        while (run_one(w)) {
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
    atomic_init(&w->claimed, 0);
    atomic_init(&w->finished, 0);
    atomic_init(&w->quit, 0);
    for (int s = 0; s < SLOTS; s++) atomic_init(&w->busy[s], 0);
    if (pthread_create(&w->thread, NULL, loop, w) != 0) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return NULL;
    }
    return w;
}

/* Post fn(arg) to the helper. Returns 0, or -1 if its slot still holds a call that has not
 * ended (nothing posted: run it yourself). Only one thread may post to a helper. Calls posted
 * together must not depend on each other: they may run in any order, on either thread. */
int helper_post(struct helper *w, job_fn fn, const void *arg) {
    const unsigned posted = atomic_load_explicit(&w->posted, memory_order_relaxed);
    const unsigned s = posted % SLOTS;
    if (atomic_load_explicit(&w->busy[s], memory_order_acquire)) return -1;
    w->fn[s] = fn;
    w->arg[s] = arg;
    atomic_store_explicit(&w->busy[s], 1, memory_order_relaxed);
    atomic_store_explicit(&w->posted, posted + 1, memory_order_release);
    wake(w);
    return 0;
}

/* Return once every posted call has ended. The caller runs the calls the helper has not taken
 * yet itself, so a helper kept off its core (a busy host) costs at most the call it is in. */
void helper_wait(struct helper *w) {
    const unsigned posted = atomic_load_explicit(&w->posted, memory_order_relaxed);
    unsigned spins = 0;
    while (atomic_load_explicit(&w->finished, memory_order_acquire) != posted) {
        if (run_one(w)) continue;
        if (++spins < 1u << 12)
            relax();
        else
            sched_yield(); /* the helper is in a call but off its core: let it run */
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
