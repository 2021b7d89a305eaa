#!/bin/sh
# Start Kamailio in the foreground, logging to stderr, with the database and
# sidecar URLs passed as the #!trydef defines kamailio.cfg honours.
#   DBURL        postgres://user[:pass]@host:port/db  (db_postgres form)
#   SIDECAR_URL  http://sidecar:8080
#   KAMAILIO_ARGS  more options, e.g. "-m 256 -A LISTEN_ADDR=..." (word-split)
set -eu
: "${DBURL:=postgres://postgres@postgres:5432/sidecar}"
: "${SIDECAR_URL:=http://sidecar:8080}"
# shellcheck disable=SC2086
exec kamailio -DD -E -f /etc/kamailio/project/kamailio.cfg \
    -A "DBURL=\"$DBURL\"" -A "SIDECAR_URL=\"$SIDECAR_URL\"" ${KAMAILIO_ARGS:-} "$@"
