/*
 * The kernel's floor for the file work of a render, with nothing else:
 *
 *   fsfloor read DIR            open, read and close every file of DIR
 *                               (what reading N sources costs at least)
 *   fsfloor create DIR SRC      create DIR, then in it one file per file of
 *                               SRC with the same bytes (read beforehand,
 *                               not timed), then syncfs: the file work of an
 *                               N-certificate hashed directory
 *   fsfloor publish VOLS OUT    for each kubelet volume in VOLS (a directory
 *                               of volumes, each with a `..data` link):
 *                               read `..data`, list and read its files,
 *                               read `..data` again, then publish their bytes
 *                               as OUT/<volume>.pem the durable way: a
 *                               temporary file written, fsynced and renamed,
 *                               and OUT fsynced. One thread: the file work of
 *                               a start of N one-volume bundles
 *   fsfloor start VOLS OUT T    the whole of such a start with nothing of
 *                               anchorage's own: an inotify watch on VOLS and
 *                               on each volume, then `publish`'s work for
 *                               every volume on T threads taking volumes in
 *                               turn. Prints the milliseconds until the
 *                               watches were set, then until all was done
 *
 * Each prints the milliseconds of the timed part on stdout. Used by
 * bench/render.sh as floor rows; it is not a tool.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

struct file {
    char name[256];
    char *bytes;
    ssize_t len;
};

static int load(const char *dir, struct file **out, int slurp)
{
    DIR *d = opendir(dir);
    if (!d)
        die(dir);
    int cap = 1024, n = 0;
    struct file *files = malloc(cap * sizeof *files);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap)
            files = realloc(files, (cap *= 2) * sizeof *files);
        snprintf(files[n].name, sizeof files[n].name, "%s", e->d_name);
        files[n].bytes = NULL;
        files[n].len = 0;
        if (slurp) {
            int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                die(e->d_name);
            files[n].bytes = malloc(65536);
            files[n].len = read(fd, files[n].bytes, 65536);
            if (files[n].len < 0)
                die("read");
            close(fd);
        }
        n++;
    }
    closedir(d);
    *out = files;
    return n;
}

/* Opens and reads every file of `d` (dot-files skipped) into `buf`: one
 * after the other when `append` is set (at most `cap` bytes in all), else
 * each over the same bytes. Returns the bytes read. */
static long read_files(DIR *d, char *buf, size_t cap, int append)
{
    long total = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(e->d_name);
        ssize_t r;
        size_t at = append ? (size_t)total : 0;
        while ((r = read(fd, buf + at, cap - at)) > 0) {
            total += r;
            if (append)
                at += r;
        }
        close(fd);
    }
    return total;
}

/* `publish`'s work for one volume: VOLS/NAME read through `..data`, its
 * files' bytes published as OUT/NAME.pem the durable way. */
static void publish_one(const char *vols, const char *outdir, const char *name, char *buf,
                        size_t cap)
{
    char link[4096], again[4096], path[8192], tmp[8192], out[8192];
    snprintf(path, sizeof path, "%s/%s/..data", vols, name);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0)
        die(path);
    link[l] = 0;
    snprintf(path, sizeof path, "%s/%s/%s", vols, name, link);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        die(path);
    DIR *d = fdopendir(dfd);
    if (!d)
        die(path);
    size_t len = (size_t)read_files(d, buf, cap, 1);
    closedir(d);
    snprintf(path, sizeof path, "%s/%s/..data", vols, name);
    l = readlink(path, again, sizeof again - 1);
    if (l < 0)
        die(path);
    snprintf(out, sizeof out, "%s/%s.pem", outdir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.pem.tmp", outdir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        die(tmp);
    if (write(fd, buf, len) != (ssize_t)len)
        die("write");
    if (fsync(fd) < 0)
        die("fsync");
    close(fd);
    if (rename(tmp, out) < 0)
        die(out);
    int od = open(outdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (od < 0 || fsync(od) < 0)
        die(outdir);
    close(od);
}

struct start {
    const char *vols, *out;
    struct file *names;
    int n;
    atomic_int next;
};

static void *start_worker(void *arg)
{
    struct start *st = arg;
    char *buf = malloc(65536);
    int i;
    while ((i = atomic_fetch_add(&st->next, 1)) < st->n)
        publish_one(st->vols, st->out, st->names[i].name, buf, 65536);
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "read") == 0) {
        static char buf[65536];
        double t0 = now_ms();
        DIR *d = opendir(argv[2]);
        if (!d)
            die(argv[2]);
        long total = read_files(d, buf, sizeof buf, 0);
        closedir(d);
        printf("%.3f\n", now_ms() - t0);
        return total > 0 ? 0 : 1;
    }
    if (argc == 4 && strcmp(argv[1], "create") == 0) {
        struct file *files;
        int n = load(argv[3], &files, 1);
        double t0 = now_ms();
        if (mkdir(argv[2], 0755) < 0)
            die(argv[2]);
        int dfd = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
            die(argv[2]);
        for (int i = 0; i < n; i++) {
            int fd = openat(dfd, files[i].name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
            if (fd < 0)
                die(files[i].name);
            if (write(fd, files[i].bytes, files[i].len) != files[i].len)
                die("write");
            close(fd);
        }
        if (syncfs(dfd) < 0)
            die("syncfs");
        close(dfd);
        printf("%.3f\n", now_ms() - t0);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "publish") == 0) {
        static char buf[65536];
        struct file *vols;
        int n = load(argv[2], &vols, 0);
        double t0 = now_ms();
        for (int i = 0; i < n; i++)
            publish_one(argv[2], argv[3], vols[i].name, buf, sizeof buf);
        printf("%.3f\n", now_ms() - t0);
        return n > 0 ? 0 : 1;
    }
    if (argc == 5 && strcmp(argv[1], "start") == 0) {
        struct start st = {.vols = argv[2], .out = argv[3]};
        st.n = load(argv[2], &st.names, 0);
        int threads = atoi(argv[4]);
        if (threads < 1 || threads > 64)
            threads = 1;
        double t0 = now_ms();
        int fd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
        if (fd < 0)
            die("inotify_init1");
        uint32_t mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE |
                        IN_DELETE_SELF | IN_MOVE_SELF;
        char path[8192];
        if (inotify_add_watch(fd, argv[2], mask) < 0)
            die(argv[2]);
        for (int i = 0; i < st.n; i++) {
            snprintf(path, sizeof path, "%s/%s", argv[2], st.names[i].name);
            if (inotify_add_watch(fd, path, mask) < 0)
                die(path);
        }
        double watched = now_ms() - t0;
        pthread_t tids[64];
        for (int k = 0; k < threads; k++)
            if (pthread_create(&tids[k], NULL, start_worker, &st) != 0)
                die("pthread_create");
        for (int k = 0; k < threads; k++)
            pthread_join(tids[k], NULL);
        printf("%.3f %.3f\n", watched, now_ms() - t0);
        close(fd);
        return st.n > 0 ? 0 : 1;
    }
    fprintf(stderr, "usage: fsfloor read DIR | fsfloor create DIR SRC | fsfloor publish VOLS OUT | "
                    "fsfloor start VOLS OUT THREADS\n");
    return 2;
}
