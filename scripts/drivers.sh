#!/usr/bin/env bash
# Installs the client drivers tests/drivers.rs runs pgshield against, when missing:
# asyncpg and psycopg 3 (in a venv), node-postgres, and pgjdbc (Debian's package), plus
# what they need (python3-venv, nodejs and npm, a JDK) from Debian's packages. Everything
# but the Debian packages goes under $PGSHIELD_DRIVERS_DIR (default target/drivers).
# Idempotent: a second run installs nothing. scripts/test.sh runs it before cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${PGSHIELD_DRIVERS_DIR:-target/drivers}
ASYNCPG=0.32.0 PSYCOPG=3.3.9 NODE_PG=8.23.1

debs=()
python3 -c 'import ensurepip, venv' 2>/dev/null || debs+=(python3-venv)
command -v node >/dev/null && command -v npm >/dev/null || debs+=(nodejs npm)
command -v javac >/dev/null || debs+=(default-jdk-headless)
[[ -f /usr/share/java/postgresql.jar ]] || debs+=(libpostgresql-jdbc-java)
if ((${#debs[@]})); then
    echo "scripts/drivers.sh: installing Debian's ${debs[*]}" >&2
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
fi

mkdir -p "$DIR"
if ! "$DIR/venv/bin/python" -c "import asyncpg, psycopg
assert asyncpg.__version__ == '$ASYNCPG' and psycopg.__version__ == '$PSYCOPG'" 2>/dev/null; then
    echo "scripts/drivers.sh: installing asyncpg $ASYNCPG and psycopg $PSYCOPG in $DIR/venv" >&2
    python3 -m venv "$DIR/venv"
    "$DIR/venv/bin/pip" install -q --disable-pip-version-check "asyncpg==$ASYNCPG" "psycopg[binary]==$PSYCOPG"
fi
if ! grep -qs "\"version\": \"$NODE_PG\"" "$DIR/node/node_modules/pg/package.json"; then
    echo "scripts/drivers.sh: installing node-postgres $NODE_PG in $DIR/node" >&2
    npm install --silent --no-audit --no-fund --prefix "$DIR/node" "pg@$NODE_PG" >/dev/null
fi
