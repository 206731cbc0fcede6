#!/usr/bin/env bash
# Runs herald locally in one command: `herald dev` starts nats-server and redis-server as
# child processes when nothing listens on their ports, and uses SQLite by default. This
# script only makes sure both binaries are installed (Debian packages), then runs it.
# Extra arguments go to `herald dev`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "demo: error: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

# Install only; do not start: herald dev starts them itself.
scripts/services.sh install nats redis

# Debian puts nats-server in /usr/sbin, which a non-root PATH may lack.
case ":$PATH:" in
*:/usr/sbin:*) ;;
*) PATH="$PATH:/usr/sbin" ;;
esac
export PATH

exec cargo run --release -p herald-engine --bin herald -- dev "$@"
