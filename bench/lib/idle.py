"""Driver of bench/idle.sh: what anchorage and its peers cost while nothing
happens, watching 10 kubelet-style Secret directories. See bench/README.md."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def size_mib(path):
    return os.path.getsize(path) / (1024.0 * 1024.0)


def stripped(path):
    """'yes'/'no' from the ELF section names (no .symtab = stripped)."""
    try:
        out = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return "no" if ".symtab" in out else "yes"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchorage", required=True)
    ap.add_argument("--target-cmd", required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--shm", required=True)
    ap.add_argument("--dirs", type=int, default=10)
    ap.add_argument("--idle-secs", type=float, default=60)
    ap.add_argument("--watchexec", default="")
    ap.add_argument("--baseline", default="", help="another anchorage binary, idling beside the current one")
    ap.add_argument("--static", default="", help="the same source built static (crt-static), as the image ships it")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for k in list(os.environ):
        if k.startswith("ANCHORAGE_"):
            del os.environ[k]
    pems = bl.read_pems(args.pool)
    target_cmd = args.target_cmd.split()
    hz = os.sysconf("SC_CLK_TCK")

    kinds = ["anchorage", "anchorage-static", "anchorage-baseline", "inotifywait", "watchexec", "entr"]
    if not args.watchexec:
        kinds.remove("watchexec")
    if not args.baseline:
        kinds.remove("anchorage-baseline")
    if not args.static:
        kinds.remove("anchorage-static")
    anchorage_bin = {"anchorage": args.anchorage, "anchorage-static": args.static,
                     "anchorage-baseline": args.baseline}
    tools = {}
    targets = {}
    logs = []
    try:
        for kind in kinds:
            base = os.path.join(args.shm, "idle-" + kind)
            dirs = []
            for i in range(args.dirs):
                d = os.path.join(base, "secrets", "s%02d" % (i + 1))
                bl.kubelet_write(d, {"ca.crt": pems[i % len(pems)]})
                dirs.append(d)
            out = os.path.join(base, "bundle.pem")
            pidfile = os.path.join(base, "app.pid")
            glob = base + "/secrets/s*/..data/*"
            log = open(os.path.join(base, "tool.log"), "wb")
            logs.append(log)
            target = bl.Target(target_cmd, out, pidfile)
            targets[kind] = (target, dirs)
            if kind in anchorage_bin:
                argv = [anchorage_bin[kind], "run", "--output", out, "--pid-file", pidfile, "--signal", "HUP"]
                for d in dirs:
                    argv += ["--source", d]
                tools[kind] = bl.Proc(kind, argv, env={"RUST_LOG": "warn"}, stderr=log)
            elif kind == "inotifywait":
                tools[kind] = bl.Proc(kind, bl.inotifywait_loop(dirs, glob, out, target.pid), stderr=log)
            elif kind == "watchexec":
                tools[kind] = bl.Proc(kind, bl.watchexec_cmd(args.watchexec, dirs, glob, out, target.pid),
                                      stderr=log)
            elif kind == "entr":
                tools[kind] = bl.Proc(kind, bl.entr_loop(glob, glob, out, target.pid), stderr=log)

        # Each tool passes one swap on (so it is fully up), then all settle.
        working = {}
        time.sleep(0.5)
        for kind in kinds:
            target, dirs = targets[kind]
            ok = False
            for attempt in range(10):
                content = pems[0] + pems[(args.dirs + attempt) % len(pems)]
                bl.kubelet_write(dirs[0], {"ca.crt": content})
                want = bl.set_id(b"".join(
                    [content] + [pems[i % len(pems)] for i in range(1, len(dirs))]))[0]
                if target.wait_for(want, 2.0, settle_s=0.3, hard_s=3.0):
                    ok = True
                    break
            working[kind] = ok
        time.sleep(3)

        pids = {k: bl.session_pids(tools[k].pid) for k in kinds}
        before = {k: bl.tree_snapshot(pids[k]) for k in kinds}
        for k in kinds:
            targets[k][0].poll(0)
        t0 = time.monotonic()
        t0_ns = bl.mono()
        print("idle window: %.0f s, %d watched directories per tool..." % (args.idle_secs, args.dirs),
              file=sys.stderr, flush=True)
        time.sleep(args.idle_secs)
        window = time.monotonic() - t0
        t1_ns = bl.mono()
        pids_after = {k: bl.session_pids(tools[k].pid) for k in kinds}
        after = {k: bl.tree_snapshot(pids_after[k]) for k in kinds}
        for k in kinds:
            targets[k][0].poll(0.05)
        in_window = {k: sum(1 for r in targets[k][0].records if t0_ns <= r[0] <= t1_ns) for k in kinds}
    finally:
        for p in tools.values():
            p.stop()
        for t, _ in targets.values():
            t.stop()
        for log in logs:
            log.close()

    delta = {k: bl.tree_delta(before[k], after[k]) for k in kinds}
    sh = shutil.which("sh")
    binaries = {
        "anchorage": [args.anchorage],
        "anchorage-static": [args.static],
        "anchorage-baseline": [args.baseline],
        "inotifywait": [shutil.which("inotifywait"), "/lib/x86_64-linux-gnu/libinotifytools.so.0", sh],
        "watchexec": [args.watchexec, sh],
        "entr": [shutil.which("entr"), sh],
    }

    def bin_total(k):
        return sum(os.path.getsize(os.path.realpath(b)) for b in binaries[k] if b and os.path.exists(b))

    labels = {
        "anchorage": "anchorage (1 bundle, %d sources)" % args.dirs,
        "anchorage-static": "anchorage static, as in the image (1 bundle, %d sources)" % args.dirs,
        "anchorage-baseline": "anchorage (baseline) (1 bundle, %d sources)" % args.dirs,
        "inotifywait": "inotifywait loop",
        "watchexec": "watchexec --debounce 0ms",
        "entr": "entr -d loop",
    }
    print()
    print("idle: %d kubelet-style Secret directories watched, %.1f s without any event "
          "(CPU ticks at %d Hz; all threads of the whole process tree)" % (args.dirs, window, hz))
    rows = []
    for k in kinds:
        d = delta[k]
        rows.append([
            labels[k] + ("" if working[k] else " [did not react]"),
            "%d/%d" % (len(after[k]["procs"]), len(after[k]["tasks"])),
            d["ticks"],
            "%.3f" % (d["sched_ns"] / 1e6),
            d["vcsw"],
            "%.2f" % (d["vcsw"] / window),
            d["ivcsw"],
            "%.1f" % (d["rss_kib"] / 1024.0),
            "%.1f" % (d["anon_kib"] / 1024.0),
            "%.2f" % size_mib(os.path.realpath(binaries[k][0])),
            "%.2f" % (bin_total(k) / 1048576.0),
        ])
    bl.table(["tool", "procs/threads", "CPU ticks", "sched ms", "wakeups", "wakeups/s",
              "invol cs", "RSS MiB", "anon MiB", "binary MiB", "all binaries MiB"], rows)
    print("(wakeups = voluntary context switches; anon = RssAnon, the private part of RSS; all binaries = the tool's programs and its own "
          "libraries, sh included for the shell loops, libc not)")
    print()
    print("binaries (ls -l size; stripped?):")
    seen = set()
    brow = []
    for k in kinds:
        for path in binaries[k]:
            if path and path not in seen and os.path.exists(path):
                seen.add(path)
                real = os.path.realpath(path)
                brow.append([path, os.path.getsize(real), "%.2f" % size_mib(real), stripped(real)])
    bl.table(["binary", "bytes", "MiB", "stripped"], brow)
    for k in kinds:
        d = delta[k]
        if in_window[k]:
            print("note: %s: the target got %d signal(s) during the idle window" % (labels[k], in_window[k]))
        if d["gone"] or d["new"]:
            print("note: %s: %d thread(s) ended and %d started during the window (an ended thread's "
                  "last moments are not counted)" % (labels[k], d["gone"], d["new"]))
    print()
    peers = [k for k in kinds if k not in anchorage_bin]

    def ratio(x, y):
        return "%.2f" % (x / y) if y else ("1.00 (both 0)" if x == 0 else "inf (peer 0)")

    out = []
    for who in [k for k in ("anchorage", "anchorage-static") if k in kinds]:
        for fig, get, fmt in (
            ("CPU ticks", lambda k: delta[k]["ticks"], "%d"),
            ("sched ms", lambda k: delta[k]["sched_ns"] / 1e6, "%.3f"),
            ("wakeups", lambda k: delta[k]["vcsw"], "%d"),
            ("RSS MiB", lambda k: delta[k]["rss_kib"] / 1024.0, "%.1f"),
            ("all binaries MiB", lambda k: bin_total(k) / 1048576.0, "%.2f"),
        ):
            best = min(peers, key=get)
            out.append([labels[who].split(" (")[0], fig, labels[best], fmt % get(who), fmt % get(best),
                        ratio(get(who), get(best))])
    print("ratio anchorage / best peer (the static build: glibc linked in, no shared libraries to map)")
    bl.table(["anchorage", "figure", "best peer", "anchorage", "peer", "ratio"], out)
    if "anchorage-baseline" in kinds:
        out = []
        for fig, get, fmt in (
            ("CPU ticks", lambda k: delta[k]["ticks"], "%d"),
            ("sched ms", lambda k: delta[k]["sched_ns"] / 1e6, "%.3f"),
            ("wakeups", lambda k: delta[k]["vcsw"], "%d"),
            ("RSS MiB", lambda k: delta[k]["rss_kib"] / 1024.0, "%.1f"),
            ("anon MiB", lambda k: delta[k]["anon_kib"] / 1024.0, "%.1f"),
            ("binary MiB", lambda k: bin_total(k) / 1048576.0, "%.2f"),
        ):
            cur, base = get("anchorage"), get("anchorage-baseline")
            out.append([fig, fmt % cur, fmt % base, ratio(cur, base)])
        print()
        print("ratio current / baseline (same window)")
        bl.table(["figure", "current", "baseline", "ratio"], out)

if __name__ == "__main__":
    main()
