"""Chaos over real SIP through a real Kamailio (SPEC section 8: nothing may leak).

Each test runs its OWN PostgreSQL database (or private cluster), `sidecar serve` and
Kamailio, because it kills them, with short timers:

    sidecar   SIDECAR_RECONCILE_GRACE=2  SIDECAR_JANITOR_INTERVAL=1  SIDECAR_RINGING_TTL=6
    kamailio  HEARTBEAT_INTERVAL=2 (tests/e2e/conftest.py)  FR_INV_TIMER=4000
              MAX_CALL_DURATION=8 or 6 where a test needs the dialog timeout

and drives a steady stream of calls (25 calls/s, each held 1-3 s) from four caller UAs (an
application server recognised by source address) to four registered callee UAs that answer.

Every test ends with the same check:

    GET /v1/usage (admin)  ==  the calls truly up  and  SELECT count(*) FROM counter_drift() = 0

"Truly up" is counted from the user agents' side, as what the proxy still carries: a call the
callee UA answered (200 sent), whose INVITE reached it from the Kamailio process that is
running now, and that has not ended (no BYE reached the callee: a BYE that passes the proxy
always reaches the callee, and so does the proxy's own BYE at the dialog timeout). A call whose
BYE was lost before the proxy is still up: the proxy keeps its dialog until the dialog timeout.
A call set up by a Kamailio process that was killed is not up any more, whatever its UAs
believe: no proxy carries it, its in-dialog requests get 481 from the new process, and the
new process's first heartbeat (new boot id) releases it.

The scenarios: the sidecar killed (-9) and restarted on its port; PostgreSQL stopped and
started (a binding limit); Kamailio killed (-9) and restarted on its port; 5 % of the BYEs lost
on the way (tests/udp_relay.py, a binding limit); and the cleanup time of each way a release
is lost (reconciliation, dialog timeout, ringing TTL), measured by polling GET /v1/calls.

Each test prints one summary line `CHAOS test=... placed= answered= refused= 503= ... up_end=
usage= drift= ...` with the cleanup times it measured (`max s(n=calls,min=...)`, inf: never
released), even when it passes; with CHAOS_SUMMARY_FILE set they are appended to that file.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import PrivateCluster, create_database, drop_database
from tests.e2e.conftest import (
    REALM,
    SIDECAR,
    T1,
    Api,
    KamailioProc,
    Proc,
    SidecarProc,
)
from tests.sipua import Call, IncomingCall, SipUA
from tests.udp_relay import UdpRelay

pytestmark = pytest.mark.e2e

Addr = tuple[str, int]

# --- timers (seconds) --------------------------------------------------------------------
HB = 2  # HEARTBEAT_INTERVAL, set by tests/e2e/conftest.py's KamailioProc
GRACE = 2  # SIDECAR_RECONCILE_GRACE
JANITOR = 1  # SIDECAR_JANITOR_INTERVAL
RINGING_TTL = 6  # SIDECAR_RINGING_TTL (> FR_INV_TIMER = 4 s of the e2e Kamailio)
MARGIN = 1.5  # scheduling, the watcher's poll period, a loaded 2-core machine
RECONCILE_BOUND = HB + GRACE + MARGIN  # a lost release is reconciled within this
DLG_TICK = 1  # Kamailio's dialog timer counts whole seconds: a timeout fires within 1 s of it

SIDECAR_ENV = {
    "SIDECAR_RECONCILE_GRACE": str(GRACE),
    "SIDECAR_JANITOR_INTERVAL": str(JANITOR),
    "SIDECAR_RINGING_TTL": str(RINGING_TTL),
}

# --- load ---------------------------------------------------------------------------------
RATE = 25.0  # calls per second
HOLD = (1.0, 3.0)  # an answered call is held this long, then the caller hangs up
FINAL_TIMEOUT = 8.0  # an INVITE gets its final answer within this (FR_INV_TIMER 4 s)
BYE_TIMEOUT = 3.0  # a BYE unanswered for this long was lost
APP_IP = "127.0.0.2"  # the callers: an application server known by source address
PW = "chaos-pw"
CALLEES = ("1001", "1002", "1003", "1004")
WIDE = 1000  # a limit the load never reaches


def config(limit: int) -> dict[str, Any]:
    """A provider with one organisation; callers and callees are all the organisation's."""
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "prov", "limits": {"calls": None}},
            {"id": "acme", "parent": "prov", "limits": {"calls": limit}},
        ],
        "extensions": [{"id": "app", "account": "acme", "sources": [APP_IP]}]
        + [{"id": u, "account": "acme", "password": PW} for u in CALLEES],
    }


