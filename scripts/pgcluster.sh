#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for development and tests.
#
#   scripts/pgcluster.sh start  DIR PORT   initdb if needed, start, create db "sidecar"
#   scripts/pgcluster.sh stop   DIR PORT   fast shutdown; harmless when not running
#   scripts/pgcluster.sh status DIR PORT   exit 0 when running, 3 when not
#   scripts/pgcluster.sh url    DIR PORT   print postgresql://postgres@127.0.0.1:PORT/sidecar
#
# Layout: DIR/data is the cluster, DIR/postgres.log its log, and DIR holds the
# unix socket. It listens on 127.0.0.1:PORT only, with trust auth for local
# connections (loopback TCP and the socket) and superuser "postgres".
#
# PostgreSQL refuses to run as root: when we are root, initdb/pg_ctl run as the
# `postgres` system user (runuser), DIR is chowned to it, and any parent
# directory it cannot traverse gets o+x (search only, not read) so it can reach
# DIR. When not root, everything runs as the current user.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status|url DIR PORT" >&2; exit 2; }
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -eq 3 ] || usage
cmd=$1 port=$3
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
url="postgresql://postgres@127.0.0.1:$port/sidecar"

if [ "$cmd" = url ]; then
    echo "$url"
    exit 0
fi

# Only `start` creates DIR; stop/status on a missing DIR just find nothing running.
[ "$cmd" = start ] && mkdir -p "$2"
case "$2" in /*) dir=$2 ;; *) dir="$PWD/$2" ;; esac
[ -d "$dir" ] && dir=$(cd "$dir" && pwd -P)
data="$dir/data"
log="$dir/postgres.log"
bin=/usr/lib/postgresql/15/bin
[ -x "$bin/pg_ctl" ] || die "PostgreSQL 15 not found in $bin (run scripts/install-system.sh)"

if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user"
    # cd into DIR so the postgres user never starts in a directory it cannot read.
    as_pg() { (cd "$dir" 2>/dev/null || cd /; runuser -u postgres -- "$@"); }
else
    as_pg() { (cd "$dir" 2>/dev/null || cd /; "$@"); }
fi

running() { [ -f "$data/PG_VERSION" ] && as_pg "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; }

# As root: let the postgres user reach DIR, and own it.
prepare_dir_for_postgres() {
    [ "$(id -u)" -eq 0 ] || return 0
    local d=$dir
    while [ "$d" != / ]; do
        d=$(dirname "$d")
        if ! runuser -u postgres -- test -x "$d"; then
            say "chmod o+x $d (so the postgres user can reach $dir)"
            chmod o+x "$d"
        fi
    done
    chown postgres: "$dir"
    chmod 0700 "$dir"
}

# The socket path (DIR/.s.PGSQL.PORT) must fit in a sockaddr_un (107 bytes);
# for deep DIRs (pytest tmp dirs) go TCP-only rather than fail to start.
socket_dirs() {
    if [ $(( ${#dir} + ${#port} + 12 )) -lt 100 ]; then
        echo "$dir"
    else
        echo ""
    fi
}

start() {
    if running; then
        say "PostgreSQL already running in $data"
    else
        prepare_dir_for_postgres
        if [ ! -f "$data/PG_VERSION" ]; then
            say "initdb: new PostgreSQL 15 cluster in $data"
            # Superuser "postgres" whatever our user name; trust auth for the
            # socket and loopback TCP (initdb's pg_hba lists only those).
            as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust \
                --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
                || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
            # fsync and synchronous_commit keep their safe defaults.
            cat >>"$data/postgresql.conf" <<EOF

# --- added by scripts/pgcluster.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$(socket_dirs)'
max_connections = 200
shared_buffers = 256MB
fsync = on
# A lock wait past deadlock_timeout (1 s) is logged with who holds the lock.
log_lock_waits = on
log_autovacuum_min_duration = 250ms
EOF
        fi
        say "starting PostgreSQL on 127.0.0.1:$port (log: $log)"
        # The port is given on each start, so a cluster dir can move ports.
        if ! as_pg "$bin/pg_ctl" start -w -t 60 -D "$data" -l "$log" -o "-p $port" >/dev/null; then
            tail -n 30 "$log" >&2 || true
            die "PostgreSQL did not start (log: $log)"
        fi
    fi
    # Create the application database once.
    local psql=(psql -X -q -h 127.0.0.1 -p "$port" -U postgres)
    if [ "$("${psql[@]}" -d postgres -tAc "select 1 from pg_database where datname = 'sidecar'")" != 1 ]; then
        say "creating database sidecar"
        "${psql[@]}" -d postgres -c 'create database sidecar' >/dev/null
    fi
}

stop() {
    if running; then
        say "stopping PostgreSQL in $data"
        as_pg "$bin/pg_ctl" stop -w -t 60 -m fast -D "$data" >/dev/null
    else
        say "PostgreSQL not running in $data"
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status)
        if running; then echo "running: $url"; exit 0; else echo "not running"; exit 3; fi ;;
    *) usage ;;
esac
