#!/usr/bin/env bash
# TARGET_HOOK for ../shared/bench/run_matrix.sh: starts and stops a release build of
# pgshield fronting the benchmark cluster, so pgshield runs interleaved with direct
# PostgreSQL and PgBouncer in one matrix:
#
#   cargo build --release
#   TARGET_HOOK=$PWD/scripts/bench_target.sh TARGETS="direct pgb-sess pgshield@6450" \
#     ../shared/bench/run_matrix.sh /tmp/bench/results.txt
#
# Usage: bench_target.sh start|stop NAME PORT   (start prints pgshield's PID)
# Environment (defaults): PG_PORT=5440 PG_HOST=127.0.0.1 (or the cluster's socket
#   directory, e.g. /tmp/bench/pg/sock) CLUSTER_DIR=/tmp/bench/pg AUTH=scram
#   PGSHIELD_POOL=40 PGSHIELD_MODE=session WORK=/tmp/bench PGSHIELD_BIN=target/release/pgshield
# With AUTH=scram clients are checked against the cluster's own SCRAM verifier for
# `bench` (from CLUSTER_DIR/userlist.txt, as PgBouncer's auth_file); with AUTH=trust,
# clients are trusted, as PgBouncer's auth_type=trust.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -eq 3 ]] || { sed -n '2,17p' "$0" >&2; exit 2; }
CMD=$1 NAME=$2 PORT=$3
WORK=${WORK:-/tmp/bench}
DIR=$WORK/$NAME
BIN=${PGSHIELD_BIN:-$HERE/target/release/pgshield}

stop() {
    [[ -f $DIR/pid ]] || return 0
    local pid
    pid=$(cat "$DIR/pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid"; kill -INT "$pid" 2>/dev/null || true   # second signal: close now
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$DIR/pid"
}

case "$CMD" in
    start)
        stop
        mkdir -p "$DIR"
        if [[ ${AUTH:-scram} == scram ]]; then
            verifier=$(awk '{print $2}' "${CLUSTER_DIR:-/tmp/bench/pg}/userlist.txt" | tr -d '"')
            user_auth="password = \"$verifier\""
        else
            user_auth='auth = "trust"'
        fi
        cat > "$DIR/pgshield.toml" <<CONF
[listen]
addr = "127.0.0.1:$PORT"
max_client_connections = 20000
[pool]
mode = "${PGSHIELD_MODE:-session}"
max_size = ${PGSHIELD_POOL:-40}
shutdown_timeout = "1s"
[databases.bench]
host = "${PG_HOST:-127.0.0.1}"
port = ${PG_PORT:-5440}
[users.bench]
$user_auth
server_password = "bench"
[log]
level = "warn"
CONF
        "$BIN" run --config "$DIR/pgshield.toml" >"$DIR/pgshield.log" 2>&1 &
        echo $! > "$DIR/pid"
        for _ in $(seq 1 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
            sleep 0.1
        done
        cat "$DIR/pid"
        ;;
    stop) stop ;;
    *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