def now() -> float:
    return time.monotonic()


async def wait_for(
    cond: Callable[[], Awaitable[bool]], timeout: float, period: float = 0.2
) -> float | None:
    """Seconds until cond() held, None if it never did within timeout."""
    start = now()
    while True:
        try:
            if await cond():
                return now() - start
        except (aiohttp.ClientError, OSError, AssertionError, TimeoutError):
            pass
        if now() - start > timeout:
            return None
        await asyncio.sleep(period)


# --- call records -------------------------------------------------------------------------


@dataclass
class Rec:
    """One call, as its caller saw it."""

    call: Call
    placed: float
    long: bool = False  # held until the end of the test
    final: int | None = None  # None: no final answer within FINAL_TIMEOUT
    limit_refusal: bool = False
    answered: float | None = None
    bye_at: float | None = None
    bye_status: int | None = None  # None: the BYE got no answer (lost)
    bye_done: float | None = None

    @property
    def call_id(self) -> str:
        return self.call.call_id


class Watcher:
    """Polls the admin API: usage (every sample kept) and the active calls (when each call
    was last seen active and first seen gone), to measure when calls were released."""

    def __init__(self, api: Api, period: float = 0.25):
        self.api, self.period = api, period
        self.samples: list[tuple[float, int]] = []
        self.seen: dict[str, float] = {}  # call_id -> last time listed active
        self.gone: dict[str, float] = {}  # call_id -> first time not listed after being seen
        self.errors = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            t = now()
            try:
                u = await self.api.usage()
                self.samples.append((t, int(u["accounts"]["acme"]["calls"]["active"])))
                calls = await self.api.calls()
                t = now()
                active = {
                    c["call_id"] for c in calls if c.get("state") in ("ringing", "answered")
                }
                for cid in active:
                    self.seen[cid] = t
                    self.gone.pop(cid, None)
                for cid in self.seen.keys() - active:
                    self.gone.setdefault(cid, t)
            except Exception as e:  # noqa: BLE001 - the watcher outlives every outage
                self.errors += 1
                self.last_error = repr(e)[:300]
            await asyncio.sleep(self.period)

    def max_usage(self, since: float = 0.0) -> int:
        return max((n for t, n in self.samples if t >= since), default=0)

    def released_at(self, call_id: str) -> float | None:
        return self.gone.get(call_id)


class Phones:
    """The test's user agents: callers (APP_IP) and registered callees that answer."""

    def __init__(self, proxy: Addr):
        self.proxy = proxy
        self.callers: list[SipUA] = []
        self.callees: dict[str, SipUA] = {}
        # call_id -> [(arrival time, incoming call)]: one per INVITE that reached a callee
        self.arrivals: dict[str, list[tuple[float, IncomingCall]]] = {}
        self.ring_only: set[str] = set()  # callees that ring and never answer
        self.relay: Addr | None = None

    def _via_relay(self, ua: SipUA) -> None:
        """Everything this UA sends to the proxy goes to the relay instead (requests, ACKs,
        BYEs along the route set, responses to the proxy's requests)."""
        relay, proxy, send = self.relay, self.proxy, ua.send_raw
        assert relay is not None

        def send_raw(data: bytes, dest: Addr) -> None:
            send(data, relay if tuple(dest) == proxy else dest)

        ua.send_raw = send_raw  # type: ignore[method-assign]

    async def start(self, n_callers: int = 4, relay: Addr | None = None) -> None:
        self.relay = relay
        for _ in range(n_callers):
            ua = SipUA(APP_IP, user="app", domain=REALM, t1=T1)
            await ua.start()
            if relay is not None:
                self._via_relay(ua)
            self.callers.append(ua)
        for user in CALLEES:
            ua = SipUA("127.0.0.1", user=user, password=PW, domain=REALM, t1=T1)
            await ua.start()
            if relay is not None:
                self._via_relay(ua)
            ua.on_invite = self._policy(user)
            self.callees[user] = ua
        await self.register()

    def _policy(self, user: str) -> Callable[[IncomingCall], None]:
        def policy(inc: IncomingCall) -> None:  # after the UA's own 100 Trying
            self.arrivals.setdefault(inc.call_id, []).append((now(), inc))
            inc.ringing()
            if user not in self.ring_only:
                inc.answer()

        return policy

    async def register(self) -> None:
        for ua in self.callees.values():
            resp = await ua.register(self.proxy, expires=600)
            assert resp.status == 200, resp

    def truly_up(self, since: float = 0.0) -> int:
        """Calls the proxy running since `since` still carries (see the module docstring)."""
        return sum(
            1
            for lst in self.arrivals.values()
            for t, inc in lst
            if t >= since and inc.final_status == 200 and not inc.ended.is_set()
        )

    def incoming(self, call_id: str) -> list[IncomingCall]:
        return [inc for _, inc in self.arrivals.get(call_id, [])]

    async def close(self) -> None:
        for ua in [*self.callers, *self.callees.values()]:
            await ua.close()


