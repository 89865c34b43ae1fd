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
 *
 * Each prints the milliseconds of the timed part on stdout. Used by
 * bench/render.sh as floor rows; it is not a tool.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        char link[4096], again[4096], path[8192], tmp[8192], out[8192];
        struct file *vols;
        int n = load(argv[2], &vols, 0);
        double t0 = now_ms();
        for (int i = 0; i < n; i++) {
            snprintf(path, sizeof path, "%s/%s/..data", argv[2], vols[i].name);
            ssize_t l = readlink(path, link, sizeof link - 1);
            if (l < 0)
                die(path);
            link[l] = 0;
            snprintf(path, sizeof path, "%s/%s/%s", argv[2], vols[i].name, link);
            int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd < 0)
                die(path);
            DIR *d = fdopendir(dfd);
            if (!d)
                die(path);
            size_t len = (size_t)read_files(d, buf, sizeof buf, 1);
            closedir(d);
            snprintf(path, sizeof path, "%s/%s/..data", argv[2], vols[i].name);
            l = readlink(path, again, sizeof again - 1);
            if (l < 0)
                die(path);
            snprintf(out, sizeof out, "%s/%s.pem", argv[3], vols[i].name);
            snprintf(tmp, sizeof tmp, "%s/.%s.pem.tmp", argv[3], vols[i].name);
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
            int od = open(argv[3], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (od < 0 || fsync(od) < 0)
                die(argv[3]);
            close(od);
        }
        printf("%.3f\n", now_ms() - t0);
        return n > 0 ? 0 : 1;
    }
    fprintf(stderr, "usage: fsfloor read DIR | fsfloor create DIR SRC | fsfloor publish VOLS OUT\n");
    return 2;
}
