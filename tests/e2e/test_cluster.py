"""Several nodes and a database that fails over, on loopback (issue 9).

One module-wide formation: pg_auto_failover's monitor, a primary and a synchronous standby
(scripts/pgformation.sh), two `sidecar serve` on the formation's multi-host DSN
(target_session_attrs=read-write), two Kamailio nodes (distinct NODE_IDs), each asking its
own sidecar first and the other one when its own does not answer (SIDECAR_URL_2).

Callers: an application server known by its source address (127.0.0.2), so that no call
needs Kamailio's digest lookups (auth_db reads one database node: see docs/scaling.md).
Callees: user agents with static contacts, reachable through either node.

The tests run in file order; the last one kills the primary.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import (
    REALM,
    SIDECAR,
    T1,
    Api,
    KamailioProc,
    SidecarProc,
    start_sidecar,
)
from tests.sipua import Call, SipUA

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FORMATION = REPO / "scripts" / "pgformation.sh"
APP_IP = "127.0.0.2"
CALLEES = ("c0", "c1", "c2", "c3")
HB, GRACE = 2, 2  # HEARTBEAT_INTERVAL (KamailioProc), SIDECAR_RECONCILE_GRACE
SIDECAR_ENV = {"SIDECAR_RECONCILE_GRACE": str(GRACE), "SIDECAR_JANITOR_INTERVAL": "1"}


def free_block(n: int) -> int:
    """The first of n consecutive free TCP ports of 127.0.0.1 (below the ephemeral range)."""
    for base in range(21000, 32000, 7):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


@dataclass
class Formation:
    dir: Path
    port: int

    @property
    def url(self) -> str:
        return (f"postgresql://postgres@127.0.0.1:{self.port + 1},127.0.0.1:{self.port + 2}"
                f"/sidecar?target_session_attrs=read-write")

    def node_url(self, n: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port + n}/sidecar"

    @property
    def monitor_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/pg_auto_failover"

    def script(self, *args: str) -> str:
        return subprocess.run([str(FORMATION), *args], check=True, capture_output=True,
                              text=True, timeout=240).stdout


def pg_reachable_dir(prefix: str) -> Path:
    """A directory the postgres user can reach whatever happens to pytest's own temporary
    root (0700, and set so again by every pytest session that starts meanwhile)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="module")
async def formation() -> AsyncIterator[Formation]:
    f = Formation(pg_reachable_dir("sidecar-formation-"), free_block(3))
    try:
        await asyncio.to_thread(f.script, "start", str(f.dir), str(f.port))
        await asyncio.to_thread(subprocess.run, [str(SIDECAR), "migrate"], check=True,
                                capture_output=True, env=dict(os.environ, DATABASE_URL=f.url))
        yield f
    finally:
        await asyncio.to_thread(f.script, "stop", str(f.dir))
        shutil.rmtree(f.dir, ignore_errors=True)


@dataclass
class Cluster:
    formation: Formation
    sidecars: list[SidecarProc]
    nodes: list[KamailioProc]
    callees: dict[str, SipUA]
    caller: SipUA
    api: Api


async def start_node(f: Formation, workdir: Path, own: SidecarProc, other: SidecarProc,
                     node: str, port: int | None = None) -> KamailioProc:
    kam = KamailioProc(f.node_url(1), own.url, workdir, f'SIDECAR_URL_2="{other.url}"',
                       node=node, port=port)
    await kam.wait_ready()
    return kam


