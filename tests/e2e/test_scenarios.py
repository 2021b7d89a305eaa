"""SPEC section 9 acceptance cases over SIP, failure policies with the sidecar down, and a
smoke call from an outside client (sipsak)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    ADDR_IN_USE,
    E2E,
    REALM,
    Api,
    KamailioProc,
    Phones,
    PortHold,
    SidecarProc,
    free_port,
    kv,
    start_kamailio,
    start_sidecar,
)

pytestmark = pytest.mark.e2e

PW = "pw-123"
CARRIER = "127.0.0.3"
APP = "127.0.0.2"


def ext(id_: str, account: str, **kw: Any) -> dict[str, Any]:
    return {"id": id_, "account": account, **kw}


def channel(
    id_: str,
    gw: tuple[str, int],
    limit: int | None = None,
    prefixes: list[str] | None = None,
    priority: int = 1,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "limits": {"calls": limit},
        "sources": sources or [],
        "gateway": f"sip:{gw[0]}:{gw[1]}",
        "prefixes": prefixes or ["+", "0"],
        "priority": priority,
    }


async def test_stringee_seven(e2e: E2E, api: Api, phones: Phones) -> None:
    gw = await phones.ua(CARRIER, user="gw")  # the carrier's gateway (outbound calls)
    gw.on_invite = "answer"
    doc = {
        "counting": "per_call",
        "accounts": [{"id": "shop", "limits": {"calls": 7}}],
        "extensions": [ext(f"200{i}", "shop", password=PW) for i in range(1, 7)]
        + [ext("otp", "shop", sources=[APP])],
        "numbers": [
            {"number": "+15550001", "extension": "2001"},
            {"number": "+15550002", "extension": "2002"},
        ],
        "channels": [channel("carrier", (CARRIER, gw.port), sources=[CARRIER])],
    }
    await api.put_config(doc)
    agents = {i: await phones.registered_ua(f"200{i}", PW) for i in (1, 2, 6)}
    agents[2].on_invite = "ring"
    customer = await phones.ua(CARRIER, user="customer")
    calls = []
    # two inbound customer calls: one answered, one ringing
    c1 = await customer.invite("+15550001", proxy=e2e.proxy)
    assert await c1.wait_final(5) == 200
    c2 = await customer.invite("+15550002", proxy=e2e.proxy)
    await c2.wait_provisional(180, 5)
    calls += [c1, c2]
    # an agent calls a customer (out through the carrier)
    a3 = await phones.ua(user="2003", password=PW)
    c3 = await a3.invite("+15557770001", proxy=e2e.proxy)
    assert await c3.wait_final(5) == 200
    # agent A calls agent B
    a4 = await phones.ua(user="2004", password=PW)
    c4 = await a4.invite("2006", proxy=e2e.proxy)
    assert await c4.wait_final(5) == 200
    # three OTP calls from the application server
    app = await phones.ua(APP, user="otp")
    otp = [await app.invite(f"+1555888000{i}", proxy=e2e.proxy) for i in range(3)]
    assert [await c.wait_final(5) for c in otp] == [200, 200, 200]
    assert await api.wait_active(7, "shop") == 7
    # an eighth call of any kind is refused
    for caller, target in ((app, "+15558880009"), (a4, "2006"), (customer, "+15550001")):
        c = await caller.invite(target, proxy=e2e.proxy)
        code = await c.wait_final(5)
        assert code in (403, 486) and c.final is not None
        assert c.final.reason == "REACH_PLAN_LIMIT"
    assert await api.active("shop") == 7
    # hang up everything
    assert await c2.cancel() == 200
    for c in [c1, c3, c4, *otp]:
        assert await c.bye() == 200
    assert await api.wait_active(0, "shop") == 0


async def test_stringee_forward_to_mobile_counts_one(e2e: E2E, api: Api, phones: Phones) -> None:
    gw = await phones.ua(CARRIER, user="gw")
    doc = {
        "counting": "per_call",
        "accounts": [{"id": "shop", "limits": {"calls": 7}}],
        "extensions": [ext("hotline", "shop", forward=["+15559990000"])],
        "numbers": [{"number": "+15550100", "extension": "hotline"}],
        "channels": [channel("carrier", (CARRIER, gw.port), sources=[CARRIER])],
    }
    await api.put_config(doc)
    customer = await phones.ua(CARRIER, user="customer")
    call = await customer.invite("+15550100", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    assert gw.incoming and "+15559990000" in gw.incoming[-1].request_uri
    assert await api.wait_active(1, "shop") == 1
    assert await call.bye() == 200
    assert await api.wait_active(0, "shop") == 0


def voipnow(gw_port: int, public: int, internal: int) -> dict[str, Any]:
    return {
        "counting": "per_leg",
        "accounts": [{"id": "org3", "limits": {"public": public, "internal": internal}}],
        "extensions": [
            ext(
                "0003*001",
                "org3",
                password=PW,
                forward=["0003*002", "0003*011", "0804993222"],
                ring_self=True,
            ),
            ext("0003*002", "org3", password=PW),
            ext("0003*011", "org3", password=PW),
        ],
        "numbers": [{"number": "+15550003001", "extension": "0003*001"}],
        "channels": [channel("carrier", (CARRIER, gw_port), sources=[CARRIER])],
    }


@pytest.mark.parametrize(
    ("public", "internal", "ringing"),
    [
        (1, 1, {"0003*002"}),
        (2, 3, {"0003*001", "0003*002", "0003*011", "gw"}),
    ],
)
async def test_voipnow_transfer(
    e2e: E2E, api: Api, phones: Phones, public: int, internal: int, ringing: set[str]
) -> None:
    gw = await phones.ua(CARRIER, user="gw")
    await api.put_config(voipnow(gw.port, public, internal))
    uas = {u: await phones.registered_ua(u, PW) for u in ("0003*001", "0003*002", "0003*011")}
    for ua in [*uas.values(), gw]:
        ua.on_invite = "ring"
    customer = await phones.ua(CARRIER, user="customer")
    call = await customer.invite("+15550003001", proxy=e2e.proxy)
    await call.wait_provisional(180, 5)
    await asyncio.sleep(0.5)  # every admitted leg has had time to ring
    rang = {u for u, ua in uas.items() if ua.incoming}
    if gw.incoming:
        rang.add("gw")
        assert "0804993222" in gw.incoming[-1].request_uri
    assert rang == ringing
    # the first admitted extension answers: the others are cancelled
    first = uas["0003*002"].incoming[-1]
    first.answer()
    assert await call.wait_final(5) == 200
    assert await call.bye() == 200
    assert await api.wait_active(0, "org3", "public") == 0
    assert await api.wait_active(0, "org3", "internal") == 0


async def test_hierarchy(e2e: E2E, api: Api, phones: Phones) -> None:
    gw = await phones.ua(CARRIER, user="gw")
    doc = {
        "counting": "per_call",
        "accounts": [
            {"id": "provider", "limits": {"calls": 3}},
            {"id": "orgA", "parent": "provider", "limits": {"calls": 2}},
            {"id": "orgB", "parent": "provider", "limits": {"calls": 5}},
        ],
        "extensions": [
            ext("a-app", "orgA", sources=["127.0.0.4"]),
            ext("b-app", "orgB", sources=["127.0.0.5"]),
        ],
        "channels": [channel("carrier", (CARRIER, gw.port))],
    }
    await api.put_config(doc)
    a = await phones.ua("127.0.0.4", user="a-app")
    b = await phones.ua("127.0.0.5", user="b-app")
    a_calls = [await a.invite(f"+1555000100{i}", proxy=e2e.proxy) for i in range(3)]
    codes = [await c.wait_final(5) for c in a_calls]
    assert sorted(codes) == [200, 200, 403]
    b_calls = [await b.invite(f"+1555000200{i}", proxy=e2e.proxy) for i in range(2)]
    codes_b = [await c.wait_final(5) for c in b_calls]
    assert sorted(codes_b) == [200, 403]
    refused = next(c for c in b_calls if c.status == 403)
    assert refused.final is not None and refused.final.reason == "REACH_PLAN_LIMIT"
    assert "provider" in (refused.final.get("x-limit-counter") or "")
    assert await api.active("provider") == 3
    for c in [*a_calls, *b_calls]:
        if c.status == 200:
            assert await c.bye() == 200
    assert await api.wait_active(0, "provider") == 0


async def test_channel_overflow(e2e: E2E, api: Api, phones: Phones) -> None:
    gw1 = await phones.ua(CARRIER, user="gw1")
    gw2 = await phones.ua("127.0.0.6", user="gw2")
    doc = {
        "counting": "per_call",
        "accounts": [{"id": "acme", "limits": {"calls": 10}}],
        "extensions": [ext("app", "acme", sources=[APP])],
        "channels": [
            channel("first", (CARRIER, gw1.port), 1, ["+1"], 1),
            channel("second", ("127.0.0.6", gw2.port), 1, ["+1"], 2),
        ],
    }
    await api.put_config(doc)
    app = await phones.ua(APP, user="app")
    c1 = await app.invite("+15551230001", proxy=e2e.proxy)
    assert await c1.wait_final(5) == 200
    assert len(gw1.incoming) == 1 and not gw2.incoming
    c2 = await app.invite("+15551230002", proxy=e2e.proxy)
    assert await c2.wait_final(5) == 200
    assert len(gw2.incoming) == 1 and len(gw1.incoming) == 1
    c3 = await app.invite("+15551230003", proxy=e2e.proxy)
    assert await c3.wait_final(5) == 486
    assert c3.final is not None and c3.final.reason == "REACH_PLAN_LIMIT"
    assert await api.active(channel="first") == 1
    assert await api.active(channel="second") == 1
    assert await c1.bye() == 200 and await c2.bye() == 200
    assert await api.wait_active(0, channel="first") == 0
    assert await api.wait_active(0, channel="second") == 0


def office(app_ip: str = APP) -> dict[str, Any]:
    return {
        "counting": "per_call",
        "accounts": [{"id": "acme", "limits": {"calls": 5}}],
        "extensions": [ext("1002", "acme", password=PW), ext("app", "acme", sources=[app_ip])],
    }


async def test_fail_closed_sidecar_down(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    with PortHold() as dead:  # nothing listens there, and nobody can start to meanwhile
        kam = await start_kamailio(e2e.db_url, dead.url, e2e.workdir, node="e2e-closed")
        e2e.extra.append(kam)
        try:
            kmark = kam.mark()
            app = await phones.ua(APP, user="app")
            call = await app.invite("1002", proxy=kam.addr)
            assert await call.wait_final(5) == 503
            assert call.final is not None and call.final.get("retry-after") == "5"
            assert len(kam.events("fail_closed", kmark)) == 1, kam.text(kmark)
            assert await api.active("acme") == 0
        finally:
            kam.stop()


async def test_fail_open_counted_late(e2e: E2E, api: Api, phones: Phones) -> None:
    """The sidecar is down when the call comes: the call rings anyway (fail-open), the
    sidecar comes up on its port while it rings, and the call is counted when answered.
    The sidecar's port is held from the start (PortHold: refused connections, as a down
    server, and no one else can take it); the node rings for 30 s instead of 4 s so a
    slow sidecar start on a busy machine cannot end the call first."""
    await api.put_config(office())
    hold = PortHold()
    sc2: SidecarProc | None = None
    kam = await start_kamailio(
        e2e.db_url, hold.url, e2e.workdir, "FAIL_OPEN", "FR_INV_TIMER=30000", node="e2e-open"
    )
    e2e.extra.append(kam)
    try:
        kmark = kam.mark()
        callee = await phones.ua(user="1002", password=PW)
        assert (await callee.register(kam.addr, expires=600)).status == 200
        callee.on_invite = "ring"
        app = await phones.ua(APP, user="app")
        call = await app.invite("1002", proxy=kam.addr)
        await call.wait_provisional(180, 5)  # sidecar down: the call goes ahead
        assert len(kam.events("fail_open", kmark)) == 1, kam.text(kmark)
        assert await api.active("acme") == 0  # not counted while it rings
        sc2 = await asyncio.to_thread(start_sidecar, e2e.db_url, e2e.workdir, port=hold.port)
        e2e.extra.append(sc2)
        hold.release()
        assert call.final is None  # still ringing: the sidecar was ready in time
        mark = sc2.mark()
        inc = callee.incoming[-1]
        assert inc.answer()
        assert await call.wait_final(5) == 200
        await inc.wait_acked(5)
        assert await api.wait_active(1, "acme") == 1  # counted late
        assert await api.wait_call_state(call.call_id, "answered") == "answered"
        late = kam.events("late_admit", kmark, contains=call.call_id)
        assert len(late) == 1, kam.text(kmark)
        admitted = await sc2.wait_records("decision", 1, mark, call_id=call.call_id)
        assert [d["action"] for d in admitted] == ["relay"], admitted
        assert await call.bye() == 200
        assert await api.wait_active(0, "acme") == 0
        released = await sc2.wait_records("released", 1, mark, call_id=call.call_id)
        assert [r["reason"] for r in released if r["released"]] == ["bye"], released
        await callee.unregister(kam.addr)
    finally:
        hold.release()
        kam.stop()
        if sc2 is not None:
            sc2.stop()


async def test_sipsak_smoke(e2e: E2E, api: Api, phones: Phones, tmp_path: Path) -> None:
    await api.put_config(office(app_ip="127.0.0.1"))  # sipsak sends from 127.0.0.1
    await phones.registered_ua("1002", PW)
    for _attempt in range(3):  # sipsak's own port may be taken between pick and bind
        port = free_port()
        out = await _sipsak(e2e, tmp_path, port)
        if ADDR_IN_USE not in out.lower():
            break
    assert "200" in out
    assert await api.wait_active(1, "acme") == 1


async def _sipsak(e2e: E2E, tmp_path: Path, port: int) -> str:
    msg = (
        f"INVITE sip:1002@{REALM} SIP/2.0\r\n"
        f"From: <sip:app@127.0.0.7>;tag=sipsak{port}\r\n"
        f"To: <sip:1002@{REALM}>\r\n"
        f"Call-ID: sipsak-{port}@127.0.0.7\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:app@127.0.0.7:{port}>\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    f = tmp_path / "invite.sip"
    f.write_bytes(msg.encode())
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            "sipsak",
            "-f",
            str(f),
            "-s",
            f"sip:1002@127.0.0.1:{e2e.kamailio.port}",
            "-l",
            str(port),
            "-H",
            "127.0.0.7",
            "--no-crlf",
            "-vv",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 or ADDR_IN_USE in out.lower(), out
    return out


async def release_reasons(kam: KamailioProc, call_id: str) -> list[str]:
    """The reasons of Kamailio's release lines for a call, once it has one (up to 5 s: on a
    loaded machine the slot may come back first by the node's heartbeat, which no longer
    lists the dialog, and the dialog:end line a moment later)."""
    for _ in range(50):
        lines = kam.events("release", contains=call_id)
        if lines:
            break
        await asyncio.sleep(0.1)
    return [kv(line)["reason"] for line in lines]


async def test_max_call_duration_releases(e2e: E2E, api: Api, phones: Phones) -> None:
    """MAX_CALL_DURATION reached: Kamailio's dialog module sends BYE both ways and the
    call is released (reason timeout), once, as Kamailio's log and the sidecar's say."""
    await api.put_config(office())
    kam = await start_kamailio(
        e2e.db_url, e2e.sidecar.url, e2e.workdir, "MAX_CALL_DURATION=2", node="e2e-short"
    )
    e2e.extra.append(kam)
    try:
        mark = e2e.sidecar.mark()
        callee = await phones.ua(user="1002", password=PW)
        assert (await callee.register(kam.addr, expires=600)).status == 200
        app = await phones.ua(APP, user="app")
        call = await app.invite("1002", proxy=kam.addr)
        assert await call.wait_final(5) == 200
        assert await api.wait_active(1, "acme") == 1
        assert await api.wait_call_state(call.call_id, "answered") == "answered"
        await call.wait_ended(10)  # the proxy's BYE, to both sides
        await callee.incoming[-1].wait_ended(5)
        assert call.bye_received.is_set() and callee.incoming[-1].bye_received.is_set()
        assert await api.wait_active(0, "acme", timeout=5) == 0
        assert await release_reasons(kam, call.call_id) == ["timeout"]
        recs = await e2e.sidecar.wait_records("released", 1, mark, call_id=call.call_id)
        assert [r["reason"] for r in recs if r["released"]] == ["timeout"], recs
        await callee.unregister(kam.addr)
    finally:
        kam.stop()


TIMEOUT_CALLS = 40


async def test_max_call_duration_ends_every_call_both_ways(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """Many calls reaching MAX_CALL_DURATION in the same dialog timer tick: each one gets
    the proxy's BYE on both sides and is released once, reason timeout. Stock Kamailio
    5.6 sends the caller's BYE, and when the caller's 200 to it is handled (by another
    process) before the callee's BYE is sent, it sends no BYE to the callee and raises
    no dialog:end (kamailio issue #4169); kamailio.cfg loads the dialog module patched
    for that (kamailio/patches/dialog-bye-both-legs.patch, switch DIALOG_MODULE)."""
    doc = office()
    doc["accounts"][0]["limits"]["calls"] = TIMEOUT_CALLS
    await api.put_config(doc)
    kam = await start_kamailio(
        e2e.db_url, e2e.sidecar.url, e2e.workdir, "MAX_CALL_DURATION=2", node="e2e-many"
    )
    e2e.extra.append(kam)
    try:
        callee = await phones.ua(user="1002", password=PW)
        assert (await callee.register(kam.addr, expires=600)).status == 200
        app = await phones.ua(APP, user="app")
        calls = await asyncio.gather(
            *(app.invite("1002", proxy=kam.addr) for _ in range(TIMEOUT_CALLS))
        )
        assert await asyncio.gather(*(c.wait_final(5) for c in calls)) == [200] * len(calls)
        assert await api.wait_active(TIMEOUT_CALLS, "acme") == TIMEOUT_CALLS
        await asyncio.sleep(2 + 1 + 2)  # the timeout, a timer tick, time for the BYEs
        by_call = {inc.call_id: inc for inc in callee.incoming}
        missing = [
            c.call_id
            for c in calls
            if not (c.bye_received.is_set() and by_call[c.call_id].bye_received.is_set())
        ]
        assert not missing, f"{len(missing)} of {len(calls)} calls not ended both ways: {missing}"
        assert await api.wait_active(0, "acme", timeout=5) == 0
        for _ in range(50):
            reasons = {c.call_id: kam.events("release", contains=c.call_id) for c in calls}
            if all(reasons.values()):
                break
            await asyncio.sleep(0.1)
        wrong = {
            cid: [kv(line)["reason"] for line in lines]
            for cid, lines in reasons.items()
            if [kv(line)["reason"] for line in lines] != ["timeout"]
        }
        assert not wrong, f"releases not exactly one timeout: {wrong}"
        await callee.unregister(kam.addr)
    finally:
        kam.stop()


async def test_keepalive_ends_a_call_whose_caller_vanished(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """The caller of an answered call is gone (its BYE never reached the proxy, or the phone
    went off): the dialog module's keepalive OPTIONS to it go unanswered (408), so the call
    is ended with BYEs and released (reason timeout) instead of holding its slot until
    MAX_CALL_DURATION (4 h by default). A caller that restarted and lost the call answers
    them 481 (no such dialog): released the same way. A call whose ends answer the
    keepalives (both got one) stays counted. DIALOG_KEEPALIVE 30 is the least the dialog
    module takes."""
    await api.put_config(office())
    kam = await start_kamailio(
        e2e.db_url,
        e2e.sidecar.url,
        e2e.workdir,
        "DIALOG_KEEPALIVE=30",
        "KEEPALIVE_FAILURES=1",
        node="e2e-keepalive",
    )
    e2e.extra.append(kam)
    try:
        callee = await phones.ua(user="1002", password=PW)
        assert (await callee.register(kam.addr, expires=600)).status == 200
        gone_ua = await phones.ua(APP, user="app")
        live_ua = await phones.ua(APP, user="app")
        restarted_ua = await phones.ua(APP, user="app")
        gone = await gone_ua.invite("1002", proxy=kam.addr)
        live = await live_ua.invite("1002", proxy=kam.addr)
        restarted = await restarted_ua.invite("1002", proxy=kam.addr)
        finals = [await c.wait_final(5) for c in (gone, live, restarted)]
        assert finals == [200, 200, 200]
        assert await api.wait_active(3, "acme") == 3
        await gone_ua.close()  # no BYE: the caller just disappears
        restarted_ua.forget(restarted)  # still there, but the call is unknown to it: 481
        by_call = {inc.call_id: inc for inc in callee.incoming}
        # First keepalive 30-40 s after the answer, its 408 after FR_TIMER (5 s) or its 481
        # at once, the dialog's lifetime then cut to 10 s, the timer's tick: 55 s at most.
        for ended in (gone, restarted):
            await by_call[ended.call_id].wait_ended(90)
            assert by_call[ended.call_id].bye_received.is_set()
        assert await api.wait_active(1, "acme", timeout=5) == 1
        assert await release_reasons(kam, gone.call_id) == ["timeout"]
        assert await release_reasons(kam, restarted.call_id) == ["timeout"]
        # (its UA, knowing no such dialog, answered each in-dialog request 481)
        keepalives = [
            r for r in restarted_ua.requests if r.method == "OPTIONS" and r.to_tag is not None
        ]
        assert keepalives, "the restarted caller got no keepalive"
        # The call whose ends answered stays up and counted, and was pinged both ways.
        assert not live.bye_received.is_set() and not kam.events("release", contains=live.call_id)
        assert any(r.method == "OPTIONS" for r in live.requests), "caller got no keepalive"
        assert any(r.method == "OPTIONS" for r in by_call[live.call_id].requests), (
            "callee got no keepalive"
        )
        assert await live.bye() == 200
        assert await api.wait_active(0, "acme", timeout=5) == 0
        await callee.unregister(kam.addr)
    finally:
        kam.stop()
