#!/usr/bin/env bash
# Install the servers that `make test`, `make demo` and `make bench` start for themselves:
# redis-server and the PostgreSQL server binaries; with --peers (make bench
# BENCH_ARGS=--peers) also a Java 17 runtime for the Debezium peer. Only what is missing,
# with apt-get.
set -euo pipefail

need=()
if [ "${1:-}" = "--peers" ]; then
    # A java on PATH or under JAVA_HOME is used as found (Debezium 3 needs 17 or later;
    # the report names the runtime it ran on).
    if ! command -v java >/dev/null 2>&1 && [ ! -x "${JAVA_HOME:-/nonexistent}/bin/java" ]; then
        need+=(openjdk-17-jre-headless)
    fi
fi
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    need+=(redis-server)
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install these with your package manager, then run make again: ${need[*]}" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