@pytest.fixture(scope="module")
async def cluster(formation: Formation,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    os.chmod(workdir, 0o755)
    sidecars: list[SidecarProc] = []
    nodes: list[KamailioProc] = []
    uas: list[SipUA] = []
    try:
        for _ in range(2):
            sidecars.append(await asyncio.to_thread(start_sidecar, formation.url, workdir,
                                                    **SIDECAR_ENV))
        nodes.append(await start_node(formation, workdir, sidecars[0], sidecars[1], "node-a"))
        nodes.append(await start_node(formation, workdir, sidecars[1], sidecars[0], "node-b"))
        callees = {}
        for user in CALLEES:
            ua = SipUA("127.0.0.1", user=user, domain=REALM, t1=T1)
            await ua.start()
            uas.append(ua)
            callees[user] = ua
        caller = SipUA(APP_IP, user="app", domain=REALM, t1=T1)
        await caller.start()
        uas.append(caller)
        async with aiohttp.ClientSession() as session:
            api = Api(sidecars[0].url, session)
            yield Cluster(formation, sidecars, nodes, callees, caller, api)
    finally:
        for ua in uas:
            await ua.close()
        for p in [*nodes, *sidecars]:
            await asyncio.to_thread(p.stop)


async def configure(c: Cluster, limit: int) -> None:
    await c.api.release_all()
    await c.api.put_config({
        "counting": "per_call",
        "accounts": [{"id": "prov"}, {"id": "acme", "parent": "prov",
                                      "limits": {"calls": limit}}],
        "extensions": [{"id": "app", "account": "acme", "sources": [APP_IP]}]
        + [{"id": u, "account": "acme", "contact": f"sip:{u}@127.0.0.1:{ua.port}"}
           for u, ua in c.callees.items()],
    })


async def usage(c: Cluster) -> int:
    u = await c.api.usage()
    return int(u["accounts"]["acme"]["calls"]["active"])


async def drift(f: Formation) -> list[Any]:
    conn = await asyncpg.connect(f.url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT * FROM counter_drift()")]
    finally:
        await conn.close()


async def place(c: Cluster, node: int, i: int) -> Call:
    return await c.caller.invite(CALLEES[i % len(CALLEES)], proxy=c.nodes[node].addr)


async def until(cond: Any, timeout: float, period: float = 0.2) -> float:
    """Seconds until the coroutine function cond() is true; fails after timeout."""
    t0 = time.monotonic()
    while True:
        try:
            if await cond():
                return time.monotonic() - t0
        except (aiohttp.ClientError, OSError, KeyError):
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {cond.__name__}")
        await asyncio.sleep(period)


async def hang_up(calls: list[Call]) -> None:
    await asyncio.gather(*(call.bye() for call in calls))


async def test_burst_split_between_two_nodes_admits_exactly_the_limit(cluster: Cluster) -> None:
    c = cluster
    await configure(c, limit=10)
    # Node b holds 4 calls; then a burst of 40, split between both nodes, fights for the
    # 6 slots left: exactly 6 are admitted, wherever they came in.
    held = [await place(c, 1, i) for i in range(4)]
    assert [await call.wait_final(8) for call in held] == [200] * 4
    calls = await asyncio.gather(*(place(c, i % 2, i) for i in range(40)))
    finals = await asyncio.gather(*(call.wait_final(8) for call in calls))
    up = [call for call, st in zip(calls, finals, strict=True) if st == 200]
    refused = [call for call, st in zip(calls, finals, strict=True) if st != 200]
    assert len(up) == 6, sorted(finals)
    assert all(call.final is not None and call.final.reason == "REACH_PLAN_LIMIT"
               for call in refused), {call.final.status for call in refused if call.final}
    assert await usage(c) == 10
    await hang_up(held + up)
    await until(lambda: _usage_is(c, 0), 10)
    assert await drift(c.formation) == []


async def _usage_is(c: Cluster, n: int) -> bool:
    return await usage(c) == n


async def test_node_death_releases_its_calls_the_other_nodes_stay(cluster: Cluster) -> None:
    c = cluster
    await configure(c, limit=100)
    a_calls = [await place(c, 0, i) for i in range(4)]
    b_calls = [await place(c, 1, i) for i in range(4)]
    assert [await call.wait_final(8) for call in a_calls + b_calls] == [200] * 8
    await until(lambda: _usage_is(c, 8), 5)

    dead = c.nodes[0]
    dead.stop(sig=9)
    # Node a comes back on its port with a new boot id: its first heartbeat releases the
    # calls of the dead process; node b's calls stay counted.
    c.nodes[0] = await start_node(c.formation, dead.log.parent, c.sidecars[0], c.sidecars[1],
                                  "node-a", port=dead.port)
    took = await until(lambda: _usage_is(c, 4), HB + GRACE + 6)
    active = {x["call_id"] for x in await c.api.calls()
              if x.get("state") in ("ringing", "answered")}
    assert active == {call.call_id for call in b_calls}
    await asyncio.sleep(HB + 1)   # a few heartbeats later, b's calls are still counted
    assert await usage(c) == 4
    print(f"CLUSTER node_death released_after_restart_s={took:.2f} kept={len(b_calls)}")
    await hang_up(b_calls)
    await until(lambda: _usage_is(c, 0), 10)
    assert await drift(c.formation) == []


async def test_a_node_whose_sidecar_dies_asks_the_other(cluster: Cluster) -> None:
    c = cluster
    await configure(c, limit=100)
    dead = c.sidecars[0]
    dead.stop(sig=9)
    try:
        api = Api(c.sidecars[1].url, c.api.session)
        # Node a's own sidecar is gone: its admission, then its answer and release (outbox)
        # go to the other one.
        call = await place(c, 0, 0)
        assert await call.wait_final(8) == 200
        assert int((await api.usage())["accounts"]["acme"]["calls"]["active"]) == 1
        assert await call.bye() == 200

        async def released() -> bool:
            u = await api.usage()
            return int(u["accounts"]["acme"]["calls"]["active"]) == 0

        await until(released, 10)
        assert c.nodes[0].events("sidecar_switch"), c.nodes[0].tail()
    finally:
        c.sidecars[0] = await asyncio.to_thread(start_sidecar, c.formation.url,
                                                dead.log.parent, dead.port, **SIDECAR_ENV)
    assert await drift(c.formation) == []


async def test_cps_burst_at_five_times_the_limit_over_both_nodes(cluster: Cluster) -> None:
    """An account limited to 4 new calls per second; 20 INVITEs per second for 2 s, split
    between both nodes (5 times the limit): about one second's worth is admitted per second
    (the burst of 4, then 4 per second), refused calls get REACH_PLAN_LIMIT naming the cps
    counter, whichever node they came in by."""
    c = cluster
    await c.api.release_all()
    await configure(c, limit=1000)
    status, _ = await c.api.call("PATCH", "/v1/accounts/acme", {"limits": {"calls": 1000,
                                                                         "cps": 4}})
    assert status == 200
    calls: list[Call] = []
    t0 = time.monotonic()
    for i in range(40):
        await asyncio.sleep(max(0.0, t0 + i / 20 - time.monotonic()))
        calls.append(await place(c, i % 2, i))
    finals = await asyncio.gather(*(call.wait_final(8) for call in calls))
    elapsed = time.monotonic() - t0
    up = [call for call, st in zip(calls, finals, strict=True) if st == 200]
    refused = [call for call, st in zip(calls, finals, strict=True) if st != 200]
    expected = 4 + 4 * elapsed   # the burst, then the rate over the time the INVITEs took
    print(f"CLUSTER cps offered=40 in {elapsed:.2f}s admitted={len(up)} expected~{expected:.1f}")
    assert expected - 2 <= len(up) <= expected + 1, (len(up), expected)
    assert all(call.final is not None and call.final.reason == "REACH_PLAN_LIMIT"
               and call.final.status == 403 for call in refused)
    assert {sum(1 for i, call in enumerate(calls) if call in up and i % 2 == n)
            for n in (0, 1)} != {0}, "no call admitted"
    await hang_up(up)
    await until(lambda: _usage_is(c, 0), 10)
    assert await drift(c.formation) == []


async def monitor_events(f: Formation, since: float) -> list[tuple[float, str]]:
    conn = await asyncpg.connect(f.monitor_url)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM eventtime)::float8 AS t, description "
            "FROM pgautofailover.event WHERE eventtime >= to_timestamp($1) ORDER BY eventid",
            since)
        return [(r["t"], r["description"]) for r in rows]
    finally:
        await conn.close()


