#!/usr/bin/env bash
# Makes sure the servers herald's tests need run on this machine, on loopback only:
# NATS with JetStream (4222), Redis (6379), PostgreSQL (5432, user postgres, trust auth).
#
#   scripts/services.sh                    start whatever does not already listen (idempotent)
#   scripts/services.sh install [names]    only install missing packages (nats redis postgres)
#
# A server that already listens on its port is left alone. A missing binary is installed
# from the Debian package (apt-get; through sudo when not root). No systemd is needed.
#
# Environment overrides (defaults in brackets):
#   HERALD_NATS_PORT [4222]   HERALD_NATS_DIR [/var/lib/nats-server]  HERALD_NATS_LOG
#   HERALD_REDIS_PORT [6379]  HERALD_REDIS_DIR [/var/lib/redis]       HERALD_REDIS_LOG
#   HERALD_PG_PORT [5432]     HERALD_PG_VERSION [newest installed]
#   HERALD_SERVICES_TIMEOUT [30]   seconds to wait for a started server to listen
# When not root, the NATS and Redis defaults move to ~/.local/state/herald/.
set -euo pipefail

HOST=127.0.0.1
TIMEOUT="${HERALD_SERVICES_TIMEOUT:-30}"

if [[ $(id -u) -eq 0 ]]; then
    state_dir=/var/lib
    log_dir=/var/log
else
    state_dir="${XDG_STATE_HOME:-$HOME/.local/state}/herald"
    log_dir="$state_dir"
fi

NATS_PORT="${HERALD_NATS_PORT:-4222}"
NATS_DIR="${HERALD_NATS_DIR:-$state_dir/nats-server}"
NATS_LOG="${HERALD_NATS_LOG:-$log_dir/nats-server.log}"
REDIS_PORT="${HERALD_REDIS_PORT:-6379}"
REDIS_DIR="${HERALD_REDIS_DIR:-$state_dir/redis}"
REDIS_LOG="${HERALD_REDIS_LOG:-$log_dir/redis/ci.log}"
PG_PORT="${HERALD_PG_PORT:-5432}"

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

