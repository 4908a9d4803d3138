#!/usr/bin/env bash
# Counts the code a pgbench transaction runs through in pgshield: runs a release build
# under callgrind (one worker, transaction mode, pool 20) in front of the benchmark
# cluster, drives it with pgbench, and reports instructions, hot code lines and simulated
# I1 misses per transaction (scripts/footprint.py). Deterministic, unlike tps on a shared
# machine: compare two builds by their hot lines (docs/BENCHMARKS.md, seventh session).
#
#   AUTH=trust ../shared/bench/pgcluster.sh start /tmp/bench/pg 5440
#   cargo build --release && scripts/footprint.sh
#
# Environment (defaults): PGSHIELD_BIN=target/release/pgshield PG_PORT=5440 PORT=7450
#   C=16 (clients: fewer than the pool's 20, so that no borrow queues and counts repeat)
#   T=500 (transactions per client) SEL=-S (pgbench's script option: SEL= for tpcb)
#   OUT=/tmp/pgshield-footprint (the profile and logs)
# Needs valgrind, pgbench and python3.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${PGSHIELD_BIN:-$HERE/target/release/pgshield}
PG_PORT=${PG_PORT:-5440} PORT=${PORT:-7450} C=${C:-16} T=${T:-500}
OUT=${OUT:-/tmp/pgshield-footprint}
PGBENCH=${PGBENCH:-$(command -v pgbench || ls -v /usr/lib/postgresql/*/bin/pgbench | tail -1)}
for tool in valgrind callgrind_control python3; do
    command -v "$tool" >/dev/null || { echo "footprint.sh: needs $tool" >&2; exit 2; }
done
mkdir -p "$OUT"
rm -f "$OUT"/callgrind.out*
cat > "$OUT/pgshield.toml" <<CONF
[listen]
addr = "127.0.0.1:$PORT"
[pool]
mode = "transaction"
max_size = 20
shutdown_timeout = "1s"
[runtime]
workers = 1
[admin]
http_listen = ""
[databases.bench]
host = "127.0.0.1"
port = $PG_PORT
[users.bench]
auth = "trust"
server_password = "bench"
[log]
level = "warn"
CONF
valgrind --tool=callgrind --dump-instr=yes --cache-sim=yes \
    --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" run --config "$OUT/pgshield.toml" >"$OUT/valgrind.log" 2>&1 &
VPID=$!
trap 'kill -INT $VPID 2>/dev/null || true' EXIT
up=
for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && { up=1; break; }
    kill -0 $VPID 2>/dev/null || { cat "$OUT/valgrind.log" >&2; exit 1; }
    sleep 0.3
done
[[ -n $up ]] || { echo "footprint.sh: pgshield did not listen on $PORT within 60 s" >&2; exit 1; }
bench() {
    PGPASSWORD=bench "$PGBENCH" -n ${SEL--S} -c "$C" -j 2 -t "$1" \
        -h 127.0.0.1 -p "$PORT" -U bench bench
}
bench 100 >/dev/null 2>&1  # warm up: backends open, statements prepared
callgrind_control -z $VPID >/dev/null
bench "$T" >"$OUT/pgbench.log" 2>&1
callgrind_control -d $VPID >/dev/null
grep -E "failed|actually processed" "$OUT/pgbench.log"
for _ in $(seq 1 50); do ls "$OUT"/callgrind.out.* >/dev/null 2>&1 && break; sleep 0.2; done
sleep 1
python3 "$HERE/scripts/footprint.py" "$(ls "$OUT"/callgrind.out.* | head -1)" $((C * T))
