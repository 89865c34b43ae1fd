#!/usr/bin/env bash
# Swap latency: the time from kubelet's rename of ..data to the application
# having received SIGHUP *and* read the new bundle, for anchorage and for the
# peers doing the same job (an inotifywait shell loop, watchexec, entr), over
# SWAPS kubelet swaps each publishing a different certificate set. Counts
# missed, premature and extra signals. Then STRESS_SWAPS back-to-back swaps
# (3 ms apart) into one of the two sources of a bundle: does the application
# ever read a bundle missing a source? Prints figures; asserts nothing.
#
#   bench/swap-latency.sh              # 200 swaps per row, outputs on tmpfs and on disk
#   SWAPS=50 MEDIA=shm STRESS_SWAPS=0 bench/swap-latency.sh
#   BASELINE=/path/to/older/anchorage bench/swap-latency.sh
#                                      # adds "anchorage (baseline)" rows, same
#                                      # settings, and the ratios current/baseline
#
# Needs: python3, inotify-tools, entr, openssl, cargo; gcc for the C target
# (else a slower python target); watchexec optional
# (cargo install watchexec-cli --locked).
set -euo pipefail
# shellcheck source=bench/lib/common.sh
. "$(dirname "$0")/lib/common.sh"

SWAPS=${SWAPS:-200}
STRESS_SWAPS=${STRESS_SWAPS:-1000}  # 0 skips the rapid-swap section
MEDIA=${MEDIA:-shm disk}

check_common_tools
build_anchorage
make_scratch
build_target
WX=$(find_watchexec)

gen_cas "$SCRATCH_SHM/pool" 12

machine_line
printf 'output media: shm = %s (%s), disk = %s (%s)\n' \
    "$SCRATCH_SHM" "$(stat -f -c %T "$SCRATCH_SHM")" "$SCRATCH_DISK" "$(stat -f -c %T "$SCRATCH_DISK")"
printf 'anchorage %s; inotifywait %s; entr %s; watchexec %s; load average before: %s\n' \
    "$("$ANCHORAGE" --version | awk '{print $2}')" \
    "$(inotifywait --help 2>&1 | head -1 | awk '{print $2}')" \
    "$(entr 2>&1 | awk '/release/ {print $2}')" \
    "$(wx_version "$WX")" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"

# Worst case per row: SWAPS x ~1 s; in practice a few seconds per row.
run_driver $((SWAPS * 14 + 300)) "$LIB/swap_latency.py" \
    --anchorage "$ANCHORAGE" --target-cmd "$TARGET_CMD" --pool "$SCRATCH_SHM/pool" \
    --shm "$SCRATCH_SHM" --disk "$SCRATCH_DISK" --swaps "$SWAPS" --media "$MEDIA" \
    --stress-swaps "$STRESS_SWAPS" \
    --watchexec "$WX" ${BASELINE:+--baseline "$BASELINE"} ${ONLY:+--only "$ONLY"}
printf 'load average after: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
