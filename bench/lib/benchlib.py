"""Shared pieces of the anchorage benchmarks (bench/swap-latency.sh,
bench/idle.sh, bench/scale.sh): kubelet-style volume swaps, the SIGHUP
target, the peers' command lines, /proc accounting and table printing.

Only local files and local processes are used. Every process started here
runs in its own session and is ended by `Proc.stop` (SIGTERM, then SIGKILL
to its process group).

`python3 benchlib.py target BUNDLE PIDFILE` is the pure-python fallback of
sighup_target.c (used only when no C compiler is found; it adds latency).
"""

import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time

MARK_BEGIN = b"-----BEGIN CERTIFICATE-----"
MARK_END = b"-----END CERTIFICATE-----"
FNV_OFFSET = 1469598103934665603
FNV_PRIME = 1099511628211
MASK = (1 << 64) - 1
WS = frozenset(b" \n\r\t")


def set_id(data):
    """(id, count) of the certificates in PEM text: order- and
    wrapping-independent; identical to sighup_target.c."""
    total, count, i = 0, 0, 0
    while True:
        b = data.find(MARK_BEGIN, i)
        if b < 0:
            break
        s = b + len(MARK_BEGIN)
        e = data.find(MARK_END, s)
        if e < 0:
            break
        h = FNV_OFFSET
        for ch in data[s:e]:
            if ch in WS:
                continue
            h = ((h ^ ch) * FNV_PRIME) & MASK
        total = (total + h) & MASK
        count += 1
        i = e + len(MARK_END)
    return total, count


def mono():
    return time.monotonic_ns()


# --------------------------------------------------------------------------
# kubelet's AtomicWriter


