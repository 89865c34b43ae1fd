#!/usr/bin/env bash
# Scale: 1,000 watched kubelet-style Secret directories. anchorage with
# (a) one bundle of 1,000 sources (--source repeated) and (b) 1,000 bundles
# (a generated config, one output and a SIGHUP reload each), and the peers
# (an inotifywait shell loop over the 1,000 directories, watchexec over
# them): time from process start until the watches are set and the first
# render is done, RSS after start, and the latency of a kubelet swap in one
# of the 1,000 directories (median of SWAPS); then, as the floor of (b), the
# same file work done by a C loop on one thread, the whole start (watches,
# then that work on every core) done by it, and the configuration's parse
# (benches/config.rs). Prints figures; asserts nothing.
#
#   bench/scale.sh
#   DIRS=1000 SWAPS=20 STARTS=3 bench/scale.sh
#   BASELINE=/path/to/older/anchorage bench/scale.sh
#                                      # adds "anchorage (baseline)" rows, same
#                                      # settings, and the ratios current/baseline
#   CONFIG_BENCH=0 bench/scale.sh      # without the configuration's figures
#                                      # (benches/config.rs, built for them)
#   STATIC=0 bench/scale.sh            # without the rows of the static build
#                                      # (docker/Dockerfile's: crt-static, in
#                                      # target/bench-static; minutes of LTO)
#
# Needs: python3, inotify-tools, openssl, cargo; gcc for the C target;
# watchexec optional (cargo install watchexec-cli --locked). Raises
# fs.inotify.max_user_watches / max_user_instances with sysctl if they are
# too low (needs root) and says so.
set -euo pipefail
# shellcheck source=bench/lib/common.sh
. "$(dirname "$0")/lib/common.sh"

DIRS=${DIRS:-1000}
SWAPS=${SWAPS:-20}
STARTS=${STARTS:-3}

check_common_tools
build_anchorage
build_static
drop_page_cache "$ANCHORAGE" "$STATIC_BIN" "$BASELINE"

# Each tool needs about DIRS+1 watches; three tools may hold theirs at once
# while a previous one exits.
need_watches=$((DIRS * 4 + 1000))
watches=$(sysctl -n fs.inotify.max_user_watches)
instances=$(sysctl -n fs.inotify.max_user_instances)
printf 'fs.inotify.max_user_watches = %s, fs.inotify.max_user_instances = %s\n' "$watches" "$instances"
if [ "$watches" -lt "$need_watches" ]; then
    sysctl -w fs.inotify.max_user_watches="$need_watches" >/dev/null
    printf 'raised fs.inotify.max_user_watches to %s (sysctl -w, as root)\n' "$need_watches"
fi
if [ "$instances" -lt 64 ]; then
    sysctl -w fs.inotify.max_user_instances=128 >/dev/null
    printf 'raised fs.inotify.max_user_instances to 128 (sysctl -w, as root)\n'
fi

make_scratch
build_target
WX=$(find_watchexec)
gen_cas "$SCRATCH_SHM/pool" $((DIRS + 8))

machine_line
printf 'anchorage %s; inotifywait %s; watchexec %s; load average before: %s\n' \
    "$("$ANCHORAGE" --version | awk '{print $2}')" \
    "$(inotifywait --help 2>&1 | head -1 | awk '{print $2}')" \
    "$(wx_version "$WX")" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"

run_driver 900 "$LIB/scale.py" \
    --anchorage "$ANCHORAGE" --target-cmd "$TARGET_CMD" --pool "$SCRATCH_SHM/pool" \
    --shm "$SCRATCH_SHM" --dirs "$DIRS" --swaps "$SWAPS" --starts "$STARTS" --watchexec "$WX" ${BASELINE:+--baseline "$BASELINE"} \
    ${STATIC_BIN:+--static "$STATIC_BIN"}
printf 'load average after: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"

# The kernel's floor for the file work of a start of (b): every volume read
# through ..data and every output published the durable way, on one thread,
# by a C loop (bench/lib/fsfloor.c publish) on the same volumes.
if cc=$(command -v cc || command -v gcc) && "$cc" -O2 -o "$SCRATCH_SHM/fsfloor" "$LIB/fsfloor.c" 2>/dev/null; then
    floors=()
    for _ in 1 2 3 4 5; do
        rm -rf "$SCRATCH_SHM/floor-out"
        mkdir "$SCRATCH_SHM/floor-out"
        floors+=("$("$SCRATCH_SHM/fsfloor" publish "$SCRATCH_SHM/vols" "$SCRATCH_SHM/floor-out")")
    done
    rm -rf "$SCRATCH_SHM/floor-out"
    printf '%s\n' "${floors[@]}" | sort -n | awk -v n="$DIRS" '{ v[NR] = $1 } END {
        printf "floor: the file work of starting %s one-volume bundles, one thread (each volume read through ..data; each output a temporary file written, fsynced, renamed, its directory fsynced): median %.1f ms, least %.1f ms (5 runs)\n", n, v[3], v[1] }'
    # The whole start of (b) with nothing of anchorage's own: the watches,
    # then that file work on as many threads as cores (fsfloor start).
    cores=$(nproc)
    starts=()
    for _ in 1 2 3 4 5; do
        rm -rf "$SCRATCH_SHM/floor-out"
        mkdir "$SCRATCH_SHM/floor-out"
        starts+=("$("$SCRATCH_SHM/fsfloor" start "$SCRATCH_SHM/vols" "$SCRATCH_SHM/floor-out" "$cores")")
    done
    rm -rf "$SCRATCH_SHM/floor-out"
    printf '%s\n' "${starts[@]}" | sort -n -k2 | awk -v n="$DIRS" -v t="$cores" '{ w[NR] = $1; v[NR] = $2 } END {
        printf "floor: the whole start of %s one-volume bundles (%s watches, then that file work on %s threads): watches set in %.1f ms, all done in %.1f ms median, %.1f least (5 runs)\n", n, n + 1, t, w[3], v[3], v[1] }'
else
    say "note: no C compiler (apt-get install -y gcc): the file-work floor lines are skipped"
fi

# The configuration's part of (b)'s start: the same 1,000-bundle file parsed
# by the TOML crate alone and by anchorage (benches/config.rs).
if [ "${CONFIG_BENCH:-1}" != 0 ]; then
    BUNDLES=$DIRS cargo bench --quiet --manifest-path "$REPO/Cargo.toml" --bench config 2>/dev/null
fi
