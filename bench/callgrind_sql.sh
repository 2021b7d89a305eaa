#!/usr/bin/env bash
# PostgreSQL's instructions per call in the batch functions, exactly (callgrind counts
# instructions, not time: the same figure whatever else the machine is doing).
#
#   bench/callgrind_sql.sh [TREE] [BATCH]     TREE: a checkout (default: this one), BATCH: 4
#
# Makes a private cluster (scripts/pgcluster.sh) in a scratch directory, migrates it with
# TREE's `sidecar migrate`, imports bench_admission.py's configuration (one hot provider,
# 64 users, one hot trunk), stops it, then runs PostgreSQL's single-user backend under
# valgrind --tool=callgrind twice, on 20 and on 60 rounds of BATCH calls (admit_batch(),
# then control_events() with their answers, then with their releases; one transaction each),
# and prints the difference per call: start-up, first-call compilation and the harness are
# the same in both runs and cancel out. Needs valgrind; runs as root (through runuser) or as
# the cluster's owner. About two minutes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tree=$(cd "${1:-$ROOT}" && pwd)
batch=${2:-4}
py="$ROOT/.venv/bin/python"
work=$(mktemp -d /tmp/callgrind-sql.XXXXXX)
chmod 755 "$work"
trap '"$ROOT/scripts/pgcluster.sh" stop "$work/pg" "$port" >/dev/null 2>&1 || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "==> a private cluster in $work/pg, migrated by $tree" >&2
"$ROOT/scripts/pgcluster.sh" start "$work/pg" "$port" >/dev/null
url=$("$ROOT/scripts/pgcluster.sh" url "$work/pg" "$port")
"$py" -c "import json, sys; sys.path.insert(0, '$ROOT/bench'); from bench_admission import bench_config; json.dump(bench_config(), open('$work/config.json', 'w'))"
(cd "$tree" && PYTHONPATH="$tree" DATABASE_URL="$url" "$ROOT/.venv/bin/sidecar" migrate >/dev/null 2>&1)
(cd "$tree" && PYTHONPATH="$tree" DATABASE_URL="$url" "$ROOT/.venv/bin/sidecar" import "$work/config.json" >/dev/null)
"$ROOT/scripts/pgcluster.sh" stop "$work/pg" "$port" >/dev/null
owner=$(stat -c %U "$work/pg/data")
run() {  # $1: rounds -> instructions
    "$py" "$ROOT/bench/callgrind_workload.py" "$1" "$batch" > "$work/w-$1.sql"
    chmod 644 "$work/w-$1.sql"
    rm -rf "$work/pg/run" && cp -a "$work/pg/data" "$work/pg/run"
    local as=()
    [ "$(id -u)" = 0 ] && as=(runuser -u "$owner" --)
    "${as[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/pg/cg-$1.out" \
        /usr/lib/postgresql/15/bin/postgres --single -D "$work/pg/run" -c fsync=off sidecar \
        < "$work/w-$1.sql" > "$work/out-$1.txt" 2> "$work/vg-$1.txt"
    if grep -q ERROR "$work/out-$1.txt"; then grep ERROR "$work/out-$1.txt" | head -3 >&2; exit 1; fi
    grep -o "Collected : [0-9]*" "$work/vg-$1.txt" | awk '{print $3}'
}
echo "==> callgrind: 20 and 60 rounds of $batch calls" >&2
a=$(run 20); b=$(run 60)
echo "instructions per call (admit + answer + release, batches of $batch): $(( (b - a) / (40 * batch) ))"
