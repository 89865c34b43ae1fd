#!/usr/bin/env bash
# How long `anchorage render` takes to turn a directory of N CA certificates
# (one PEM file each) into a PEM bundle or an OpenSSL hashed directory, next to
# the tools that do the same job: `openssl rehash`, p11-kit's `trust extract`
# and Debian's `update-ca-certificates`, with `cat` as the floor. It prints
# figures; it is not a test and has no thresholds. See bench/README.md.
#
#   bench/render.sh                 # 150, 1,000 and 10,000 CAs
#   BENCH_QUICK=1 bench/render.sh   # the same without update-ca-certificates
#                                   # at 10,000 (one run of it takes 1-2 min)
#
# Environment:
#   BENCH_QUICK=1  skip update-ca-certificates at sizes above 2,000
#   BENCH_SLOW=1   also time p11-kit above 2,000 (one run: ~4 min at 10,000)
#   BENCH_SIZES    the sizes, default "150 1000 10000" (1 to 99999 each)
#   BENCH_KEEP=1   keep the scratch tree (inputs, outputs, hyperfine JSON)
#   BASELINE=PATH  another anchorage binary (an earlier commit): its rows,
#                  "anchorage (baseline) render ...", are timed beside the
#                  current binary's, and the ratios current/baseline printed
#
# Everything it writes is in one scratch tree on tmpfs (/dev/shm), removed on
# exit; it never touches /etc, the system trust store or the p11-kit config.

# SC2317: cleanup and the check_* functions are called through trap and "$check".
# shellcheck disable=SC2317
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZES=${BENCH_SIZES:-150 1000 10000}
QUICK=${BENCH_QUICK:-0}
SLOW=${BENCH_SLOW:-0}
KEEP=${BENCH_KEEP:-0}
BASELINE=${BASELINE:-}
# update-ca-certificates lives in /usr/sbin, often not on a user's PATH.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
export LC_ALL=C
umask 022

