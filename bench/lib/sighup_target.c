/*
 * The "application" of the anchorage benchmarks: it waits for SIGHUP, and on
 * each one reads the bundle file and prints one line to stdout:
 *
 *     T_SIGNAL_NS T_READ_NS SET_ID N_CERTS SENDER_PID
 *
 * T_SIGNAL_NS is CLOCK_MONOTONIC when sigwaitinfo returned, T_READ_NS when the
 * whole file had been read and identified. SET_ID identifies the set of
 * certificates read, whatever their order or line wrapping: the sum (mod 2^64)
 * over the CERTIFICATE blocks of the FNV-1a 64 hash of each block's base64
 * text with whitespace removed (bench/lib/benchlib.py computes the same).
 * A missing or empty file reads as SET_ID 0, 0 certificates.
 *
 * usage: sighup_target BUNDLE PIDFILE    (SIGTERM or SIGINT ends it)
 *
 * The signals are blocked and taken with sigwaitinfo, so no handler runs:
 * this is the tightest reaction a real application could have. Standard
 * signals coalesce: two SIGHUPs that arrive while one read is in progress
 * count as one (a read takes microseconds).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char buf[64 << 20];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_id(const char *p, size_t n, uint64_t *id, int *count) {
    static const char begin[] = "-----BEGIN CERTIFICATE-----";
    static const char end[] = "-----END CERTIFICATE-----";
    uint64_t sum = 0;
    int c = 0;
    size_t i = 0;
    for (;;) {
        const char *b = memmem(p + i, n - i, begin, sizeof begin - 1);
        if (!b) break;
        size_t s = (size_t)(b - p) + sizeof begin - 1;
        const char *e = memmem(p + s, n - s, end, sizeof end - 1);
        if (!e) break;
        uint64_t h = 1469598103934665603ull;
        for (const char *q = p + s; q < e; q++) {
            unsigned char ch = (unsigned char)*q;
            if (ch == ' ' || ch == '\n' || ch == '\r' || ch == '\t') continue;
            h ^= ch;
            h *= 1099511628211ull;
        }
        sum += h;
        c++;
        i = (size_t)(e - p) + sizeof end - 1;
    }
    *id = sum;
    *count = c;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: sighup_target BUNDLE PIDFILE\n");
        return 2;
    }
    const char *bundle = argv[1], *pidfile = argv[2];
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL);

    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", pidfile);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0 || rename(tmp, pidfile) != 0) {
        perror(pidfile);
        return 1;
    }
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&set, &info);
        if (sig < 0) {
            if (errno == EINTR) continue;
            perror("sigwaitinfo");
            return 1;
        }
        if (sig != SIGHUP) break;
        uint64_t t1 = now_ns();
        size_t n = 0;
        int fd = open(bundle, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t r;
            while (n < sizeof buf && (r = read(fd, buf + n, sizeof buf - n)) > 0) n += (size_t)r;
            close(fd);
        }
        uint64_t id;
        int count;
        set_id(buf, n, &id, &count);
        uint64_t t2 = now_ns();
        dprintf(1, "%llu %llu %016llx %d %d\n", (unsigned long long)t1, (unsigned long long)t2,
                (unsigned long long)id, count, (int)info.si_pid);
    }
    unlink(pidfile);
    return 0;
}