class Load:
    """Places calls at a steady rate, round robin over callers and callees."""

    def __init__(self, phones: Phones, seed: int):
        self.phones = phones
        self.rng = random.Random(seed)
        self.recs: list[Rec] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._n = 0

    def _next_pair(self) -> tuple[SipUA, str]:
        callers = self.phones.callers
        targets = [u for u in CALLEES if u not in self.phones.ring_only]
        i = self._n
        self._n += 1
        return callers[i % len(callers)], targets[i % len(targets)]

    async def place(self, long: bool = False, to: str | None = None) -> Rec:
        caller, target = self._next_pair()
        call = await caller.invite(to or target, proxy=self.phones.proxy)
        rec = Rec(call, now(), long=long)
        self.recs.append(rec)
        return rec

    async def _lifecycle(self, rec: Rec, hold: float | None) -> None:
        try:
            rec.final = await rec.call.wait_final(FINAL_TIMEOUT)
        except TimeoutError:
            return
        final = rec.call.final
        rec.limit_refusal = final is not None and final.reason == "REACH_PLAN_LIMIT"
        if rec.final != 200:
            return
        rec.answered = now()
        if hold is None:
            return
        await asyncio.sleep(hold)
        await self.hangup(rec)

    async def hangup(self, rec: Rec) -> None:
        rec.bye_at = now()
        try:
            rec.bye_status = await rec.call.bye(timeout=BYE_TIMEOUT)
        except TimeoutError:
            rec.bye_status = None
        rec.bye_done = now()

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, long: bool = False) -> Rec:
        rec = await self.place(long=long)
        self.spawn(self._lifecycle(rec, None if long else self.rng.uniform(*HOLD)))
        return rec

    async def long_calls(self, n: int) -> list[Rec]:
        """n calls held until the end of the test, answered before this returns."""
        recs = [await self.call(long=True) for _ in range(n)]
        for r in recs:
            assert await r.call.wait_final(FINAL_TIMEOUT) == 200, r.call.final
        await asyncio.sleep(0.05)
        return recs

    async def run(self, duration: float, rate: float = RATE) -> None:
        start = now()
        i = 0
        while now() - start < duration:
            await self.call()
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - now()))

    async def drain(self, timeout: float = FINAL_TIMEOUT + HOLD[1] + BYE_TIMEOUT + 2) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)

    # -- figures ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        recs = self.recs
        return {
            "placed": len(recs),
            "answered": sum(r.final == 200 for r in recs),
            "refused": sum(r.limit_refusal for r in recs),
            "503": sum(r.final == 503 for r in recs),
            "other": sum(
                r.final is not None and r.final not in (200, 503) and not r.limit_refusal
                for r in recs
            ),
            "no_final": sum(r.final is None for r in recs),
            "bye_lost": sum(r.bye_at is not None and r.bye_status is None for r in recs),
        }

    def placed_between(self, t0: float, t1: float) -> list[Rec]:
        return [r for r in self.recs if t0 <= r.placed <= t1]

    def bye_passed_between(self, t0: float, t1: float) -> list[Rec]:
        """Calls whose BYE went through the proxy (200) between t0 and t1."""
        return [
            r
            for r in self.recs
            if r.bye_at is not None and t0 <= r.bye_at <= t1 and r.bye_status == 200
        ]


# --- the rig: this test's own database, sidecar and Kamailio ------------------------------


