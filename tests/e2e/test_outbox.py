"""The outbox of kamailio/kamailio.cfg: answers and releases are queued in shared memory
(mqueue) and posted in batches, in queue order, to POST /v1/control/events by a process of
their own (rtimer "outbox"), and sent again until the sidecar takes them.

Against a stub sidecar (aiohttp, below) instead of `sidecar serve`: it relays every INVITE
to one callee UA, answers heartbeats, and records every POST /v1/control/events (what it
received, with which headers, and what it answered). It can be stopped (connections
refused, its port kept by a PortHold) and started again on the same port, answer 503, refuse
a batch holding a "poison" event with 400, or answer too late. PostgreSQL is only there for
Kamailio's auth_db.

Event shapes (docs/control-api.md, POST /v1/control/events):
    {"type": "answer", "call_id": ..., "from_tag": ..., "leg": 0}
    {"type": "release", "call_id": ..., "from_tag": ..., "reason": "bye"}
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e.conftest import REALM, T1, KamailioProc, PortHold, kv, start_kamailio
from tests.sipua import Call, IncomingCall, SipUA

# ruff: noqa: ASYNC109

pytestmark = pytest.mark.e2e

SECRET = "outbox-secret"
DEADLINE_MS = "1000"  # SIDECAR_TIMEOUT of the e2e Kamailio (tests/e2e/conftest.py)


@dataclass
class Attempt:
    """One POST /v1/control/events as the stub saw it."""

    status: int
    events: list[dict[str, Any]]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class StubSidecar:
    """Just enough of the sidecar for Kamailio: admit (relay to ``callee``), heartbeat, and
    the recorded events endpoint."""

    def __init__(self, hold: PortHold):
        self.hold = hold
        self.port = hold.port
        self.url = hold.url
        self.callee: str = ""
        self.attempts: list[Attempt] = []
        self.admits: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.status: int | None = None  # answer this to every batch (None: 200)
        self.delay_first = 0.0  # hold the first batch this long before answering it
        self._arrivals = 0
        self._runner: web.AppRunner | None = None

    # -- the recorded answers ------------------------------------------------------------
    def delivered(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Every event of the batches answered 200, in the order received."""
        return [e for a in self.attempts if a.status == 200 and a.at >= since for e in a.events]

    async def wait_delivered(
        self, n: int, since: float = 0.0, timeout: float = 10, settle: float = 0.5
    ) -> float:
        """Wait until ``n`` events were delivered since ``since``, then ``settle`` seconds
        more (a duplicate or a stray event would show); the time the ``n`` took."""
        start = time.monotonic()
        while True:
            took = time.monotonic() - start
            if len(self.delivered(since)) >= n or took > timeout:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle)
        return took

    # -- the server -----------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/control/admit", self._admit)
        app.router.add_post("/v1/control/heartbeat", self._heartbeat)
        app.router.add_post("/v1/control/events", self._events)
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        # SO_REUSEADDR: binds next to the PortHold, which keeps the port ours while down
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        """Down: connections to the port are refused (the PortHold does not listen)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _admit(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.admits.append((body, dict(request.headers)))
        legs = [{"leg": 0, "uri": self.callee, "lookup": False}]
        return web.json_response({"action": "relay", "legs": legs})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True, "released": 0, "answered": 0})

    async def _events(self, request: web.Request) -> web.Response:
        self._arrivals += 1
        arrival = self._arrivals
        # NDJSON, as kamailio.cfg sends it: one event object per line, each ending in "\n"
        raw = await request.read()
        assert raw.endswith(b"\n"), raw
        events = [json.loads(line) for line in raw.decode().split("\n")[:-1]]
        assert all(isinstance(e, dict) for e in events), raw
        if self.status is not None:
            status = self.status
        elif any("poison" in str(e.get("call_id")) for e in events):
            status = 400
        else:
            status = 200
        if status == 200 and self.delay_first and arrival == 1:
            # applied, but the answer comes after Kamailio gave up (OUTBOX_TIMEOUT)
            await asyncio.sleep(self.delay_first)
        self.attempts.append(Attempt(status, events, dict(request.headers)))
        if status != 200:
            return web.json_response({"error": {"code": "nope"}}, status=status)
        return web.json_response({"ok": True, "results": [{"ok": True} for _ in events]})


class Rig:
    def __init__(self, stub: StubSidecar, kam: KamailioProc, caller: SipUA, callee: SipUA):
        self.stub, self.kam, self.caller, self.callee = stub, kam, caller, callee

    async def ringing(self, call_id: str | None = None) -> tuple[Call, IncomingCall]:
        """A call admitted by the stub and ringing at the callee (not answered)."""
        n = len(self.callee.incoming)
        call = await self.caller.invite("1002", proxy=self.kam.addr, call_id=call_id)
        await call.wait_provisional(180, 5)
        assert len(self.callee.incoming) == n + 1
        inc = self.callee.incoming[-1]
        assert inc.call_id == call.call_id
        return call, inc

    async def answer(self, call: Call, inc: IncomingCall) -> None:
        """The callee answers; once the caller has the 200 Kamailio queued the answer."""
        assert inc.answer()
        assert await call.wait_final(5) == 200
        await inc.wait_acked(5)


@pytest.fixture
async def outbox(request: Any, e2e_db: str, e2e_workdir: Path) -> AsyncIterator[Any]:
    """outbox(*defines): stub sidecar, Kamailio pointed at it, a caller and a ringing callee."""
    made: list[Any] = []

    async def make(*defines: str) -> Rig:
        hold = PortHold()
        stub = StubSidecar(hold)
        made.append(stub)
        await stub.start()
        callee = await SipUA("127.0.0.1", user="1002", domain=REALM, t1=T1).start()
        made.append(callee)
        callee.on_invite = "ring"
        stub.callee = callee.uri
        caller = await SipUA("127.0.0.2", user="app", domain=REALM, t1=T1).start()
        made.append(caller)
        kam = await start_kamailio(e2e_db, stub.url, e2e_workdir, *defines, node="outbox")
        made.append(kam)
        return Rig(stub, kam, caller, callee)

    yield make

    rep = getattr(request.node, "rep_call", None)
    for obj in reversed(made):
        if isinstance(obj, KamailioProc):
            if rep is None or rep.failed:
                print(f"\n----- kamailio log ({obj.log}) -----\n{obj.tail(80)}")
            await asyncio.to_thread(obj.stop)
        elif isinstance(obj, SipUA):
            await obj.close()
        elif isinstance(obj, StubSidecar):
            await obj.stop()
            obj.hold.release()


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["call_id"]) for e in events]


async def test_outage_loses_nothing_and_keeps_order(outbox: Any) -> None:
    """The sidecar refuses connections for 3 s while calls are answered and hung up: the
    answers and releases wait in the outbox, then every one is delivered exactly once, in
    the order Kamailio saw them, soon after the sidecar is back. Admissions meanwhile fail
    closed (503) on their own path. The headers are right on both paths."""
    rig: Rig = await outbox(f'SIDECAR_SECRET="{SECRET}"')
    stub, kam = rig.stub, rig.kam
    calls = [await rig.ringing() for _ in range(6)]
    for call, inc in calls[:3]:
        await rig.answer(call, inc)
    await stub.wait_delivered(3)
    assert kinds(stub.delivered()) == [("answer", c.call_id) for c, _ in calls[:3]]

    kmark = kam.mark()
    await stub.stop()
    down = time.monotonic()
    expected: list[tuple[str, str]] = []
    for call, inc in calls[3:]:
        await rig.answer(call, inc)
        expected.append(("answer", call.call_id))
    for call, _ in calls:
        assert await call.bye() == 200  # the release is queued before the BYE is relayed
        expected.append(("release", call.call_id))
    refused = await rig.caller.invite("1002", proxy=kam.addr)
    assert await refused.wait_final(5) == 503  # admission: fail-closed, on its own path
    assert stub.delivered(down) == []
    await asyncio.sleep(max(0.0, down + 3.0 - time.monotonic()))
    await stub.start()
    back = time.monotonic()

    took = await stub.wait_delivered(len(expected), since=back)
    got = stub.delivered(back)
    assert kinds(got) == expected, kinds(got)
    assert took < 2.5, took  # the back-off is at most OUTBOX_BACKOFF_MAX_MS (2 s)
    # over the whole test: one answer and one release per call, nothing else
    everything = kinds(stub.delivered())
    assert sorted(everything) == sorted(
        [("answer", c.call_id) for c, _ in calls] + [("release", c.call_id) for c, _ in calls]
    )
    assert len(everything) == len(set(everything)) == 12
    # shapes
    by_call = {c.call_id: c for c, _ in calls}
    for e in stub.delivered():
        call = by_call[e["call_id"]]
        if e["type"] == "answer":
            assert e == {
                "type": "answer",
                "call_id": call.call_id,
                "from_tag": call.local_tag,
                "leg": 0,
            }, e
        else:
            assert e == {
                "type": "release",
                "call_id": call.call_id,
                "from_tag": call.local_tag,
                "reason": "bye",
            }, e
    # headers: events and admit
    for a in stub.attempts:
        assert a.headers.get("X-Control-Secret") == SECRET, a.headers
        assert a.headers.get("Content-Type") == "application/x-ndjson", a.headers
    for body, headers in stub.admits:
        assert headers.get("X-Control-Secret") == SECRET, headers
        assert headers.get("X-Deadline-Ms") == DEADLINE_MS, headers
        assert body["node"] == "outbox"
    # the outage in Kamailio's log: failed posts with back-off, then one resumption
    failed = kam.events("outbox_post_failed", kmark)
    assert failed, kam.text(kmark)
    assert {kv(line)["events"] for line in failed} <= {str(n) for n in range(1, 13)}
    resumed = kam.events("outbox_resumed", kmark)
    assert len(resumed) == 1, resumed
    assert kam.events("outbox_dropped", 0) == [] and kam.events("outbox_full", 0) == []


@pytest.mark.parametrize("unavailable", [503, 404])
async def test_unavailable_retried_and_a_bad_event_dropped_alone(
    outbox: Any, unavailable: int
) -> None:
    """The sidecar answers 503 (overloaded) or 404 (an older version, being upgraded) for
    a while: the batch is sent again, unchanged, nothing is dropped. Then it refuses the
    batch (400) because one call's events are bad: the batch is split and sent one event
    at a time, the bad events are dropped (logged), every other is delivered once, in
    order."""
    rig: Rig = await outbox()
    stub, kam = rig.stub, rig.kam
    stub.status = unavailable
    calls = [await rig.ringing(call_id=cid) for cid in (None, None, "poison-1@127.0.0.2", None)]
    expected: list[tuple[str, str]] = []
    for call, inc in calls:
        await rig.answer(call, inc)
        expected.append(("answer", call.call_id))
    for call, _ in calls:
        assert await call.bye() == 200
        expected.append(("release", call.call_id))
    await asyncio.sleep(1.0)
    assert stub.delivered() == []
    tries = [a for a in stub.attempts if a.status == unavailable]
    assert len(tries) >= 2
    # a batch sent again is the same batch (nothing newer overtakes it)
    assert all(kinds(a.events) == kinds(tries[0].events) for a in tries[1:]), [
        kinds(a.events) for a in tries
    ]
    assert kam.events("outbox_dropped") == []
    stub.status = None
    good = [k for k in expected if "poison" not in k[1]]
    await stub.wait_delivered(len(good))
    assert kinds(stub.delivered()) == good
    bad = [a for a in stub.attempts if a.status == 400]
    # Each batch holding a poisoned event is refused whole, then split: each poisoned event
    # is refused on its own. (How many batches: the BYEs may come after the drain took the
    # answers, on a busy machine.)
    whole = [a for a in bad if len(a.events) > 1]
    alone = [a for a in bad if len(a.events) == 1]
    assert whole and bad[0] is whole[0]
    assert [kinds(a.events) for a in alone] == [[k] for k in expected if "poison" in k[1]]
    assert len(kam.events("outbox_batch_refused")) == len(whole)
    dropped = kam.events("outbox_dropped")
    assert len(dropped) == 2 and all("poison-1@127.0.0.2" in line for line in dropped), dropped


async def test_timeout_resends_the_same_batch(outbox: Any) -> None:
    """A batch the sidecar applied but answered after OUTBOX_TIMEOUT (1 s here) is sent
    again, the same: delivery is at least once, and the sidecar applies a batch
    idempotently."""
    rig: Rig = await outbox("OUTBOX_TIMEOUT=1")
    stub, kam = rig.stub, rig.kam
    stub.delay_first = 1.6
    call, inc = await rig.ringing()
    await rig.answer(call, inc)
    await stub.wait_delivered(2, timeout=10)
    # the second POST is answered at once, the first (slow) one after it
    first, second = stub.attempts[0], stub.attempts[1]
    assert kinds(first.events) == kinds(second.events) == [("answer", call.call_id)]
    assert kam.events("outbox_post_failed")
    assert await call.bye() == 200
    await stub.wait_delivered(3)
    assert kinds(stub.delivered())[-1] == ("release", call.call_id)


async def test_full_outbox_drops_loudly(outbox: Any) -> None:
    """OUTBOX_SIZE bounds the queue: beyond it an event is dropped with an
    event=outbox_full line (the heartbeat repairs); what was queued is delivered."""
    rig: Rig = await outbox("OUTBOX_SIZE=2")
    stub, kam = rig.stub, rig.kam
    calls = [await rig.ringing() for _ in range(5)]
    for i, (call, inc) in enumerate(calls):
        await rig.answer(call, inc)
        await stub.wait_delivered(i + 1, settle=0)  # never more than 2 queued
    await stub.wait_delivered(5)
    assert kam.events("outbox_full") == []
    await stub.stop()
    # the first release is taken into a batch whose post fails; the drain then backs off
    # and sends only that batch again, so the queue fills with the next ones
    assert await calls[0][0].bye() == 200
    await asyncio.sleep(0.3)
    for call, _ in calls[1:]:
        assert await call.bye() == 200
    full = kam.events("outbox_full")
    assert len(full) == 2 and all(kv(line)["type"] == "release" for line in full), full
    await stub.start()
    back = time.monotonic()
    await stub.wait_delivered(3, since=back)
    assert kinds(stub.delivered(back)) == [("release", c.call_id) for c, _ in calls[:3]]
