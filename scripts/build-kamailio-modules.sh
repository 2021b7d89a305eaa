#!/usr/bin/env bash
# Build the two Kamailio modules this project needs beyond Debian's packages,
# from Debian's own kamailio source package:
#
#   http_async_client  Debian bookworm's kamailio 5.6.3 packages do not ship
#                      it; installed into Debian's module directory.
#   dialog (patched)   Debian's dialog module with
#                      kamailio/patches/dialog-bye-both-legs.patch: at the
#                      dialog timeout (MAX_CALL_DURATION) it sends BYE to
#                      both sides. Stock 5.6 checks the dialog's state again
#                      before the second BYE, and the caller's 200 to the
#                      first one, handled by another process, may have
#                      ended the dialog by then: the callee stayed up, and
#                      the end route (the release) did not run (kamailio
#                      issue #4169, still in upstream's code). Installed
#                      beside, not over, Debian's module, in
#                      /usr/local/lib/kamailio/modules, which kamailio.cfg
#                      loads it from (switch DIALOG_MODULE).
#
# Steps: add a deb-src entry for bookworm (a separate deb822 file) if none
# exists; `apt-get source --download-only kamailio` into .build/kamailio-src/;
# untar the .orig.tar.gz ourselves (dpkg-source needs dpkg-dev, which is not on
# every machine, and Debian's patches touch neither module); `make cfg` at the
# top of the tree; build each module alone (seconds); install it and check that
# kamailio loads it.
#
# Does nothing for a module already installed (the patched dialog module: from
# this very patch and kamailio version, by the stamp beside it). Root, or sudo.
# Env: KAMAILIO_BUILD_DIR overrides where the source goes (default
# .build/kamailio-src); KAMAILIO_LOCAL_MODULES where the patched module goes.
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
localdir=${KAMAILIO_LOCAL_MODULES:-/usr/local/lib/kamailio/modules}

patch_file="$repo/kamailio/patches/dialog-bye-both-legs.patch"
[ -f "$patch_file" ] || die "missing $patch_file"
ver=$(dpkg-query -W -f='${Version}' kamailio)
# What the installed patched module must have been built from.
dialog_stamp="kamailio $ver, patch $(sha256sum "$patch_file" | cut -d' ' -f1)"

# Check that Kamailio loads a module (path $1) after the ones it needs ($2...).
verify_module() {
    local so=$1 cfg out m
    shift
    cfg=$(mktemp --suffix=.cfg)
    {
        echo '#!KAMAILIO'
        for m in "$@"; do echo "loadmodule \"$moddir/$m.so\""; done
        echo "loadmodule \"$so\""
        echo 'request_route {'
        echo '    sl_send_reply("200", "OK");'
        echo '}'
    } >"$cfg"
    if ! out=$(kamailio -c -f "$cfg" 2>&1); then
        rm -f "$cfg"
        echo "$out" >&2
        die "kamailio cannot load $so (output above)"
    fi
    rm -f "$cfg"
}

need_async=1
if [ -f "$moddir/http_async_client.so" ]; then
    say "http_async_client already installed in $moddir"
    need_async=0
fi
need_dialog=1
if [ -f "$localdir/dialog.so" ] && [ "$(cat "$localdir/dialog.so.stamp" 2>/dev/null)" = "$dialog_stamp" ]; then
    say "patched dialog module already installed in $localdir"
    need_dialog=0
fi
[ "$need_async$need_dialog" = "00" ] && exit 0

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

# 2. Debian's source package (only the files; no unpacking), matching the
#    version Debian's binary was built from.
build=${KAMAILIO_BUILD_DIR:-$repo/.build/kamailio-src}
mkdir -p "$build"
cd "$build"
upstream=${ver#*:}
upstream=${upstream%-*}
orig="kamailio_${upstream}.orig.tar.gz"
if [ ! -f "$orig" ]; then
    say "updating apt package lists (for deb-src)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    say "downloading kamailio $ver source into $build"
    # apt-get writes as the _apt user when it can; as root in a dir _apt cannot
    # write, it warns and downloads as root. Both are fine.
    apt-get source --download-only "kamailio=$ver" >&2 \
        || die "apt-get source kamailio=$ver failed (is a deb-src entry for bookworm configured?)"
fi
[ -f "$orig" ] || die "expected $build/$orig after apt-get source"

# 3. Unpack the upstream tarball ourselves; 4. make cfg once.
tree="$build/kamailio-$upstream"
if [ ! -f "$tree/src/modules/http_async_client/Makefile" ] || [ ! -f "$tree/src/modules/dialog/Makefile" ]; then
    say "unpacking $orig"
    rm -rf "$tree"
    mkdir -p "$tree"
    tar -xzf "$orig" -C "$tree" --strip-components=1
fi
if [ ! -f "$tree/src/config.mak" ]; then
    say "configuring the kamailio tree (make cfg)"
    make -C "$tree" cfg >"$build/make-cfg.log" 2>&1 \
        || { tail -n 30 "$build/make-cfg.log" >&2; die "make cfg failed (log: $build/make-cfg.log)"; }
fi

# 5. http_async_client, into Debian's module dir.
if [ "$need_async" = 1 ]; then
    say "building http_async_client (make -C src/modules/http_async_client)"
    make -C "$tree/src/modules/http_async_client" >"$build/make-module.log" 2>&1 \
        || { tail -n 30 "$build/make-module.log" >&2; die "module build failed (log: $build/make-module.log)"; }
    so="$tree/src/modules/http_async_client/http_async_client.so"
    [ -f "$so" ] || die "build finished but $so is missing"
    say "installing http_async_client.so into $moddir"
    as_root install -m 0644 "$so" "$moddir/http_async_client.so"
    verify_module "$moddir/http_async_client.so" tm pv sl
    say "http_async_client installed and loads: $moddir/http_async_client.so"
fi

# 6. The patched dialog module, into $localdir. The module's sources are
#    unpacked afresh, so the patch always applies to Debian's code.
if [ "$need_dialog" = 1 ]; then
    say "building the dialog module with $(basename "$patch_file")"
    rm -rf "$tree/src/modules/dialog"
    tar -xzf "$orig" -C "$tree" --strip-components=1 "kamailio-$upstream/src/modules/dialog"
    patch -d "$tree" -p1 --quiet <"$patch_file" || die "the patch does not apply to kamailio $ver's dialog module"
    make -C "$tree/src/modules/dialog" >"$build/make-dialog.log" 2>&1 \
        || { tail -n 30 "$build/make-dialog.log" >&2; die "dialog build failed (log: $build/make-dialog.log)"; }
    so="$tree/src/modules/dialog/dialog.so"
    [ -f "$so" ] || die "build finished but $so is missing"
    say "installing the patched dialog.so into $localdir"
    as_root install -d "$localdir"
    as_root install -m 0644 "$so" "$localdir/dialog.so"
    verify_module "$localdir/dialog.so" tm sl rr pv
    echo "$dialog_stamp" | as_root tee "$localdir/dialog.so.stamp" >/dev/null
    say "patched dialog module installed and loads: $localdir/dialog.so"
fi
