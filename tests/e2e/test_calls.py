"""Call life cycles over real SIP through Kamailio: counting, refusal on the wire, release
on every way a call ends, re-INVITE and retransmissions, concurrency, hostile headers.

Usage is checked at every step of a call (ringing, answered and ACKed, ended), and each
step is also checked in the logs for this very call: the sidecar's JSON lines (msg
"decision" / "answered" / "released" with its call_id, sidecar/control.py) and Kamailio's
xlog lines (event=answer / event=release ... call_id=..., kamailio/kamailio.cfg). A log
check counts the lines of this Call-ID written since the test's mark, so it fails when the
event did not happen, or happened twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.e2e.conftest import E2E, Api, Phones, kv
from tests.sipua import Call, IncomingCall, SipMessage, SipUA, parse_auth_params

pytestmark = pytest.mark.e2e

PW = "s3cret"
APP = "127.0.0.2"


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


def app_office(limit: int | None = 2) -> dict[str, Any]:
    """office() plus "app", an application server known by its source address (APP)."""
    doc = office(limit)
    doc["extensions"].append({"id": "app", "account": "acme", "sources": [APP]})
    return doc


# -- what the logs say about one call -----------------------------------------------------


def decisions(e2e: E2E, call: Call, since: int, **fields: Any) -> list[dict[str, Any]]:
    return e2e.sidecar.records("decision", since, call_id=call.call_id, **fields)


def admitted(e2e: E2E, call: Call, since: int) -> list[dict[str, Any]]:
    """The sidecar's first-time "relay" decisions for this call (repeats left out)."""
    return [d for d in decisions(e2e, call, since, action="relay") if d["reason"] != "repeat"]


async def assert_admitted_once(e2e: E2E, call: Call, since: int) -> None:
    got = admitted(e2e, call, since)
    assert len(got) == 1, got
    assert got[0]["reason"] == "admitted" and got[0]["from_tag"] == call.local_tag, got
    repeats = [d for d in decisions(e2e, call, since) if d["reason"] == "repeat"]
    assert all(d["action"] == "relay" for d in repeats), repeats  # the first decision again


async def assert_answered_once(e2e: E2E, call: Call, since: int) -> None:
    """The sidecar moved the call to answered exactly once; Kamailio reported it once."""
    recs = await e2e.sidecar.wait_records("answered", 1, since, call_id=call.call_id)
    assert len(recs) == 1, recs
    if not recs[0]["changed"]:
        # The node's heartbeat listed the dialog confirmed a moment before the answer came
        # (both mark it answered, the first wins): it must have been that, nothing else.
        beats = e2e.sidecar.records("reconciled node", since, node=e2e.kamailio.node)
        assert sum(b["answered"] for b in beats) >= 1, (recs, beats)
    lines = e2e.kamailio.events("answer", since=0, contains=call.call_id)
    assert len(lines) == 1, lines


async def assert_released_once(
    e2e: E2E, call: Call, since: int, reasons: tuple[str, ...], *, dialog: bool = True
) -> None:
    """Exactly one release gave slots back, for one of ``reasons``; with ``dialog`` the
    release came from Kamailio's dialog (one event=release line with this Call-ID)."""
    recs = await e2e.sidecar.wait_records("released", 1, since, call_id=call.call_id)
    gave_back = [r for r in recs if r.get("released")]
    assert len(gave_back) == 1 and gave_back[0]["reason"] in reasons, recs
    if dialog:
        lines = e2e.kamailio.events("release", since=0, contains=call.call_id)
        assert len(lines) == 1 and kv(lines[0])["reason"] in reasons, lines


def assert_never_answered(e2e: E2E, call: Call, since: int) -> None:
    assert not [
        r for r in e2e.sidecar.records("answered", since, call_id=call.call_id) if r["changed"]
    ]


# -- a call's steps -----------------------------------------------------------------------


async def ringing(api: Api, call: Call, callee: SipUA, account: str = "acme") -> IncomingCall:
    """The call rings at ``callee``: one slot held, the call recorded as ringing."""
    await call.wait_provisional(180, 5)
    assert call.final is None
    inc = callee.incoming[-1]
    assert inc.call_id == call.call_id
    assert await api.wait_active(1, account) == 1
    assert await api.wait_call_state(call.call_id, "ringing") == "ringing"
    return inc


