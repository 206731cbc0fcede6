# Shared by the scripts that drive `herald serve` from outside herald (outside_push.sh,
# outside_startup.sh); sourced, not run. Needs nats-py, psql and redis-cli.

PG=(env PGOPTIONS='-c client_min_messages=warning' psql -q -h 127.0.0.1 -U postgres)
BIN=${HERALD_BIN:-target/release/herald}

# Names this run's database $1 and NATS prefix $2 (in $DB and $PREFIX) and points
# `herald serve` at them.
name_run() {
    DB=$1
    PREFIX=$2
    export HERALD__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB?sslmode=disable"
    export HERALD__NATS__PREFIX=$PREFIX
}

# Starts `$BIN serve` in the background, its PID in $SERVE and its output in the file $LOG,
# and waits until its API answers.
start_serve() {
    LOG=$(mktemp)
    "$BIN" serve >"$LOG" 2>&1 &
    SERVE=$!
    wait_for_api "$PREFIX"
}

# Stops the `herald serve` whose PID is in $SERVE, if any, and reports the warnings and
# errors it logged.
stop_serve() {
    if [ -n "${SERVE:-}" ]; then
        kill "$SERVE" 2>/dev/null || true
        wait "$SERVE" 2>/dev/null || true
        SERVE=
        report_warnings "$LOG"
        rm -f "$LOG"
    fi
}

# Gives the disk what is pending, so that a later flush does not land in a measurement: the
# checkpointer writes the seed now (as the bench does after seeding), and `sync` flushes the
# stream files nats-server 2.9 otherwise flushes only every 60 s.
settle() {
    sync
    "${PG[@]}" -c CHECKPOINT >/dev/null
    sleep 2
}

# Removes database $1, and the streams and Redis keys of NATS prefix $2.
remove_run() {
    local db=$1 prefix=$2
    "${PG[@]}" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    (cd /tmp && python3 - "$prefix" <<'EOF'
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
    ) || echo "removing the ${prefix^^}_* streams failed" >&2
    redis-cli --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli del >/dev/null
}

# Checks that $BIN is built, makes database $DB afresh and migrates it, and on exit stops
# the `herald serve` in $SERVE and removes $DB and the streams and keys of prefix $PREFIX.
start_run() {
    [ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p herald-engine" >&2; exit 1; }
    SERVE=
    trap 'stop_serve; remove_run "$DB" "$PREFIX"' EXIT
    trap 'exit 1' INT TERM
    "${PG[@]}" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
    "$BIN" migrate >/dev/null
}

# Waits (up to 20 s) until the API of prefix $1 answers: the status of an unknown campaign.
wait_for_api() {
    local prefix=$1
    for _ in $(seq 100); do
        if (cd /tmp && python3 -c "
import asyncio, nats
async def m():
    nc = await nats.connect('nats://127.0.0.1:4222')
    await nc.request('$prefix.api.campaign.status', b'{\"campaign_id\":1}', timeout=0.5)
asyncio.run(m())" 2>/dev/null); then return 0; fi
        sleep 0.2
    done
    echo "the API on $prefix did not answer within 20 s" >&2
    return 1
}

# CPU clock ticks (user + system) process $1 has used.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Prints the lines of log file $1 that are warnings or errors, if any.
report_warnings() {
    if grep -qiE ' (WARN|ERROR) ' "$1"; then
        echo "herald serve logged warnings or errors:" >&2
        grep -iE ' (WARN|ERROR) ' "$1" | head -n 5 >&2
    fi
}
