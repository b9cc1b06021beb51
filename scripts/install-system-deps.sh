#!/usr/bin/env bash
# Install the programs that `make test`, `make demo` and `make bench` run: the Redis and
# PostgreSQL servers they start for themselves, and the clients and tools the tests call;
# with --peers (make bench BENCH_ARGS=--peers) also a Java 17 runtime for the Debezium
# peer.
# Only what is missing, with apt-get; then every one is checked, so that a missing
# program stops the run here, by name, instead of turning tests into skips later.
set -euo pipefail

# PostgreSQL's server programs live in a versioned directory on Debian
# (/usr/lib/postgresql/N/bin), elsewhere on PATH.
pg_bin() {
    local found
    found=$(compgen -G "/usr/lib/postgresql/*/bin/$1" | sort -V | tail -n 1 || true)
    if [ -n "$found" ]; then echo "$found"; else command -v "$1" || true; fi
}

# program  Debian package  how to find it
programs=(
    "redis-server redis-server"   # every test's Redis, the Sentinel and the Cluster nodes
    "redis-cli    redis-tools"    # creates the Redis Cluster (tests/test_cluster.py, bench --cluster)
    "initdb       postgresql"     # the test clusters ...
    "pg_ctl       postgresql"     # ... started and stopped as the postgres user
    "postgres     postgresql"
    "pgbench      postgresql"     # bench: write overhead
    "psql         postgresql-client"   # DBA-style installs in the tests
    "pg_dump      postgresql-client"   # tests/test_restore.py
    "runuser      util-linux"     # runs PostgreSQL as the postgres user when we are root
    "ip           iproute2"       # the vanished-host test's network namespace
    "pgbouncer    pgbouncer"      # a pooler in front of the database (tests/test_poolers.py)
    "gcc          gcc"            # builds capture/_walk.c at pip install (logical mode's tuple walks)
)
if [ "${1:-}" = "--peers" ]; then
    # A java on PATH or under JAVA_HOME is used as found (Debezium 3 needs 17 or later;
    # the report names the runtime it ran on).
    programs+=("java openjdk-17-jre-headless")
fi

where() {
    case "$1" in
        initdb | pg_ctl | postgres | pgbench | pg_dump) pg_bin "$1" ;;
        pgbouncer) command -v pgbouncer || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } || true ;;
        java) if [ -x "${JAVA_HOME:-/nonexistent}/bin/java" ]; then echo "$JAVA_HOME/bin/java"; else command -v java || true; fi ;;
        *) command -v "$1" || true ;;
    esac
}

missing() {
    local entry name
    for entry in "${programs[@]}"; do
        read -r name _ <<<"$entry"
        [ -n "$(where "$name")" ] || echo "$entry"
    done
}

need=$(missing | awk '{print $2}' | sort -u | tr '\n' ' ')
if [ -n "${need// /}" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install these with your package manager, then run make again: $need" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing $need with apt-get" >&2
    $sudo apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

still=$(missing)
if [ -n "$still" ]; then
    echo "these programs are still missing (program, Debian package):" >&2
    echo "$still" | sed 's/^/  /' >&2
    exit 1
fi
