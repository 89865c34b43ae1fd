"""Driver of bench/swap-latency.sh: kubelet swaps -> SIGHUP latency for
anchorage and its peers. See bench/README.md."""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

POOL = 12  # CAs in the rotation
PER_SET = 3  # CAs per set: set k = pool[k .. k+2], so consecutive sets differ


def sets_from(pems):
    def content(k):
        return b"".join(pems[(k + j) % len(pems)] for j in range(PER_SET))

    return content


class Run:
    def __init__(self, label, kind, medium, debounce=None, binary=None, baseline=False):
        self.label, self.kind, self.medium, self.debounce = label, kind, medium, debounce
        self.binary, self.baseline = binary, baseline
        self.lat = []
        self.missed = self.premature = self.extra = self.other = self.signals = 0
        self.swaps = 0
        self.note = ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchorage", required=True)
    ap.add_argument("--target-cmd", required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--shm", required=True)
    ap.add_argument("--disk", required=True)
    ap.add_argument("--swaps", type=int, default=200)
    ap.add_argument("--media", default="shm disk")
    ap.add_argument("--watchexec", default="")
    ap.add_argument("--baseline", default="", help="another anchorage binary, measured beside the current one")
    ap.add_argument("--wait-ms", type=float, default=500)
    ap.add_argument("--settle-ms", type=float, default=40)
    ap.add_argument("--stress-swaps", type=int, default=1000)
    ap.add_argument("--stress-gap-ms", type=float, default=3)
    ap.add_argument("--only", default="", help="comma-separated run kinds (debugging)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for k in list(os.environ):
        if k.startswith("ANCHORAGE_"):
            del os.environ[k]

    pems = bl.read_pems(args.pool, POOL)
    content = sets_from(pems)
    ids = {}

    def sid(k):
        if k not in ids:
            ids[k] = bl.set_id(content(k))[0]
        return ids[k]

    media = args.media.split()
    runs = [Run("floor: driver signals", "floor", "-")]
    # The baseline's rows follow the current binary's, same settings, so
    # both see the machine in the same minutes.
    for debounce, what in (("0", "--debounce 0"), (None, "(default 200ms)")):
        for m in media:
            runs.append(Run("anchorage " + what, "anchorage", m, debounce, args.anchorage))
            if args.baseline:
                runs.append(Run("anchorage (baseline) " + what, "anchorage", m, debounce, args.baseline, True))
    for m in media:
        runs.append(Run("inotifywait loop", "inotifywait", m))
    for m in media:
        runs.append(Run("inotifywait loop, ..data only", "inotifywait-data", m))
    for m in media:
        if args.watchexec:
            runs.append(Run("watchexec --debounce 0ms", "watchexec", m))
    for m in media:
        runs.append(Run("entr -d loop", "entr", m))
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r.kind in keep]

    target_cmd = args.target_cmd.split()
    for n, run in enumerate(runs):
        t0 = time.monotonic()
        measure(run, n, args, target_cmd, content, sid)
        print(
            "  %-38s %-5s done in %5.1fs: p50 %s ms, missed %d, premature %d, extra %d%s"
            % (run.label, run.medium, time.monotonic() - t0, bl.fmt_ms(bl.median(run.lat)),
               run.missed, run.premature, run.extra, ("  (" + run.note + ")") if run.note else ""),
            file=sys.stderr, flush=True,
        )

    print()
    print("kubelet swap -> target has SIGHUP and has read the new bundle (%d swaps per row; "
          "volume on tmpfs; output on the medium shown)" % args.swaps)
    rows = []
    for r in runs:
        rows.append([
            r.label, r.medium, r.swaps,
            bl.fmt_ms(bl.pct(r.lat, 50)) if r.lat else "-",
            bl.fmt_ms(bl.pct(r.lat, 99)) if r.lat else "-",
            bl.fmt_ms(max(r.lat)) if r.lat else "-",
            r.missed, r.premature, r.extra, r.other, r.signals,
        ])
    bl.table(["run", "output", "swaps", "p50 ms", "p99 ms", "max ms", "missed", "premature",
              "extra", "other", "signals"], rows)
    notes = [r for r in runs if r.note]
    for r in notes:
        print("note: %s (%s): %s" % (r.label, r.medium, r.note))
    print()
    peers = ("inotifywait", "inotifywait-data", "watchexec", "entr")
    ratio_rows = []
    for m in media:
        mine = [r for r in runs if r.kind == "anchorage" and not r.baseline and r.debounce == "0"
                and r.medium == m and r.lat]
        others = [r for r in runs if r.kind in peers and r.medium == m and r.lat]
        if not mine or not others:
            continue
        best = min(others, key=lambda r: bl.pct(r.lat, 50))
        a = mine[0]
        ratio_rows.append([
            "anchorage --debounce 0 / " + best.label, m,
            "%.2f" % (bl.pct(a.lat, 50) / bl.pct(best.lat, 50)),
            "%.2f" % (bl.pct(a.lat, 99) / bl.pct(best.lat, 99)),
        ])
    if ratio_rows:
        print("ratio anchorage / best peer (best = lowest p50 on that medium)")
        bl.table(["ratio", "output", "p50", "p99"], ratio_rows)
    base_rows = []
    for b in (r for r in runs if r.baseline and r.lat):
        cur = [r for r in runs if r.kind == "anchorage" and not r.baseline and r.debounce == b.debounce
               and r.medium == b.medium and r.lat]
        if not cur:
            continue
        a = cur[0]
        base_rows.append([
            a.label, a.medium,
            "%.2f" % (bl.pct(a.lat, 50) / bl.pct(b.lat, 50)),
            "%.2f" % (bl.pct(a.lat, 99) / bl.pct(b.lat, 99)),
            "%.2f" % (max(a.lat) / max(b.lat)),
        ])
    if base_rows:
        print()
        print("ratio current / baseline (same run, same settings)")
        bl.table(["anchorage", "output", "p50", "p99", "max"], base_rows)

    if args.stress_swaps > 0:
        stress_all(args, target_cmd, pems)


def stress_all(args, target_cmd, pems):
    """Back-to-back swaps into one of two sources of a bundle: does the
    application ever get a bundle that misses a source?"""
    kinds = []
    for debounce, what in (("0", "--debounce 0"), (None, "(default 200ms)")):
        kinds.append(("anchorage " + what, "anchorage", debounce, args.anchorage))
        if args.baseline:
            kinds.append(("anchorage (baseline) " + what, "anchorage", debounce, args.baseline))
    kinds += [("inotifywait loop", "inotifywait", None, None),
              ("inotifywait loop, ..data only", "inotifywait-data", None, None)]
    if args.watchexec:
        kinds.append(("watchexec --debounce 0ms", "watchexec", None, None))
    kinds.append(("entr -d loop", "entr", None, None))
    if args.only:
        keep = set(args.only.split(","))
        kinds = [x for x in kinds if x[1] in keep]
    rows = []
    for n, (label, kind, debounce, binary) in enumerate(kinds):
        t0 = time.monotonic()
        rows.append([label] + stress_one(args, n, kind, debounce, binary, target_cmd, pems))
        print("  stress %-38s done in %5.1fs" % (label, time.monotonic() - t0), file=sys.stderr, flush=True)
    print()
    print("rapid swaps: one bundle of 2 kubelet-style sources (s1: 1 CA, never changes; s2: 2 CAs), "
          "%d swaps into s2, %.0f ms apart; output on tmpfs" % (args.stress_swaps, args.stress_gap_ms))
    bl.table(["run", "signals", "incomplete reads", "s2 empty", "final set ok", "WARN lines"], rows)
    print("incomplete: the application read a bundle without the 3 certificates every complete set has "
          "(a source read while kubelet was deleting its old generation); s2 empty: of those, the ones "
          "holding s1's CA alone.")


def stress_one(args, n, kind, debounce, binary, target_cmd, pems):
    base = os.path.join(args.shm, "stress-%02d" % n)
    s1, s2 = os.path.join(base, "s1"), os.path.join(base, "s2")
    out = os.path.join(base, "bundle.pem")
    pidfile = os.path.join(base, "app.pid")
    os.makedirs(base)
    bl.kubelet_write(s1, {"ca.crt": pems[11]})

    def s2_content(k):
        return pems[k % 11] + pems[(k + 1) % 11]

    bl.kubelet_write(s2, {"ca.crt": s2_content(0)})
    log = open(os.path.join(base, "tool.log"), "wb")
    target = bl.Target(target_cmd, out, pidfile)
    glob = base + "/s*/..data/*"
    tool = None
    k = 0
    try:
        if kind == "anchorage":
            argv = [binary, "run", "--source", s1, "--source", s2, "--output", out,
                    "--pid-file", pidfile, "--signal", "HUP"]
            if debounce is not None:
                argv += ["--debounce", debounce]
            tool = bl.Proc(kind, argv, env={"RUST_LOG": "warn"}, stderr=log)
        elif kind in ("inotifywait", "inotifywait-data"):
            tool = bl.Proc(kind, bl.inotifywait_loop([s1, s2], glob, out, target.pid,
                                                     data_only=kind == "inotifywait-data"), stderr=log)
        elif kind == "watchexec":
            tool = bl.Proc(kind, bl.watchexec_cmd(args.watchexec, [s1, s2], glob, out, target.pid), stderr=log)
        elif kind == "entr":
            tool = bl.Proc(kind, bl.entr_loop(glob, glob, out, target.pid), stderr=log)
        # ready: one swap passed on
        for _ in range(10):
            k += 1
            bl.kubelet_write(s2, {"ca.crt": s2_content(k)})
            want = bl.set_id(pems[11] + s2_content(k))[0]
            if target.wait_for(want, 2.0, settle_s=0.3, hard_s=3.0):
                break
        target.poll(0)
        t_start = bl.mono()
        gap = args.stress_gap_ms / 1000.0
        for _ in range(args.stress_swaps):
            k += 1
            bl.kubelet_write(s2, {"ca.crt": s2_content(k)})
            time.sleep(gap)
            target.poll(0)
        final = bl.set_id(pems[11] + s2_content(k))[0]
        target.wait_for(final, 3.0, settle_s=0.5, hard_s=4.0)
    finally:
        if tool is not None:
            tool.stop()
        target.stop()
        log.close()
    recs = [r for r in target.records if r[0] >= t_start]
    only_s1 = bl.set_id(pems[11])[0]
    incomplete = sum(1 for r in recs if r[3] != 3)
    s2_empty = sum(1 for r in recs if r[2] == only_s1)
    final_ok = "yes" if recs and sorted(recs)[-1][2] == final else "NO"
    warns = "-"
    if kind == "anchorage":
        with open(os.path.join(base, "tool.log"), errors="replace") as f:
            warns = sum(1 for x in f if " WARN " in x or " ERROR " in x)
    return [len(recs), incomplete, s2_empty, final_ok, warns]


def measure(run, n, args, target_cmd, content, sid):
    base = os.path.join(args.shm, "run-%02d" % n)
    vol = os.path.join(base, "secret")
    os.makedirs(base)
    out_dir = os.path.join(args.disk if run.medium == "disk" else args.shm, "out-%02d" % n)
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "bundle.pem")
    pidfile = os.path.join(base, "app.pid")
    log = open(os.path.join(base, "tool.log"), "wb")
    k = 0
    bl.kubelet_write(vol, {"ca.crt": content(k)})
    floor = run.kind == "floor"
    target = bl.Target(target_cmd, os.path.join(vol, "ca.crt") if floor else out, pidfile)
    tool = None
    glob = vol + "/..data/*"
    try:
        if run.kind == "anchorage":
            argv = [run.binary, "run", "--source", vol, "--output", out,
                    "--pid-file", pidfile, "--signal", "HUP"]
            if run.debounce is not None:
                argv += ["--debounce", run.debounce]
            tool = bl.Proc("anchorage", argv, env={"RUST_LOG": "warn"}, stderr=log)
        elif run.kind in ("inotifywait", "inotifywait-data"):
            tool = bl.Proc(run.kind, bl.inotifywait_loop([vol], glob, out, target.pid,
                                                         data_only=run.kind == "inotifywait-data"),
                           stderr=log)
        elif run.kind == "watchexec":
            tool = bl.Proc("watchexec", bl.watchexec_cmd(args.watchexec, [vol], glob, out, target.pid),
                           stderr=log)
        elif run.kind == "entr":
            tool = bl.Proc("entr", bl.entr_loop(glob, glob, out, target.pid), stderr=log)

        # Warm-up swaps (not counted): the tool is ready once it has passed
        # three swaps on to the target.
        ok = 0
        deadline = time.monotonic() + 20
        while ok < 3 and time.monotonic() < deadline:
            k += 1
            bl.kubelet_write(vol, {"ca.crt": content(k)})
            if floor:
                os.kill(target.pid, signal.SIGHUP)
            if target.wait_for(sid(k), 2.0, settle_s=0.1, hard_s=3.0):
                ok += 1
        if ok < 3:
            run.note = "never passed a warm-up swap on; not measured"
            return
        time.sleep(0.2)
        target.poll(0)

        wait_s = args.wait_ms / 1000.0
        settle_s = args.settle_ms / 1000.0
        swaps = []
        for _ in range(args.swaps):
            k += 1
            target.poll(0)
            t_begin, t_rename = bl.kubelet_write(vol, {"ca.crt": content(k)})
            if floor:
                os.kill(target.pid, signal.SIGHUP)
            target.wait_for(sid(k), wait_s, settle_s=settle_s, hard_s=wait_s + 0.5)
            swaps.append((t_begin, t_rename, k))
        time.sleep(max(settle_s, 0.05) * 2)
        target.poll(0)
    finally:
        if tool is not None:
            rc = tool.stop()
            if run.kind == "anchorage" and rc not in (0, None):
                run.note = (run.note + "; " if run.note else "") + "anchorage exited %s on SIGTERM" % rc
        target.stop()
        log.close()
        if run.kind == "anchorage":
            with open(os.path.join(base, "tool.log"), errors="replace") as f:
                warns = [x.rstrip() for x in f if " WARN " in x or " ERROR " in x]
            if warns:
                run.note = (run.note + "; " if run.note else "") + "anchorage logged %d WARN/ERROR line(s); the first: %s" % (
                    len(warns), warns[0][:400])

    run.swaps = len(swaps)
    res = bl.classify(target.records, [(b, r, sid(kk), sid(kk - 1)) for b, r, kk in swaps])
    run.lat = res["lat"]
    for key in ("missed", "premature", "extra", "other", "signals"):
        setattr(run, key, res[key])


if __name__ == "__main__":
    main()