async def test_primary_killed_standby_promoted_nothing_lost(cluster: Cluster) -> None:
    c = cluster
    await configure(c, limit=100)
    calls = [await place(c, i % 2, i) for i in range(6)]
    assert [await call.wait_final(8) for call in calls] == [200] * 6
    await until(lambda: _usage_is(c, 6), 5)

    wall0, t0 = time.time(), time.monotonic()
    await asyncio.to_thread(c.formation.script, "kill", str(c.formation.dir), "1")
    # BYEs during the failover: Kamailio answers them, its outbox keeps the releases until
    # a sidecar can write them.
    byes = calls[:2]
    kept = calls[2:]
    assert [await call.bye() for call in byes] == [200, 200]

    # New calls every 0.5 s, alternately through each node, until one is admitted again.
    # Each gets a final answer within Kamailio's timeout (fail-closed 503 while no primary
    # is writable), never a hung transaction.
    tried: list[tuple[float, int]] = []
    first_ok: Call | None = None
    i = 0
    while first_ok is None:
        assert time.monotonic() - t0 < 30, f"no call admitted within 30 s: {tried}"
        call = await place(c, i % 2, i)
        status = await call.wait_final(5)
        tried.append((round(time.monotonic() - t0, 2), status))
        if status == 200:
            first_ok = call
        else:
            assert status == 503, tried
            await asyncio.sleep(0.5)
        i += 1
    t_first = time.monotonic() - t0

    # Afterwards: usage equals the calls truly up (the 4 kept and the new one), the two
    # BYEs of the failover released, nothing doubled, no drift.
    up = [*kept, first_ok]
    settle = await until(lambda: _usage_is(c, len(up)), 15)
    active = {x["call_id"] for x in await c.api.calls()
              if x.get("state") in ("ringing", "answered")}
    assert active == {call.call_id for call in up}
    assert await drift(c.formation) == []

    events = await monitor_events(c.formation, wall0 - 1)
    detect = next((t - wall0 for t, d in events if "node 1" in d and "demote" in d), None)
    promote = next((t - wall0 for t, d in events
                    if "node 2" in d and ("wait_primary" in d or "primary" in d)
                    and "reported" in d.lower()), None)
    refused = sum(1 for _, s in tried if s != 200)
    print(f"CLUSTER failover detection_s={detect} promotion_s={promote} "
          f"first_admitted_s={t_first:.2f} refused_meanwhile={refused} "
          f"releases_settled_s={settle:.2f} usage={len(up)}")
    await hang_up(up)
    await until(lambda: _usage_is(c, 0), 10)
    assert await drift(c.formation) == []


