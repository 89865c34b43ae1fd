#!/usr/bin/env bash
# Idle cost: 10 kubelet-style Secret directories watched (anchorage: one
# bundle with 10 sources), IDLE_SECS (60) seconds without any event. For
# anchorage and its peers (an inotifywait shell loop, watchexec, entr), all
# idling in the same window: CPU ticks and schedstat run time, voluntary
# context switches (wakeups) summed over every thread of the process tree,
# RSS, and binary sizes. Prints figures; asserts nothing.
#
#   bench/idle.sh
#   IDLE_SECS=20 DIRS=10 bench/idle.sh
#   BASELINE=/path/to/older/anchorage bench/idle.sh
#                                      # adds "anchorage (baseline)" rows, same
#                                      # settings, and the ratios current/baseline
#   STATIC=0 bench/idle.sh             # without the static build's row (its
#                                      # build is docker/Dockerfile's: crt-static,
#                                      # in target/bench-static; minutes of LTO)
#
# Needs: python3, inotify-tools, entr, openssl, cargo, readelf (binutils);
# gcc for the C target; watchexec optional (cargo install watchexec-cli --locked).
set -euo pipefail
# shellcheck source=bench/lib/common.sh
. "$(dirname "$0")/lib/common.sh"

IDLE_SECS=${IDLE_SECS:-60}
DIRS=${DIRS:-10}

check_common_tools
need readelf binutils || true
build_anchorage
build_static
drop_page_cache "$ANCHORAGE" "$STATIC_BIN" "$BASELINE"
make_scratch
build_target
WX=$(find_watchexec)

gen_cas "$SCRATCH_SHM/pool" $((DIRS + 10))

machine_line
printf 'anchorage %s; inotifywait %s; entr %s; watchexec %s; load average before: %s\n' \
    "$("$ANCHORAGE" --version | awk '{print $2}')" \
    "$(inotifywait --help 2>&1 | head -1 | awk '{print $2}')" \
    "$(entr 2>&1 | awk '/release/ {print $2}')" \
    "$(wx_version "$WX")" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"

run_driver $(( ${IDLE_SECS%.*} + 180 )) "$LIB/idle.py" \
    --anchorage "$ANCHORAGE" --target-cmd "$TARGET_CMD" --pool "$SCRATCH_SHM/pool" \
    --shm "$SCRATCH_SHM" --dirs "$DIRS" --idle-secs "$IDLE_SECS" --watchexec "$WX" ${BASELINE:+--baseline "$BASELINE"} ${STATIC_BIN:+--static "$STATIC_BIN"}
printf 'load average after: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
