# shellcheck shell=bash disable=SC2034
# Sourced by bench/swap-latency.sh, bench/idle.sh and bench/scale.sh.
# Tool checks, the release build, the scratch directories (removed on exit),
# the SIGHUP target, the CA pool, and cleanup of every process started.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
LIB="$BENCH_DIR/lib"
ANCHORAGE="$REPO/target/release/anchorage"
# BASELINE=/path/to/anchorage: another build (an earlier commit) measured in
# the same run, with the same settings, as "anchorage (baseline)" rows.
BASELINE=${BASELINE:-}
SCRATCH_SHM=""
SCRATCH_DISK=""
DRIVER_PID=""

say() { printf '%s\n' "$*" >&2; }

# need TOOL DEBIAN-PACKAGE: fails with the install hint when TOOL is missing.
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        say "missing: $1 (Debian package $2: apt-get install -y $2)"
        return 1
    fi
}

# The optional peer watchexec: prints its path, or nothing.
find_watchexec() {
    if [ -n "${WATCHEXEC:-}" ] && [ -x "$WATCHEXEC" ]; then
        printf '%s\n' "$WATCHEXEC"
    elif command -v watchexec >/dev/null 2>&1; then
        command -v watchexec
    elif [ -x "$HOME/.cargo/bin/watchexec" ]; then
        printf '%s\n' "$HOME/.cargo/bin/watchexec"
    fi
}

# wx_version PATH: watchexec's version, or "not installed".
wx_version() {
    if [ -n "$1" ]; then "$1" --version | head -1 | awk '{print $2}'; else echo "not installed"; fi
}

check_common_tools() {
    local ok=0
    need python3 python3 || ok=1
    need inotifywait inotify-tools || ok=1
    need entr entr || ok=1
    need openssl openssl || ok=1
    need cargo "cargo (or rustup)" || ok=1
    if [ -z "$(find_watchexec)" ]; then
        say "note: watchexec not found (cargo install watchexec-cli --locked); its rows are skipped"
    fi
    return $ok
}

build_anchorage() {
    say "building the release binary (cargo build --release)..."
    (cd "$REPO" && cargo build --release --quiet)
    [ -x "$ANCHORAGE" ] || { say "no $ANCHORAGE after the build"; exit 1; }
    if [ -n "$BASELINE" ]; then
        [ -x "$BASELINE" ] || { say "BASELINE=$BASELINE is not an executable file"; exit 1; }
        BASELINE=$(realpath "$BASELINE")
    fi
}

# build_static: unless STATIC=0, builds the binary docker/Dockerfile ships,
# with the script the Dockerfile runs (scripts/build-static: crt-static,
# --target <host>, the start's functions laid out first; in
# target/bench-static; minutes of LTO) and sets STATIC_BIN to it; else
# leaves STATIC_BIN empty.
build_static() {
    STATIC_BIN=
    [ "${STATIC:-1}" != 0 ] || return 0
    local host
    host=$(rustc -vV | awk '/^host:/ {print $2}')
    say "building the static binary as docker/Dockerfile does (scripts/build-static $host)..."
    STATIC_BIN="$REPO/target/bench-static/anchorage"
    CARGO_TARGET_DIR="$REPO/target/bench-static" "$REPO/scripts/build-static" "$host" "$STATIC_BIN"
}

# drop_page_cache FILE...: the files' pages leave the page cache, so that
# each binary is read the way exec reads it from disk. RSS counts the
# binary's pages the kernel maps around each one a process runs, and how
# many it maps depends on how the file sits in the cache: a binary just
# written by the linker or cp measured 1 MiB more at idle than the same
# file read back from disk.
drop_page_cache() {
    sync
    python3 - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    if path:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}

# describe_binary PATH: "<commit>[ + uncommitted src changes] (<bytes> bytes)",
# the commit of the checkout the binary sits in (unknown outside one).
describe_binary() {
    local top rev="unknown" dirty=""
    if top=$(git -C "$(dirname "$1")" rev-parse --show-toplevel 2>/dev/null); then
        rev=$(git -C "$top" rev-parse --short HEAD)
        git -C "$top" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null ||
            dirty=" + uncommitted src changes"
    fi
    printf '%s%s (%s bytes)' "$rev" "$dirty" "$(stat -c %s "$1")"
}