CLUSTER_PORTS = {"tcp": (8080, 8081, 25500, 25501, 25502, 5060, 5070), "udp": (5060, 5070)}


def busy_ports() -> list[str]:
    busy = []
    for kind, ports in CLUSTER_PORTS.items():
        for p in ports:
            s = socket.socket(type=socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
            # as the servers bind: a connection of an earlier run in TIME_WAIT is no owner
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                busy.append(f"{kind}/{p}")
            finally:
                s.close()
    return busy


def test_make_run_cluster_brings_everything_up_and_stop_takes_it_down() -> None:
    """scripts/run-cluster.sh (make run-cluster) in a clone of the work tree: every address
    of the issue answers, .run/cluster.env holds the variables, scripts/stop.sh (make stop)
    frees every port again."""
    busy = busy_ports()
    assert not busy, f"ports of make run-cluster already taken (stop make run?): {busy}"
    # A copy of the work tree (its own .run), using this one's venv.
    tmp_path = pg_reachable_dir("sidecar-run-cluster-")
    clone = tmp_path / "repo"
    shutil.copytree(REPO, clone, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".run", ".build", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache",
        ".pytest_cache"))
    (clone / ".venv").symlink_to(REPO / ".venv")
    os.chmod(tmp_path, 0o755)
    env = dict(os.environ, SIDECAR_ADMIN_TOKEN="cluster-test-token")
    try:
        out = subprocess.run([str(clone / "scripts" / "run-cluster.sh")], env=env, cwd=clone,
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        values = dict(
            line.split("=", 1) for line in (clone / ".run" / "cluster.env").read_text()
            .splitlines() if "=" in line and not line.startswith("#"))
        values = {k: v.strip('"') for k, v in values.items()}
        assert values["PG_NODES"] == "127.0.0.1:25501 127.0.0.1:25502"
        assert values["PG_MONITOR"] == "127.0.0.1:25500"
        assert values["SIDECAR_URLS"] == "http://127.0.0.1:8080 http://127.0.0.1:8081"
        assert values["SIP_NODES"] == "127.0.0.1:5060 127.0.0.1:5070"
        assert values["SIDECAR_ADMIN_TOKEN"] == "cluster-test-token"
        assert "target_session_attrs=read-write" in values["DATABASE_URL"]
        import urllib.request
        for url in values["SIDECAR_URLS"].split():
            req = urllib.request.Request(url + "/v1/usage",
                                         headers={"Authorization": "Bearer cluster-test-token"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
        for node in values["SIP_NODES"].split():
            host, port = node.split(":")
            ping = subprocess.run(["python3", str(REPO / "scripts" / "sip-ping.py"), host, port,
                                   "5"], capture_output=True, text=True)
            assert ping.returncode == 0, ping.stderr
    finally:
        stop = subprocess.run([str(clone / "scripts" / "stop.sh")], cwd=clone,
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
    deadline = time.monotonic() + 10
    while busy_ports() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy_ports() == []
