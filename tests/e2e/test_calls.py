"""Call life cycles over real SIP through Kamailio: counting, refusal on the wire, release
on every way a call ends, re-INVITE and retransmissions, concurrency, hostile headers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.e2e.conftest import E2E, Api, Phones

pytestmark = pytest.mark.e2e

PW = "s3cret"


def office(limit: int | None = 2, **acct: Any) -> dict[str, Any]:
    """One account, two digest extensions, an app server and a carrier (no gateway)."""
    return {
        "counting": "per_call",
        "accounts": [{"id": "acme", "limits": {"calls": limit, **acct}}],
        "extensions": [
            {"id": "1001", "account": "acme", "password": PW},
            {"id": "1002", "account": "acme", "password": PW},
        ],
    }


async def test_options_probe(e2e: E2E, phones: Phones) -> None:
    ua = await phones.ua()
    assert await ua.options(f"sip:127.0.0.1:{e2e.kamailio.port}", e2e.proxy) == 200


async def test_call_answered_then_bye_from_caller(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    assert call.challenges and call.challenges[0].status == 407  # digest on the INVITE
    assert await api.wait_active(1, "acme") == 1
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    assert await api.wait_idle() == []


async def test_bye_from_callee_releases(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    inc = callee.incoming[-1]
    assert await api.wait_active(1, "acme") == 1
    assert await inc.bye() == 200
    await call.wait_ended(5)
    assert await api.wait_active(0, "acme") == 0


async def test_refusal_on_the_wire(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office(limit=1))
    await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    first = await caller.invite("1002", proxy=e2e.proxy)
    assert await first.wait_final(5) == 200
    second = await caller.invite("1002", proxy=e2e.proxy)
    code = await second.wait_final(5)
    assert code in (403, 486)
    final = second.final
    assert final is not None
    assert final.reason == "REACH_PLAN_LIMIT"
    assert final.get("reason") == f'SIP;cause={code};text="REACH_PLAN_LIMIT"'
    assert final.get("x-limit-counter")  # WITH_LIMIT_HEADER is on in the e2e node
    assert await api.wait_active(1, "acme") == 1
    assert await first.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_unknown_origin_forbidden(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    stranger = await phones.ua("127.0.0.9", user="nobody")
    call = await stranger.invite("1002", proxy=e2e.proxy)
    code = await call.wait_final(5)
    assert code in (403, 407)
    assert call.final is not None and call.final.reason != "REACH_PLAN_LIMIT"


async def test_cancel_before_answer(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    await call.wait_provisional(180, 5)
    assert await api.wait_active(1, "acme") == 1
    assert await call.cancel() == 200
    assert await call.wait_final(5) == 487
    assert await api.wait_active(0, "acme") == 0


async def test_busy_callee_releases(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "busy"
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 486
    assert call.final is not None and call.final.reason != "REACH_PLAN_LIMIT"
    assert await api.wait_active(0, "acme") == 0


async def test_no_answer_fr_inv_timer(e2e: E2E, api: Api, phones: Phones) -> None:
    """The callee rings forever; Kamailio's fr_inv_timer (4 s in e2e) ends it with 408."""
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    await call.wait_provisional(180, 5)
    assert await api.wait_active(1, "acme") == 1
    assert await call.wait_final(10) in (408, 480, 487)
    assert await api.wait_active(0, "acme") == 0


async def test_unregistered_destination(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)  # 1002 not registered
    assert await call.wait_final(5) == 480
    assert await api.wait_active(0, "acme") == 0


