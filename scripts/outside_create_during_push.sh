#!/usr/bin/env bash
# Create latency on a `herald serve` that is pushing a full-population campaign, from outside
# herald: a release `herald serve` on a fresh database of USERS seeded users (the bench's
# push knobs, a 200 ms provider), then RUNS times: creates paced at RATE/s (100 requesters,
# EACH requests each, campaigns on an empty segment) on the idle node, and the same load
# again 2 s after a promotion for everyone was created, while it is pushing. The same two
# loads go to a no-op responder (scripts/outside_create.py --serve-noop), which shows what
# the request and reply through NATS alone take on the same machine at the same moment.
# BENCHMARKS.md ("Create latency during a push") has its results.
#
#   scripts/outside_create_during_push.sh                        10M users, 2 runs
#   SEND=40000 scripts/outside_create_during_push.sh             at most 40,000 sends in
#                                                                flight: a slower push
#   USERS=1000000 RUNS=1 RATE=500 EACH=20 scripts/outside_create_during_push.sh
#
# Needs nats-py (`python3 -m pip install nats-py`, run outside the repository), psql and
# redis-cli, and the servers on loopback (scripts/services.sh). It stops the `herald serve`
# and the responder it started, by their PIDs, and removes its database, streams and keys.
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
trap '[ -n "$NOOP" ] && kill "$NOOP" 2>/dev/null; stop_serve; remove_run "$DB" "$PREFIX"' EXIT
"$BIN" users seed --count "$USERS" >/dev/null
start_serve
python3 scripts/outside_create.py --serve-noop "$PREFIX.noop" 2>/dev/null &
NOOP=$!

load() {
    local what=$1 subject=$2
    printf '%s: ' "$what"
    python3 scripts/outside_create.py --prefix "$PREFIX" --subject "$subject" \
        --rate "$RATE" --requesters 100 --requests-each "$EACH"
}

# Before each idle load the disk is given what is pending (the seed, the last push's stream
# files, which nats-server 2.9 flushes only every 60 s), so that a flush of earlier writes
# does not stall the idle figures.
settle() {
    sync
    "${PG[@]}" -c CHECKPOINT >/dev/null
    sleep 2
}

for _ in $(seq "$RUNS"); do
    for target in create noop; do
        subject=$PREFIX.api.campaign.create
        [ "$target" = noop ] && subject=$PREFIX.noop
        settle
        load "$target, idle node" "$subject"
        push_out=$(mktemp)
        python3 scripts/outside_push.py --prefix "$PREFIX" --runs 1 --expect "$USERS" >"$push_out" 2>&1 &
        push=$!
        sleep 2
        load "$target, during the push" "$subject"
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
