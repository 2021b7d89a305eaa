#!/usr/bin/env bash
# A PostgreSQL formation with automatic failover, on loopback, with pg_auto_failover
# (Debian's postgresql-15-auto-failover, `pg_autoctl`): a monitor, a primary and a
# synchronous standby.
#
#   scripts/pgformation.sh start DIR PORT   monitor on PORT, data nodes on PORT+1 and PORT+2;
#                                           returns when a primary and a standby are up and
#                                           database "sidecar" exists
#   scripts/pgformation.sh stop  DIR        stop every process of the formation
#   scripts/pgformation.sh url   DIR PORT   the sidecars' DSN: both data nodes, read-write
#   scripts/pgformation.sh state DIR        pg_autoctl show state
#   scripts/pgformation.sh kill  DIR NODE   kill -9 a data node (1 or 2): its keeper and its
#                                           postmaster, as when its machine dies
#
# Each node is one `pg_autoctl ... --run` process group (started with setsid; its pid in
# DIR/<node>.pid), its data in DIR/<node>, its log in DIR/<node>.log; pg_autoctl's own
# configuration and state live under DIR/xdg. Every commit on the primary waits for the
# standby (synchronous_standby_names 'ANY 1 (...)', which pg_auto_failover keeps), so a
# call admitted before a failover is on the standby that takes over.
#
# Failover timing: the monitor checks every node each second and takes a node that fails
# its checks for 2 s as unhealthy; it then waits FORMATION_DEMOTE_TIMEOUT seconds (default 5;
# pg_auto_failover's default is 30) for the old primary to demote itself before it promotes
# the standby. On one box, where "the node died" means its processes were killed, 5 s is
# safe; across machines keep the default unless fencing is in place.
#
# PostgreSQL and pg_autoctl refuse to run as root: as root they run as the `postgres`
# user (runuser), and DIR is handed to it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

