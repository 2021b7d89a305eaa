# Shared by the scripts in this folder: `. "$here/lib.sh"`.

# Progress and failure, on stderr.
say() { echo "==> $*" >&2; }
die() { echo "ERROR: $*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Set and export SIDECAR_ADMIN_TOKEN (and token_note) by the rule of `make run` and
# `make run-cluster`: the environment's when set, else the one saved in RUN/admin-token
# (generated once, mode 600).
admin_token() {
    local run=$1
    if [ -n "${SIDECAR_ADMIN_TOKEN:-}" ]; then
        token_note="(from SIDECAR_ADMIN_TOKEN)"
    else
        if [ ! -s "$run/admin-token" ]; then
            say "generating an admin token in .run/admin-token"
            (umask 077 && openssl rand -hex 24 >"$run/admin-token")
        fi
        chmod 600 "$run/admin-token"
        SIDECAR_ADMIN_TOKEN=$(cat "$run/admin-token")
        token_note="(generated; saved in .run/admin-token)"
    fi
    export SIDECAR_ADMIN_TOKEN
}

# `sidecar migrate` on $DATABASE_URL, then `sidecar import DOC` only into an empty database:
# a configuration an operator loaded (CLI, API, SQL) survives every start.
migrate_and_load_example() {
    local sidecar=$1 doc=$2 configured
    say "applying database migrations (sidecar migrate)"
    "$sidecar" migrate
    configured=$(psql "$DATABASE_URL" -X -At -v ON_ERROR_STOP=1 -c \
        "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM extensions)
              + (SELECT count(*) FROM numbers) + (SELECT count(*) FROM channels)") \
        || die "cannot read the configuration tables at $DATABASE_URL"
    if [ "$configured" != 0 ]; then
        say "the database already holds a configuration ($configured items); keeping it"
    elif [ -f "$doc" ]; then
        say "empty configuration: loading $(basename "$doc") (sidecar import)"
        "$sidecar" import "$doc"
    else
        say "$doc not found; starting with an empty configuration"
    fi
}
