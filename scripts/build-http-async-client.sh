#!/usr/bin/env bash
# Build Kamailio's http_async_client module and install it into Debian's
# kamailio module directory.
#
# Debian bookworm's kamailio 5.6.3 packages do not ship http_async_client, but
# the module builds from Debian's own source package in a couple of seconds and
# loads into Debian's kamailio binary. We:
#   1. add a deb-src entry for bookworm (a separate deb822 file) if none exists,
#   2. `apt-get source --download-only kamailio` into .build/kamailio-src/,
#   3. untar the .orig.tar.gz ourselves (dpkg-source needs dpkg-dev, which is
#      not on every machine, and Debian's patches do not touch this module),
#   4. `make cfg` at the top of the tree, then build only this module,
#   5. install the .so and check that kamailio loads it (after tm and pv).
#
# Does nothing when the module is already installed. Root, or sudo when not root.
# Env: KAMAILIO_BUILD_DIR overrides where the source goes (default .build/kamailio-src).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

. "$here/lib.sh"

command -v kamailio >/dev/null 2>&1 || die "kamailio is not installed (run scripts/install-system.sh)"

# Debian's module dir is /usr/lib/<multiarch triplet>/kamailio/modules. Find it
# from the files the kamailio package installed (tm.so is always there), and
# fall back to gcc's triplet.
moddir=$(dpkg -L kamailio 2>/dev/null | sed -n 's#/tm\.so$##p' | head -n1 || true)
if [ -z "$moddir" ] || [ ! -d "$moddir" ]; then
    moddir="/usr/lib/$(gcc -dumpmachine)/kamailio/modules"
fi
[ -f "$moddir/tm.so" ] || die "cannot find kamailio's module directory (tried $moddir)"

# Check that Kamailio loads the module with a minimal config.
verify_module() {
    local cfg out
    cfg=$(mktemp --suffix=.cfg)
    cat >"$cfg" <<EOF
#!KAMAILIO
loadmodule "$moddir/tm.so"
loadmodule "$moddir/pv.so"
loadmodule "$moddir/sl.so"
loadmodule "$moddir/http_async_client.so"
request_route {
    sl_send_reply("200", "OK");
}
EOF
    if ! out=$(kamailio -c -f "$cfg" 2>&1); then
        rm -f "$cfg"
        echo "$out" >&2
        die "kamailio cannot load $moddir/http_async_client.so (output above)"
    fi
    rm -f "$cfg"
}

if [ -f "$moddir/http_async_client.so" ]; then
    say "http_async_client already installed in $moddir"
    verify_module
    exit 0
fi

# 1. A deb-src source for bookworm, unless one is already configured.
has_deb_src() {
    grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! has_deb_src; then
    srcfile=/etc/apt/sources.list.d/kamailio-src.sources
    say "adding a deb-src entry for bookworm ($srcfile)"
    # Reuse the URIs/Signed-By of Debian's own entry (debian.sources) when it
    # exists, so a mirror configured there is used for sources too.
    uris=http://deb.debian.org/debian
    signed=/usr/share/keyrings/debian-archive-keyring.gpg
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        u=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        s=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        [ -n "$u" ] && uris=$u
        [ -n "$s" ] && signed=$s
    fi
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n' \
        "$uris" "$signed" | as_root tee "$srcfile" >/dev/null
fi

# 2. Download Debian's source package (only the files; no unpacking).
say "updating apt package lists (for deb-src)"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2

build=${KAMAILIO_BUILD_DIR:-$repo/.build/kamailio-src}
mkdir -p "$build"
cd "$build"
# The version Debian's binary was built from; the source must match it.
ver=$(dpkg-query -W -f='${Version}' kamailio)
upstream=${ver#*:}
upstream=${upstream%-*}
orig="kamailio_${upstream}.orig.tar.gz"
if [ ! -f "$orig" ]; then
    say "downloading kamailio $ver source into $build"
    # apt-get writes as the _apt user when it can; as root in a dir _apt cannot
    # write, it warns and downloads as root. Both are fine.
    apt-get source --download-only "kamailio=$ver" >&2 \
        || die "apt-get source kamailio=$ver failed (is a deb-src entry for bookworm configured?)"
fi
[ -f "$orig" ] || die "expected $build/$orig after apt-get source"

# 3. Unpack the upstream tarball ourselves.
tree="$build/kamailio-$upstream"
if [ ! -f "$tree/src/modules/http_async_client/Makefile" ]; then
    say "unpacking $orig"
    rm -rf "$tree"
    mkdir -p "$tree"
    tar -xzf "$orig" -C "$tree" --strip-components=1
fi

# 4. Configure and build just this module (about 2 s).
say "building http_async_client (make cfg; make -C src/modules/http_async_client)"
make -C "$tree" cfg >"$build/make-cfg.log" 2>&1 \
    || { tail -n 30 "$build/make-cfg.log" >&2; die "make cfg failed (log: $build/make-cfg.log)"; }
make -C "$tree/src/modules/http_async_client" >"$build/make-module.log" 2>&1 \
    || { tail -n 30 "$build/make-module.log" >&2; die "module build failed (log: $build/make-module.log)"; }
so="$tree/src/modules/http_async_client/http_async_client.so"
[ -f "$so" ] || die "build finished but $so is missing"

# 5. Install and check that it loads.
say "installing http_async_client.so into $moddir"
as_root install -m 0644 "$so" "$moddir/http_async_client.so"
verify_module
say "http_async_client installed and loads: $moddir/http_async_client.so"