usage() { echo "usage: $0 start DIR PORT | stop DIR | url DIR PORT | state DIR | kill DIR NODE" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
[ "$cmd" = start ] && mkdir -p "$2"
case "$2" in /*) dir=$2 ;; *) dir="$PWD/$2" ;; esac
[ -d "$dir" ] && dir=$(cd "$dir" && pwd -P)
port=${3:-}
bin=/usr/lib/postgresql/15/bin
demote_timeout=${FORMATION_DEMOTE_TIMEOUT:-5}

dsn() { echo "postgresql://postgres@127.0.0.1:$(( $1 + 1 )),127.0.0.1:$(( $1 + 2 ))/sidecar?target_session_attrs=read-write"; }

# The command prefix that runs as the postgres user with the formation's environment.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user"
    pg_user=(runuser -u postgres --)
else
    pg_user=()
fi
pg_env=(env PATH="$bin:$PATH" XDG_CONFIG_HOME="$dir/xdg/config" XDG_DATA_HOME="$dir/xdg/data")
as_pg() { (cd "$dir" && "${pg_user[@]}" "${pg_env[@]}" "$@"); }

alive() {   # alive NODE: its pg_autoctl process group is running
    local pid
    pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

psql_at() { psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres "${@:2}"; }

# nodes_in N STATE...: at least N nodes report (and are assigned) one of these states
nodes_in() {
    local n=$1
    shift
    local states
    states=$(printf "'%s'," "$@")
    [ "$(psql_at "$port" -d pg_auto_failover -c "select count(*) from pgautofailover.node
         where reportedstate = goalstate and reportedstate::text in (${states%,})")" -ge "$n" ]
}

# run NODE ARGS...: `pg_autoctl ARGS --run` in a process group of its own, in the background
run() {
    local node=$1
    shift
    if alive "$node"; then
        say "$node already running"
        return
    fi
    # setsid execs in place (a background job of this script is no group leader), so $! is
    # the pid, and the process group, of everything the node runs.
    cd "$dir"
    setsid "${pg_user[@]}" "${pg_env[@]}" pg_autoctl "$@" --run >>"$dir/$node.log" 2>&1 </dev/null &
    echo $! >"$dir/$node.pid"
}

wait_for() {   # wait_for SECONDS WHAT COMMAND...
    local t=$1 what=$2
    shift 2
    for _ in $(seq $(( t * 4 ))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "$what not ready after ${t}s (logs in $dir/*.log)"
}

start() {
    [[ "$port" =~ ^[0-9]+$ ]] || usage
    command -v pg_autoctl >/dev/null || die "pg_autoctl not found (run scripts/install-system.sh)"
    mkdir -p "$dir/xdg"
    if [ "$(id -u)" -eq 0 ]; then
        # the postgres user must reach DIR
        local d=$dir
        while [ "$d" != / ]; do
            d=$(dirname "$d")
            runuser -u postgres -- test -x "$d" || chmod o+x "$d"
        done
        chown -R postgres: "$dir"
    fi
    chmod 0700 "$dir"

    say "pg_auto_failover monitor on 127.0.0.1:$port"
    run monitor create monitor --pgdata "$dir/monitor" --pgport "$port" \
        --hostname 127.0.0.1 --listen 127.0.0.1 --auth trust --no-ssl
    wait_for 60 "the monitor" psql_at "$port" -d pg_auto_failover -c "select 1 from pgautofailover.node limit 0"
    # Quick health checks on loopback (see the header for the demote timeout).
    psql_at "$port" -d pg_auto_failover \
        -c "ALTER SYSTEM SET pgautofailover.health_check_period = 1000" \
        -c "ALTER SYSTEM SET pgautofailover.health_check_timeout = 1000" \
        -c "ALTER SYSTEM SET pgautofailover.health_check_max_retries = 1" \
        -c "ALTER SYSTEM SET pgautofailover.health_check_retry_delay = 500" \
        -c "ALTER SYSTEM SET pgautofailover.node_considered_unhealthy_timeout = 2000" \
        -c "ALTER SYSTEM SET pgautofailover.primary_demote_timeout = '${demote_timeout}s'" \
        -c "SELECT pg_reload_conf()" >/dev/null
    local monitor="postgres://autoctl_node@127.0.0.1:$port/pg_auto_failover?sslmode=disable"
    for n in 1 2; do
        say "data node node$n on 127.0.0.1:$(( port + n ))"
        run "node$n" create postgres --pgdata "$dir/node$n" --pgport "$(( port + n ))" \
            --hostname 127.0.0.1 --listen 127.0.0.1 --name "node$n" --auth trust --no-ssl --monitor "$monitor" \
            --pgctl "$bin/pg_ctl"
        # one node at a time: the first becomes the primary, the second its standby
        wait_for 120 "node$n" nodes_in "$n" single primary secondary wait_primary catchingup
    done
    say "waiting for a primary with its synchronous standby"
    wait_for 120 "the formation" nodes_in 2 primary secondary
    local url
    url=$(dsn "$port")
    if [ "$(psql -X -At "${url/\/sidecar/\/postgres}" -c "select count(*) from pg_database where datname = 'sidecar'")" != 1 ]; then
        say "creating database sidecar"
        psql -X -q "${url/\/sidecar/\/postgres}" -c "create database sidecar" >/dev/null
    fi
    say "formation ready: $url"
}

stop() {
    local any=0
    for node in node2 node1 monitor; do
        if alive "$node"; then
            any=1
            say "stopping $node"
            kill -TERM -- "-$(cat "$dir/$node.pid")" 2>/dev/null || true
        fi
    done
    [ "$any" = 1 ] || { say "formation not running in $dir"; return 0; }
    for _ in $(seq 60); do
        alive node1 || alive node2 || alive monitor || break
        sleep 0.5
    done
    for node in node2 node1 monitor; do
        alive "$node" && kill -KILL -- "-$(cat "$dir/$node.pid")" 2>/dev/null || true
        # a postmaster left behind (its keeper killed first)
        if [ -f "$dir/$node/postmaster.pid" ]; then
            kill -KILL "$(head -1 "$dir/$node/postmaster.pid")" 2>/dev/null || true
        fi
    done
    return 0
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    url) [[ "$port" =~ ^[0-9]+$ ]] || usage; dsn "$port" ;;
    state) as_pg pg_autoctl show state --pgdata "$dir/monitor" ;;
    kill)
        node="node${3:?NODE}"
        alive "$node" || die "$node is not running"
        pm=$(head -1 "$dir/$node/postmaster.pid" 2>/dev/null || true)
        kill -KILL -- "-$(cat "$dir/$node.pid")" 2>/dev/null || true
        [ -n "$pm" ] && kill -KILL "$pm" 2>/dev/null || true
        say "killed $node (keeper process group and postmaster ${pm:-?})"
        ;;
    *) usage ;;
esac