# Commands that need root (apt, PostgreSQL cluster admin) go through sudo when not root.
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi
as_root() {
    if [[ $(id -u) -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
        die "need root to run '$*' (not root, no sudo); run this script as root"
    fi
    "${SUDO[@]}" "$@"
}

# Finds a binary on PATH or in the sbin directories a non-root PATH may lack.
find_bin() {
    local name="$1" dir
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for dir in /usr/sbin /sbin /usr/local/sbin /usr/local/bin; do
        if [[ -x "$dir/$name" ]]; then
            echo "$dir/$name"
            return 0
        fi
    done
    return 1
}

# True if something accepts TCP connections on $HOST:$1.
listening() {
    local port="$1"
    if command -v timeout >/dev/null 2>&1; then
        timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$port" 2>/dev/null
    else
        (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null
    fi
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install $* with your package manager and re-run"
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        as_root apt-get update -q
        apt_updated=1
    fi
    log "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# Newest PostgreSQL server version installed from Debian packages, or nothing.
pg_installed_version() {
    local bin
    for bin in /usr/lib/postgresql/*/bin/postgres; do
        if [[ -x $bin ]]; then
            basename "$(dirname "$(dirname "$bin")")"
        fi
    done | sort -V | tail -n 1
}

# (Written with if, not ||, so that set -e still applies inside apt_install.)
ensure_installed() {
    case "$1" in
    nats)
        if ! find_bin nats-server >/dev/null; then
            apt_install nats-server
            find_bin nats-server >/dev/null || die "nats-server still missing after install"
        fi
        ;;
    redis)
        if ! find_bin redis-server >/dev/null; then
            apt_install redis-server
            find_bin redis-server >/dev/null || die "redis-server still missing after install"
        fi
        ;;
    postgres)
        if ! find_bin pg_ctlcluster >/dev/null || ! find_bin psql >/dev/null ||
            [[ -z $(pg_installed_version) ]]; then
            apt_install postgresql
            [[ -n $(pg_installed_version) ]] || die "no PostgreSQL server under /usr/lib/postgresql after install"
        fi
        ;;
    *) die "unknown service '$1' (expected nats, redis or postgres)" ;;
    esac
}

# Waits until $2 listens; otherwise fails with the tail of log file $3. Gives up early when
# the process in pidfile $4 (optional) has exited.
wait_port() {
    local name="$1" port="$2" logfile="$3" pidfile="${4:-}" waited=0 pid reason
    until listening "$port"; do
        reason=""
        if ((waited >= TIMEOUT * 2)); then
            reason="did not listen on $HOST:$port within ${TIMEOUT}s"
        elif [[ -n $pidfile && -s $pidfile ]]; then
            pid="$(cat "$pidfile")"
            kill -0 "$pid" 2>/dev/null || reason="exited (pid $pid) before listening on $HOST:$port"
        fi
        if [[ -n $reason ]]; then
            log "$name $reason; last lines of $logfile:"
            if [[ -r $logfile ]]; then
                tail -n 30 "$logfile" >&2
            else
                as_root tail -n 30 "$logfile" >&2 || true
            fi
            die "$name failed to start"
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
}

# Runs a command in the background, detached, and records its pid in pidfile $1.
start_daemon() {
    local pidfile="$1" bin="$2"
    shift 2
    if command -v start-stop-daemon >/dev/null 2>&1; then
        # The pidfile (not just the executable name) identifies our instance, so a server
        # of the same kind on another port does not count as "already running".
        start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$pidfile" \
            --exec "$bin" -- "$@"
    else
        setsid nohup "$bin" "$@" >/dev/null 2>&1 </dev/null &
        echo $! >"$pidfile"
    fi
}

summary=()

# Warns when the NATS server on $NATS_PORT runs without JetStream: its greeting (INFO) says.
nats_check_jetstream() {
    local info
    info="$( (exec 3<>"/dev/tcp/$HOST/$NATS_PORT" && read -r -t 3 line <&3 && printf '%s' "$line") 2>/dev/null || true)"
    if [[ $info == INFO* && $info != *'"jetstream":true'* ]]; then
        log "nats: warning: the server on $HOST:$NATS_PORT runs without JetStream (-js); herald needs it"
    fi
}

up_nats() {
    local url="nats://$HOST:$NATS_PORT" bin
    if listening "$NATS_PORT"; then
        log "nats: something already listens on $HOST:$NATS_PORT, leaving it alone"
        nats_check_jetstream
        summary+=("nats      $url  (already running)")
        return
    fi
    ensure_installed nats
    if listening "$NATS_PORT"; then
        nats_check_jetstream
        summary+=("nats      $url  (started by the package install)")
        return
    fi
    bin="$(find_bin nats-server)"
    mkdir -p "$NATS_DIR" "$(dirname "$NATS_LOG")"
    log "nats: starting $bin on $HOST:$NATS_PORT (JetStream store $NATS_DIR, log $NATS_LOG)"
    start_daemon "$NATS_DIR/nats-server.pid" "$bin" \
        -a "$HOST" -p "$NATS_PORT" -js -sd "$NATS_DIR" -l "$NATS_LOG"
    wait_port nats "$NATS_PORT" "$NATS_LOG" "$NATS_DIR/nats-server.pid"
    summary+=("nats      $url  (started, pid $(cat "$NATS_DIR/nats-server.pid"), store $NATS_DIR, log $NATS_LOG)")
}

up_redis() {
    local url="redis://$HOST:$REDIS_PORT" bin
    if listening "$REDIS_PORT"; then
        log "redis: something already listens on $HOST:$REDIS_PORT, leaving it alone"
        summary+=("redis     $url  (already running)")
        return
    fi
    ensure_installed redis
    # The Debian package may have started its own server on install.
    if listening "$REDIS_PORT"; then
        summary+=("redis     $url  (started by the package install)")
        return
    fi
    bin="$(find_bin redis-server)"
    mkdir -p "$REDIS_DIR" "$(dirname "$REDIS_LOG")"
    log "redis: starting $bin on $HOST:$REDIS_PORT (dir $REDIS_DIR, log $REDIS_LOG, no persistence)"
    # "-::1": also bind IPv6 loopback when it exists, without failing when it does not.
    # A pidfile left by a crashed server would fool wait_port; nothing serves this port now.
    rm -f "$REDIS_DIR/redis-$REDIS_PORT.pid"
    "$bin" --daemonize yes --bind "$HOST" -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$REDIS_DIR" --logfile "$REDIS_LOG" --pidfile "$REDIS_DIR/redis-$REDIS_PORT.pid"
    wait_port redis "$REDIS_PORT" "$REDIS_LOG" "$REDIS_DIR/redis-$REDIS_PORT.pid"
    summary+=("redis     $url  (started, pid $(cat "$REDIS_DIR/redis-$REDIS_PORT.pid" 2>/dev/null || echo '?'), dir $REDIS_DIR, log $REDIS_LOG)")
}

# True if user postgres can connect over TCP without a password.
pg_trusts() {
    env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
        psql -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -w -Atqc 'select 1' >/dev/null 2>&1
}

# Puts trust rules for loopback TCP first in the cluster's pg_hba.conf and reloads.
pg_trust_loopback() {
    local ver="$1" hba tmp marker="# herald scripts/services.sh: trust loopback TCP (dev/CI only)"
    hba="$(pg_conftool -s "$ver" main show hba_file 2>/dev/null | tr -d "'" || true)"
    [[ -n $hba ]] || hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if as_root grep -qxF "$marker" "$hba"; then
        die "postgres: user postgres cannot connect to $HOST:$PG_PORT without a password although $hba trusts loopback; check that file"
    fi
    log "postgres: user postgres needs a password over TCP; adding trust rules for 127.0.0.1 and ::1 at the top of $hba"
    tmp="$(mktemp)"
    {
        echo "$marker"
        echo "host    all             all             127.0.0.1/32            trust"
        echo "host    all             all             ::1/128                 trust"
        as_root cat "$hba"
    } >"$tmp"
    # tee keeps the file's owner and mode.
    as_root tee "$hba" <"$tmp" >/dev/null
    rm -f "$tmp"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
}

up_postgres() {
    local url="postgres://postgres@$HOST:$PG_PORT/postgres" ver cluster_port logfile how i
    if listening "$PG_PORT"; then
        log "postgres: something already listens on $HOST:$PG_PORT, leaving it alone"
        if find_bin psql >/dev/null && ! pg_trusts; then
            log "postgres: warning: user postgres cannot connect to $HOST:$PG_PORT without a password; tests expect trust auth (or set HERALD_TEST_PG_URL)"
        fi
        summary+=("postgres  $url  (already running)")
        return
    fi
    ensure_installed postgres
    ver="${HERALD_PG_VERSION:-}"
    if [[ -z $ver ]]; then
        # Prefer an existing "main" cluster; otherwise the newest installed server.
        ver="$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" { print $1 }' | sort -V | tail -n 1)"
        [[ -n $ver ]] || ver="$(pg_installed_version)"
    fi
    [[ -n $ver ]] || die "postgres: no PostgreSQL server found under /usr/lib/postgresql"
    if [[ ! -d /etc/postgresql/$ver/main ]]; then
        log "postgres: creating cluster $ver/main on port $PG_PORT"
        as_root pg_createcluster --port "$PG_PORT" "$ver" main
    fi
    cluster_port="$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" { print $3 }')"
    if [[ $cluster_port != "$PG_PORT" ]]; then
        die "postgres: cluster $ver/main is configured for port ${cluster_port:-?}, not $PG_PORT; set 'port = $PG_PORT' in /etc/postgresql/$ver/main/postgresql.conf or HERALD_PG_PORT=$cluster_port"
    fi
    logfile="$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" { print $7 }')"
    [[ -n $logfile ]] || logfile="/var/log/postgresql/postgresql-$ver-main.log"
    # The package install may already have started the cluster.
    if listening "$PG_PORT"; then
        how="started by the package install"
    else
        log "postgres: starting cluster $ver/main on port $PG_PORT (log $logfile)"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
        how="started cluster $ver/main, log $logfile"
    fi
    wait_port postgres "$PG_PORT" "$logfile"
    if ! pg_trusts; then
        pg_trust_loopback "$ver"
        # A reload is asynchronous: poll briefly.
        for ((i = 0; i < 20; i++)); do
            pg_trusts && break
            sleep 0.5
        done
        pg_trusts || die "postgres: user postgres still cannot connect to $HOST:$PG_PORT without a password after reload; see $logfile"
    fi
    summary+=("postgres  $url  ($how)")
}

main() {
    local cmd="${1:-up}"
    case "$cmd" in
    up)
        [[ $# -le 1 ]] || die "usage: $0 [up | install [nats|redis|postgres ...]]"
        up_nats
        up_redis
        up_postgres
        printf '%s\n' "${summary[@]}"
        ;;
    install)
        shift
        local name
        [[ $# -gt 0 ]] || set -- nats redis postgres
        for name in "$@"; do
            ensure_installed "$name"
        done
        ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "usage: $0 [up | install [nats|redis|postgres ...]]" ;;
    esac
}

main "$@"
