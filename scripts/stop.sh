#!/usr/bin/env bash
# Stop what scripts/run.sh started: Kamailio, the sidecar, and the private
# PostgreSQL cluster (only if run.sh started it; never a DATABASE_URL one);
# and what scripts/run-cluster.sh started: two Kamailio nodes, two sidecars,
# the pg_auto_failover formation.
# Harmless when nothing runs. Only processes named in .run/*.pid are touched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
run="$PWD/.run"

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# stop_pid NAME PIDFILE WORD: TERM the pid in PIDFILE if it is alive and its
# command line contains WORD (a stale pid file may point at a reused pid);
# KILL after 10 s.
stop_pid() {
    local name=$1 file=$2 word=$3 pid
    if [ ! -f "$file" ]; then
        say "$name not running"
        return 0
    fi
    pid=$(cat "$file" 2>/dev/null || true)
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word"; then
        say "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name did not exit within 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        say "$name not running (stale pid file)"
    fi
    rm -f "$file"
}

stop_pid Kamailio "$run/kamailio.pid" kamailio
stop_pid sidecar "$run/sidecar.pid" sidecar
# what scripts/run-cluster.sh started
for i in 1 2; do
    [ -f "$run/kamailio-$i.pid" ] && stop_pid "Kamailio node $i" "$run/kamailio-$i.pid" kamailio
done
for port in 8080 8081; do
    [ -f "$run/sidecar-$port.pid" ] && stop_pid "sidecar :$port" "$run/sidecar-$port.pid" sidecar
done
if [ -f "$run/formation-started" ]; then
    scripts/pgformation.sh stop "$run/formation"
    rm -f "$run/formation-started" "$run/cluster.env"
fi

if [ -f "$run/pg-started" ]; then
    scripts/pgcluster.sh stop "$run/pg" "$(cat "$run/pg-started")"
    rm -f "$run/pg-started"
else
    say "no private PostgreSQL cluster started by run.sh"
fi