# Kills, by pid, every process whose command line names a scratch directory
# (everything this run started), then removes the scratch directories.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        sleep 1
    fi
    local pass pid
    for pass in TERM KILL; do
        for pid in $(scratch_pids); do
            kill -"$pass" "$pid" 2>/dev/null || true
        done
        [ "$pass" = TERM ] && sleep 0.3
    done
    [ -n "$SCRATCH_SHM" ] && rm -rf "$SCRATCH_SHM"
    [ -n "$SCRATCH_DISK" ] && rm -rf "$SCRATCH_DISK"
    exit "$rc"
}

scratch_pids() {
    local d pid cmd
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [ "$pid" = "$$" ] && continue
        cmd=$(tr '\0' ' ' 2>/dev/null < "$d/cmdline") || continue
        if { [ -n "$SCRATCH_SHM" ] && [[ $cmd == *"$SCRATCH_SHM"* ]]; } ||
            { [ -n "$SCRATCH_DISK" ] && [[ $cmd == *"$SCRATCH_DISK"* ]]; }; then
            printf '%s\n' "$pid"
        fi
    done
}

make_scratch() {
    SCRATCH_SHM=$(mktemp -d /dev/shm/anchorage-bench.XXXXXX)
    SCRATCH_DISK=$(mktemp -d /var/tmp/anchorage-bench.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# The SIGHUP target: compiled C when a compiler is there, else python.
build_target() {
    local cc
    cc=$(command -v cc || command -v gcc || true)
    if [ -n "$cc" ] && "$cc" -O2 -o "$SCRATCH_SHM/sighup_target" "$LIB/sighup_target.c" 2>/dev/null; then
        TARGET_CMD="$SCRATCH_SHM/sighup_target"
        TARGET_KIND="C (sigwaitinfo)"
    else
        say "note: no C compiler (apt-get install -y gcc): the python target adds latency to every row"
        TARGET_CMD="python3 $LIB/benchlib.py target"
        TARGET_KIND="python3 (sigwaitinfo)"
    fi
}

# gen_cas DIR N: N distinct self-signed CA PEM files DIR/ca-00001.pem...
# With examples/gen_cas.rs (fast); else openssl, one key signing them all.
gen_cas() {
    local dir=$1 n=$2 i
    mkdir -p "$dir"
    if [ -f "$REPO/examples/gen_cas.rs" ] &&
        (cd "$REPO" && cargo build --release --quiet --example gen_cas 2>/dev/null) &&
        "$REPO/target/release/examples/gen_cas" "$dir" "$n" 2>/dev/null; then
        return 0
    fi
    say "generating $n CAs with openssl..."
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/key.pem" 2>/dev/null
    for ((i = 1; i <= n; i++)); do
        openssl req -x509 -key "$dir/key.pem" -days 3650 -set_serial "$i" \
            -subj "$(printf '/CN=Bench CA %05d/O=anchorage bench' "$i")" \
            -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign,cRLSign \
            -out "$(printf '%s/ca-%05d.pem' "$dir" "$i")" 2>/dev/null
    done
    rm -f "$dir/key.pem"
}

# Runs the python driver in the background (so the traps can end it) and
# waits for it; bounded by TIMEOUT seconds.
run_driver() {
    local limit=$1
    shift
    # NICE=-10 (root) runs the driver, the tools and the target above the
    # machine's other work, all at the same priority: steadier figures on a
    # shared machine.
    local nice=()
    if [ -n "${NICE:-}" ]; then
        nice=(nice -n "$NICE")
        say "running at nice $NICE"
    fi
    timeout --signal=TERM --kill-after=10 "$limit" "${nice[@]}" python3 "$@" &
    DRIVER_PID=$!
    local rc=0
    wait "$DRIVER_PID" || rc=$?
    DRIVER_PID=""
    if [ "$rc" = 124 ]; then
        say "the driver ran past its ${limit}s bound and was stopped"
    fi
    return "$rc"
}

machine_line() {
    printf 'machine: %s cores, %s, kernel %s; target: %s\n' "$(nproc)" \
        "$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" "$(uname -r)" "$TARGET_KIND"
    printf 'anchorage built from %s; nice: %s\n' "$(describe_binary "$ANCHORAGE")" "${NICE:-0}"
    if [ -n "${STATIC_BIN:-}" ]; then
        printf 'anchorage static: built from %s\n' "$(describe_binary "$STATIC_BIN")"
    fi
    if [ -n "$BASELINE" ]; then
        printf 'anchorage (baseline): %s, built from %s\n' "$BASELINE" "$(describe_binary "$BASELINE")"
    fi
}