say() { printf '%s\n' "$*" >&2; }
die() {
    say "render.sh: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
q() { printf '%q' "$1"; }

for n in $SIZES; do
    [[ $n =~ ^[1-9][0-9]{0,4}$ ]] || die "BENCH_SIZES: $n is not an integer from 1 to 99999"
done

# --- tools -------------------------------------------------------------------

missing=()
for spec in hyperfine:hyperfine python3:python3 openssl:openssl trust:p11-kit \
    update-ca-certificates:ca-certificates; do
    have "${spec%%:*}" || missing+=("${spec%%:*} (Debian package ${spec#*:})")
done
if ((${#missing[@]} > 0)); then
    say "missing tools:"
    for m in "${missing[@]}"; do say "  - $m"; done
    say "install them with: apt-get install -y hyperfine openssl p11-kit ca-certificates"
    say "(this script installs nothing; the rows of a missing peer are skipped)"
fi
have hyperfine || die "hyperfine is required"
have python3 || die "python3 is required (it reads hyperfine's JSON)"
have cargo || die "cargo is required"

# p11-kit ignores the user configuration (the only way to point it at a scratch
# store without touching /etc) in a process whose real uid is 0, so as root the
# `trust` command runs as nobody, through setpriv (adds ~1 ms, one exec).
P11_PREFIX=""
P11_SKIP=""
if ! have trust; then
    P11_SKIP="not installed (apt-get install -y p11-kit)"
elif [ "$(id -u)" = 0 ]; then
    if have setpriv; then
        P11_PREFIX="setpriv --reuid=65534 --regid=65534 --clear-groups "
    else
        P11_SKIP="running as root without setpriv: p11-kit would read the system store"
    fi
fi
UCA_SKIP=""
have update-ca-certificates || UCA_SKIP="not installed (apt-get install -y ca-certificates)"
have openssl || UCA_SKIP="needs openssl (apt-get install -y openssl)"

# --- build -------------------------------------------------------------------

say "==> cargo build --release (and the gen_cas example)"
(cd "$REPO" && cargo build --release && cargo build --release --example gen_cas)
TARGET_DIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET_DIR/release/anchorage
GEN=$TARGET_DIR/release/examples/gen_cas
[ -x "$BIN" ] || die "no $BIN after the build"
[ -x "$GEN" ] || die "no $GEN after the build"
if [ -n "$BASELINE" ]; then
    [ -x "$BASELINE" ] || die "BASELINE=$BASELINE is not an executable file"
    BASELINE=$(realpath "$BASELINE")
fi

# --- scratch tree --------------------------------------------------------------

SCRATCH=""
cleanup() {
    if [ -n "$SCRATCH" ] && [ -d "$SCRATCH" ]; then
        if [ "$KEEP" = 1 ]; then
            say "kept the scratch tree: $SCRATCH"
        else
            rm -rf "$SCRATCH"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    SCRATCH=$(mktemp -d /dev/shm/anchorage-render-bench.XXXXXX)
else
    SCRATCH=$(mktemp -d)
    say "note: no writable /dev/shm; the scratch tree is $SCRATCH, which may be on a"
    say "      disk: the figures then include more file system work than on tmpfs"
fi
# Readable by nobody, who runs p11-kit's `trust` when this script runs as root.
chmod 755 "$SCRATCH"
mkdir "$SCRATCH/json"
RESULTS=$SCRATCH/results.tsv
NOTES=$SCRATCH/notes.txt
: >"$RESULTS"
: >"$NOTES"
FAILED=0

# Only the flags below configure anchorage here, not the caller's environment.
while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^ANCHORAGE_' || true)
unset P11_KIT_NO_USER_CONFIG
export RUST_LOG=warn

# --- helpers -------------------------------------------------------------------

count_pem() {
    local c
    c=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$1" 2>/dev/null) || true
    printf '%s\n' "${c:-0}"
}
# The <hash>.N entries (files or symlinks) of an OpenSSL hashed directory.
hash_names() {
    find "$1" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9a-f]{8}\.[0-9]+' \
        -printf '%f\n' 2>/dev/null | sort
}
count_hashed() { hash_names "$1" | wc -l; }

# The number of certificates each tool produced from $SCRATCH/N/in.
check_pem() { count_pem "$SCRATCH/$1/out.pem"; }
check_dir() {
    local links bundle
    links=$(count_hashed "$SCRATCH/$1/out-dir")
    bundle=$(count_pem "$SCRATCH/$1/out-dir/ca-certificates.crt")
    if [ "$links" = "$bundle" ]; then echo "$links"; else echo "$links links, $bundle in the bundle"; fi
}
check_rehash() { count_hashed "$SCRATCH/$1/rehash"; }
check_p11() { count_pem "$SCRATCH/$1/p11/out/bundle.pem"; }
check_uca() {
    local links bundle
    links=$(count_hashed "$SCRATCH/$1/uca/etc")
    bundle=$(count_pem "$SCRATCH/$1/uca/etc/ca-certificates.crt")
    if [ "$links" = "$bundle" ]; then echo "$links"; else echo "$links links, $bundle in the bundle"; fi
}
check_none() { echo "$1"; }

# 10000 -> 10,000
thousands() { printf '%s\n' "$1" | sed -e ':a' -e 's/\B[0-9]\{3\}\>/,&/' -e 'ta'; }

# record N KEY LABEL STATUS DETAIL: STATUS ok (DETAIL: the JSON) or skipped/failed.
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

# is_ok N KEY: whether that measurement succeeded.
is_ok() { awk -F'\t' -v n="$1" -v k="$2" '$1 == n && $2 == k && $4 == "ok" { f = 1 } END { exit !f }' "$RESULTS"; }

# bench N KEY LABEL WARMUP RUNS PREPARE COMMAND CHECK
bench() {
    local n=$1 key=$2 label=$3 warmup=$4 runs=$5 prepare=$6 cmd=$7 check=$8
    local json=$SCRATCH/json/$n-$key.json log=$SCRATCH/json/$n-$key.log got
    local args=(--style none --warmup "$warmup" --runs "$runs" --command-name "$label" --export-json "$json")
    # Without a shell (-N) hyperfine runs the command directly and needs no
    # correction for the shell's start-up, which is noisy next to a 5 ms run;
    # only the cat floor needs the shell, for its glob. The preparation then
    # runs through sh explicitly (its paths hold no single quote).
    if [ "$key" != cat ]; then
        args+=(-N)
        if [ -n "$prepare" ]; then prepare="sh -c '$prepare'"; fi
    fi
    if [ -n "$prepare" ]; then args+=(--prepare "$prepare"); fi
    say "    $label: $warmup warmup, $runs timed run(s)"
    if ! hyperfine "${args[@]}" "$cmd" >"$log" 2>&1; then
        say "    $label FAILED; hyperfine's output:"
        tail -n 20 "$log" >&2
        record "$n" "$key" "$label" failed "the command failed (hyperfine's log above)"
        FAILED=1
        return
    fi
    # The last timed run's output is still there: check it holds all N.
    got=$("$check" "$n")
    if [ "$got" != "$n" ]; then
        say "    $label made $got certificates out of $n"
        record "$n" "$key" "$label" failed "wrong output: $got certificates, expected $n"
        FAILED=1
        return
    fi
    record "$n" "$key" "$label" ok "$json"
}

# How many runs: many for small inputs, few for large ones and slow tools.
fast_runs() { if (($1 <= 200)); then echo 30; elif (($1 <= 2000)); then echo 15; else echo 10; fi; }

# --- run -----------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# The kernel's floor for the file work alone (bench/lib/fsfloor.c), when a
# C compiler is there: the least that reading the N files, and creating N
# files and syncing them, can cost on this file system.
FSFLOOR=""
if cc=$(command -v cc || command -v gcc) && "$cc" -O2 -o "$SCRATCH/fsfloor" "$REPO/bench/lib/fsfloor.c" 2>/dev/null; then
    FSFLOOR=$SCRATCH/fsfloor
else
    say "note: no C compiler (apt-get install -y gcc): the file-system floor lines are skipped"
fi
# floor N DIR: the median and the least of 10 runs of each fsfloor mode.
floor() {
    local n=$1 d=$2 mode i reads=() creates=()
    for i in 1 2 3 4 5 6 7 8 9 10; do
        reads+=("$("$FSFLOOR" read "$d/in")")
        rm -rf "$d/fsfloor-out"
        creates+=("$("$FSFLOOR" create "$d/fsfloor-out" "$d/in")")
    done
    rm -rf "$d/fsfloor-out"
    for mode in read create; do
        if [ "$mode" = read ]; then set -- "${reads[@]}"; else set -- "${creates[@]}"; fi
        printf '%s\n' "$@" | sort -n | awk -v n="$n" -v mode="$mode" '{ v[NR] = $1 }
            END { printf "%6s CAs: kernel floor, %s: median %.1f ms, least %.1f ms (10 runs)\n",
                  n, (mode == "read" ? "open+read+close of the N files" : "create N files with their bytes + syncfs"),
                  (v[5] + v[6]) / 2, v[1] }' >>"$NOTES"
    done
}

START=$(date +%s)
for n in $SIZES; do
    d=$SCRATCH/$n
    say "==> $n CAs"
    mkdir -p "$d"
    "$GEN" "$d/in" "$n" 2>/dev/null
    made=$(find "$d/in" -name '*.pem' | wc -l)
    [ "$made" = "$n" ] || die "gen_cas wrote $made files, expected $n"

    # update-ca-certificates' tree: the same files named .crt in its local
    # certs dir; an empty certsconf, certs dir and hooks dir.
    # p11-kit's tree: the same files in <store>/anchors (files directly in a
    # trust path are not anchors), and a user config that loads only the
    # trust module, on that store.
    mkdir -p "$d/uca/share" "$d/uca/hooks" "$d/uca/tmp" "$d/uca/etc" \
        "$d/p11/xdg/pkcs11/modules" "$d/p11/out"
    : >"$d/uca/certs.conf"
    python3 - "$d/in" "$d/uca/local" "$d/p11/store/anchors" <<'EOF'
import os, shutil, sys
src, crt_dir, anchors = sys.argv[1:]
os.makedirs(crt_dir)
os.makedirs(anchors)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(crt_dir, name[: -len(".pem")] + ".crt"))
    shutil.copyfile(os.path.join(src, name), os.path.join(anchors, name))
EOF
    printf 'user-config: only\n' >"$d/p11/xdg/pkcs11/pkcs11.conf"
    printf 'module: p11-kit-trust.so\ntrust-policy: yes\nx-init-reserved: paths=%s\n' \
        "$d/p11/store" >"$d/p11/xdg/pkcs11/modules/bench-trust.module"
    chmod -R a+rX "$d"
    chmod 1777 "$d/p11/out"

    runs=$(fast_runs "$n")
    bench "$n" pem "anchorage render (pem)" 2 "$runs" \
        "rm -f $(q "$d/out.pem")" \
        "$(q "$BIN") render --source $(q "$d/in") --output $(q "$d/out.pem")" check_pem
    bench "$n" dir "anchorage render (openssl-dir)" 2 "$runs" \
        "rm -rf $(q "$d/out-dir")" \
        "$(q "$BIN") render --source $(q "$d/in") --hashed-dir $(q "$d/out-dir")" check_dir
    if [ -n "$BASELINE" ]; then
        bench "$n" bpem "anchorage (baseline) render (pem)" 2 "$runs" \
            "rm -f $(q "$d/out.pem")" \
            "$(q "$BASELINE") render --source $(q "$d/in") --output $(q "$d/out.pem")" check_pem
        bench "$n" bdir "anchorage (baseline) render (openssl-dir)" 2 "$runs" \
            "rm -rf $(q "$d/out-dir")" \
            "$(q "$BASELINE") render --source $(q "$d/in") --hashed-dir $(q "$d/out-dir")" check_dir
    fi

    if have openssl; then
        r=$runs
        if ((n > 2000)); then r=5; fi # ~2 s a run at 10,000
        bench "$n" rehash "openssl rehash" 2 "$r" \
            "rm -rf $(q "$d/rehash") && cp -r $(q "$d/in") $(q "$d/rehash")" \
            "openssl rehash $(q "$d/rehash")" check_rehash
        # Both hashed directories must name the same <hash>.N entries.
        if is_ok "$n" dir && is_ok "$n" rehash; then
            if diff <(hash_names "$d/out-dir") <(hash_names "$d/rehash") >/dev/null; then
                echo "$(thousands "$n") CAs: anchorage --hashed-dir names the same $(thousands "$n") <hash>.N entries as openssl rehash" >>"$NOTES"
            else
                echo "$(thousands "$n") CAs: MISMATCH: anchorage --hashed-dir and openssl rehash name different <hash>.N entries" >>"$NOTES"
                FAILED=1
            fi
        fi
    else
        record "$n" rehash "openssl rehash" skipped "not installed (apt-get install -y openssl)"
    fi

    if [ -n "$P11_SKIP" ]; then
        record "$n" p11 "p11-kit trust extract" skipped "$P11_SKIP"
    elif ((n > 2000)) && [ "$SLOW" != 1 ]; then
        record "$n" p11 "p11-kit trust extract" skipped "superlinear, 3-4 min a run at 10,000 on 2 cores; BENCH_SLOW=1 times it"
    else
        if ((n <= 200)); then w=2 r=10; elif ((n <= 2000)); then w=1 r=3; else w=0 r=1; fi
        if ((n > 2000)); then say "    (p11-kit at $n: expect minutes)"; fi
        bench "$n" p11 "p11-kit trust extract" "$w" "$r" \
            "rm -f $(q "$d/p11/out/bundle.pem")" \
            "${P11_PREFIX}env HOME=$(q "$d/p11") XDG_CONFIG_HOME=$(q "$d/p11/xdg") trust extract --format=pem-bundle --filter=ca-anchors --purpose=server-auth --overwrite $(q "$d/p11/out/bundle.pem")" \
            check_p11
    fi

    if [ -n "$UCA_SKIP" ]; then
        record "$n" uca "update-ca-certificates" skipped "$UCA_SKIP"
    elif ((n > 2000)) && [ "$QUICK" = 1 ]; then
        record "$n" uca "update-ca-certificates" skipped "BENCH_QUICK=1"
    else
        if ((n <= 200)); then w=1 r=5; elif ((n <= 2000)); then w=0 r=2; else w=0 r=1; fi
        if ((n > 2000)); then say "    (update-ca-certificates at $n: expect 1-2 minutes)"; fi
        bench "$n" uca "update-ca-certificates" "$w" "$r" \
            "rm -rf $(q "$d/uca/etc") && mkdir $(q "$d/uca/etc")" \
            "env TMPDIR=$(q "$d/uca/tmp") update-ca-certificates --certsconf $(q "$d/uca/certs.conf") --certsdir $(q "$d/uca/share") --localcertsdir $(q "$d/uca/local") --etccertsdir $(q "$d/uca/etc") --hooksdir $(q "$d/uca/hooks")" \
            check_uca
    fi

    bench "$n" cat "cat (floor)" 2 "$runs" "" "cat $(q "$d/in")/* >/dev/null" check_none
    if [ -n "$FSFLOOR" ]; then floor "$n" "$d"; fi
done
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report --------------------------------------------------------------------

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') || true
size=$(stat -c %s "$BIN")
stripped="$size bytes"
if have strip; then
    cp "$BIN" "$SCRATCH/anchorage.stripped"
    strip "$SCRATCH/anchorage.stripped" 2>/dev/null || true
    size=$(stat -c %s "$SCRATCH/anchorage.stripped")
    stripped="$size bytes stripped"
fi
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "?"; }
openssl_version=$(openssl version 2>/dev/null | cut -d' ' -f2) || true

echo
echo "anchorage render benchmark, $(date -u +%Y-%m-%d)"
echo "machine:   $(nproc) CPUs (nproc), ${cpu:-unknown CPU}, Linux $(uname -r)"
echo "anchorage: $("$BIN" --version), release binary $stripped, built from $(git -C "$REPO" rev-parse --short HEAD)"
if [ -n "$BASELINE" ]; then
    echo "baseline:  $BASELINE, $(stat -c %s "$BASELINE") bytes, built from $(git -C "$(dirname "$BASELINE")" rev-parse --short HEAD 2>/dev/null || echo "an unknown commit")"
fi
echo "peers:     hyperfine $(hyperfine --version | cut -d' ' -f2), OpenSSL ${openssl_version:-?}, p11-kit $(pkg_version p11-kit), ca-certificates $(pkg_version ca-certificates)"
echo "scratch:   $(stat -f -c %T "$SCRATCH") ($SCRATCH)"
echo "load:      $LOAD_BEFORE before, $LOAD_AFTER after (1/5/15 min); ${ELAPSED}s of timing"
echo
python3 - "$RESULTS" <<'EOF'
import json
import sys

PEERS = ("rehash", "p11", "uca")
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
sizes = []
for n, *_ in rows:
    if n not in sizes:
        sizes.append(n)

table = [("size", "tool", "mean ms", "stddev ms", "min ms", "runs", "/ best peer")]
footer = []
for n in sizes:
    stats = {}
    for size, key, label, status, detail in rows:
        if size == n and status == "ok":
            result = json.load(open(detail))["results"][0]
            sd = result.get("stddev")
            stats[key] = (
                result["mean"] * 1000,
                None if sd is None else sd * 1000,
                result["min"] * 1000,
                len(result["times"]),
            )
    peers = [(stats[k][0], k) for k in PEERS if k in stats]
    best = min(peers) if peers else None
    labels = {}
    for size, key, label, status, detail in rows:
        if size != n:
            continue
        labels[key] = label
        if status != "ok":
            table.append((f"{int(n):,}", label, f"{status}: {detail}", "", "", "", ""))
            continue
        mean, sd, low, runs = stats[key]
        ratio = f"{mean / best[0]:.3f}" if best else "-"
        if best and key == best[1]:
            ratio += " (best)"
        sd = "-" if sd is None else f"{sd:.1f}"
        table.append((f"{int(n):,}", label, f"{mean:.1f}", sd, f"{low:.1f}", str(runs), ratio))
    if best:
        parts = [f"{labels[k]} / best peer = {stats[k][0] / best[0]:.3f}" for k in ("pem", "dir") if k in stats]
        footer.append(f"{int(n):,} CAs: best peer {labels[best[1]]}; " + ", ".join(parts))
    else:
        footer.append(f"{int(n):,} CAs: no peer timed, no ratio")
    for cur, base in (("pem", "bpem"), ("dir", "bdir")):
        if cur in stats and base in stats:
            footer.append(f"{int(n):,} CAs: {labels[cur]} current / baseline = {stats[cur][0] / stats[base][0]:.3f}")

# A skipped or failed row carries its reason in the mean column: leave it
# out of the column widths so it does not push the other columns apart.
widths = [max(len(r[i]) for r in table if i < 2 or r[3]) for i in range(7)]
for r in table:
    if not r[3]:
        print(f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    else:
        cells = [f"{r[0]:>{widths[0]}}", f"{r[1]:<{widths[1]}}"]
        cells += [f"{r[i]:>{widths[i]}}" for i in range(2, 6)]
        cells.append(r[6])
        print("  ".join(cells).rstrip())
print()
for line in footer:
    print(line)
EOF
if [ -s "$NOTES" ]; then cat "$NOTES"; fi
if [ "$FAILED" != 0 ]; then
    say "render.sh: some tool failed or produced the wrong output (see above)"
fi
exit "$FAILED"
