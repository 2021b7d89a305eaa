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
