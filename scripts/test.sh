#!/usr/bin/env bash
# Runs pgshield's whole test suite on a fresh Debian/Ubuntu machine with Rust.
#
# The integration tests start their own throwaway PostgreSQL from the machine's server
# binaries (initdb, postgres). If none are found, this installs Debian's `postgresql`
# package first (which also creates the `postgres` OS user the server runs as under root),
# then installs the client drivers tests/drivers.rs uses (scripts/drivers.sh), then runs
# `cargo test`. Extra arguments go to cargo test, e.g. `scripts/test.sh --test pool`.
set -euo pipefail
cd "$(dirname "$0")/.."

has_server_binaries() {
    local dir
    if [[ -n ${PGSHIELD_PG_BINDIR:-} ]]; then
        [[ -x $PGSHIELD_PG_BINDIR/initdb && -x $PGSHIELD_PG_BINDIR/postgres ]]
        return
    fi
    if dir=$(pg_config --bindir 2>/dev/null) && [[ -x $dir/initdb && -x $dir/postgres ]]; then
        return 0
    fi
    if command -v initdb >/dev/null && command -v postgres >/dev/null; then
        return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x $dir/initdb && -x $dir/postgres ]] && return 0
    done
    return 1
}

if ! has_server_binaries; then
    echo "scripts/test.sh: PostgreSQL server binaries not found; installing Debian's postgresql package" >&2
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# The drivers tests/drivers.rs runs (asyncpg, psycopg, node-postgres, pgjdbc).
scripts/drivers.sh

# A full run builds every test binary from scratch on CI: incremental state would only add
# hundreds of megabytes of disk there (one CI run ran out of it).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
exec cargo test --locked "$@"
