"""Driver of bench/scale.sh: 1,000 watched kubelet-style Secret directories.
Start-up time, RSS and swap latency for anchorage ((a) one bundle with 1,000
sources, (b) 1,000 bundles) and its peers. See bench/README.md."""

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d+)Z")
WATCHING = re.compile(r"watching directories=(\d+)")


def wall_ns(line):
    """The wall-clock ns of a tracing log line, or None."""
    m = TS.match(line)
    if not m:
        return None
    dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    frac = (m.group(2) + "000000000")[:9]
    return int(dt.timestamp()) * 1_000_000_000 + int(frac)


class Lines(threading.Thread):
    """Reads a stream line by line, noting when each line arrived."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines = []  # (monotonic ns, text)
        # Sorted as they arrive, so waiting for the start scans nothing: a
        # poll over every line so far would take the CPU (and with a slow
        # reader, the pipe's room) from the tool being timed.
        self.watching = []  # texts of the "watching" lines
        self.rendered = []  # texts of the render lines

    def run(self):
        for raw in iter(self.stream.readline, b""):
            text = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            self.lines.append((bl.mono(), text))
            if " rendered " in text or "::daemon: rendered" in text:
                self.rendered.append(text)
            elif WATCHING.search(text):
                self.watching.append(text)


class Row:
    def __init__(self, label, job=None, baseline=False):
        self.label = label
        self.job = job  # anchorage: "a" or "b"
        self.baseline = baseline
        self.watches = "-"
        self.setup = []  # ms until the watches are set
        self.ready = []  # ms until the first render is done (anchorage) / ready
        self.rss = []
        self.cpu = []  # CPU ms (all threads, all processes) spent by the time it was ready
        self.res = None
        self.note = ""
        self.renders = "-"  # anchorage: bundle renders logged per swap
        self.warnings = 0
        self.first_warning = ""
        self.failed = False  # did not get ready: no more starts
        self.seconds = 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchorage", required=True)
    ap.add_argument("--target-cmd", required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--shm", required=True)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--watchexec", default="")
    ap.add_argument("--baseline", default="", help="another anchorage binary, measured beside the current one")
    ap.add_argument("--static", default="", help="the same anchorage, built static as the image ships it")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for k in list(os.environ):
        if k.startswith("ANCHORAGE_"):
            del os.environ[k]
    target_cmd = args.target_cmd.split()
    pems = bl.read_pems(args.pool)
    n = args.dirs
    if len(pems) < n + 8:
        sys.exit("the pool needs %d CAs" % (n + 8))
    extras = pems[n:n + 8]

    vols = os.path.join(args.shm, "vols")
    names = ["v%04d" % (i + 1) for i in range(n)]
    dirs = [os.path.join(vols, x) for x in names]
    t0 = time.monotonic()
    for i, d in enumerate(dirs):
        bl.kubelet_write(d, {"ca.crt": pems[i]})
    print("  laid out %d kubelet-style directories in %.1f s" % (n, time.monotonic() - t0), file=sys.stderr)
    dir_ids = [bl.set_id(pems[i])[0] for i in range(n)]
    state = {"k": 0}
    hot = n // 2  # the directory the swaps happen in (v0500 of 1,000)

    def total():
        return sum(dir_ids) & bl.MASK

    def swap(i, kill_pid=None):
        """A kubelet swap in dirs[i] to a content different from the last;
        returns (t_begin, t_rename, (total before, total after),
        (dir before, dir after))."""
        state["k"] += 1
        k = state["k"]
        content = pems[i] + extras[k % len(extras)] if k % 2 else pems[i]
        before_total, before_dir = total(), dir_ids[i]
        t_begin, t_rename = bl.kubelet_write(dirs[i], {"ca.crt": content})
        if kill_pid:
            os.kill(kill_pid, signal.SIGHUP)
        dir_ids[i] = bl.set_id(content)[0]
        return t_begin, t_rename, (total(), before_total), (dir_ids[i], before_dir)

    out_dir = os.path.join(args.shm, "out")
    os.makedirs(out_dir)
    pidfile = os.path.join(args.shm, "app.pid")
    all_out = os.path.join(out_dir, "all.pem")
    hot_out = os.path.join(out_dir, names[hot] + ".pem")

    config = os.path.join(args.shm, "bundles.toml")
    with open(config, "w") as f:
        f.write('[daemon]\ndebounce = "0s"\n\n')
        for name, d in zip(names, dirs):
            f.write('[[bundle]]\nname = "%s"\nsources = ["%s"]\n'
                    '  [[bundle.output]]\n  path = "%s"\n'
                    '  [[bundle.reload]]\n  signal = "HUP"\n  pid_file = "%s"\n\n'
                    % (name, d, os.path.join(out_dir, name + ".pem"), pidfile))

    glob_all = vols + "/v*/..data/*"

    # ---- anchorage
    def anchorage_a(binary):
        def make(tpid):
            argv = [binary, "run", "--output", all_out, "--pid-file", pidfile, "--signal", "HUP",
                    "--debounce", "0"]
            for d in dirs:
                argv += ["--source", d]
            return argv
        return make

    def anchorage_b(binary):
        return lambda tpid: [binary, "run", "--config", config]

    # The starts go round the rows (start 1 of every row, then start 2, ...)
    # and the swaps are measured in the last round: the current binary, the
    # static build and the baseline see the machine in the same minutes,
    # and a busy minute falls on every row alike.
    specs = []
    for job, make, what, bundle_path, which, renders in (
            ("a", anchorage_a, "(a) 1 bundle x %d sources" % n, all_out, "total", 1),
            ("b", anchorage_b, "(b) %d bundles" % n, hot_out, "dir", n)):
        specs.append(("anchorage " + what, "anchorage", make(args.anchorage), bundle_path, which, renders,
                      job, False))
        if args.static:
            specs.append(("anchorage static " + what, "anchorage", make(args.static), bundle_path, which,
                          renders, job, False))
        if args.baseline:
            specs.append(("anchorage (baseline) " + what, "anchorage", make(args.baseline), bundle_path, which,
                          renders, job, True))
    specs += [
        ("inotifywait loop, cat all", "inotifywait",
         lambda tpid: bl.inotifywait_loop(dirs, glob_all, all_out, tpid), all_out, "total", 0,
         None, False),
        ("inotifywait loop, per-dir output", "inotifywait",
         lambda tpid: bl.inotifywait_loop(dirs, None, out_dir, tpid, per_dir=True), hot_out, "dir", 0,
         None, False),
    ]
    if args.watchexec:
        specs.append(("watchexec --debounce 0ms, cat all", "watchexec",
                      lambda tpid: bl.watchexec_cmd(args.watchexec, dirs, glob_all, all_out, tpid),
                      all_out, "total", 0, None, False))
    specs.append(("floor: driver signals", "floor", None, os.path.join(dirs[hot], "ca.crt"), "dir", 0, None,
                  False))

    rows = [Row(spec[0], spec[6], spec[7]) for spec in specs]
    for s in range(args.starts):
        last = s == args.starts - 1
        for row, (label, kind, make, bundle_path, which, renders, job, baseline) in zip(rows, specs):
            if row.failed or (kind == "floor" and not last):
                continue
            t_row = time.monotonic()
            for x in os.listdir(out_dir):
                os.unlink(os.path.join(out_dir, x))
            target = bl.Target(target_cmd, bundle_path, pidfile)
            tool = None
            lines = None
            try:
                if kind != "floor":
                    spawn_wall = time.time_ns()
                    spawn_mono = bl.mono()
                    tool = bl.Proc(label, make(target.pid), env={"RUST_LOG": "info"} if kind == "anchorage" else None,
                                   stderr=subprocess.PIPE)
                    lines = Lines(tool.p.stderr)
                    lines.start()
                    ok = wait_ready(row, kind, tool, lines, spawn_wall, spawn_mono, renders, dirs, swap,
                                    target, which)
                    if not ok:
                        row.note = row.note or "did not get ready within 120 s"
                        row.failed = True
                        continue
                    row.cpu.append(bl.proc_sample(bl.session_pids(tool.pid))["sched_ns"] / 1e6)
                    time.sleep(1.0)
                    row.rss.append(bl.rss_mib(bl.session_pids(tool.pid)))
                if not last:
                    continue
                # swap latency, in the hot directory
                time.sleep(0.3)
                target.poll(0)
                n_lines = len(lines.lines) if lines is not None else 0
                swaps = []
                for _ in range(args.swaps):
                    target.poll(0)
                    t_begin, t_rename, tot, dirid = swap(hot, target.pid if kind == "floor" else None)
                    want, prev = tot if which == "total" else dirid
                    target.wait_for(want, 5.0, settle_s=0.1, hard_s=6.0)
                    swaps.append((t_begin, t_rename, want, prev))
                time.sleep(0.2)
                target.poll(0)
                row.res = bl.classify(target.records, swaps)
                if kind == "anchorage":
                    rendered = sum(1 for _, t in lines.lines[n_lines:] if " rendered " in t)
                    row.renders = "%.0f" % (rendered / max(1, len(swaps)))
            finally:
                if tool is not None:
                    rc = tool.stop()
                    if kind == "anchorage" and rc not in (0, None):
                        row.note = "anchorage exited %s on SIGTERM" % rc
                target.stop()
            if lines is not None:
                lines.join(2)
                errors = [t for _, t in lines.lines if " ERROR " in t or " WARN " in t]
                if errors:
                    row.warnings += len(errors)
                    row.first_warning = row.first_warning or errors[0]
            row.seconds += time.monotonic() - t_row
        print("  round %d of %d done" % (s + 1, args.starts), file=sys.stderr, flush=True)
    for row in rows:
        print("  %-40s %5.1fs" % (row.label, row.seconds), file=sys.stderr, flush=True)

    print()
    print("scale: %d kubelet-style Secret directories (volumes on tmpfs, outputs on tmpfs); start-up "
          "medians of %d starts; swap latency over %d swaps in %s (--debounce 0)"
          % (n, args.starts, args.swaps, names[hot]))
    table_rows = []
    for r in rows:
        res = r.res or {"lat": [], "missed": "-", "premature": "-", "extra": "-"}
        lat = res["lat"]
        table_rows.append([
            r.label, r.watches,
            "%.0f" % bl.median(r.setup) if r.setup else "-",
            "%.0f" % bl.median(r.ready) if r.ready else "-",
            "%.0f" % bl.median(r.cpu) if r.cpu else "-",
            "%.1f" % bl.median(r.rss) if r.rss else "-",
            bl.fmt_ms(bl.median(lat)) if lat else "-",
            bl.fmt_ms(bl.pct(lat, 99)) if lat else "-",
            bl.fmt_ms(max(lat)) if lat else "-",
            res["missed"], res["premature"], res["extra"], r.renders,
        ])
    # The p99 of fewer than 100 swaps is their max: swaps=200 or more
    # separates them.
    bl.table(["run", "watches", "watches set ms", "ready ms", "CPU ms", "RSS MiB", "swap p50 ms", "swap p99 ms",
              "swap max ms", "missed", "premature", "extra", "renders/swap"], table_rows)
    for r in rows:
        if r.setup and len(r.setup) > 1:
            print("  %s: watches set in %s ms; ready in %s ms" % (
                r.label, ", ".join("%.0f" % x for x in r.setup), ", ".join("%.0f" % x for x in r.ready)))
    for r in rows:
        if r.note:
            print("note: %s: %s" % (r.label, r.note))
        if r.warnings:
            print("note: %s: %d WARN/ERROR log line(s) over its %d start(s) and %d swaps; the first:\n  %s"
                  % (r.label, r.warnings, args.starts, args.swaps, r.first_warning[:400]))
    print("watches set: anchorage: its 'watching directories=N' log line; inotifywait: 'Watches "
          "established.'; watchexec (which says nothing): the first probe swap it passed on in each of "
          "the first, middle and last directory (an upper bound, probes every ~50 ms). ready: anchorage: "
          "its last 'rendered' line of the first render; the peers render nothing at start. CPU ms: "
          "the run time of every thread of the tool's processes (schedstat) when it was seen ready: "
          "on this machine's cores, ready can come no sooner than about CPU ms / cores. "
          "renders/swap: anchorage's 'rendered' log lines (one per bundle rendered) per swap, at the "
          "default log level (info).")
    print()
    # (a) is compared with the peers that write one bundle of everything,
    # (b) with the peer that writes one output per directory
    peers = [r for r in rows if not r.label.startswith(("anchorage", "floor"))]
    mine = [r for r in rows if r.job and not r.baseline]
    out = []
    for a in mine:
        job = "per-dir" if a.job == "b" else "cat all"
        peers_a = [p for p in peers if job in p.label]
        for fig, get in (("watches set ms", lambda r: bl.median(r.setup) if r.setup else None),
                         ("ready ms (peers: watches set)", lambda r: bl.median(r.ready) if r.ready else None),
                         ("RSS MiB", lambda r: bl.median(r.rss) if r.rss else None),
                         ("swap p50 ms", lambda r: bl.median(r.res["lat"]) if r.res and r.res["lat"] else None)):
            cands = [(get(p), p) for p in peers_a if get(p) is not None]
            va = get(a)
            if not cands or va is None:
                continue
            vb, best = min(cands, key=lambda c: c[0])
            scale = 1e6 if fig.startswith("swap") else 1
            out.append([a.label, fig, best.label, "%.2f" % (va / scale), "%.2f" % (vb / scale),
                        "%.2f" % (va / vb) if vb else "-"])
    if out:
        print("ratio anchorage / best peer")
        bl.table(["anchorage", "figure", "best peer", "anchorage", "peer", "ratio"], out)
    out = []
    for b in (r for r in rows if r.baseline):
        cur = [r for r in mine if r.job == b.job]
        if not cur:
            continue
        a = cur[0]
        for fig, get, scale in (
                ("watches set ms", lambda r: bl.median(r.setup) if r.setup else None, 1),
                ("ready ms", lambda r: bl.median(r.ready) if r.ready else None, 1),
                ("CPU ms to ready", lambda r: bl.median(r.cpu) if r.cpu else None, 1),
                ("RSS MiB", lambda r: bl.median(r.rss) if r.rss else None, 1),
                ("swap p50 ms", lambda r: bl.median(r.res["lat"]) if r.res and r.res["lat"] else None, 1e6),
                ("swap p99 ms", lambda r: bl.pct(r.res["lat"], 99) if r.res and r.res["lat"] else None, 1e6),
                ("swap max ms", lambda r: max(r.res["lat"]) if r.res and r.res["lat"] else None, 1e6)):
            va, vb = get(a), get(b)
            if va is None or vb is None:
                continue
            out.append([a.label, fig, "%.2f" % (va / scale), "%.2f" % (vb / scale),
                        "%.2f" % (va / vb) if vb else "-"])
    if out:
        print()
        print("ratio current / baseline (same run, same settings)")
        bl.table(["anchorage", "figure", "current", "baseline", "ratio"], out)


def wait_ready(row, kind, tool, lines, spawn_wall, spawn_mono, renders, dirs, swap, target, which):
    deadline = time.monotonic() + 120
    if kind == "anchorage":
        while time.monotonic() < deadline and tool.alive():
            watching = lines.watching
            rendered = lines.rendered
            if watching and len(rendered) >= renders:
                row.watches = WATCHING.search(watching[0]).group(1)
                row.setup.append((wall_ns(watching[0]) - spawn_wall) / 1e6)
                row.ready.append((wall_ns(rendered[renders - 1]) - spawn_wall) / 1e6)
                return True
            time.sleep(0.005)
        return False
    if kind == "inotifywait":
        while time.monotonic() < deadline and tool.alive():
            est = [m for m, t in lines.lines if "Watches established" in t]
            if est:
                row.watches = str(len(dirs))
                ms = (est[0] - spawn_mono) / 1e6
                row.setup.append(ms)
                row.ready.append(ms)
                return True
            time.sleep(0.001)
        return False
    if kind == "watchexec":
        # No message says the watches are set: probe the first, middle and
        # last directories until each change is passed on.
        probe = [0, len(dirs) // 2 - 1, len(dirs) - 1]
        seen = set()
        while time.monotonic() < deadline and tool.alive() and len(seen) < len(probe):
            for i in probe:
                if i in seen:
                    continue
                t_begin, t_rename, tot, dirid = swap(i)
                want = tot[0] if which == "total" else dirid[0]
                if target.wait_for(want, 0.05, settle_s=0.0, hard_s=0.2):
                    seen.add(i)
                    done = t_begin
        if len(seen) < len(probe):
            return False
        row.watches = str(len(dirs))
        ms = (done - spawn_mono) / 1e6
        row.setup.append(ms)
        row.ready.append(ms)
        # let the probes' queued runs finish
        target.wait_for(-1, 0.5)
        return True
    return False


if __name__ == "__main__":
    main()
