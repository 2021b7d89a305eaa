"""A limit a caller can escape is no limit: SIP tricks tried against a real Kamailio.

Every test puts one call up at a limit of 1, tries a trick that would free its slot or place
a call around the admission, and then checks, while the tricked call is still up, that the
next call is still refused and the usage still 1; the call's own end then releases it.
Forged requests are built by hand (tests/sipua.py's message builder), as an attacker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.e2e.conftest import E2E, REALM, Api, KamailioProc, Phones, SidecarProc
from tests.sipua import Call, SipMessage, SipUA, build_message, new_branch, new_tag

# helpers take a timeout on purpose, like tests/sipua.py
# ruff: noqa: ASYNC109

pytestmark = pytest.mark.e2e

PW = "s3cret"


def office(limit: int | None = 1) -> dict[str, Any]:
    return {
        "counting": "per_call",
        "accounts": [{"id": "acme", "limits": {"calls": limit}}],
        "extensions": [
            {"id": "1001", "account": "acme", "password": PW},
            {"id": "1002", "account": "acme", "password": PW},
            {"id": "1003", "account": "acme", "password": PW},
        ],
    }


async def forge(
    ua: SipUA,
    method: str,
    ruri: str,
    dest: tuple[str, int],
    call_id: str,
    from_header: str | bytes,
    to_header: str | bytes,
    cseq: int,
    routes: Sequence[str] = (),
    branch: str | None = None,
    timeout: float = 3,
) -> SipMessage | None:
    """Send one hand-built request and return its final response (None: no answer)."""
    branch = branch or new_branch()
    headers: list[Any] = [("Via", ua.via(branch)), ("Max-Forwards", "70")]
    headers += [("Route", r) for r in routes]
    headers += [
        ("From", from_header),
        ("To", to_header),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),
        ("Contact", f"<{ua.contact_uri}>"),
    ]
    try:
        return await ua.transact(
            build_message(f"{method} {ruri} SIP/2.0", headers), dest, branch, method, timeout
        )
    except TimeoutError:
        return None


async def up_at_limit(api: Api, phones: Phones, proxy: tuple[str, int]) -> tuple[Call, Any, SipUA]:
    """One answered call 1001 -> 1002 at a limit of 1; returns (call, callee side, caller UA)."""
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW, proxy=proxy)
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=proxy)
    assert await call.wait_final(5) == 200
    assert await api.wait_active(1, "acme") == 1
    return call, callee.incoming[-1], caller


async def assert_still_limited(api: Api, phones: Phones, proxy: tuple[str, int]) -> None:
    """The tricked call still holds its slot: usage 1, and the next call is refused."""
    assert await api.active("acme") == 1
    other = await phones.ua(user="1003", password=PW)
    for _ in range(3):
        nxt = await other.invite("1002", proxy=proxy)
        code = await nxt.wait_final(5)
        # 503: the sidecar could not decide in time on a loaded machine (fail-closed, never
        # a way through); ask again. Anything else must be the limit's refusal.
        if code != 503:
            break
    assert code in (403, 486), code
    assert nxt.final is not None and nxt.final.reason == "REACH_PLAN_LIMIT"
    assert await api.active("acme") == 1


async def test_answered_call_outlives_ringing_ttl(
    short_ttl: tuple[SidecarProc, KamailioProc], api: Api, phones: Phones
) -> None:
    """A one-leg call answered and held past SIDECAR_RINGING_TTL (2 s here, janitor every
    0.5 s) stays counted: the dialog's start was reported as an answer."""
    _, kam = short_ttl
    call, _, _ = await up_at_limit(api, phones, kam.addr)
    await asyncio.sleep(4.5)
    assert await api.active("acme") == 1
    await assert_still_limited(api, phones, kam.addr)
    [row] = await api.calls()
    assert row["state"] == "answered"
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_cancel_after_200_releases_nothing(e2e: E2E, api: Api, phones: Phones) -> None:
    """A CANCEL for the INVITE's own transaction (same branch) after the 200 has no effect."""
    call, inc, caller = await up_at_limit(api, phones, e2e.proxy)
    headers: list[Any] = [
        ("Via", caller.via(call.branch)),
        ("Max-Forwards", "70"),
        ("From", call.from_header),
        ("To", call.to_header),
        ("Call-ID", call.call_id),
        ("CSeq", f"{call.invite_cseq} CANCEL"),
    ]
    data = build_message(f"CANCEL {call.request_uri} SIP/2.0", headers)
    try:
        await caller.transact(data, e2e.proxy, call.branch, "CANCEL", 3)
    except TimeoutError:
        pass  # dropped is fine too
    await asyncio.sleep(0.5)
    assert not inc.bye_received.is_set() and not inc.ended.is_set()
    await assert_still_limited(api, phones, e2e.proxy)
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_bye_off_the_route_set_is_refused(e2e: E2E, api: Api, phones: Phones) -> None:
    """A BYE with the right Call-ID and tags sent straight to the proxy without the route set:
    refused, not relayed (the callee never gets it), the call stays counted."""
    call, inc, caller = await up_at_limit(api, phones, e2e.proxy)
    assert call.remote_target is not None and call.route_set
    resp = await forge(
        caller, "BYE", call.remote_target, e2e.proxy, call.call_id,
        call.local_header, call.remote_header or "", call.local_cseq + 1,
    )
    assert resp is not None and resp.status is not None and resp.status >= 400, resp
    await asyncio.sleep(0.5)
    assert not inc.bye_received.is_set()
    await assert_still_limited(api, phones, e2e.proxy)
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_bye_with_wrong_tag_on_route_set_is_refused(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """The recorded route set but a made-up To tag: 481, nothing ends."""
    call, inc, caller = await up_at_limit(api, phones, e2e.proxy)
    assert call.remote_target is not None
    to = f"<sip:1002@{REALM}>;tag={new_tag()}"
    resp = await forge(
        caller, "BYE", call.remote_target, e2e.proxy, call.call_id,
        call.local_header, to, call.local_cseq + 1, routes=call.route_set,
    )
    assert resp is not None and resp.status == 481, resp
    assert not inc.bye_received.is_set()
    await assert_still_limited(api, phones, e2e.proxy)
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_forged_in_dialog_invite_to_a_gateway(e2e: E2E, api: Api, phones: Phones) -> None:
    """Toll fraud: an 'in-dialog' INVITE with a made-up To tag, Route to the proxy and a
    gateway as Request-URI. 481, never relayed: the gateway sees nothing."""
    call, _, caller = await up_at_limit(api, phones, e2e.proxy)
    gateway = await phones.ua("127.0.0.3", user="gw")
    gw_uri = f"sip:+15550001111@127.0.0.3:{gateway.addr[1]}"
    proxy_route = f"<sip:127.0.0.1:{e2e.kamailio.port};lr>"
    for call_id, from_header in (
        (call.call_id, call.local_header),  # riding on a real call
        (f"fraud-{new_tag()}", f"<sip:1001@{REALM}>;tag={new_tag()}"),  # out of thin air
    ):
        resp = await forge(
            caller, "INVITE", gw_uri, e2e.proxy, call_id, from_header,
            f"<{gw_uri}>;tag={new_tag()}", 7, routes=[proxy_route],
        )
        assert resp is not None and resp.status == 481, resp
    await asyncio.sleep(0.3)
    assert gateway.incoming == []
    await assert_still_limited(api, phones, e2e.proxy)
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_preloaded_route_on_initial_invite_is_ignored(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """An initial INVITE carrying a Route to a gateway goes through admission like any other
    and rings where the sidecar says, never the preloaded hop."""
    call, _, _ = await up_at_limit(api, phones, e2e.proxy)
    gateway = await phones.ua("127.0.0.3", user="gw")
    other = await phones.ua(user="1003", password=PW)
    sneaky = await other.invite(
        "1002", proxy=e2e.proxy,
        extra_headers=[("Route", f"<sip:127.0.0.3:{gateway.addr[1]};lr>")],
    )
    code = await sneaky.wait_final(5)
    assert code in (403, 486), code  # admission ran, and refused: the account is full
    assert gateway.incoming == []
    assert await api.active("acme") == 1
    assert await call.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_invite_without_from_tag_is_refused(e2e: E2E, api: Api, phones: Phones) -> None:
    """No From tag, no dialog the proxy could follow: refused before admission."""
    await api.put_config(office())
    await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    call = await caller.invite("1002", proxy=e2e.proxy, from_header=f"<sip:1001@{REALM}>")
    assert await call.wait_final(5) == 400
    assert await api.active("acme") == 0


async def test_cancel_while_admission_is_pending(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """The CANCEL reaches the sidecar before the admission commits (the account row is held
    by another transaction, as a slow database would): the release wins, nothing stays
    counted, the callee never rings."""
    await api.put_config(office())
    callee = await phones.registered_ua("1002", PW)
    caller = await phones.ua(user="1001", password=PW)
    # First the digest round, so the held INVITE is the authenticated one.
    warm = await caller.invite("1002", proxy=e2e.proxy)
    assert await warm.wait_final(5) == 200
    assert await warm.bye() == 200
    assert await api.wait_active(0, "acme") == 0
    rings_before = len(callee.incoming)

    blocker = await asyncpg.connect(e2e.db_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE id = 'acme' FOR UPDATE")
        call = await caller.invite("1002", proxy=e2e.proxy)
        await call.wait_response(lambda r: (r.status or 0) == 100, 3)
        await asyncio.sleep(0.2)  # the admit is now waiting on the row lock
        assert await call.cancel() == 200
        assert await call.wait_final(5) == 487
        await asyncio.sleep(0.3)  # the release reached the sidecar, and waits too
        await tx.commit()
    finally:
        await blocker.close()
    await asyncio.sleep(1.0)
    assert await api.active("acme") == 0
    assert len(callee.incoming) == rings_before
    conn = await asyncpg.connect(e2e.db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM counter_drift()") == 0
    finally:
        await conn.close()


async def test_method_not_allowed_says_allow(e2e: E2E, phones: Phones) -> None:
    ua = await phones.ua()
    resp = await forge(
        ua, "SUBSCRIBE", f"sip:127.0.0.1:{e2e.kamailio.port}", e2e.proxy, f"s-{new_tag()}",
        f"<sip:x@{REALM}>;tag={new_tag()}", f"<sip:127.0.0.1:{e2e.kamailio.port}>", 1,
    )
    assert resp is not None and resp.status == 405
    allow = resp.get("allow") or ""
    assert "INVITE" in allow and "BYE" in allow


# --- a hardened node: only 127.0.0.1 is trusted -------------------------------------------

@pytest.fixture(scope="module")
async def hardened(e2e: E2E) -> AsyncIterator[KamailioProc]:
    kam = KamailioProc(
        e2e.db_url, e2e.sidecar.url, e2e.workdir,
        'TRUSTED_NETS="127.0.0.1/32"', "FLOOD_DENSITY=20", "AUTH_FAIL_MAX=4", "BAN_TIME=60",
        node="e2e-hardened",
    )
    try:
        await kam.wait_ready()
        yield kam
    finally:
        kam.stop()


async def test_limit_header_only_for_trusted_peers(
    hardened: KamailioProc, api: Api, phones: Phones
) -> None:
    await api.put_config(office())
    await phones.registered_ua("1002", PW, proxy=hardened.addr)
    trusted = await phones.ua(user="1001", password=PW)
    first = await trusted.invite("1002", proxy=hardened.addr)
    assert await first.wait_final(5) == 200
    again = await trusted.invite("1002", proxy=hardened.addr)
    assert await again.wait_final(5) in (403, 486)
    assert again.final is not None and again.final.get("x-limit-counter") == "account:acme:calls"
    outsider = await phones.ua("127.0.0.6", user="1003", password=PW)
    refused = await outsider.invite("1002", proxy=hardened.addr)
    assert await refused.wait_final(5) in (403, 486)
    assert refused.final is not None and refused.final.reason == "REACH_PLAN_LIMIT"
    assert refused.final.get("x-limit-counter") is None
    assert "acme" not in str(refused.final)
    assert await first.bye() == 200
    assert await api.wait_active(0, "acme") == 0


async def test_password_guessing_is_banned(
    hardened: KamailioProc, api: Api, phones: Phones
) -> None:
    """AUTH_FAIL_MAX wrong passwords from one source: it is ignored, right password included."""
    await api.put_config(office())
    guesser = await phones.ua("127.0.0.8", user="1001", password="wrong")
    for _ in range(4):
        resp = await guesser.register(hardened.addr, expires=60)
        assert resp.status in (401, 403), resp
    right = await phones.ua("127.0.0.8", user="1001", password=PW)
    with pytest.raises(TimeoutError):
        await right.register(hardened.addr, expires=60, timeout=1.5)
    elsewhere = await phones.ua("127.0.0.9", user="1001", password=PW)
    assert (await elsewhere.register(hardened.addr, expires=60)).status == 200
    await elsewhere.unregister(hardened.addr)


async def test_flood_is_banned(hardened: KamailioProc, phones: Phones) -> None:
    """More than FLOOD_DENSITY requests per 2 s from one untrusted source: it is ignored."""
    flooder = await phones.ua("127.0.0.7", user="flood")
    target = f"sip:127.0.0.1:{hardened.port}"
    answered = 0
    for _ in range(60):
        try:
            if await flooder.options(target, hardened.addr, timeout=0.3) == 200:
                answered += 1
        except TimeoutError:
            break
    assert 0 < answered < 60
    with pytest.raises(TimeoutError):
        await flooder.options(target, hardened.addr, timeout=1)
    calm = await phones.ua("127.0.0.1", user="calm")
    assert await calm.options(target, hardened.addr) == 200


# --- failure policy -------------------------------------------------------------------------

async def test_sidecar_4xx_is_a_refusal_not_an_outage(
    e2e: E2E, api: Api, phones: Phones
) -> None:
    """A fail-open node whose sidecar refuses its control requests (403: not an allowed source)
    refuses the call: a 4xx never opens the gate."""
    sc = SidecarProc(e2e.db_url, e2e.workdir, SIDECAR_CONTROL_SOURCES="10.255.255.0/24")
    sc.wait_ready()
    kam = KamailioProc(e2e.db_url, sc.url, e2e.workdir, "FAIL_OPEN", node="e2e-4xx")
    try:
        await kam.wait_ready()
        await api.put_config(office())
        callee = await phones.registered_ua("1002", PW)
        await callee.register(kam.addr, expires=60)
        caller = await phones.ua(user="1001", password=PW)
        call = await caller.invite("1002", proxy=kam.addr)
        assert await call.wait_final(5) == 403
        assert "event=admit_refused_by_sidecar http_status=403" in kam.text()
        assert "event=fail_open" not in kam.text()
    finally:
        kam.stop()
        sc.stop()


async def test_fail_open_still_authenticates(e2e: E2E, api: Api, phones: Phones) -> None:
    """Sidecar unreachable, fail-open: an untrusted caller without credentials is challenged,
    and goes ahead only once it authenticates."""
    kam = KamailioProc(
        e2e.db_url, "http://127.0.0.1:9", e2e.workdir, "FAIL_OPEN",
        'TRUSTED_NETS="127.0.0.1/32"', node="e2e-open-auth",
    )
    try:
        await kam.wait_ready()
        await api.put_config(office())
        callee = await phones.registered_ua("1002", PW)
        await callee.register(kam.addr, expires=60)
        anonymous = await phones.ua("127.0.0.6", user="1001")  # no password
        call = await anonymous.invite("1002", proxy=kam.addr)
        assert await call.wait_final(5) == 407
        rings = len(callee.incoming)
        caller = await phones.ua("127.0.0.6", user="1001", password=PW)
        ok = await caller.invite("1002", proxy=kam.addr)
        assert await ok.wait_final(5) == 200
        assert len(callee.incoming) == rings + 1
        assert await ok.bye() == 200
    finally:
        kam.stop()


# --- a node and sidecar with a short ringing TTL ----------------------------------------------

@pytest.fixture(scope="module")
async def short_ttl(e2e: E2E) -> AsyncIterator[tuple[SidecarProc, KamailioProc]]:
    sc = SidecarProc(
        e2e.db_url, e2e.workdir,
        SIDECAR_RINGING_TTL="2", SIDECAR_JANITOR_INTERVAL="0.5", SIDECAR_RECONCILE_GRACE="2",
    )
    sc.wait_ready()
    kam = KamailioProc(e2e.db_url, sc.url, e2e.workdir, node="e2e-short-ttl")
    try:
        await kam.wait_ready()
        yield sc, kam
    finally:
        kam.stop()
        sc.stop()


@contextlib.asynccontextmanager
async def outage_front(sidecar_url: str) -> AsyncIterator[str]:
    """An HTTP front for the sidecar in an outage that only deciding admissions see: an admit
    without "late" gets 503; everything else (late admits, answers, releases, heartbeats) is
    passed through. Returns the front's base URL."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if request.path == "/v1/control/admit" and not json.loads(body).get("late"):
            return web.json_response({"error": {"code": "down"}}, status=503)
        async with aiohttp.ClientSession() as s, s.post(
            sidecar_url + request.path, data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as r:
            return web.Response(
                body=await r.read(), status=r.status, content_type="application/json"
            )

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_late_fail_open_call_outlives_ringing_ttl(
    short_ttl: tuple[SidecarProc, KamailioProc], e2e: E2E, api: Api, phones: Phones
) -> None:
    """A call let through by fail-open is counted when answered, as answered: the ringing TTL
    never releases it while it is up."""
    sc, _ = short_ttl
    async with outage_front(sc.url) as front:
        kam = KamailioProc(
            e2e.db_url, front, e2e.workdir, "FAIL_OPEN", 'TRUSTED_NETS="127.0.0.1/32"',
            node="e2e-late",
        )
        try:
            await kam.wait_ready()
            await api.put_config(office(limit=5))
            callee = await phones.ua(user="1002", password=PW)
            assert (await callee.register(kam.addr, expires=60)).status == 200
            # an untrusted source: fail-open lets it through once it authenticates, and the
            # late admit counts it for its extension
            caller = await phones.ua("127.0.0.6", user="1001", password=PW)
            call = await caller.invite("1002", proxy=kam.addr)
            assert await call.wait_final(5) == 200
            assert "event=fail_open " in kam.text()
            assert await api.wait_active(1, "acme") == 1
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.5:
                assert await api.active("acme") == 1
                await asyncio.sleep(0.5)
            [row] = await api.calls()
            assert row["state"] == "answered"
            assert await call.bye() == 200
            assert await api.wait_active(0, "acme") == 0
        finally:
            kam.stop()


async def test_no_rpc_fifo_and_owner_only_ctl(e2e: E2E) -> None:
    """No JSON-RPC FIFO or datagram socket (core.ppdefines_full would show every -A define,
    SIDECAR_SECRET included); kamcmd's ctl socket is for its owner only."""
    [rundir] = e2e.workdir.glob(f"kam-{e2e.kamailio.port}-*")
    entries = {p.name: p.lstat() for p in rundir.iterdir()}
    assert not any(stat.S_ISFIFO(st.st_mode) for st in entries.values()), entries
    sockets = {n: st for n, st in entries.items() if stat.S_ISSOCK(st.st_mode)}
    assert sockets, entries  # the ctl socket is there...
    for name, st in sockets.items():
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (name, oct(st.st_mode))  # ...owner-only