class Rig:
    def __init__(self, request: Any, workdir: Path):
        self.request, self.workdir = request, workdir
        self.db_url = ""
        self.cluster: PrivateCluster | None = None
        self.pg_server_url: str | None = None
        self.sidecar: SidecarProc | None = None
        self.kamailio: KamailioProc | None = None
        self.procs: list[Proc] = []
        self.node = f"chaos-{os.getpid()}-{request.node.name[:20]}"
        self.kamailio_started = 0.0  # when the running Kamailio process was started
        self.generation_start = 0.0  # INVITEs reaching callees after this: current proxy
        self.session: aiohttp.ClientSession | None = None
        self.api: Api | None = None
        self.phones: Phones | None = None
        self.relay: UdpRelay | None = None
        self.watcher: Watcher | None = None
        self.extra: dict[str, Any] = {}

    # -- database ------------------------------------------------------------------------
    async def own_database(self) -> None:
        """A fresh database on the session's PostgreSQL server."""
        self.pg_server_url = self.request.getfixturevalue("pg_server_url")
        assert self.pg_server_url is not None
        self.db_url = await create_database(self.pg_server_url, template=None)
        await self._migrate()

    async def own_cluster(self) -> PrivateCluster:
        """A PostgreSQL cluster of this test's own, to stop and start."""
        cluster = PrivateCluster()
        self.cluster = cluster
        await asyncio.to_thread(cluster.start)
        self.db_url = cluster.url.rsplit("/", 1)[0] + "/sidecar"  # pgcluster.sh creates it
        await self._migrate()
        return cluster

    async def _migrate(self) -> None:
        await asyncio.to_thread(
            subprocess.run,
            [str(SIDECAR), "migrate"],
            env=dict(os.environ, DATABASE_URL=self.db_url),
            check=True,
            capture_output=True,
        )

    async def drift(self) -> int:
        conn = await asyncpg.connect(self.db_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM counter_drift()"))
        finally:
            await conn.close()

    # -- processes -------------------------------------------------------------------------
    async def start_sidecar(self, port: int | None = None) -> SidecarProc:
        sc = SidecarProc(self.db_url, self.workdir, port=port, **SIDECAR_ENV)
        self.procs.append(sc)
        self.sidecar = sc
        await asyncio.to_thread(sc.wait_ready)
        return sc

    async def kill_sidecar(self) -> None:
        assert self.sidecar is not None
        await asyncio.to_thread(self.sidecar.stop, signal.SIGKILL)

    async def start_kamailio(self, *defines: str, port: int | None = None) -> KamailioProc:
        assert self.sidecar is not None
        self.kamailio_started = now()
        kam = KamailioProc(self.db_url, self.sidecar.url, self.workdir, *defines, port=port,
                           node=self.node)
        self.procs.append(kam)
        self.kamailio = kam
        assert f"HEARTBEAT_INTERVAL={HB}" in kam.argv, "the e2e Kamailio's heartbeat changed"
        await kam.wait_ready()
        return kam

    async def kill_kamailio(self) -> None:
        assert self.kamailio is not None
        await asyncio.to_thread(self.kamailio.stop, signal.SIGKILL)

    async def up(self, limit: int, *kam_defines: str, relay: dict[str, Any] | None = None,
                 cluster: bool = False) -> None:
        """Database, sidecar, Kamailio, configuration, UAs (registered), watcher."""
        if cluster:
            await self.own_cluster()
        else:
            await self.own_database()
        sc = await self.start_sidecar()
        kam = await self.start_kamailio(*kam_defines)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        self.api = Api(sc.url, self.session)
        await self.api.put_config(config(limit))
        relay_addr: Addr | None = None
        if relay is not None:
            self.relay = UdpRelay(kam.addr, **relay)
            await self.relay.start()
            relay_addr = self.relay.addr
        self.phones = Phones(kam.addr)
        await self.phones.start(relay=relay_addr)
        self.watcher = Watcher(self.api)
        self.watcher.start()

    # -- checks ----------------------------------------------------------------------------
    async def usage(self) -> int:
        assert self.api is not None
        u = await self.api.usage()
        acme = int(u["accounts"]["acme"]["calls"]["active"])
        prov = int(u["accounts"]["prov"]["calls"]["active"])
        assert acme == prov, u  # every call of acme is the provider's too
        return acme

    def truly_up(self) -> int:
        assert self.phones is not None
        return self.phones.truly_up(self.generation_start)

    async def settle(self, timeout: float) -> tuple[float | None, int, int]:
        """Wait until usage equals the calls truly up; (seconds, usage, truly up)."""

        async def equal() -> bool:
            return await self.usage() == self.truly_up()

        took = await wait_for(equal, timeout)
        return took, await self.usage(), self.truly_up()

    async def end_state(self, timeout: float) -> dict[str, Any]:
        """The end condition, measured: wait until usage equals the calls truly up, then
        once more a heartbeat later (no live call may be released by a reconciliation), and
        the drift."""
        took, usage, up = await self.settle(timeout)
        await asyncio.sleep(HB + 0.5)
        return {
            "took": took,
            "usage_first": usage,
            "up_first": up,
            "usage": await self.usage(),
            "up": self.truly_up(),
            "drift": await self.drift(),
        }

    def report(self, load: Load, name: str, end: dict[str, Any], problems: list[str],
               expect_up: int | None = None, **extra: Any) -> dict[str, Any]:
        """Print the summary line, then assert the end condition and the scenario's own
        checks (problems: what it found wrong), all reported at once."""
        summary = {
            "test": name,
            **load.counts(),
            "up_end": end["up"],
            "usage": end["usage"],
            "drift": end["drift"],
            "settle_s": None if end["took"] is None else round(end["took"], 2),
            **extra,
        }
        self.print_summary(summary)
        problems = list(problems)
        if end["took"] is None:
            problems.append(
                f"usage {end['usage_first']} never equalled the calls truly up {end['up_first']}"
            )
        if end["usage"] != end["up"]:
            problems.append(f"usage {end['usage']} != calls truly up {end['up']} a heartbeat later")
        if end["drift"] != 0:
            problems.append(f"counter_drift() has {end['drift']} rows")
        if expect_up is not None and end["up"] != expect_up:
            problems.append(f"{end['up']} calls truly up at the end, expected {expect_up}")
        assert not problems, "\n".join(problems)
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        line = "CHAOS " + " ".join(
            f"{k}={v}" for k, v in summary.items()
        )
        capman = self.request.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print("\n" + line, flush=True)
        else:
            print(line, flush=True)
        path = os.environ.get("CHAOS_SUMMARY_FILE")
        if path:
            with open(path, "a") as fh:
                fh.write(line + "\n")

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.phones is not None:
            await self.phones.close()
        if self.relay is not None:
            await self.relay.close()
        for p in reversed(self.procs):  # nothing to drain: kill
            await asyncio.to_thread(p.stop, signal.SIGKILL)
        if self.session is not None:
            await self.session.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.remove)
        elif self.pg_server_url and self.db_url:
            await drop_database(self.pg_server_url, self.db_url)

    def dump_logs(self) -> None:
        for p in self.procs:
            print(f"\n----- {p.name} log ({p.log}) -----\n{p.tail(60)}")
        if self.cluster is not None:
            log = Path(self.cluster.dir) / "postgres.log"
            if log.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                print(f"\n----- postgres log ({log}) -----\n{tail}")


