#!/usr/bin/env bash
# The bench's full-population push driven from outside herald: a release `herald serve` on a
# fresh PostgreSQL database of USERS seeded users (the disk settled after seeding, as the
# bench does; the bench's knobs set through the environment), and scripts/outside_push.py, a
# plain nats-py client, creating a promotion for everyone and polling its status every 20 ms
# until it is final, RUNS times with a 200 ms provider and RUNS times with a 0 ms provider
# (a node restarted in between). After each node it prints `herald serve`'s CPU µs per user
# and peak RSS (VmHWM).
# BENCHMARKS.md ("Driven from outside herald") has its results.
#
#   scripts/outside_push.sh                          1,000,000 users, 3 runs per latency
#   USERS=10000000 RUNS=1 scripts/outside_push.sh
#   HERALD_BIN=/path/to/herald scripts/outside_push.sh   another build
#
# Needs nats-py (`python3 -m pip install nats-py`, run outside the repository), psql and
# redis-cli, and the servers on loopback (scripts/services.sh). It stops each `herald serve`
# it started, by its PID, and removes its database, streams and Redis keys.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-1000000}
RUNS=${RUNS:-3}
# shellcheck source=scripts/outside_lib.sh
. scripts/outside_lib.sh
name_run herald_outside hout$$
export HERALD__DATABASE__MAX_CONNECTIONS=16 HERALD__DATABASE__MIN_CONNECTIONS=16
export HERALD__PROVIDERS__APP__KIND=simulated
export HERALD__PIPELINE__PUSH__CONCURRENCY=3600 HERALD__PIPELINE__PUSH__MAX_ACK_PENDING=7200
export HERALD__PIPELINE__SEND_CONCURRENCY=360000

start_run
"$BIN" users seed --count "$USERS"
settle

for latency in 200 0; do
    export HERALD__PROVIDERS__APP__LATENCY_MS=$latency
    start_serve
    t0=$(ticks "$SERVE")
    echo "provider latency $latency ms:"
    python3 scripts/outside_push.py --prefix "$PREFIX" --runs "$RUNS" --expect "$USERS"
    t1=$(ticks "$SERVE")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SERVE/status")
    echo "{\"latency_ms\": $latency, \"herald_cpu_us_per_user\": $(printf '%.2f' "$(echo "scale=4; ($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / ($USERS * $RUNS)" | bc)"), \"herald_peak_rss_mb\": $((hwm / 1024))}"
    stop_serve
done
