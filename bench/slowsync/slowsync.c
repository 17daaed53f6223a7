/*
 * slowsync: an LD_PRELOAD shim that makes every fsync and fdatasync of the
 * process it is loaded into take at least SLOWSYNC_US microseconds (default
 * 3500: the disk the group-commit target was written for, measured
 * before the project started, "one fsync ≈ 3.5 ms": ../shared/FACTS.md,
 * outside this repository). The real call runs first; the shim then sleeps for
 * whatever is left of the delay, so the file is as durable as without it and
 * the caller blocks as it would on that slower disk.
 *
 * Used only by bench/run.sh, for the "kvdb strict, 3.5 ms fsync" contender:
 *   cc -shared -fPIC -O2 -o libslowsync.so slowsync.c -ldl
 *   LD_PRELOAD=$PWD/libslowsync.so kvdb serve ...
 * It prints one line to stderr when loaded, so a run can check it is active.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long delay_ns = 3500LL * 1000;

__attribute__((constructor)) static void slowsync_init(void) {
    const char *us = getenv("SLOWSYNC_US");
    if (us && *us) {
        delay_ns = atoll(us) * 1000;
    }
    fprintf(stderr, "slowsync: fsync and fdatasync take at least %lld us\n", delay_ns / 1000);
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Sleeps until `start` + delay_ns. */
static void wait_out(long long start) {
    long long left = start + delay_ns - now_ns();
    if (left <= 0) {
        return;
    }
    struct timespec t = {left / 1000000000LL, left % 1000000000LL};
    int saved = errno;
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
    errno = saved;
}

/* NAME(fd): the real call, then the rest of the delay. */
#define SLOW(NAME)                                                      \
    int NAME(int fd) {                                                  \
        static int (*real)(int);                                        \
        if (!real) {                                                    \
            real = (int (*)(int))dlsym(RTLD_NEXT, #NAME);               \
        }                                                               \
        long long start = now_ns();                                     \
        int result = real(fd);                                          \
        wait_out(start);                                                \
        return result;                                                  \
    }

SLOW(fsync)
SLOW(fdatasync)
