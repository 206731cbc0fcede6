#!/usr/bin/env bash
# The bench's full-population push driven from outside herald: a release `herald serve` on a
# fresh PostgreSQL database of USERS seeded users (the bench's knobs set through the
# environment), and scripts/outside_push.py, a plain nats-py client, creating a promotion
# for everyone and polling its status every 20 ms until it is final, RUNS times with a 200 ms
# provider and RUNS times with a 0 ms provider (a node restarted in between). After each
# node it prints `herald serve`'s CPU µs per user and peak RSS (VmHWM).
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

BIN=${HERALD_BIN:-target/release/herald}
USERS=${USERS:-1000000}
RUNS=${RUNS:-3}
PG=(env PGOPTIONS='-c client_min_messages=warning' psql -q -h 127.0.0.1 -U postgres)
DB=herald_outside
PREFIX=hout$$
export HERALD__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable"
export HERALD__DATABASE__MAX_CONNECTIONS=16 HERALD__DATABASE__MIN_CONNECTIONS=16
export HERALD__NATS__PREFIX=$PREFIX
export HERALD__PROVIDERS__APP__KIND=simulated
export HERALD__PIPELINE__PUSH__CONCURRENCY=3600 HERALD__PIPELINE__PUSH__MAX_ACK_PENDING=7200
export HERALD__PIPELINE__SEND_CONCURRENCY=360000

[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p herald-engine" >&2; exit 1; }

SERVE=
stop_serve() {
    if [ -n "$SERVE" ]; then
        kill "$SERVE" 2>/dev/null || true
        wait "$SERVE" 2>/dev/null || true
        SERVE=
    fi
}
cleanup() {
    stop_serve
    "${PG[@]}" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    (cd /tmp && python3 - "$PREFIX" <<'EOF'
import asyncio, sys
import nats

async def main(prefix):
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    for s in await js.streams_info():
        if s.config.name.startswith(prefix.upper() + "_"):
            await js.delete_stream(s.config.name)
    await nc.close()

asyncio.run(main(sys.argv[1]))
EOF
    ) || echo "removing the ${PREFIX^^}_* streams failed" >&2
    redis-cli --scan --pattern "$PREFIX:*" | xargs -r -n 500 redis-cli del >/dev/null
}
trap cleanup EXIT
trap 'exit 1' INT TERM

"${PG[@]}" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
"$BIN" migrate >/dev/null
"$BIN" users seed --count "$USERS"

for latency in 200 0; do
    LOG=$(mktemp)
    HERALD__PROVIDERS__APP__LATENCY_MS=$latency "$BIN" serve >"$LOG" 2>&1 &
    SERVE=$!
    # Up once the API answers (an unknown campaign's status).
    for _ in $(seq 100); do
        if (cd /tmp && python3 -c "
import asyncio, nats
async def m():
    nc = await nats.connect('nats://127.0.0.1:4222')
    await nc.request('$PREFIX.api.campaign.status', b'{\"campaign_id\":1}', timeout=0.5)
asyncio.run(m())" 2>/dev/null); then break; fi
        sleep 0.2
    done
    t0=$(awk '{print $14 + $15}' "/proc/$SERVE/stat")
    echo "provider latency $latency ms:"
    python3 scripts/outside_push.py --prefix "$PREFIX" --runs "$RUNS" --expect "$USERS"
    t1=$(awk '{print $14 + $15}' "/proc/$SERVE/stat")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SERVE/status")
    echo "{\"latency_ms\": $latency, \"herald_cpu_us_per_user\": $(printf '%.2f' "$(echo "scale=4; ($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / ($USERS * $RUNS)" | bc)"), \"herald_peak_rss_mb\": $((hwm / 1024))}"
    stop_serve
    if grep -qiE ' (WARN|ERROR) ' "$LOG"; then
        echo "herald serve logged warnings or errors:" >&2
        grep -iE ' (WARN|ERROR) ' "$LOG" | head -n 5 >&2
    fi
    rm -f "$LOG"
done
