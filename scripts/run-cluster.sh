#!/usr/bin/env bash
# The whole formation on one box, on loopback, returning once everything answers:
#   1. PostgreSQL with automatic failover (scripts/pgformation.sh, pg_auto_failover): a
#      monitor on 127.0.0.1:$FORMATION_PORT (default 25500), a primary and a synchronous
#      standby on the next two ports, in .run/formation,
#   2. `sidecar migrate`, and `sidecar import examples/config.json` only into an empty
#      database,
#   3. two sidecars, HTTP 127.0.0.1:8080 and 127.0.0.1:8081, both on the formation's
#      multi-host DSN (target_session_attrs=read-write: after a failover they reconnect to
#      the new primary by themselves),
#   4. two Kamailio nodes, UDP/TCP 127.0.0.1:5060 (NODE_ID kamailio-1) and 127.0.0.1:5070
#      (kamailio-2), each asking its own sidecar first and the other when its own does not
#      answer (SIDECAR_URL_2).
# Writes .run/cluster.env (shell variables: PG_NODES, PG_MONITOR, SIDECAR_URLS, SIP_NODES,
# DATABASE_URL, SIDECAR_ADMIN_TOKEN) and prints every address. `scripts/stop.sh` (make
# stop) stops all of it. The admin token follows `make run`'s rule: SIDECAR_ADMIN_TOKEN
# from the environment, else .run/admin-token (generated once, mode 600).
#
# Kamailio's auth_db (digest) reads the subscriber view over db_postgres, which takes one
# host: both nodes read the first data node. See docs/scaling.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
run="$repo/.run"
sidecar="$repo/.venv/bin/sidecar"
cfg="$repo/kamailio/kamailio.cfg"
config_doc="$repo/examples/config.json"
fport=${FORMATION_PORT:-25500}
. scripts/lib.sh

mkdir -p "$run"
[ -x "$sidecar" ] || die "$sidecar not found: run \`make deps\` first"

alive() {   # alive PIDFILE WORD
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

wait_http() {   # wait_http URL PIDFILE LOG
    for _ in $(seq 150); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1/health" || true)" = 200 ] && return 0
        alive "$2" sidecar || break
        sleep 0.2
    done
    tail -n 30 "$3" >&2 || true
    die "the sidecar at $1 did not become healthy (log: $3)"
}

# --- 1. PostgreSQL formation ----------------------------------------------------
say "starting the PostgreSQL formation in .run/formation (monitor 127.0.0.1:$fport)"
# Marked first: `make stop` also stops a formation that failed halfway through its start.
echo "$fport" >"$run/formation-started"
scripts/pgformation.sh start "$run/formation" "$fport"
DATABASE_URL=$(scripts/pgformation.sh url "$run/formation" "$fport")
export DATABASE_URL

# --- admin token ------------------------------------------------------------------
admin_token "$run"

# --- 2. schema and configuration ------------------------------------------------------
migrate_and_load_example "$sidecar" "$config_doc"

# --- 3. two sidecars ---------------------------------------------------------------------
sidecar_urls=()
for port in 8080 8081; do
    pidf="$run/sidecar-$port.pid"
    url="http://127.0.0.1:$port"
    if alive "$pidf" sidecar; then
        say "sidecar on :$port already running; restarting it"
        kill "$(cat "$pidf")"
        for _ in $(seq 50); do alive "$pidf" sidecar || break; sleep 0.1; done
    fi
    curl -s -o /dev/null --max-time 2 "$url/health" && die "something else answers on $url; stop it first"
    say "starting the sidecar on $url (log: .run/sidecar-$port.log)"
    SIDECAR_PORT=$port setsid "$sidecar" serve </dev/null >>"$run/sidecar-$port.log" 2>&1 &
    echo $! >"$pidf"
    sidecar_urls+=("$url")
done
for port in 8080 8081; do
    wait_http "http://127.0.0.1:$port" "$run/sidecar-$port.pid" "$run/sidecar-$port.log"
done

# --- 4. two Kamailio nodes ----------------------------------------------------------------
dburl="postgres://postgres@127.0.0.1:$(( fport + 1 ))/sidecar"
sip_nodes=()
for i in 1 2; do
    sip=$(( 5060 + (i - 1) * 10 ))
    own=${sidecar_urls[$(( i - 1 ))]}
    other=${sidecar_urls[$(( 2 - i ))]}
    pidf="$run/kamailio-$i.pid"
    if alive "$pidf" kamailio; then
        say "Kamailio node $i already running; restarting it"
        kill "$(cat "$pidf")"
        for _ in $(seq 100); do alive "$pidf" kamailio || break; sleep 0.1; done
    fi
    mkdir -p "$run/kamailio-$i-rt"
    say "starting Kamailio kamailio-$i on 127.0.0.1:$sip (sidecar $own, then $other)"
    # shellcheck disable=SC2086
    kamailio -f "$cfg" -P "$pidf" -Y "$run/kamailio-$i-rt" -E -m 256 -M 32 ${KAMAILIO_OPTS:-} \
        -A "DBURL=\"$dburl\"" -A "SIDECAR_URL=\"$own\"" -A "SIDECAR_URL_2=\"$other\"" \
        -A "NODE_ID=\"kamailio-$i\"" \
        -A "LISTEN_UDP=udp:127.0.0.1:$sip" -A "LISTEN_TCP=tcp:127.0.0.1:$sip" \
        </dev/null >>"$run/kamailio-$i.log" 2>&1 \
        || { tail -n 40 "$run/kamailio-$i.log" >&2; die "Kamailio node $i failed to start"; }
    python3 scripts/sip-ping.py 127.0.0.1 "$sip" 20 >/dev/null \
        || { tail -n 40 "$run/kamailio-$i.log" >&2; die "Kamailio node $i does not answer on $sip"; }
    sip_nodes+=("127.0.0.1:$sip")
done

pg_nodes="127.0.0.1:$(( fport + 1 )) 127.0.0.1:$(( fport + 2 ))"
(umask 077 && cat >"$run/cluster.env" <<EOF
# written by scripts/run-cluster.sh; source it: . .run/cluster.env
PG_NODES="$pg_nodes"
PG_MONITOR="127.0.0.1:$fport"
SIDECAR_URLS="${sidecar_urls[*]}"
SIP_NODES="${sip_nodes[*]}"
DATABASE_URL="$DATABASE_URL"
SIDECAR_ADMIN_TOKEN="$SIDECAR_ADMIN_TOKEN"
EOF
)

cat <<EOF

The cluster is up.
  PostgreSQL      data nodes $pg_nodes (monitor 127.0.0.1:$fport)
                  $DATABASE_URL
                  state: scripts/pgformation.sh state .run/formation
  Sidecars        ${sidecar_urls[*]}
  Kamailio        sip:${sip_nodes[0]} (kamailio-1)  sip:${sip_nodes[1]} (kamailio-2)
  Admin token     $SIDECAR_ADMIN_TOKEN   $token_note
  Variables       .run/cluster.env
  Logs            .run/sidecar-808[01].log .run/kamailio-[12].log .run/formation/*.log
Stop it all with: make stop
EOF