def kubelet_write(vol, files):
    """Publishes `files` ({name: bytes}) in `vol` exactly as kubelet's
    AtomicWriter does. Returns (t_begin, t_rename): CLOCK_MONOTONIC ns just
    before the first filesystem change and right after the rename of
    ..data."""
    t_begin = mono()
    os.makedirs(vol, exist_ok=True)
    data = os.path.join(vol, "..data")
    try:
        old = os.readlink(data)
    except FileNotFoundError:
        old = None
    new = "..2026_11_23_10_00_00.%d" % time.time_ns()
    new_path = os.path.join(vol, new)
    os.mkdir(new_path, 0o755)
    for name, content in files.items():
        fd = os.open(os.path.join(new_path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
    tmp = os.path.join(vol, "..data_tmp")
    os.symlink(new, tmp)
    os.rename(tmp, data)
    t_rename = mono()
    for name in files:
        visible = os.path.join(vol, name)
        if not os.path.lexists(visible):
            os.symlink(os.path.join("..data", name), visible)
    for name in os.listdir(vol):
        # kubelet removes the visible links of keys that are gone
        if not name.startswith("..") and name not in files:
            os.unlink(os.path.join(vol, name))
    if old is not None and old != new:
        shutil.rmtree(os.path.join(vol, old))
    return t_begin, t_rename


# --------------------------------------------------------------------------
# processes


class Proc:
    """A process in its own session; `stop` ends it and its group."""

    def __init__(self, name, argv, env=None, stdout=subprocess.DEVNULL, stderr=None, cwd=None):
        self.name = name
        self.argv = argv
        self.t_spawn = mono()
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=5.0):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left in its group (shell loops, their children)
        try:
            os.killpg(self.pid, signal.SIGTERM)
            time.sleep(0.05)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.p.returncode


class Target:
    """The SIGHUP target: reads BUNDLE on each SIGHUP and reports
    (t_signal, t_read, set_id, count, sender)."""

    def __init__(self, target_cmd, bundle, pidfile):
        for p in (pidfile, pidfile + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = Proc("target", target_cmd + [bundle, pidfile], stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.fd = self.proc.p.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.records = []
        deadline = time.monotonic() + 10
        while not os.path.exists(pidfile):
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError("the SIGHUP target did not start")
            time.sleep(0.005)

    def poll(self, timeout):
        """Reads what the target reported, waiting up to `timeout` seconds
        for the first line; returns the new records."""
        new = []
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return new
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            f = line.split()
            if len(f) == 5:
                rec = (int(f[0]), int(f[1]), int(f[2], 16), int(f[3]), int(f[4]))
                new.append(rec)
                self.records.append(rec)
        return new

    def wait_for(self, want_id, timeout_s, settle_s=0.0, hard_s=None):
        """Waits until a record with `want_id` arrives (or `timeout_s`);
        then until `settle_s` passes with no record (bounded by `hard_s`
        from the call). Returns True if `want_id` was seen."""
        start = time.monotonic()
        hard = start + (hard_s if hard_s is not None else timeout_s + 1.0)
        seen = False
        last = None
        while True:
            now = time.monotonic()
            if not seen:
                left = start + timeout_s - now
                if left <= 0:
                    return False
            else:
                left = min(last + settle_s, hard) - now
                if left <= 0:
                    return True
            new = self.poll(left)
            if new:
                last = time.monotonic()
                if any(r[2] == want_id for r in new):
                    seen = True

    def stop(self):
        self.proc.stop()
        self.poll(0)


# --------------------------------------------------------------------------
# the peers: the same job (watch the volume directories, copy the bundle to
# the output, signal the target) done with common tools


def inotifywait_loop(dirs, cat_glob, out, pid, data_only=False, per_dir=False):
    """An inotifywait -m shell loop. `cat_glob` is what is concatenated to
    the output (a shell glob). data_only: react to the rename of ..data
    only. per_dir: write OUT/<dir name>.pem from the directory of the event
    (one bundle per directory)."""
    events = "moved_to" if data_only else "moved_to,create,close_write,delete"
    guard = '[ "$f" = ..data ] || continue; ' if data_only else ""
    if per_dir:
        job = 'n=${w%/}; n=${n##*/}; cat "$w"..data/* > "$OUT/$n.pem.tmp" && mv -f "$OUT/$n.pem.tmp" "$OUT/$n.pem" && kill -HUP "$PID"'
        fmt = "%w %e %f"
        read = "while read -r w e f; do "
    else:
        job = 'cat ' + cat_glob + ' > "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT" && kill -HUP "$PID"'
        fmt = "%e %f"
        read = "while read -r e f; do "
    script = (
        'OUT="$1"; PID="$2"; shift 2; '
        'inotifywait -m -e ' + events + " --format '" + fmt + "' \"$@\" | " + read + guard + job + "; done"
    )
    return ["sh", "-c", script, "inotifywait-loop", out, str(pid)] + list(dirs)


def watchexec_cmd(watchexec, dirs, cat_glob, out, pid, debounce="0ms"):
    """watchexec at its minimum debounce, not running at start."""
    job = "cat %s > %s.tmp && mv -f %s.tmp %s && kill -HUP %d" % (cat_glob, out, out, out, pid)
    argv = [watchexec]
    for d in dirs:
        argv += ["-W", d]
    argv += [
        "--debounce", debounce,
        "--postpone",
        "--ignore-nothing",
        "--no-meta",
        # the default, do-nothing, drops the rename of ..data when it comes
        # while the run for the swap's first event is still going
        "--on-busy-update", "queue",
        "--quiet",
        "--shell=none",
        "--",
        "sh", "-c", job,
    ]
    return argv


def entr_loop(files_glob, cat_glob, out, pid):
    """entr's restart loop: entr watches files (resolved through ..data when
    it starts), -d makes it also watch their directories and exit when a
    file is added there; the loop starts it again on the new paths."""
    job = 'cat %s > "$0.tmp" && mv -f "$0.tmp" "$0" && kill -HUP "$1"' % cat_glob
    script = (
        'OUT="$1"; PID="$2"; '
        "while :; do ls -d " + files_glob + ' | entr -n -d -p sh -c \'' + job + '\' "$OUT" "$PID"; sleep 0.01; done'
    )
    return ["sh", "-c", script, "entr-loop", out, str(pid)]


# --------------------------------------------------------------------------
# classifying what the target saw


def classify(records, swaps):
    """records: the target's (t_signal, t_read, id, n, sender); swaps:
    (t_begin, t_rename, want_id, previous_id). A swap's window runs from its
    t_begin to the next swap's. Returns latencies (ns, rename -> first read
    of the new set) and counts: missed (no read of the new set in the
    window), premature (reads of the previous set), extra (signals beyond
    the first), other (reads of neither set), signals."""
    recs = sorted(records)
    res = {"lat": [], "missed": 0, "premature": 0, "extra": 0, "other": 0, "signals": 0}
    for i, (t_begin, t_rename, want, prev) in enumerate(swaps):
        end = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        window = [r for r in recs if t_begin <= r[0] < end]
        good = [r for r in window if r[2] == want]
        res["signals"] += len(window)
        if good:
            res["lat"].append(good[0][1] - t_rename)
        else:
            res["missed"] += 1
        res["premature"] += sum(1 for r in window if r[2] == prev)
        res["other"] += sum(1 for r in window if r[2] not in (want, prev))
        res["extra"] += max(0, len(window) - 1)
    return res


# --------------------------------------------------------------------------
# /proc accounting


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _stat_fields(pid):
    text = _read("/proc/%d/stat" % pid)
    if text is None:
        return None
    # comm may hold spaces: split after the last ')'
    return text[text.rindex(")") + 2:].split()


def session_pids(sid):
    """Every process of session `sid` (a Proc's tree: it leads its session)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        # fields after comm: state ppid pgrp session ...
        if f is not None and int(f[3]) == sid:
            pids.append(int(name))
    return sorted(pids)


def proc_sample(pids):
    """Summed over `pids` and all their threads: CPU ticks (utime+stime),
    schedstat run time (ns), voluntary and involuntary context switches,
    RSS (KiB)."""
    ticks = sched = vol = invol = rss = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is None:
            continue
        ticks += int(f[11]) + int(f[12])
        status = _read("/proc/%d/status" % pid) or ""
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except FileNotFoundError:
            continue
        for tid in tids:
            s = _read("/proc/%d/task/%s/schedstat" % (pid, tid))
            if s:
                sched += int(s.split()[0])
            st = _read("/proc/%d/task/%s/status" % (pid, tid)) or ""
            for line in st.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return {"ticks": ticks, "sched_ns": sched, "vcsw": vol, "ivcsw": invol, "rss_kib": rss}


def tree_snapshot(pids):
    """Per process CPU ticks and per thread (schedstat ns, voluntary and
    involuntary context switches), plus the summed RSS (KiB)."""
    procs, tasks, rss, anon = {}, {}, 0, 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is None:
            continue
        procs[pid] = int(f[11]) + int(f[12])
        for line in (_read("/proc/%d/status" % pid) or "").splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except FileNotFoundError:
            continue
        for tid in tids:
            sched = vol = invol = 0
            s = _read("/proc/%d/task/%s/schedstat" % (pid, tid))
            if s:
                sched = int(s.split()[0])
            for line in (_read("/proc/%d/task/%s/status" % (pid, tid)) or "").splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol = int(line.split()[1])
            tasks[(pid, tid)] = (sched, vol, invol)
    return {"procs": procs, "tasks": tasks, "rss_kib": rss, "anon_kib": anon}


def tree_delta(before, after):
    """What the tree consumed between two snapshots: processes and threads
    present at the end count from their value at the start (or from 0 if
    they are new); those that vanished are counted in `gone` (their last
    moments are not seen)."""
    ticks = sum(v - before["procs"].get(p, 0) for p, v in after["procs"].items())
    sched = vol = invol = 0
    for t, (s, v, i) in after["tasks"].items():
        s0, v0, i0 = before["tasks"].get(t, (0, 0, 0))
        sched += s - s0
        vol += v - v0
        invol += i - i0
    gone = len(set(before["tasks"]) - set(after["tasks"]))
    new = len(set(after["tasks"]) - set(before["tasks"]))
    return {"ticks": ticks, "sched_ns": sched, "vcsw": vol, "ivcsw": invol, "gone": gone, "new": new,
            "rss_kib": after["rss_kib"], "anon_kib": after["anon_kib"]}


def rss_mib(pids):
    return proc_sample(pids)["rss_kib"] / 1024.0


# --------------------------------------------------------------------------
# figures


def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def median(values):
    return statistics.median(values) if values else float("nan")


def fmt_ms(ns):
    if ns != ns:  # nan
        return "-"
    return "%.2f" % (ns / 1e6)


def table(headers, rows, out=sys.stdout):
    """A plain aligned table: first column left, the others right."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            parts.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)
    out.flush()


def read_pems(pool_dir, n=None):
    names = sorted(x for x in os.listdir(pool_dir) if x.endswith(".pem"))
    if n is not None:
        names = names[:n]
    out = []
    for name in names:
        with open(os.path.join(pool_dir, name), "rb") as f:
            out.append(f.read())
    return out


def _fallback_target(bundle, pidfile):
    sigs = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    with open(pidfile + ".tmp", "w") as f:
        f.write("%d\n" % os.getpid())
    os.rename(pidfile + ".tmp", pidfile)
    while True:
        info = signal.sigwaitinfo(sigs)
        if info.si_signo != signal.SIGHUP:
            break
        t1 = mono()
        try:
            with open(bundle, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        sid, n = set_id(data)
        t2 = mono()
        os.write(1, b"%d %d %016x %d %d\n" % (t1, t2, sid, n, info.si_pid))
    try:
        os.unlink(pidfile)
    except OSError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "target":
        _fallback_target(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: benchlib.py target BUNDLE PIDFILE")