async def answered(api: Api, call: Call, inc: IncomingCall, account: str = "acme") -> None:
    """The callee answers, the caller ACKs: still one slot, the call now answered."""
    assert inc.answer()
    assert await call.wait_final(5) == 200
    await inc.wait_acked(5)
    assert await api.wait_call_state(call.call_id, "answered") == "answered"
    assert await api.active(account) == 1


async def test_options_probe(e2e: E2E, phones: Phones) -> None:
    ua = await phones.ua()
    assert await ua.options(f"sip:127.0.0.1:{e2e.kamailio.port}", e2e.proxy) == 200


async def test_active_names_what_is_missing(api: Api) -> None:
    """A misspelled account, channel or counter is an error, never a silent 0."""
    await api.put_config(office())
    assert await api.active("acme") == 0
    with pytest.raises(AssertionError, match=r"no account 'acmee'.*\['acme'\]"):
        await api.active("acmee")
    with pytest.raises(AssertionError, match=r"no channel 'trunk'.*channels: \[\]"):
        await api.active(channel="trunk")
    with pytest.raises(AssertionError, match=r"no counter 'call'.*'calls'"):
        await api.active("acme", "call")
    with pytest.raises(AssertionError, match="no account"):
        await api.wait_active(0, "nobody")


async def test_call_answered_then_bye_from_caller(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    assert call.challenges and call.challenges[0].status == 407  # digest on the INVITE
    await assert_admitted_once(e2e, call, mark)
    await answered(api, call, inc)
    await assert_answered_once(e2e, call, mark)
    assert await call.bye() == 200
    assert inc.bye_received.is_set()
    assert await api.wait_active(0, "acme") == 0
    assert await api.wait_idle() == []
    await assert_released_once(e2e, call, mark, ("bye",))


async def test_digest_qop_and_nonce_counting(e2e: E2E, api: Api, phones: Phones) -> None:
    """Kamailio challenges with qop=auth; the answer carries qop=auth, a cnonce and nc.
    The nonce may be reused with a higher nc (no new challenge), never with the same nc:
    a replayed credential is challenged again and counts nothing."""
    await api.put_config(office(limit=5))
    await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    caller.preemptive_auth = True
    mark = e2e.sidecar.mark()
    first = await caller.invite("1002", proxy=e2e.proxy)
    assert await first.wait_final(5) == 200
    assert [c.status for c in first.challenges] == [407]
    chal = parse_auth_params(first.challenges[0].get("proxy-authenticate") or "")
    assert "auth" in [q.strip() for q in chal["qop"].split(",")], chal
    authed = SipMessage.parse(first.invites_sent[-1])
    sent = parse_auth_params(authed.get("proxy-authorization") or "")
    assert (sent["qop"], sent["nc"]) == ("auth", "00000001") and sent["cnonce"]
    second = await caller.invite("1002", proxy=e2e.proxy)  # same nonce, nc 2
    assert await second.wait_final(5) == 200
    assert second.challenges == [] and len(second.invites_sent) == 1
    assert caller.nonce_count(chal["nonce"]) == 2
    assert await api.wait_active(2, "acme") == 2
    await assert_admitted_once(e2e, first, mark)
    await assert_admitted_once(e2e, second, mark)
    # a captured credential replayed (nc 2 again) on a new INVITE
    assert caller.last_challenge is not None
    replay = caller.authorization(caller.last_challenge, "INVITE", second.request_uri, nc=2)
    assert replay is not None
    forged = await caller.invite("1002", proxy=e2e.proxy, extra_headers=[replay], auth=False)
    assert await forged.wait_final(5) == 407
    assert await api.steady_active(2, "acme", seconds=0.5) == []
    assert not admitted(e2e, forged, mark)
    assert await first.bye() == 200 and await second.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_bye_from_callee_releases(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    await answered(api, call, inc)
    assert await inc.bye() == 200
    await call.wait_ended(5)
    assert call.bye_received.is_set()
    assert await api.wait_active(0, "acme") == 0
    await assert_admitted_once(e2e, call, mark)
    await assert_answered_once(e2e, call, mark)
    await assert_released_once(e2e, call, mark, ("bye",))


async def test_refusal_on_the_wire(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office(limit=1))
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    first = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, first, callee)
    await answered(api, first, inc)
    second = await caller.invite("1002", proxy=e2e.proxy)
    code = await second.wait_final(5)
    assert code in (403, 486)
    final = second.final
    assert final is not None
    assert final.reason == "REACH_PLAN_LIMIT"
    assert final.get("reason") == f'SIP;cause={code};text="REACH_PLAN_LIMIT"'
    assert final.get("x-limit-counter")  # WITH_LIMIT_HEADER, and 127.0.0.1 is trusted
    assert len(callee.incoming) == 1  # the refused call never rang
    assert await api.active("acme") == 1
    refused = decisions(e2e, second, mark, action="reject")
    assert len(refused) == 1, refused
    assert refused[0]["reason"] in ("limit_origin", "limit_destination")
    assert refused[0]["counter"] == final.get("x-limit-counter") == "account:acme:calls"
    assert not admitted(e2e, second, mark)
    assert await first.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    await assert_released_once(e2e, first, mark, ("bye",))
    # the refused call held nothing: no release of it gave anything back
    assert not [
        r
        for r in e2e.sidecar.records("released", mark, call_id=second.call_id)
        if r.get("released")
    ]


async def test_unknown_origin_forbidden(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    stranger = await phones.ua("127.0.0.9", user="nobody")
    call = await stranger.invite("1002", proxy=e2e.proxy)
    code = await call.wait_final(5)
    assert code in (403, 407)
    assert call.final is not None and call.final.reason != "REACH_PLAN_LIMIT"
    assert await api.active("acme") == 0


async def test_cancel_before_answer(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    assert await call.cancel() == 200
    assert await call.wait_final(5) == 487
    assert inc.cancelled.is_set()
    assert await api.wait_active(0, "acme") == 0
    await assert_admitted_once(e2e, call, mark)
    await assert_released_once(e2e, call, mark, ("cancel", "failure"))
    assert_never_answered(e2e, call, mark)


async def test_busy_callee_releases(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    assert inc.reject(486)
    assert await call.wait_final(5) == 486
    assert call.final is not None and call.final.reason != "REACH_PLAN_LIMIT"
    assert await api.wait_active(0, "acme") == 0
    await assert_released_once(e2e, call, mark, ("failure",))
    assert_never_answered(e2e, call, mark)


async def test_no_answer_fr_inv_timer(e2e: E2E, api: Api, phones: Phones) -> None:
    """The callee rings forever; Kamailio's fr_inv_timer (4 s in e2e) ends it with 408."""
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    await ringing(api, call, callee)
    assert await api.steady_active(1, "acme", seconds=1.0) == []  # held while it rings
    assert await call.wait_final(10) in (408, 480, 487)
    assert await api.wait_active(0, "acme") == 0
    await assert_released_once(e2e, call, mark, ("failure",))
    assert_never_answered(e2e, call, mark)


async def test_unregistered_destination(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office())
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)  # 1002 not registered
    assert await call.wait_final(5) == 480
    assert await api.wait_active(0, "acme") == 0
    # admitted, nothing to ring: released at once, before any dialog existed
    await assert_admitted_once(e2e, call, mark)
    await assert_released_once(e2e, call, mark, ("failure",), dialog=False)


async def test_reinvite_not_counted(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(office(limit=1))
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    caller = await phones.ua(user="1001", password=PW)
    mark = e2e.sidecar.mark()
    call = await caller.invite("1002", proxy=e2e.proxy)
    inc = await ringing(api, call, callee)
    await answered(api, call, inc)
    asked = len(decisions(e2e, call, mark))
    assert await call.reinvite() == 200
    assert await inc.reinvite() == 200  # and one from the callee
    assert await call.reinvite() == 200
    assert await api.active("acme") == 1
    assert len(await api.calls()) == 1
    assert len(callee.incoming) == 1
    assert len(decisions(e2e, call, mark)) == asked  # no re-INVITE reached the sidecar
    assert await api.wait_call_state(call.call_id, "answered") == "answered"
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    await assert_admitted_once(e2e, call, mark)
    await assert_released_once(e2e, call, mark, ("bye",))


async def test_retransmitted_invite_counted_once(e2e: E2E, api: Api, phones: Phones) -> None:
    """Retransmissions while the sidecar is deciding, while ringing and after the 200:
    the callee receives exactly one INVITE datagram, the call is counted once."""
    await api.put_config(app_office(limit=2))
    callee = await phones.registered_ua("1002", PW)
    callee.on_invite = "ring"
    app = await phones.ua(APP, user="app")
    mark = e2e.sidecar.mark()
    call = await app.invite("1002", proxy=e2e.proxy)
    # at once, before any response can have been read: the admission is in flight
    for _ in range(3):
        call.retransmit()
    assert not call.responses
    await asyncio.sleep(0.005)
    call.retransmit()
    inc = await ringing(api, call, callee)
    call.retransmit()  # while ringing
    await answered(api, call, inc)
    for _ in range(2):  # after the 200 and its ACK
        call.retransmit()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a duplicate relayed by Kamailio would have arrived
    assert call.retransmissions == 7
    raw = callee.raw_invites(call.call_id)
    assert len(raw) == 1, [(m.branch, m.source) for m in raw]
    assert len(callee.incoming) == 1
    assert await api.active("acme") == 1
    assert len(await api.calls()) == 1
    await assert_admitted_once(e2e, call, mark)
    await assert_answered_once(e2e, call, mark)
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    await assert_released_once(e2e, call, mark, ("bye",))


async def test_invite_replayed_after_release_not_counted(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """After the BYE, the very INVITE of the call comes again: with a new branch (a new
    transaction for Kamailio at once), then byte for byte once Kamailio's transaction is
    gone. Neither may become a counted call: a final >= 400 (487 from the sidecar's
    tombstone), no slot taken even for a moment, and the callee never rings again."""
    await api.put_config(app_office(limit=2))
    callee = await phones.registered_ua("1002", PW)
    app = await phones.ua(APP, user="app")
    call = await app.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    inc = callee.incoming[-1]
    await inc.wait_acked(5)
    assert await api.wait_active(1, "acme") == 1
    assert await call.bye() == 200
    ended = time.monotonic()
    assert await api.wait_active(0, "acme") == 0
    mark = e2e.sidecar.mark()

    resp = await call.replay_invite(new_branch=True, timeout=10)
    assert resp.status is not None and resp.status >= 400, resp.first_line
    assert await api.steady_active(0, "acme", seconds=1.0) == []

    await asyncio.sleep(max(0.0, ended + 6.5 - time.monotonic()))  # tm wait timer is 5 s
    resp = await call.replay_invite(timeout=10)
    assert resp.status is not None and resp.status >= 400, resp.first_line
    assert resp.branch == call.branch
    assert await api.steady_active(0, "acme", seconds=1.0) == []

    assert callee.invite_count(call.call_id) == 1
    assert len(callee.incoming) == 1
    assert await api.call_record(call.call_id) is None
    assert not admitted(e2e, call, mark), decisions(e2e, call, mark)
    assert not [
        r for r in e2e.sidecar.records("answered", mark, call_id=call.call_id) if r.get("changed")
    ]


async def test_forged_bye_and_late_cancel_change_nothing(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """The UA's forging tools against Kamailio: a BYE on the call's own route set but with
    a made-up To tag gets 481 and is never relayed; a CANCEL with the INVITE's branch
    after the 200 ends nothing. The call stays counted until its real BYE."""
    await api.put_config(app_office())
    callee = await phones.registered_ua("1002", PW)
    app = await phones.ua(APP, user="app")
    mark = e2e.sidecar.mark()
    call = await app.invite("1002", proxy=e2e.proxy)
    assert await call.wait_final(5) == 200
    inc = callee.incoming[-1]
    await inc.wait_acked(5)
    assert await api.wait_active(1, "acme") == 1
    assert call.route_set and call.remote_target
    status = await app.request_raw(
        "BYE",
        call.remote_target,
        e2e.proxy,
        call.call_id,
        call.local_tag,
        "made-up-tag",
        99,
        routes=call.route_set,
    )
    assert status == 481
    assert await call.cancel(force=True) in (200, 481)
    await asyncio.sleep(0.3)
    assert not inc.bye_received.is_set() and not inc.cancelled.is_set()
    # nothing forged reached the callee (every datagram, before any dialog matching)
    got = [m.method for m in callee.requests if m.call_id == call.call_id]
    assert got == ["INVITE", "ACK"], got
    assert await api.steady_active(1, "acme", seconds=0.5) == []
    assert await api.wait_call_state(call.call_id, "answered") == "answered"
    assert e2e.sidecar.records("released", mark, call_id=call.call_id) == []
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    await assert_released_once(e2e, call, mark, ("bye",))


async def test_fifty_at_once_limit_five(e2e: E2E, api: Api, phones: Phones) -> None:
    await api.put_config(app_office(limit=5))
    await phones.registered_ua("1002", PW)
    app = await phones.ua(APP, user="app")
    mark = e2e.sidecar.mark()
    calls = [await app.invite("1002", proxy=e2e.proxy) for _ in range(50)]
    codes = await asyncio.gather(*(c.wait_final(15) for c in calls))
    assert codes.count(200) == 5, codes
    assert all(c in (200, 403, 486) for c in codes), codes
    assert await api.active("acme") == 5
    ids = {c.call_id for c in calls if c.status == 200}
    assert {d["call_id"] for d in e2e.sidecar.records("decision", mark, action="relay")} == ids
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
    """A hostile From gets a clear answer: either Kamailio refuses it itself (400,
    event=admit_refused for this Call-ID, the sidecar never asked), or the sidecar decides
    it from a well-formed body (one decision line with this Call-ID and the right From
    tag). Never a body the sidecar refuses (event=admit_refused_by_sidecar), never an
    error (event=admit_error, an error line of the sidecar)."""
    await api.put_config(app_office())
    await phones.registered_ua("1002", PW)
    app = await phones.ua(APP, user="app")
    mark, kmark = e2e.sidecar.mark(), e2e.kamailio.mark()
    call = await app.invite("1002", proxy=e2e.proxy, from_header=from_header)
    code = await call.wait_final(5)
    assert code in (200, 400, 403, 404, 486), code
    if code == 200:
        assert await call.bye() == 200
    assert e2e.kamailio.alive() and e2e.sidecar.alive()
    asked = decisions(e2e, call, mark)
    if code == 400:
        assert asked == []
        # refused by the cfg's own checks (event=admit_refused) or by the sanity module
        # (it answers 400 itself and logs a warning; the script stops there)
        kam = e2e.kamailio
        refused = kam.events("admit_refused", kmark, contains=call.call_id) + [
            line
            for line in kam.text(kmark).splitlines()
            if call.call_id in line and " sanity [" in line
        ]
        assert refused, kam.text(kmark)
    else:
        assert len(asked) == 1, asked
        assert asked[0]["from_tag"] == (call.local_tag or ""), asked
        assert asked[0]["action"] == ("relay" if code == 200 else "reject"), asked
    # still deciding calls
    ok = await app.invite("1002", proxy=e2e.proxy)
    assert await ok.wait_final(5) == 200
    assert await ok.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    await assert_admitted_once(e2e, ok, mark)
    assert e2e.kamailio.events("admit_refused_by_sidecar", kmark) == []
    assert e2e.kamailio.events("admit_error", kmark) == []
    assert [r for r in e2e.sidecar.records(None, mark) if r.get("level") == "error"] == []


async def test_heartbeat_reconciles_dialogs(e2e: E2E, api: Api, phones: Phones) -> None:
    """Kamailio's heartbeat lists its dialogs: a live call stays counted across heartbeats,
    a call the node does not know (lost BYE, say) is released after the grace period."""
    await api.put_config(app_office(limit=5))
    await phones.registered_ua("1002", PW)
    app = await phones.ua(APP, user="app")
    live = await app.invite("1002", proxy=e2e.proxy)
    assert await live.wait_final(5) == 200
    mark = e2e.sidecar.mark()
    # a call this node never had a dialog for
    ghost = {
        "call_id": f"ghost-{time.time_ns()}@127.0.0.2",
        "from_tag": "g1",
        "source_ip": APP,
        "from_user": "app",
        "to_user": "1002",
        "auth_user": None,
        "node": e2e.kamailio.node,
    }
    async with api.session.post(e2e.sidecar.url + "/v1/control/admit", json=ghost) as r:
        assert r.status == 200
        assert (await r.json())["action"] == "relay"
    assert await api.wait_active(2, "acme") == 2
    # grace 2 s + heartbeat every 2 s: the ghost goes, the live call stays
    assert await api.wait_active(1, "acme", timeout=10) == 1
    calls = await api.calls()
    assert [c["call_id"] for c in calls] == [live.call_id]
    reconciled = e2e.sidecar.records("reconciled node", mark, node=e2e.kamailio.node)
    assert sum(int(r["released"]) for r in reconciled) == 1, reconciled
    assert await api.call_record(live.call_id) is not None
    assert await live.bye() == 200
    assert await api.wait_active(0, "acme") == 0
