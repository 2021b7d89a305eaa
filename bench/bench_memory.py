"""Memory over many calls: the sidecar's RSS and the size of the calls table while
--calls calls (default 1,000,000) go through the sidecar's control API.

Starts a private PostgreSQL, `sidecar serve` (synchronous_commit on) and the lean HTTP client
of bench_admission.py (calls in flight: --in-flight, answers and releases through an outbox,
as kamailio.cfg sends them), and runs the calls in chunks of --chunk seconds. After each
chunk it prints: calls done so far, the sidecar's RSS (VmRSS), the calls table with its
indexes and TOAST (pg_total_relation_size), its rows by state, and the database size.

Ended calls are kept as tombstones for SIDECAR_RINGING_TTL (--retention, default 30 s here;
180 s shipped) and purged by the janitor in batches: the table must stay flat, holding about
retention x calls per second rows, whatever the number of calls.

    .venv/bin/python bench/bench_memory.py                       # 1,000,000 calls, ~12 min
    .venv/bin/python bench/bench_memory.py --calls 100000        # ~1.5 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_admission import Client, bench_config  # noqa: E402
from benchlib import Db, Stack, finish, install_sigterm, say, wait_usage_zero  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--chunk", type=float, default=60.0, help="seconds between two samples")
    ap.add_argument("--retention", type=int, default=30,
                    help="SIDECAR_RINGING_TTL: how long ended calls stay (s)")
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    install_sigterm()
    stack = Stack()
    client: Client | None = None
    db: Db | None = None
    problems: list[str] = []
    try:
        client = Client(args.procs)
        say("starting a private PostgreSQL, migrating, loading the benchmark configuration")
        url = stack.start_postgres()
        stack.sidecar_cli("migrate")
        stack.load_config(bench_config())
        sc, base = stack.start_sidecar(SIDECAR_DB_SYNCHRONOUS_COMMIT="on",
                                       SIDECAR_RINGING_TTL=str(args.retention),
                                       SIDECAR_JANITOR_INTERVAL="5")
        port = int(base.rsplit(":", 1)[1])
        db = Db(url)
        print(f"{'calls':>9} {'elapsed s':>9} {'calls/s':>8} | {'sidecar RSS MB':>14} | "
              f"{'calls table MB':>14} {'rows':>8} {'live':>6} {'ended':>8} | {'db MB':>7}",
              flush=True)
        done, t0 = 0, time.monotonic()
        first_rss = None
        sizes = []
        while done < args.calls:
            r = client.run(port, args.in_flight, args.chunk, outbox=True)
            done += r["done"]
            if r["failures"]:
                problems.append(f"failures: {dict(r['failures'])}")
            rss = rss_mb(sc.pid)
            first_rss = first_rss or rss
            size = db.fetchval("SELECT pg_total_relation_size('calls')") / 2**20
            sizes.append(size)
            rows = db.fetch("SELECT count(*) AS n, count(*) FILTER (WHERE state IN "
                            "('ringing', 'answered')) AS live, count(*) FILTER (WHERE state "
                            "IN ('released', 'refused')) AS ended FROM calls")[0]
            dbsize = db.fetchval("SELECT pg_database_size(current_database())") / 2**20
            el = time.monotonic() - t0
            print(f"{done:>9} {el:>9.0f} {done / el:>8.0f} | {rss:>14.1f} | {size:>14.1f} "
                  f"{rows['n']:>8} {rows['live']:>6} {rows['ended']:>8} | {dbsize:>7.1f}",
                  flush=True)
        busy, _ = wait_usage_zero(base, timeout=15)
        if busy:
            problems.append(f"usage not back to 0: {busy}")
        drift = db.drift()
        print(f"usage after: {'all 0' if not busy else busy}; counter_drift(): {drift} rows")
        if drift:
            problems.append(f"counter_drift() lists {drift} counters")
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        code = finish(stack, problems, client, db)
    return code


if __name__ == "__main__":
    sys.exit(main())
