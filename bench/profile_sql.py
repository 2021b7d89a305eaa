"""Where PostgreSQL's time goes per call: admit, answer and release in batches, straight to
the batch functions (no HTTP, no sidecar), with `track_functions = all`.

Creates (drops first) the database named in --database-url, migrates it (`sidecar migrate`),
imports bench_admission.py's configuration (one hot provider, one hot trunk), then runs
--rounds batches of --batch calls: admit_batch(), then control_events() with their answers,
then with their releases, one transaction each (synchronous_commit as the server has it).
Prints milliseconds per call for each step and the functions by their own time.

    .venv/bin/python bench/profile_sql.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/sidecar_profile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_admission import NUMBER, USERS, bench_config  # noqa: E402

SIDECAR = str(Path(sys.executable).with_name("sidecar"))


async def recreate(url: str) -> None:
    base, _, name = url.rpartition("/")
    admin = await asyncpg.connect(base + "/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()


def setup(url: str) -> None:
    asyncio.run(recreate(url))
    env = dict(os.environ, DATABASE_URL=url)
    subprocess.run([SIDECAR, "migrate"], env=env, check=True, capture_output=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(bench_config(), f)
        f.flush()
        subprocess.run([SIDECAR, "import", f.name], env=env, check=True, capture_output=True)


def backend_cpu(pid: int) -> float | None:
    """The backend's CPU seconds so far (utime + stime), when PostgreSQL runs on this host."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def profile(args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(args.database_url)
    await conn.execute("SET track_functions = 'all'")
    for setting in args.set:
        name, _, value = setting.partition("=")
        await conn.execute(f"SET {name} = {value}")
    b, rounds = args.batch, args.rounds
    ids = [[f"c{r}-{i}" for i in range(b)] for r in range(rounds)]
    users = [f"u{i % USERS}" for i in range(b)]
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    c0, t0 = backend_cpu(pid), time.perf_counter()
    for r in range(rounds):
        await conn.fetchval(
            "SELECT admit_batch($1, $2, $3::inet[], $4, $5, $6, $7, $8, $9, false, 'bench', "
            "'180 s', '4 h')",
            ids[r], ["ft"] * b, ["127.0.0.1"] * b, users, [NUMBER] * b, users, ["n"] * b,
            ["b"] * b, [False] * b)
    c1, t1 = backend_cpu(pid), time.perf_counter()
    for r in range(rounds):
        await conn.fetchval("SELECT control_events($1, $2, $3, $4, $5, '4 h', '180 s')",
                            ["answer"] * b, ids[r], ["ft"] * b, [0] * b, [None] * b)
    c2, t2 = backend_cpu(pid), time.perf_counter()
    for r in range(rounds):
        await conn.fetchval("SELECT control_events($1, $2, $3, $4, $5, '4 h', '180 s')",
                            ["release"] * b, ids[r], ["ft"] * b, [None] * b, ["bye"] * b)
    c3, t3 = backend_cpu(pid), time.perf_counter()
    n = rounds * b
    print(f"{n} calls in batches of {b}: admit {1e3 * (t1 - t0) / n:.3f} ms per call, "
          f"answer {1e3 * (t2 - t1) / n:.3f}, release {1e3 * (t3 - t2) / n:.3f}, "
          f"all three {1e3 * (t3 - t0) / n:.3f} ({n / (t3 - t0):.0f} calls/s, one client)")
    if c0 is not None:
        print(f"  backend CPU (utime+stime, us per call): admit {1e6 * (c1 - c0) / n:.0f}, "
              f"answer {1e6 * (c2 - c1) / n:.0f}, release {1e6 * (c3 - c2) / n:.0f}, "
              f"all three {1e6 * (c3 - c0) / n:.0f}")
    await conn.close()
    await asyncio.sleep(1.5)  # statistics reach the view when the backend has reported them
    conn = await asyncpg.connect(args.database_url)
    print(f"{'function':<22} {'calls':>7} {'total ms':>9} {'self ms':>8} {'self us/call':>12}")
    for row in await conn.fetch(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
            "WHERE calls > 0 ORDER BY self_time DESC LIMIT 16"):
        print(f"{row['funcname']:<22} {row['calls']:>7} {row['total_time']:>9.1f} "
              f"{row['self_time']:>8.1f} {1000 * row['self_time'] / n:>12.1f}")
    drift = await conn.fetchval("SELECT count(*) FROM counter_drift()")
    print(f"counter_drift(): {drift} rows")
    await conn.close()
    return 1 if drift else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", required=True, help="a scratch database (dropped)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the session (plan_cache_mode=force_generic_plan)")
    args = ap.parse_args()
    setup(args.database_url)
    return asyncio.run(profile(args))


if __name__ == "__main__":
    sys.exit(main())