async def test_reinvite_not_counted(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office(limit=1))
    await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    assert await call.reinvite() == 200
    assert await call.reinvite() == 200
    assert await api.active("acme") == 1
    assert len(await api.calls()) == 1
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_retransmitted_invite_counted_once(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office(limit=2))
    callee = await phones.registered_ua("1002", PW)
    callee.answer_delay = 0.5
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy)
    await call.wait_provisional(180, 5)
    for _ in range(3):
        call.retransmit()
        await asyncio.sleep(0.05)
    assert await call.wait_final(5) == 200
    assert len(callee.incoming) == 1
    assert await api.active("acme") == 1
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_fifty_at_once_limit_five(e2e: E2E, api: Api, phones: Phones) -> None:
    doc = office(limit=5)
    doc["extensions"].append({"id": "app", "account": "acme", "sources": ["127.0.0.2"]})
    await api.put_config(doc)
    await phones.registered_ua("1002", PW)
    app = await phones.ua("127.0.0.2", user="app")
    calls = [await app.invite("1002", proxy=e2e.proxy) for _ in range(50)]
    codes = await asyncio.gather(*(c.wait_final(15) for c in calls))
    assert codes.count(200) == 5, codes
    assert all(c in (200, 403, 486) for c in codes), codes
    assert await api.active("acme") == 5
    await asyncio.gather(*(c.bye() for c in calls if c.status == 200))
    assert await api.wait_active(0, "acme") == 0


HOSTILE_FROM = [
    '"q\\"uo\\\\te" <sip:1001@sidecar.local>;tag=h1',
    '"\u00e9\u00e8\u4e2d\u6587 \U0001f600" <sip:1001@sidecar.local>;tag=h2',
    '"' + "A" * 8192 + '" <sip:1001@sidecar.local>;tag=h3',
    "<sip:sidecar.local>;tag=h4",
    '<sip:we"ird\\\\user@sidecar.local>;tag=h5',
    "<sip:1001@sidecar.local>",
]


@pytest.mark.parametrize("from_header", HOSTILE_FROM, ids=range(len(HOSTILE_FROM)))
async def test_hostile_from(e2e: E2E, api: Api, phones: Phones, from_header: str) -> None:
    doc = office()
    doc["extensions"].append({"id": "app", "account": "acme", "sources": ["127.0.0.2"]})
    await api.put_config(doc)
    await phones.registered_ua("1002", PW)
    app = await phones.ua("127.0.0.2", user="app")
    before = e2e.sidecar.text().count(" 400 ")
    call = await app.invite("1002", proxy=e2e.proxy, from_header=from_header)
    code = await call.wait_final(5)
    assert code in (200, 400, 403, 404, 486), code
    if code == 200:
        await call.bye()
    assert e2e.kamailio.alive() and e2e.sidecar.alive()
    # still deciding calls
    ok = await app.invite("1002", proxy=e2e.proxy)
    assert await ok.wait_final(5) == 200
    await ok.bye()
    assert await api.wait_active(0, "acme") == 0
    assert e2e.sidecar.text().count(" 400 ") == before
    assert "invalid_body" not in e2e.sidecar.text()


async def test_heartbeat_reconciles_dialogs(e2e: E2E, api: Api, phones: Phones) -> None:
    """Kamailio's heartbeat lists its dialogs: a live call stays counted across heartbeats,
    a call the node does not know (lost BYE, say) is released after the grace period."""
    doc = office(limit=5)
    doc["extensions"].append({"id": "app", "account": "acme", "sources": ["127.0.0.2"]})
    await api.put_config(doc)
    await phones.registered_ua("1002", PW)
    app = await phones.ua("127.0.0.2", user="app")
    live = await app.invite("1002", proxy=e2e.proxy)
    assert await live.wait_final(5) == 200
    # a call this node never had a dialog for
    ghost = {
        "call_id": "ghost-call@127.0.0.2",
        "from_tag": "g1",
        "source_ip": "127.0.0.2",
        "from_user": "app",
        "to_user": "1002",
        "auth_user": None,
        "node": "e2e-1",
    }
    async with api.session.post(e2e.sidecar.url + "/v1/control/admit", json=ghost) as r:
        assert r.status == 200
        assert (await r.json())["action"] == "relay"
    assert await api.wait_active(2, "acme") == 2
    # grace 2 s + heartbeat every 2 s: the ghost goes, the live call stays
    assert await api.wait_active(1, "acme", timeout=10) == 1
    calls = await api.calls()
    assert [c["call_id"] for c in calls] == [live.call_id]
    assert await live.bye() == 200
    assert await api.wait_active(0, "acme") == 0
