#!/usr/bin/env bash
# Create latency on a `herald serve` that is pushing a full-population campaign, from outside
# herald: a release `herald serve` on a fresh database of USERS seeded users (the bench's
# push knobs, a 200 ms provider), then RUNS times, each load once on the idle node and once
# 2 s after a promotion for everyone was created, while it is pushing:
# - creates paced at RATE/s (100 requesters, EACH requests each, campaigns on an empty
#   segment; scripts/outside_create.py);
# - the same load to a no-op responder (outside_create.py --serve-noop): the request and
#   reply through NATS alone, on the same machine at the same moment;
# - the two other waits of a create, at RATE/s each, side by side: a Redis `SET NX`
#   (scripts/outside_redis_latency.py) and a one-row insert and commit in PostgreSQL
#   (pgbench, in a table of the run's database).
# BENCHMARKS.md ("Create latency during a push") has its results.
#
#   scripts/outside_create_during_push.sh                        10M users, 2 runs
#   SEND=40000 scripts/outside_create_during_push.sh             at most 40,000 sends in
#                                                                flight: a slower push
#   USERS=1000000 RUNS=1 RATE=500 EACH=20 scripts/outside_create_during_push.sh
#
# Needs nats-py (`python3 -m pip install nats-py`, run outside the repository), psql,
# pgbench and redis-cli, and the servers on loopback (scripts/services.sh). It stops the
# `herald serve` and the responder it started, by their PIDs, and removes its database,
# streams and keys.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-10000000}
RUNS=${RUNS:-2}
RATE=${RATE:-200}
EACH=${EACH:-10}
# shellcheck source=scripts/outside_lib.sh
. scripts/outside_lib.sh
name_run herald_during_push hdp$$
export HERALD__DATABASE__MAX_CONNECTIONS=16 HERALD__DATABASE__MIN_CONNECTIONS=16
export HERALD__PROVIDERS__APP__KIND=simulated HERALD__PROVIDERS__APP__LATENCY_MS=200
export HERALD__PIPELINE__PUSH__CONCURRENCY=3600 HERALD__PIPELINE__PUSH__MAX_ACK_PENDING=7200
export HERALD__PIPELINE__SEND_CONCURRENCY=${SEND:-360000}

start_run
NOOP=
trap '[ -n "$NOOP" ] && kill "$NOOP" 2>/dev/null; rm -rf "${PGB_SQL:-}" "${PGB_LOG:-}"; stop_serve; remove_run "$DB" "$PREFIX"' EXIT
"$BIN" users seed --count "$USERS" >/dev/null
"${PG[@]}" -d "$DB" -c "CREATE TABLE during_push_probe (id bigserial PRIMARY KEY, body text)"
PGB_SQL=$(mktemp)
echo "INSERT INTO during_push_probe (body) VALUES ('x');" >"$PGB_SQL"
PGB_LOG=$(mktemp -d)
start_serve
python3 scripts/outside_create.py --serve-noop "$PREFIX.noop" 2>/dev/null &
NOOP=$!

load() {
    local what=$1 target=$2
    if [ "$target" = parts ]; then
        printf '%s, Redis: ' "$what"
        python3 scripts/outside_redis_latency.py --rate "$RATE" --count $((EACH * 100)) &
        local redis=$!
        pgbench -h 127.0.0.1 -U postgres -n -f "$PGB_SQL" -R "$RATE" \
            -T $(((EACH * 100 + ${RATE%.*} - 1) / ${RATE%.*})) -c 1 -l \
            --log-prefix="$PGB_LOG/tx" "$DB" >/dev/null 2>&1
        wait "$redis"
        printf '%s, PostgreSQL: ' "$what"
        # pgbench's log: the third field of each line is the transaction's latency in µs.
        cat "$PGB_LOG"/tx* | PYTHONPATH=scripts python3 -c '
import json, sys
from outside_create import latency_summary
took = [int(line.split()[2]) / 1e6 for line in sys.stdin]
print(json.dumps({"statement": "insert and commit", **latency_summary(took)}))'
        rm -f "$PGB_LOG"/tx*
        return
    fi
    local subject=$PREFIX.api.campaign.create
    [ "$target" = noop ] && subject=$PREFIX.noop
    printf '%s: ' "$what"
    python3 scripts/outside_create.py --prefix "$PREFIX" --subject "$subject" \
        --rate "$RATE" --requesters 100 --requests-each "$EACH"
}

# Before each idle load the disk is settled (outside_lib.sh), so that a flush of earlier
# writes (the seed, the last push's stream files) does not stall the idle figures.
for _ in $(seq "$RUNS"); do
    for target in create noop parts; do
        settle
        load "$target, idle node" "$target"
        push_out=$(mktemp)
        python3 scripts/outside_push.py --prefix "$PREFIX" --runs 1 --expect "$USERS" >"$push_out" 2>&1 &
        push=$!
        sleep 2
        load "$target, during the push" "$target"
        if ! wait "$push"; then
            cat "$push_out" >&2
            rm -f "$push_out"
            exit 1
        fi
        printf 'the push: '
        cat "$push_out"
        rm -f "$push_out"
    done
done
