"""SIP benchmark: completed calls per second through the real Kamailio, 1, 16, 64 in flight.

Superseded for the issue's figures by bench/bench_compare.py (`make bench`): open-loop rate
steps, the native dialog-profile Kamailio side by side, a lean multi-process load generator
(bench/loadgen.py) and CPU/commits per call. This closed-loop one stays for the refusal run
(486 REACH_PLAN_LIMIT per second); its load generator (tests.sipua, one process) takes most
of a core at a few hundred calls per second.

Starts the stack exactly as tests/e2e does (its helpers are imported, not copied): PostgreSQL
(DATABASE_URL's server, or a private cluster via tests.conftest.PrivateCluster), a fresh
database with `sidecar migrate`, `sidecar serve` (tests.e2e.conftest.SidecarProc) and Kamailio
with kamailio/kamailio.cfg (tests.e2e.conftest.KamailioProc), all on free ports.

Load: an application server extension authenticated by its source address (127.0.0.2, like
`otp` in examples/config.json) calls an external number; the sidecar routes it to a channel
whose gateway is a tests.sipua.SipUA on 127.0.0.3 that answers at once (100, 180, 200). Each
call is INVITE -> 200 -> ACK -> BYE -> 200; setup time is INVITE sent -> 200 seen by the caller.

Two runs:
  * admit:  limits far above the load, every call must be answered;
  * refuse: the account's limit (--refuse-limit) is held full by long calls, so every INVITE
            of the run is refused (486/403 REACH_PLAN_LIMIT): refusals per second.
At the end every counter must be back at 0 (GET /v1/usage) and `counter_drift()` empty.

    .venv/bin/python bench/bench_sip.py [--calls 2000] [--concurrency 1,16,64] [--duration S]

The load generator (this one Python process) shares the machine's cores with Kamailio, the
sidecar and PostgreSQL: the figures are what the whole box does, not the stack's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    PrivateCluster,
    create_database,
    drop_database,
    with_database,
)
from tests.e2e.conftest import (  # noqa: E402
    REALM,
    SIDECAR,
    Api,
    KamailioProc,
    SidecarProc,
    free_port,
)
from tests.sipua import SipUA  # noqa: E402

APP_IP = "127.0.0.2"  # the application server extension, known by its source address
GW_IP = "127.0.0.3"  # the carrier's gateway (our UAS)
NUMBER = "+15551230000"
BIG = 1_000_000
T1 = 0.5  # RFC 3261 default: no retransmission storm when setup time grows under load
CALL_TIMEOUT = 10.0
REFUSED = (403, 486)


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def config(gw_port: int, limit: int) -> dict[str, Any]:
    """A provider over a customer account; its app server calls out through one carrier."""
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "provider", "limits": {"calls": BIG}},
            {"id": "shop", "parent": "provider", "limits": {"calls": limit}},
        ],
        "extensions": [{"id": "otp", "account": "shop", "sources": [APP_IP]}],
        "channels": [
            {
                "id": "carrier",
                "limits": {"calls": BIG},
                "sources": [GW_IP],
                "gateway": f"sip:{GW_IP}:{gw_port}",
                "prefixes": ["+"],
                "priority": 1,
            }
        ],
    }


@dataclass
class Level:
    run: str
    concurrency: int
    attempted: int = 0
    answered: int = 0  # INVITE -> 200 -> ACK -> BYE -> 200, all done
    refused: int = 0  # REACH_PLAN_LIMIT refusals (refuse run)
    elapsed: float = 0.0
    setup: list[float] = field(default_factory=list)  # INVITE -> final wanted by this run
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    gw_invites: int = 0  # new INVITEs seen by the gateway
    gw_retrans: int = 0  # INVITE datagrams beyond those (retransmissions)

    def rate(self) -> float:
        done = self.answered if self.run == "admit" else self.refused
        return done / self.elapsed if self.elapsed else 0.0

    def q(self, p: int) -> float:
        if len(self.setup) < 2:
            return self.setup[0] * 1000 if self.setup else math.nan
        return statistics.quantiles(self.setup, n=100)[p - 1] * 1000


async def one_call(uac: SipUA, proxy: tuple[str, int], lv: Level, want: str) -> None:
    t0 = time.perf_counter()
    call = await uac.invite(NUMBER, proxy=proxy)
    try:
        code = await call.wait_final(CALL_TIMEOUT)
    except TimeoutError:
        lv.failures["INVITE timeout"] += 1
        return
    took = time.perf_counter() - t0
    if code == 200:
        if want == "admit":
            lv.setup.append(took)
        else:
            lv.failures["200 (should be refused)"] += 1
        try:
            bye = await call.bye(CALL_TIMEOUT)
        except TimeoutError:
            lv.failures["BYE timeout"] += 1
            return
        if bye != 200:
            lv.failures[f"BYE {bye}"] += 1
        elif want == "admit":
            lv.answered += 1
        return
    final = call.final
    if want == "refuse" and code in REFUSED and final is not None \
            and final.reason == "REACH_PLAN_LIMIT":
        lv.refused += 1
        lv.setup.append(took)
        return
    lv.failures[f"{code} {final.reason if final is not None else ''}".strip()] += 1


async def drive(proxy: tuple[str, int], gw: SipUA, lv: Level, calls: int,
                duration: float | None) -> None:
    """`calls` calls (or `duration` seconds of them), `lv.concurrency` in flight at a time."""
    async with SipUA(APP_IP, user="otp", domain=REALM, t1=T1) as uac:
        inv0 = sum(1 for r in gw.requests if r.method == "INVITE")
        new0 = len(gw.incoming)
        start = time.perf_counter()
        deadline = start + duration if duration else math.inf

        async def worker() -> None:
            while lv.attempted < calls and time.perf_counter() < deadline:
                lv.attempted += 1
                await one_call(uac, proxy, lv, lv.run)

        await asyncio.gather(*(worker() for _ in range(lv.concurrency)))
        lv.elapsed = time.perf_counter() - start
        lv.gw_invites = len(gw.incoming) - new0
        lv.gw_retrans = sum(1 for r in gw.requests if r.method == "INVITE") - inv0 - lv.gw_invites


def actives(usage: Any) -> dict[str, int]:
    """Every non-zero `active` figure in GET /v1/usage, by path."""
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "active" and isinstance(v, int):
                    if v:
                        out[path] = v
                else:
                    walk(v, f"{path}/{k}")

    walk(usage, "")
    return out


async def settle(api: Api) -> dict[str, int]:
    """Wait (up to 10 s) until no call is active; return what is still counted."""
    left = await api.wait_idle(timeout=10)
    end = time.monotonic() + 10
    while True:
        busy = actives(await api.usage())
        if not busy or time.monotonic() > end:
            if left:
                busy["calls listed by /v1/calls"] = len(left)
            return busy
        await asyncio.sleep(0.1)


def fmt_failures(c: collections.Counter[str]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in c.most_common()) or "-"


def print_table(levels: list[Level]) -> None:
    print()
    print(f"{'run':<7} {'in flight':>9} {'attempted':>9} {'answered':>8} {'refused':>7} "
          f"{'seconds':>7} {'per s':>7} {'p50 ms':>7} {'p99 ms':>7} {'INV rtx':>7}  failures")
    for lv in levels:
        print(f"{lv.run:<7} {lv.concurrency:>9} {lv.attempted:>9} {lv.answered:>8} "
              f"{lv.refused:>7} {lv.elapsed:>7.2f} {lv.rate():>7.1f} {lv.q(50):>7.2f} "
              f"{lv.q(99):>7.2f} {lv.gw_retrans:>7}  {fmt_failures(lv.failures)}")
    print("per s: admit = completed calls per second (CPS); refuse = refusals per second.")
    print("p50/p99: INVITE sent -> final response (200 for admit, 486/403 for refuse), "
          "seen by the caller.")
    print("INV rtx: INVITE retransmissions that reached the gateway.", flush=True)


async def bench(args: argparse.Namespace, db_url: str, workdir: Path) -> int:
    levels = [int(x) for x in args.concurrency.split(",")]
    env: dict[str, str] = {"SIDECAR_RECONCILE_GRACE": "2"}  # as the e2e session does
    defines: list[str] = []
    if args.quiet:
        env["SIDECAR_LOG_LEVEL"] = "WARNING"
        defines.append("LOG_LEVEL=1")
    say(f"starting the sidecar ({SIDECAR} serve)")
    sc = SidecarProc(db_url, workdir, **env)
    procs: list[Any] = [sc]
    results: list[Level] = []
    problems: list[str] = []
    try:
        await asyncio.to_thread(sc.wait_ready)
        kam = KamailioProc(db_url, sc.url, workdir, *defines)
        procs.append(kam)
        say(f"starting Kamailio on udp:127.0.0.1:{kam.port} (kamailio/kamailio.cfg, 4 workers)")
        await kam.wait_ready()
        gw_port = free_port()
        async with aiohttp.ClientSession() as session:
            api = Api(sc.url, session)
            for run in args.runs.split(","):
                limit = BIG if run == "admit" else args.refuse_limit
                say(f"loading the configuration for the {run} run (shop limit {limit})")
                await api.put_config(config(gw_port, limit))
                for conc in levels:
                    async with SipUA(GW_IP, gw_port, user="gw", domain=REALM, t1=T1) as gw:
                        gw.on_invite = "answer"  # 100, 180, 200 at once
                        held: list[Any] = []
                        holder: SipUA | None = None
                        if run == "refuse":
                            holder = await SipUA(APP_IP, user="otp", domain=REALM, t1=T1).start()
                            for _ in range(limit):
                                c = await holder.invite(NUMBER, proxy=kam.addr)
                                if await c.wait_final(CALL_TIMEOUT) != 200:
                                    raise RuntimeError(f"holding call refused: {c.final}")
                                held.append(c)
                            say(f"holding {limit} calls so the limit is full")
                        warm = Level(run, conc)
                        n_warm = min(100, max(10, 2 * conc))
                        say(f"{run}: warm-up, {n_warm} calls at {conc} in flight")
                        await drive(kam.addr, gw, warm, n_warm, None)
                        lv = Level(run, conc)
                        what = f"{args.duration:g} s" if args.duration else f"{args.calls} calls"
                        say(f"{run}: {what} at {conc} in flight")
                        await drive(kam.addr, gw, lv, args.calls, args.duration)
                        results.append(lv)
                        for c in held:
                            await c.bye(CALL_TIMEOUT)
                        if holder is not None:
                            await holder.close()
                        busy = await settle(api)
                        if busy:
                            problems.append(f"{run}@{conc}: still counted after the run: {busy}")
                        if lv.failures or warm.failures:
                            problems.append(f"{run}@{conc}: failures {fmt_failures(lv.failures)}"
                                            f" (warm-up: {fmt_failures(warm.failures)})")
            say("checking usage is back to 0 and counter_drift() is empty")
            busy = await settle(api)
        conn = await asyncpg.connect(db_url)
        try:
            drift = await conn.fetch("SELECT * FROM counter_drift()")
        finally:
            await conn.close()
    finally:
        for p in procs:
            if not p.alive():
                say(f"{p.name} had exited (status {p.p.returncode}); log: {p.log}")
        for p in reversed(procs):
            p.stop()
    print_table(results)
    print(f"usage after all runs: {'all 0' if not busy else busy}")
    print(f"counter_drift(): {'empty' if not drift else [dict(r) for r in drift]}")
    if busy:
        problems.append(f"usage not back to 0: {busy}")
    if drift:
        problems.append(f"counter drift: {[dict(r) for r in drift]}")
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        print(f"logs: {sc.log}, {procs[-1].log}")
    return 1 if problems else 0


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls per level (default 2000)")
    ap.add_argument("--concurrency", default="1,16,64",
                    help="calls in flight, comma-separated levels (default 1,16,64)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per level instead of a call count (stops at --calls too)")
    ap.add_argument("--runs", default="admit,refuse", help="admit, refuse or both (default)")
    ap.add_argument("--refuse-limit", type=int, default=2,
                    help="the account's limit in the refuse run, held full (default 2)")
    ap.add_argument("--quiet", action="store_true",
                    help="sidecar at WARNING and Kamailio at LOG_LEVEL=1 (default: INFO, "
                         "as shipped)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args()
    if args.duration:
        args.calls = sys.maxsize if args.calls == ap.get_default("calls") else args.calls

    cores = os.cpu_count()
    print(f"CAVEAT: this load generator (one Python process: the caller on {APP_IP} and the "
          f"gateway on {GW_IP}) shares the machine's {cores} cores with Kamailio, the sidecar "
          "and PostgreSQL; the figures are what the whole box does, not the stack's capacity.",
          flush=True)
    print("load average before the run (other work on the box skews the figures): "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-sip-"))
    os.chmod(workdir, 0o755)
    cluster = None
    if os.environ.get("DATABASE_URL"):
        server = with_database(os.environ["DATABASE_URL"], "postgres")
        say("using DATABASE_URL's server")
    else:
        say("starting a private PostgreSQL cluster")
        cluster = PrivateCluster()
        await asyncio.to_thread(cluster.start)
        server = cluster.url
    rc = 1
    db_url = None
    try:
        say("creating a database and applying migrations (sidecar migrate)")
        db_url = await create_database(server, template=None)
        await asyncio.to_thread(subprocess.run, [str(SIDECAR), "migrate"],
                                env=dict(os.environ, DATABASE_URL=db_url), check=True,
                                capture_output=True)
        rc = await bench(args, db_url, workdir)
    finally:
        if db_url is not None:
            await drop_database(server, db_url)
        if cluster is not None:
            say("stopping the private PostgreSQL cluster")
            await asyncio.to_thread(cluster.remove)
        if args.keep or rc:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
