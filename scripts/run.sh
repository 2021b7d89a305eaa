#!/usr/bin/env bash
# Bring everything up on loopback and return once it is all ready:
#   1. PostgreSQL: $DATABASE_URL when set, else a private cluster in .run/pg
#      on 127.0.0.1:$SIDECAR_PG_PORT (default 25432: below Linux's ephemeral port
#      range 32768-60999, so an outgoing connection can never have taken it),
#   2. `sidecar migrate`, and `sidecar import examples/config.json` only into an
#      empty database (what an operator loaded is never replaced),
#   3. `sidecar serve` in the background (API on 127.0.0.1:8080, or $SIDECAR_PORT),
#   4. Kamailio on UDP/TCP 127.0.0.1:5060 with kamailio/kamailio.cfg.
# State, logs and pid files live in .run/. `scripts/stop.sh` undoes it.
# Running it again restarts the sidecar and Kamailio (the database stays up).
#
# Expects `make deps` to have run (the Makefile's `run` target does that).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
run="$repo/.run"
sidecar="$repo/.venv/bin/sidecar"
cfg="$repo/kamailio/kamailio.cfg"
config_doc="$repo/examples/config.json"
api=http://127.0.0.1:${SIDECAR_PORT:-8080}  # the sidecar listens on SIDECAR_HOST:SIDECAR_PORT
pg_port=${SIDECAR_PG_PORT:-25432}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$run"

# Is the process in PIDFILE alive and does its command line contain WORD?
# (Guards against a stale pid file whose pid was reused.)
alive() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

[ -x "$sidecar" ] || die "$sidecar not found: run \`make deps\` first"

# --- 1. PostgreSQL ----------------------------------------------------------
if [ -n "${DATABASE_URL:-}" ]; then
    say "using DATABASE_URL from the environment"
    # (a pg-started marker from an earlier run stays: stop.sh still stops that cluster)
else
    say "starting a private PostgreSQL cluster in .run/pg on 127.0.0.1:$pg_port"
    scripts/pgcluster.sh start "$run/pg" "$pg_port"
    # Remember that we started it (and on which port) so stop.sh stops it.
    echo "$pg_port" >"$run/pg-started"
    DATABASE_URL=$(scripts/pgcluster.sh url "$run/pg" "$pg_port")
fi
export DATABASE_URL

# --- admin token ------------------------------------------------------------
admin_token "$run"

# --- 2. schema and configuration --------------------------------------------
migrate_and_load_example "$sidecar" "$config_doc"

# --- 3. the sidecar -----------------------------------------------------------
if alive "$run/sidecar.pid" sidecar; then
    say "sidecar already running (pid $(cat "$run/sidecar.pid")); restarting it"
    kill "$(cat "$run/sidecar.pid")"
    for _ in $(seq 50); do alive "$run/sidecar.pid" sidecar || break; sleep 0.1; done
fi
rm -f "$run/sidecar.pid"
if curl -s -o /dev/null --max-time 2 "$api/health"; then
    die "something else already answers on $api; stop it first"
fi
say "starting the sidecar (log: .run/sidecar.log)"
# setsid: its own session, so a Ctrl-C in this terminal later does not reach
# it. All three standard streams are redirected so a caller capturing our
# output is not held open by the daemon.
setsid "$sidecar" serve </dev/null >>"$run/sidecar.log" 2>&1 &
echo $! >"$run/sidecar.pid"

say "waiting for $api/health to answer 200"
ok=
for _ in $(seq 150); do  # 150 x 0.2 s = 30 s
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$api/health" || true)" = 200 ]; then
        ok=1
        break
    fi
    alive "$run/sidecar.pid" sidecar || break
    sleep 0.2
