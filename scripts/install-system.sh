#!/usr/bin/env bash
# Install the Debian (bookworm) packages this project needs, then build the
# Kamailio modules of scripts/build-kamailio-modules.sh (http_async_client,
# which Debian does not ship, and the patched dialog module).
#
# Idempotent: asks dpkg which packages are missing and installs only those;
# `apt-get update` runs only when something is missing. Safe to run again and again.
# Runs as root, or through sudo when not root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

. "$here/lib.sh"

packages=(
    # Database: a private cluster is run from /usr/lib/postgresql/15/bin.
    postgresql-15 postgresql-client-15
    # pg_auto_failover (pg_autoctl): the formation of `make run-cluster` and
    # tests/e2e/test_cluster.py, a monitor, a primary and a synchronous standby.
    postgresql-15-auto-failover
    # SIP proxy: core (tm, sl, dialog, auth_db, permissions, ...), jansson
    # (extra), db_postgres (postgres), and the utils modules.
    kamailio kamailio-extra-modules kamailio-postgres-modules kamailio-utils-modules
    # To build http_async_client and the patched dialog module from Debian's
    # kamailio source.
    libcurl4-openssl-dev libevent-dev bison flex make gcc pkg-config patch
    # Outside SIP clients for tests. baresip-core is the headless part of
    # baresip (the `baresip` metapackage recommends GTK/X11 front ends).
    baresip-core sipsak
    # A real headless browser for the /ui/ page's test (tests/e2e/test_ui.py,
    # driven by selenium through Debian's chromedriver).
    chromium chromium-driver
    # Python venv for the sidecar, and small tools the scripts use.
    python3-venv curl jq openssl
)

missing=()
for p in "${packages[@]}"; do
    # "install ok installed" only when the package is fully installed.
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages already installed"
else
    say "updating apt package lists"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    say "installing system packages (${missing[*]})"
    # --no-install-recommends keeps baresip headless and the install small.
    # Debian's postgresql package may create and start a "main" cluster on
    # port 5432; that is harmless, we use a private cluster on another port.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2
fi

"$here/build-kamailio-modules.sh"
