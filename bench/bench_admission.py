"""Admission benchmark: decisions per second and p50/p99 latency at concurrency 1, 16, 64.

Runs the real sidecar (`python -m sidecar serve`, its own process) against a real PostgreSQL
(DATABASE_URL's server, or a private cluster started here), with every call touching one hot
provider account and one hot trunk, as a busy platform would. Each simulated call is an
admission followed by a release; latency is measured on the admission.

    .venv/bin/python bench/bench_admission.py [--seconds 10] [--sync-commit off|on]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import PrivateCluster, free_port, with_database  # noqa: E402

CONFIG = {
    "counting": "per_call",
    "accounts": [
        {"id": "provider", "limits": {"calls": 1000000}},
        *({"id": f"org{i}", "parent": "provider", "limits": {"calls": 100000}} for i in range(8)),
    ],
    "extensions": [{"id": f"u{i}", "account": f"org{i % 8}", "password": "pw"} for i in range(64)],
    "channels": [{"id": "trunk", "limits": {"calls": 1000000}, "gateway": "sip:127.0.0.3:5070",
                  "prefixes": ["+"]}],
}


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


async def run_level(base: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while time.perf_counter() < deadline:
            call_id = f"bench-{w}-{n}-{uuid.uuid4().hex[:6]}"
            n += 1
            body = {"call_id": call_id, "from_tag": "ft", "source_ip": "127.0.0.1",
                    "from_user": f"u{w % 64}", "auth_user": f"u{w % 64}",
                    "to_user": "+15551230000", "node": "bench", "boot": "b"}
            t0 = time.perf_counter()
            async with session.post(base + "/v1/control/admit", json=body, headers=headers) as r:
                decision = await r.json()
            latencies.append(time.perf_counter() - t0)
            assert decision["action"] == "relay", decision
            async with session.post(base + "/v1/control/release", headers=headers,
                                    json={"call_id": call_id, "from_tag": "ft"}) as r:
                await r.read()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
    return len(latencies), latencies


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sync-commit", default="off", choices=["on", "off"])
    ap.add_argument("--levels", default="1,16,64")
    args = ap.parse_args()

    cluster = None
    if os.environ.get("DATABASE_URL"):
        server = with_database(os.environ["DATABASE_URL"], "postgres")
    else:
        say("starting a private PostgreSQL cluster")
        cluster = PrivateCluster()
        cluster.start()
        server = cluster.url
    name = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server, name)
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "SIDECAR_PORT": str(port),
           "SIDECAR_ADMIN_TOKEN": "bench", "SIDECAR_LOG_LEVEL": "WARNING",
           "SIDECAR_DB_SYNCHRONOUS_COMMIT": args.sync_commit, "SIDECAR_DB_POOL_MAX": "32"}
    py = sys.executable
    try:
        config = ROOT / ".bench-config.json"
        import orjson

        config.write_bytes(orjson.dumps(CONFIG))
        subprocess.run([py, "-m", "sidecar", "migrate"], env=env, check=True, cwd=ROOT)  # noqa: ASYNC221
        subprocess.run(  # noqa: ASYNC221
            [py, "-m", "sidecar", "import", str(config)], env=env, check=True,
                       cwd=ROOT)
        config.unlink()
        say(f"starting the sidecar on 127.0.0.1:{port} (synchronous_commit={args.sync_commit})")
        server_proc = subprocess.Popen(  # noqa: ASYNC220
            [py, "-m", "sidecar", "serve"], env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        print(f"{'concurrency':>11} {'admissions/s':>13} {'p50 ms':>8} {'p99 ms':>8}")
        try:
            for level in (int(x) for x in args.levels.split(",")):
                await run_level(base, level, 1.0)  # warm-up
                start = time.perf_counter()
                n, lat = await run_level(base, level, args.seconds)
                elapsed = time.perf_counter() - start
                q = statistics.quantiles(lat, n=100)
                print(f"{level:>11} {n / elapsed:>13.0f} {q[49] * 1000:>8.2f} {q[98] * 1000:>8.2f}",
                      flush=True)
        finally:
            server_proc.terminate()
            server_proc.wait(10)
        drift = await (await asyncpg.connect(url)).fetch("SELECT * FROM counter_drift()")
        say(f"counter drift after the run: {len(drift)} counters")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if cluster:
            cluster.remove()


if __name__ == "__main__":
    asyncio.run(main())