done
if [ -z "$ok" ]; then
    echo "---- last lines of .run/sidecar.log ----" >&2
    tail -n 40 "$run/sidecar.log" >&2 || true
    if alive "$run/sidecar.pid" sidecar; then
        kill "$(cat "$run/sidecar.pid")"
        rm -f "$run/sidecar.pid"
        die "the sidecar did not become healthy within 30 s (log: .run/sidecar.log)"
    fi
    rm -f "$run/sidecar.pid"
    die "the sidecar exited before becoming healthy (log: .run/sidecar.log)"
fi

# --- 4. Kamailio ---------------------------------------------------------------
kamailio_status="not started: kamailio/kamailio.cfg does not exist yet"
if [ ! -f "$cfg" ]; then
    say "kamailio/kamailio.cfg not found; skipping Kamailio"
else
    if alive "$run/kamailio.pid" kamailio; then
        say "Kamailio already running (pid $(cat "$run/kamailio.pid")); restarting it"
        kill "$(cat "$run/kamailio.pid")"
        for _ in $(seq 100); do alive "$run/kamailio.pid" kamailio || break; sleep 0.1; done
    fi
    rm -f "$run/kamailio.pid"
    # db_postgres wants postgres://user[:pass]@host:port/db (no query string).
    dburl=$(sed -e 's#^postgresql://#postgres://#' -e 's#?.*$##' <<<"$DATABASE_URL")
    say "checking kamailio/kamailio.cfg"
    kamailio -c -f "$cfg" -A "DBURL=\"$dburl\"" -A "SIDECAR_URL=\"$api\"" >"$run/kamailio-check.log" 2>&1 \
        || { cat "$run/kamailio-check.log" >&2; die "kamailio/kamailio.cfg does not pass kamailio -c"; }
    say "starting Kamailio on 127.0.0.1:5060 (log: .run/kamailio.log)"
    # Kamailio daemonises itself; -E keeps logging on stderr, which we send to
    # the log file. The command returns once Kamailio has started (non-zero if
    # it failed to). KAMAILIO_OPTS adds options, e.g. KAMAILIO_OPTS="-m 512".
    # -Y: a runtime dir of our own (ctl socket etc.) instead of /run/kamailio,
    # so this instance does not collide with another one on the machine.
    mkdir -p "$run/kamailio-rt"
    # shellcheck disable=SC2086
    # -M 32: the heartbeat lists every dialog (about 1 MB for 10,000 calls) in
    # the timer process's private memory.
    kamailio -f "$cfg" -P "$run/kamailio.pid" -Y "$run/kamailio-rt" -E -m 256 -M 32 ${KAMAILIO_OPTS:-} \
        -A "DBURL=\"$dburl\"" -A "SIDECAR_URL=\"$api\"" \
        </dev/null >>"$run/kamailio.log" 2>&1 \
        || { tail -n 40 "$run/kamailio.log" >&2; die "Kamailio failed to start (log: .run/kamailio.log)"; }
    say "waiting for Kamailio to answer SIP OPTIONS on UDP 127.0.0.1:5060"
    if ! reply=$(python3 scripts/sip-ping.py 127.0.0.1 5060 20); then
        tail -n 40 "$run/kamailio.log" >&2 || true
        die "Kamailio does not answer on UDP 127.0.0.1:5060 (log: .run/kamailio.log)"
    fi
    kamailio_status="sip:127.0.0.1:5060 (UDP and TCP), pid $(cat "$run/kamailio.pid"); OPTIONS -> $reply"
fi

cat <<EOF

Everything is up.
  PostgreSQL      $DATABASE_URL
  Sidecar API     $api   (health: $api/health, metrics: $api/metrics)
  Kamailio        $kamailio_status
  Admin token     $SIDECAR_ADMIN_TOKEN   $token_note
                  e.g. curl -H "Authorization: Bearer $SIDECAR_ADMIN_TOKEN" $api/v1/usage
  Logs            .run/sidecar.log  .run/kamailio.log$( [ -f "$run/pg-started" ] && echo "  .run/pg/postgres.log")
Stop it all with: make stop
EOF
