#!/usr/bin/env bash
# Where the slowest rounds of the back-to-back create loops went: runs
# `bench --only-create` under `perf sched record` (every context switch on the machine,
# stamped on CLOCK_MONOTONIC), has the bench write each loop's rounds to a file
# (`--rounds-trace`), and prints, for the slowest rounds of each loop, how the two cores
# spent the round: idle, each process of the create's path, and any other process, with the
# longest wait for a CPU and for the disk (such as PostgreSQL's WAL flush) of a process on
# the path. BENCHMARKS.md ("Where the slow rounds go") has its results.
#
#   scripts/create_stalls.sh                      the API-only node (--api-only)
#   scripts/create_stalls.sh --full-node          a full node (API and pipeline)
#   scripts/create_stalls.sh --requests-each 100  more rounds (other flags go to the bench)
#   OUT=/tmp/stalls scripts/create_stalls.sh      keep the trace there (default: a temp dir)
#   PACED=1 scripts/create_stalls.sh --api-only   also the paced loops (2,000/s): their
#                                                 requests at or above the p99
#
# Needs perf (Debian's linux-perf) allowed to record the sched tracepoints machine-wide (as
# root, or kernel.perf_event_paranoid at -1), a release build of the bench
# (`cargo build --release -p herald-examples`) and the servers on loopback
# (scripts/services.sh). perf adds its own cost to every switch, so its latencies run
# higher than the bench's alone; read it for where a round's time went, not for the figure.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v perf >/dev/null || { echo "create_stalls: perf not found (apt-get install linux-perf)" >&2; exit 1; }
BENCH=${BENCH:-target/release/bench}
[ -x "$BENCH" ] || { echo "create_stalls: $BENCH not built (cargo build --release -p herald-examples)" >&2; exit 1; }
OUT=${OUT:-$(mktemp -d -t herald-stalls.XXXXXX)}
mkdir -p "$OUT"
rm -f "$OUT/rounds.jsonl"

# The API-only node unless --full-node (the script's own flag) is given; the rest go to the
# bench.
full="" api="" args=()
for a in "$@"; do
  case "$a" in
    --full-node) full=1 ;;
    --api-only) api=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
[ -n "$full" ] || [ -n "$api" ] || args=(--api-only "${args[@]}")
# Back to back only unless PACED is set (the bench's paced loops then run too).
pace=(--create-rate 0)
[ -z "${PACED:-}" ] || pace=()
perf sched record -k CLOCK_MONOTONIC -a -o "$OUT/sched.data" -- \
  "$BENCH" --only-create "${pace[@]}" --rounds-trace "$OUT/rounds.jsonl" "${args[@]}"
perf sched timehist --state -i "$OUT/sched.data" > "$OUT/timehist.txt" 2>/dev/null
python3 scripts/create_stalls.py "$OUT/rounds.jsonl" "$OUT/timehist.txt"
echo "trace kept in $OUT"
