#!/usr/bin/env bash
# Measures how fast a full `herald serve` (its defaults) runs the campaigns it is asked to
# create, from outside herald: a fresh PostgreSQL database and a NATS prefix of its own, the
# create load of scripts/outside_create.py (100 requesters, campaigns on an empty segment),
# then the time until no campaign is pending or running, and the CPU of nats-server,
# `herald serve` and every postgres process per create (the create's own cost included).
# BENCHMARKS.md ("Create latency driven from outside herald") has its results.
#
#   scripts/outside_startup.sh                     2,000 creates back to back
#   RATE=500 EACH=100 scripts/outside_startup.sh   10,000 creates paced at 500/s
#   HERALD_BIN=/path/to/herald scripts/outside_startup.sh   another build
#   HERALD__NODE__RUN_PIPELINE=false scripts/outside_startup.sh   an API-only node (the
#                                                  creates alone; no campaign is run)
#
# Needs nats-py (`python3 -m pip install nats-py`, run outside the repository), psql and
# redis-cli, and the servers on loopback (scripts/services.sh). It stops the `herald serve`
# it started, by its PID, and removes its database, streams and Redis keys.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-0}
EACH=${EACH:-20}
# shellcheck source=scripts/outside_lib.sh
. scripts/outside_lib.sh
name_run herald_startup hstart$$

start_run
start_serve

pg_ticks() {
    local sum=0 pid
    for pid in $(pgrep -u postgres); do
        sum=$((sum + $(awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}
NATS_PID=$(pgrep -x nats-server | head -n 1)
xacts() { "${PG[@]}" -tA $DB -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$DB'"; }
n0=$(ticks "$NATS_PID"); h0=$(ticks "$SERVE"); p0=$(pg_ticks); x0=$(xacts)
t0=$(date +%s.%N)
python3 scripts/outside_create.py --prefix "$PREFIX" --rate "$RATE" --requesters 100 --requests-each "$EACH"
t1=$(date +%s.%N)
N=$((EACH * 100))
LIMIT=$(echo "$t1 + 300" | bc)
# An API-only node (HERALD__NODE__RUN_PIPELINE=false) runs no campaign: nothing to wait for.
[ "${HERALD__NODE__RUN_PIPELINE:-true}" = false ] && LIMIT=0
while [ "$LIMIT" != 0 ] && [ "$("${PG[@]}" -tA $DB -c "SELECT count(*) FROM campaign WHERE status IN ('pending', 'running')")" != 0 ]; do
    if [ "$(echo "$(date +%s.%N) > $LIMIT" | bc)" = 1 ]; then
        echo "campaigns still not final 300 s after the last create" >&2
        exit 1
    fi
    sleep 0.2
done
t2=$(date +%s.%N)
# PostgreSQL 15 publishes an idle backend's transaction counts within 10 s.
sleep 11
x1=$(xacts)
tick=$(getconf CLK_TCK)
num() { printf '%.3f' "$(echo "scale=6; $1" | bc)"; }
per() { num "($1) * 1000 / $tick / $N"; }
echo "{\"creates\": $N, \"rate\": $RATE, \"creates_s\": $(num "$t1 - $t0"), \"all_final_s\": $([ "$LIMIT" = 0 ] && echo null || num "$t2 - $t0"), \"cpu_ms_per_create\": {\"nats-server\": $(per "$(ticks "$NATS_PID") - $n0"), \"herald\": $(per "$(ticks "$SERVE") - $h0"), \"postgres\": $(per "$(pg_ticks) - $p0")}, \"db_transactions_per_create\": $(num "($x1 - $x0) / $N")}"
stop_serve