@pytest.fixture
async def rig(request: Any) -> AsyncIterator[Rig]:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-chaos-"))
    os.chmod(workdir, 0o755)
    r = Rig(request, workdir)
    try:
        yield r
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            r.dump_logs()
        await r.close()
        if os.environ.get("E2E_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def release_delays(
    watcher: Watcher, recs: Iterable[Rec], start: Callable[[Rec], float]
) -> list[float]:
    """Seconds from start(rec) to the first poll where the call was no longer active, for
    calls the watcher saw active; inf for one still active."""
    out = []
    for r in recs:
        if r.call_id not in watcher.seen:
            continue
        gone = watcher.released_at(r.call_id)
        out.append(float("inf") if gone is None else gone - start(r))
    return out


def fmt(delays: list[float]) -> str:
    """max(n=count,min=...) of release delays; inf = still not released."""
    if not delays:
        return "n/a"
    return f"{max(delays):.2f}s(n={len(delays)},min={min(delays):.2f}s)"


# --- the scenarios ------------------------------------------------------------------------


def check(problems: list[str], ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


def within(delays: list[float], low: float, high: float) -> bool:
    return bool(delays) and all(low <= d <= high for d in delays)


async def test_sidecar_kill9_mid_load(rig: Rig) -> None:
    """kill -9 of the sidecar mid-load, restarted 2 s later on the same port. INVITEs in the
    outage get the fail-closed 503; calls up stay counted; BYEs of the outage are lost by the
    sidecar and reconciled from the node's dialog list within HEARTBEAT_INTERVAL + grace."""
    await rig.up(WIDE)
    assert rig.phones is not None and rig.watcher is not None and rig.sidecar is not None
    watcher = rig.watcher
    load = Load(rig.phones, seed=1)
    early = await load.long_calls(5)
    late: list[Rec] = []
    marks: dict[str, float] = {}

    async def chaos() -> None:
        await asyncio.sleep(4)
        port = rig.sidecar.port  # type: ignore[union-attr]
        marks["kill"] = now()
        await rig.kill_sidecar()
        await asyncio.sleep(2)
        marks["restart"] = now()
        await rig.start_sidecar(port=port)
        marks["back"] = now()
        await asyncio.sleep(3)
        late.extend(await load.long_calls(5))

    await asyncio.gather(load.run(12), chaos())
    await load.drain()
    end = await rig.end_state(timeout=RECONCILE_BOUND + 2)

    problems: list[str] = []
    # INVITEs placed while nothing listened: the failure policy (fail-closed 503)
    outage = load.placed_between(marks["kill"] + 0.3, marks["restart"] - 0.2)
    check(problems, bool(outage) and all(r.final == 503 for r in outage),
          f"INVITEs in the outage not all 503: {[r.final for r in outage]}")
    check(problems, not [r for r in early + late if r.call_id in watcher.gone],
          "a call up all along was released")
    c = load.counts()
    check(problems, c["refused"] == 0, f"{c['refused']} calls refused under a wide limit")
    check(problems, c["answered"] >= c["placed"] // 2, "most calls were not answered")
    lost = load.bye_passed_between(marks["kill"], marks["back"])
    check(problems, bool(lost), "no BYE crossed the outage")
    delays = release_delays(watcher, lost, lambda r: max(r.bye_at or 0, marks["back"]))
    check(problems, within(delays, -1, RECONCILE_BOUND),
          f"lost releases not reconciled within {RECONCILE_BOUND}s of the sidecar's return: "
          f"{fmt(delays)}")
    rig.report(
        load,
        "sidecar_kill9",
        end,
        problems,
        expect_up=10,
        outage_s=round(marks["back"] - marks["kill"], 2),
        lost_releases=len(lost),
        lost_release_after_return=fmt(delays),
    )
    for r in early + late:
        assert await r.call.bye() == 200
    assert await wait_for(lambda: _eq(rig.usage(), 0), 5) is not None


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_postgres_restart_mid_load_binding_limit(rig: Rig) -> None:
    """PostgreSQL (a private cluster) stopped and started again mid-load, with a binding
    limit. Decisions fail closed while it is down; releases lost meanwhile are reconciled.
    The limit is never exceeded."""
    limit = 30
    await rig.up(limit, cluster=True)
    assert rig.phones is not None and rig.watcher is not None and rig.cluster is not None
    cluster, watcher = rig.cluster, rig.watcher
    load = Load(rig.phones, seed=2)
    early = await load.long_calls(5)
    marks: dict[str, float] = {}

    async def chaos() -> None:
        await asyncio.sleep(4)
        marks["stop"] = now()
        await asyncio.to_thread(cluster.stop)
        marks["stopped"] = now()
        await asyncio.sleep(1.5)
        marks["starting"] = now()
        await asyncio.to_thread(cluster.start)
        marks["back"] = now()

    await asyncio.gather(load.run(12), chaos())
    await load.drain()
    end = await rig.end_state(timeout=RECONCILE_BOUND + 2)

    problems: list[str] = []
    # INVITEs placed while PostgreSQL was down: the failure policy (fail-closed 503)
    outage = load.placed_between(marks["stopped"] + 0.2, marks["starting"] - 0.3)
    check(problems, bool(outage) and all(r.final == 503 for r in outage),
          f"INVITEs in the outage not all 503: {[r.final for r in outage]}")
    check(problems, load.counts()["refused"] > 0, "the limit was never binding")
    check(problems, watcher.max_usage() <= limit, f"usage {watcher.max_usage()} > {limit}")
    check(problems, not [r for r in early if r.call_id in watcher.gone],
          "a call up all along was released")
    lost = load.bye_passed_between(marks["stop"], marks["back"])
    delays = release_delays(watcher, lost, lambda r: max(r.bye_at or 0, marks["back"]))
    check(problems, not delays or within(delays, -1, RECONCILE_BOUND),
          f"lost releases not reconciled within {RECONCILE_BOUND}s of PostgreSQL's return: "
          f"{fmt(delays)}")
    rig.report(
        load,
        "postgres_restart",
        end,
        problems,
        expect_up=5,
        limit=limit,
        max_usage=watcher.max_usage(),
        outage_s=round(marks["back"] - marks["stop"], 2),
        lost_releases=len(lost),
        lost_release_after_return=fmt(delays),
    )
    for r in early:
        assert await r.call.bye() == 200


async def test_kamailio_kill9_mid_load(rig: Rig) -> None:
    """Kamailio SIGKILLed mid-load and started again on the same port (new boot id). Its calls
    are released at the new process's first heartbeat; usage goes to the calls admitted
    after the restart that are up."""
    await rig.up(WIDE)
    assert rig.phones is not None and rig.watcher is not None and rig.kamailio is not None
    phones, watcher = rig.phones, rig.watcher
    load = Load(phones, seed=3)
    early = await load.long_calls(5)
    late: list[Rec] = []
    marks: dict[str, float] = {}
    old_calls: list[str] = []

    async def chaos() -> None:
        await asyncio.sleep(4)
        port = rig.kamailio.port  # type: ignore[union-attr]
        old_calls.extend(watcher.seen.keys() - watcher.gone.keys())
        marks["kill"] = now()
        rig.generation_start = marks["kill"]  # INVITEs reaching callees from now: new proxy
        await rig.kill_kamailio()
        await asyncio.sleep(1)
        marks["start"] = now()
        await rig.start_kamailio(port=port)
        marks["ready"] = now()
        await phones.register()  # registrations lived in the dead process's memory
        await asyncio.sleep(2)
        late.extend(await load.long_calls(5))

    await asyncio.gather(load.run(12), chaos())
    await load.drain()
    # the early long calls' BYEs now meet a proxy that does not know their dialog
    for r in early:
        await load.hangup(r)
    early_bye = [r.bye_status for r in early]  # None: no answer at all
    end = await rig.end_state(timeout=HB + MARGIN + 2)

    problems: list[str] = []
    c = load.counts()
    check(problems, c["refused"] == 0, f"{c['refused']} calls refused under a wide limit")
    check(problems, c["answered"] >= c["placed"] // 2, "most calls were not answered")
    check(problems, bool(old_calls), "no call was up at the kill")
    # the dead process's calls: released by the new boot's first heartbeat
    delays = [
        (watcher.gone.get(cid) or float("inf")) - marks["start"]
        for cid in old_calls
        if cid in watcher.seen
    ]
    bound = (marks["ready"] - marks["start"]) + HB + MARGIN
    check(problems, within(delays, -5, bound),
          f"calls of the dead process not released within {bound:.2f}s of the new start: "
          f"{fmt(delays)}")
    check(problems, all(code == 481 for code in early_bye),
          f"BYEs of the dead process's dialogs: {early_bye} (481 expected)")
    rig.report(
        load,
        "kamailio_kill9",
        end,
        problems,
        expect_up=5,
        old_calls=len(old_calls),
        boot_release_after_start=fmt(delays),
        start_to_ready_s=round(marks["ready"] - marks["start"], 2),
        old_bye_codes=sorted({str(c) for c in early_bye}),
    )
    for r in late:
        assert await r.call.bye() == 200


async def test_bye_loss_5_percent(rig: Rig) -> None:
    """5 % of the BYEs lost between the UAs and Kamailio (tests/udp_relay.py; every
    retransmission of a lost BYE is lost too). Those calls stay up at the proxy, and counted,
    until the dialog timeout (MAX_CALL_DURATION = 8 s): then Kamailio sends BYE both ways
    and the sidecar releases them. Limit binding."""
    max_dur = 8
    limit = 35
    await rig.up(
        limit,
        f"MAX_CALL_DURATION={max_dur}",
        relay={"drop": lambda m, _d: m == "BYE", "probability": 0.05, "seed": 5},
    )
    assert rig.phones is not None and rig.watcher is not None and rig.relay is not None
    phones, watcher, relay = rig.phones, rig.watcher, rig.relay
    load = Load(phones, seed=4)
    await load.run(10)
    await load.drain()

    problems: list[str] = []
    dropped = set(relay.dropped_call_ids)
    assert dropped, "no BYE was dropped"
    lost = [r for r in load.recs if r.call_id in dropped]
    check(problems, all(r.bye_status is None for r in lost), "a dropped BYE got an answer")
    # before their dialog timeout the calls with a lost BYE are still up and still counted
    pending = [r for r in lost if r.answered is not None and r.answered + max_dur > now() + 1]
    mid: tuple[int, int] | None = None
    if pending:
        took, usage, up = await rig.settle(timeout=2)
        mid = (usage, up)
        check(problems, took is not None,
              f"with {len(pending)} lost BYEs pending: usage {usage} != truly up {up}")
    # every one of them ends by the dialog timeout: BYE from the proxy to the callee
    last = max((r.answered or 0) for r in lost)
    await asyncio.sleep(max(0.0, last + max_dur + MARGIN - now()))
    end = await rig.end_state(timeout=MARGIN)
    for r in lost:
        check(problems, all(inc.bye_received.is_set() for inc in phones.incoming(r.call_id)),
              f"{r.call_id}: no BYE from the proxy at the dialog timeout")
    delays = release_delays(watcher, lost, lambda r: r.answered or 0)
    check(problems, load.counts()["refused"] > 0, "the limit was never binding")
    check(problems, watcher.max_usage() <= limit, f"usage {watcher.max_usage()} > {limit}")
    check(problems, within(delays, max_dur - DLG_TICK - 0.25, max_dur + DLG_TICK + MARGIN),
          f"calls with a lost BYE not released at the dialog timeout: {sorted(delays)}")
    rig.report(
        load,
        "bye_loss_5pct",
        end,
        problems,
        expect_up=0,
        limit=limit,
        max_usage=watcher.max_usage(),
        byes=relay.stats.matched_transactions,
        byes_dropped=relay.stats.dropped_transactions,
        datagrams_dropped=relay.stats.dropped,
        usage_vs_up_with_lost_pending=mid,
        timeout_release_after_answer=fmt(delays),
    )


async def test_cleanup_times(rig: Rig) -> None:
    """How long a lost release holds its slot:
    - BYE passed while the sidecar was down: reconciliation, within HEARTBEAT_INTERVAL +
      SIDECAR_RECONCILE_GRACE (+ margin) of the sidecar's return;
    - BYE lost on the way: the proxy's dialog timeout (MAX_CALL_DURATION = 6 s) after answer;
    - a ringing call whose node disappeared (Kamailio killed for good): the janitor, at
      SIDECAR_RINGING_TTL (+ one janitor interval) after admission."""
    max_dur = 6
    doomed: set[str] = set()
    await rig.up(
        WIDE,
        f"MAX_CALL_DURATION={max_dur}",
        relay={
            "drop": lambda m, d: m == "BYE" and any(c.encode() in d for c in doomed),
            "probability": 1.0,
        },
    )
    assert rig.phones is not None and rig.watcher is not None and rig.sidecar is not None
    phones, watcher = rig.phones, rig.watcher
    load = Load(phones, seed=6)
    phones.ring_only.add("1004")
    t0 = now()
    dropped = await load.long_calls(3)
    sidecar_down = await load.long_calls(4)
    await asyncio.sleep(0.6)  # the watcher has seen them all
    problems: list[str] = []
    # (b) BYEs lost on the way
    doomed.update(r.call_id for r in dropped)
    for r in dropped:
        load.spawn(load.hangup(r))
    # (a) BYEs passing while the sidecar is down
    port = rig.sidecar.port
    await rig.kill_sidecar()
    for r in sidecar_down:
        await load.hangup(r)
    check(problems, all(r.bye_status == 200 for r in sidecar_down),
          "a BYE did not pass the proxy while the sidecar was down")
    await asyncio.sleep(1)
    await rig.start_sidecar(port=port)
    back = now()
    await wait_for(lambda: _all_gone(watcher, sidecar_down), RECONCILE_BOUND + 1, period=0.1)
    reconcile = release_delays(watcher, sidecar_down, lambda r: max(r.bye_at or 0, back))
    reconcile_from_bye = release_delays(watcher, sidecar_down, lambda r: r.bye_at or 0)
    # dialog timeout of the calls whose BYE was lost
    last = max(r.answered or 0 for r in dropped)
    await wait_for(lambda: _all_gone(watcher, dropped), last + max_dur + MARGIN + 1 - now(),
                   period=0.1)
    timeout_rel = release_delays(watcher, dropped, lambda r: r.answered or 0)
    # (c) ringing calls, then their node disappears
    ringing = [await load.place(to="1004") for _ in range(3)]
    for r in ringing:
        await r.call.wait_provisional(180, 5)  # admitted and relayed
    admitted = now()
    await asyncio.sleep(0.6)
    await rig.kill_kamailio()
    await wait_for(lambda: _all_gone(watcher, ringing), RINGING_TTL + JANITOR + MARGIN + 1,
                   period=0.1)
    janitor = release_delays(watcher, ringing, lambda r: admitted)
    rig.generation_start = now()  # no proxy carries anything any more
    end = await rig.end_state(timeout=2)
    check(problems, within(reconcile, -1, RECONCILE_BOUND),
          f"lost releases (sidecar down) not reconciled within {RECONCILE_BOUND}s: {reconcile}")
    check(problems, within(timeout_rel, max_dur - DLG_TICK - 0.25, max_dur + DLG_TICK + MARGIN),
          f"lost BYEs not released at the dialog timeout ({max_dur}s): {timeout_rel}")
    check(problems, within(janitor, RINGING_TTL - 0.5, RINGING_TTL + JANITOR + MARGIN),
          f"ringing calls of a dead node not expired at the ringing TTL: {janitor}")
    rig.report(
        load,
        "cleanup_times",
        end,
        problems,
        expect_up=0,
        reconcile_after_return=fmt(reconcile),
        reconcile_after_bye=fmt(reconcile_from_bye),
        reconcile_bound=RECONCILE_BOUND,
        dialog_timeout_after_answer=fmt(timeout_rel),
        dialog_timeout_bound=max_dur + DLG_TICK + MARGIN,
        ringing_ttl_after_admission=fmt(janitor),
        ringing_bound=RINGING_TTL + JANITOR + MARGIN,
        elapsed_s=round(now() - t0, 1),
    )


async def _all_gone(watcher: Watcher, recs: Iterable[Rec]) -> bool:
    return all(r.call_id in watcher.gone for r in recs)
