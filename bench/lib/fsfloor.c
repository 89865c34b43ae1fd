/*
 * The kernel's floor for the file work of a render, with nothing else:
 *
 *   fsfloor read DIR            open, read and close every file of DIR
 *                               (what reading N sources costs at least)
 *   fsfloor create DIR SRC      create DIR, then in it one file per file of
 *                               SRC with the same bytes (read beforehand,
 *                               not timed), then syncfs: the file work of an
 *                               N-certificate hashed directory
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

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "read") == 0) {
        static char buf[65536];
        double t0 = now_ms();
        DIR *d = opendir(argv[2]);
        if (!d)
            die(argv[2]);
        struct dirent *e;
        long total = 0;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                die(e->d_name);
            ssize_t r;
            while ((r = read(fd, buf, sizeof buf)) > 0)
                total += r;
            close(fd);
        }
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
    fprintf(stderr, "usage: fsfloor read DIR | fsfloor create DIR SRC\n");
    return 2;
}
