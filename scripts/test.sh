#!/usr/bin/env bash
# Runs herald's whole test suite against real servers: makes sure NATS (JetStream), Redis
# and PostgreSQL run (scripts/services.sh) and that the nats-server, PostgreSQL and Redis
# binaries are installed (the restart tests run servers of their own), then
# `cargo test --workspace --all-targets`.
# Extra arguments go to cargo test, e.g. `scripts/test.sh -p herald-nats` or
# `scripts/test.sh -- --nocapture`. Exits non-zero when a test fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# CI images often install rustup without putting cargo on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "test: error: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

start=$SECONDS
scripts/services.sh
# The restart tests kill and start a nats-server, a PostgreSQL cluster and a redis-server of
# their own, so the binaries must be here even when the shared servers were not started
# from them.
scripts/services.sh install nats postgres redis
services_done=$SECONDS
echo "test: services ready in $((services_done - start))s" >&2

status=0
cargo test --workspace --all-targets "$@" || status=$?
end=$SECONDS

if [[ $status -eq 0 ]]; then
    verdict="passed"
else
    verdict="FAILED (exit $status)"
fi
echo "test: cargo test $verdict in $((end - services_done))s (total $((end - start))s)" >&2
exit "$status"
