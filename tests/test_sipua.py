"""Tests for tests/sipua.py without Kamailio: UAs talk to each other over loopback,
directly or through a tiny stateless record-routing proxy defined here."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import cast

import pytest

from tests.sipua import (
    DigestChallenger,
    IncomingCall,
    SipMessage,
    SipUA,
    _b,
    build_message,
    parse_auth_params,
    parse_name_addr,
    parse_uri,
    parse_via,
    split_quoted,
)

CALLER_IP = "127.0.0.3"  # "carrier"
CALLEE_IP = "127.0.0.2"  # "application server"
PROXY_IP = "127.0.0.4"
PROXY2_IP = "127.0.0.5"


@pytest.fixture
async def caller() -> AsyncIterator[SipUA]:
    async with SipUA(CALLER_IP, user="carrier", password="secret") as ua:
        yield ua
    assert not [e for e in ua.errors if not isinstance(e, OSError)], ua.errors


@pytest.fixture
async def callee() -> AsyncIterator[SipUA]:
    async with SipUA(CALLEE_IP, user="2001") as ua:
        yield ua
    assert not [e for e in ua.errors if not isinstance(e, OSError)], ua.errors


def methods(ua: SipUA) -> list[str]:
    return [m.method or "" for m in ua.requests]


# ---------------------------------------------------------------------------
# Parser / builder
# ---------------------------------------------------------------------------

RAW = (
    b"SIP/2.0 200 OK\r\n"
    b"v: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKp1, SIP/2.0/UDP 127.0.0.3:5070"
    b";branch=z9hG4bKa1;rport=5070\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx\r\n"
    b'f: "Doe, \\"J\\" <x>" <sip:1001@127.0.0.1>;tag=abc\r\n'
    b"t: <sip:2001@127.0.0.1>;tag=def\r\n"
    b"i: cid-1@h\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"Record-Route: <sip:127.0.0.1;lr;ftag=abc>, <sip:10.0.0.9;lr>\r\n"
    b'Record-Route: "a,b" <sip:10.0.0.8;lr>\r\n'
    b"m: <sip:2001@127.0.0.2:5099>\r\n"
    b"c: application/sdp\r\n"
    b"X-Folded: one\r\n two\r\n"
    b"l: 4\r\n"
    b"\r\n"
    b"v=0\r\nEXTRA"
)


def test_parse_compact_multi_and_quoted() -> None:
    m = SipMessage.parse(RAW)
    assert not m.is_request and m.status == 200 and m.reason == "OK"
    assert len(m.vias) == 3
    assert m.branch == "z9hG4bKp1"
    assert parse_via(m.vias[1]).params["rport"] == "5070"
    assert m.get("from") == '"Doe, \\"J\\" <x>" <sip:1001@127.0.0.1>;tag=abc'
    assert m.from_tag == "abc" and m.to_tag == "def"
    assert parse_name_addr(m.get("from") or "").uri == "sip:1001@127.0.0.1"
    assert m.call_id == "cid-1@h" and m.cseq == (7, "INVITE")
    assert m.values("record-route") == [
        "<sip:127.0.0.1;lr;ftag=abc>",
        "<sip:10.0.0.9;lr>",
        '"a,b" <sip:10.0.0.8;lr>',
    ]
    assert m.contact_uri == "sip:2001@127.0.0.2:5099"
    assert m.get("Content-Type") == "application/sdp"
    assert m.get("x-folded") == "one two"
    assert m.body == b"v=0\r"  # Content-Length honoured
    assert m.raw == RAW
    u = parse_uri("sip:2001@127.0.0.2:5099;transport=udp")
    assert (u.user, u.host, u.port, u.dest) == ("2001", "127.0.0.2", 5099, ("127.0.0.2", 5099))
    assert parse_uri("sip:127.0.0.1;lr").params == {"lr": None}
    assert split_quoted('a, "b,c", <d,e>') == ["a", '"b,c"', "<d,e>"]
    assert parse_auth_params('Digest realm="r, x", nonce="n", qop="auth,auth-int"') == {
        "realm": "r, x",
        "nonce": "n",
        "qop": "auth,auth-int",
    }


def test_parse_request_and_bad_input() -> None:
    m = SipMessage.parse(b"\r\nOPTIONS sip:x@y SIP/2.0\nCall-ID: a\nCSeq: 1 OPTIONS\n\n")
    assert m.is_request and m.method == "OPTIONS" and m.uri == "sip:x@y" and m.body == b""
    for bad in (b"", b"HELLO\r\n\r\n", b"INVITE sip:x SIP/2.0\r\nno colon here\r\n\r\n"):
        with pytest.raises(ValueError):
            SipMessage.parse(bad)


def test_build_message_verbatim_and_content_length() -> None:
    hostile = b'From: "\xff\xfe \\" bad <sip:@>;tag=1'
    data = build_message("INVITE sip:a@b SIP/2.0", [("Via", "x"), hostile], b"body")
    assert hostile + b"\r\n" in data and data.endswith(b"Content-Length: 4\r\n\r\nbody")
    again = SipMessage.parse(data)
    assert again.get("from", "").encode("utf-8", "surrogateescape") == hostile[6:]
    # a caller-supplied (even wrong) Content-Length is kept and not duplicated
    data = build_message("MESSAGE sip:a@b SIP/2.0", ["l: 99"], b"x")
    assert b"Content-Length" not in data and b"l: 99\r\n" in data


# ---------------------------------------------------------------------------
# Calls, directly UAC -> UAS
# ---------------------------------------------------------------------------


async def test_answer_then_caller_bye(caller: SipUA, callee: SipUA) -> None:
    target = f"sip:5000@{CALLEE_IP}:{callee.port}"  # differs from the callee's Contact
    call = await caller.invite(target, proxy=callee.addr)
    assert await call.wait_final(3) == 200
    assert [r.status for r in call.provisionals] == [100, 180]
    assert call.final is not None and call.final.reason == "OK"
    inc = await callee.wait_invite(1)
    assert inc.request_uri == target
    assert inc.invite.branch == call.branch and inc.invite.branch.startswith("z9hG4bK")
    assert inc.source == caller.addr
    assert inc.invite.get("Max-Forwards") == "70"
    assert inc.invite.contact_uri == f"sip:carrier@{CALLER_IP}:{caller.port}"
    assert inc.invite.get("content-type") == "application/sdp" and inc.invite.body
    await inc.wait_acked(2)
    ack = inc.acks_received[0]
    assert ack.branch != call.branch  # 2xx ACK is a new transaction
    assert ack.uri == callee.contact_uri == f"sip:2001@{CALLEE_IP}:{callee.port}"
    assert ack.cseq == (1, "ACK") and ack.to_tag == inc.local_tag
    assert call.remote_tag == inc.local_tag and call.route_set == []
    assert await call.bye() == 200
    await inc.wait_ended(1)
    assert inc.bye_received.is_set()
    bye = inc.requests[-1]
    assert bye.method == "BYE" and bye.cseq == (2, "BYE") and bye.from_tag == call.local_tag
    assert bye.uri == callee.contact_uri and bye.get("to") == call.final.get("to")
    assert methods(callee) == ["INVITE", "ACK", "BYE"]
    assert len(callee.received) == 1


async def test_answer_then_callee_bye(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(f"2001@{CALLEE_IP}:{callee.port}")  # proxy defaults to URI
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    await inc.wait_acked(2)
    assert await inc.bye() == 200
    await call.wait_ended(1)
    bye = call.requests[-1]
    assert bye.method == "BYE"
    assert bye.uri == f"sip:carrier@{CALLER_IP}:{caller.port}"  # caller's Contact
    assert bye.from_tag == inc.local_tag and bye.to_tag == call.local_tag
    assert bye.get("from", "").startswith(f"<sip:2001@{CALLEE_IP}:{callee.port}>")


async def test_busy_acked_hop_by_hop(caller: SipUA, callee: SipUA) -> None:
    callee.on_invite = "busy"
    call = await caller.invite(callee.uri, proxy=callee.addr)
    assert await call.wait_final(3) == 486
    assert call.final is not None and call.final.reason == "Busy Here"
    inc = await callee.wait_invite(1)
    await inc.wait_acked(2)
    ack = inc.acks_received[0]
    assert ack.branch == call.branch and ack.uri == call.request_uri
    assert ack.cseq == (1, "ACK") and ack.to_tag == inc.local_tag
    assert call.ended.is_set()
    await asyncio.sleep(0.6)  # past T1: no retransmitted 486 since it was ACKed
    assert [r.status for r in call.responses] == [100, 486]


async def test_reject_with_reason_header(caller: SipUA, callee: SipUA) -> None:
    def policy(inc: IncomingCall) -> None:
        inc.reject(503, "Limit Reached", [("Reason", 'Q.850;cause=34;text="limit"')])

    callee.on_invite = policy
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 503
    assert call.final is not None
    assert call.final.reason == "Limit Reached"
    assert call.final.get("reason") == 'Q.850;cause=34;text="limit"'


async def test_cancel_while_ringing(caller: SipUA, callee: SipUA) -> None:
    callee.on_invite = "ring"
    call = await caller.invite(callee.uri)
    await call.wait_provisional(180, 2)
    assert await call.cancel() == 200
    assert await call.wait_final(2) == 487
    inc = await callee.wait_invite(1)
    assert inc.cancelled.is_set()
    await inc.wait_acked(2)
    assert methods(callee) == ["INVITE", "CANCEL", "ACK"]
    cancel = callee.requests[1]
    assert cancel.branch == call.branch and cancel.cseq == (1, "CANCEL")
    assert inc.answer() is False  # too late


async def test_manual_answer_in_ring_mode(caller: SipUA, callee: SipUA) -> None:
    callee.on_invite = "ring"
    call = await caller.invite(callee.uri)
    inc = await callee.wait_invite(1)
    await call.wait_provisional(180, 2)
    assert call.final is None
    assert inc.answer()
    assert await call.wait_final(2) == 200
    await inc.wait_acked(2)


async def test_reinvite_both_directions(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    await inc.wait_acked(2)
    assert await call.reinvite() == 200
    reinv = inc.requests[-1]
    assert reinv.method == "INVITE" and reinv.cseq == (2, "INVITE")
    assert reinv.to_tag == inc.local_tag
    for _ in range(50):
        if len(inc.acks_received) == 2:
            break
        await asyncio.sleep(0.01)
    assert [a.cseq for a in inc.acks_received] == [(1, "ACK"), (2, "ACK")]
    assert len(callee.received) == 1  # a re-INVITE is not a new call
    assert await inc.reinvite() == 200
    assert call.requests[-1].method == "INVITE"
    assert await call.bye() == 200


async def test_options_and_unknown_dialog(caller: SipUA, callee: SipUA) -> None:
    assert await caller.options(callee.uri) == 200
    resp = await caller.request(
        "BYE", callee.uri, extra_headers=[]
    )  # out-of-dialog BYE
    assert resp.status == 481


# ---------------------------------------------------------------------------
# Transaction behaviour
# ---------------------------------------------------------------------------


async def test_timer_a_retransmits_until_provisional(callee: SipUA) -> None:
    async with SipUA(CALLER_IP, user="fast", t1=0.05) as fast:
        callee.on_invite = "ignore"
        call = await fast.invite(callee.uri)
        await asyncio.sleep(0.4)  # 0.05 + 0.1 + 0.2 -> at least 3 retransmissions
        n = methods(callee).count("INVITE")
        assert n >= 4
        assert len(callee.received) == 1  # retransmissions are one call
        assert callee.incoming[0].st.retransmissions == n - 1
        callee.incoming[0].trying()
        await asyncio.sleep(0.1)
        n = methods(callee).count("INVITE")
        await asyncio.sleep(0.5)
        assert methods(callee).count("INVITE") == n  # stopped by the 100
        callee.incoming[0].reject(480)
        assert await call.wait_final(1) == 480


async def test_manual_retransmission_is_same_bytes_and_one_call(
    caller: SipUA, callee: SipUA
) -> None:
    callee.on_invite = "ring"
    call = await caller.invite(callee.uri)
    await call.wait_provisional(180, 2)
    call.retransmit()
    await asyncio.sleep(0.1)
    invites = [m for m in callee.requests if m.method == "INVITE"]
    assert len(invites) == 2 and invites[0].raw == invites[1].raw == call.invite_bytes
    assert len(callee.received) == 1 and callee.incoming[0].st.retransmissions == 1
    # counted raw, before the UAS's deduplication by branch
    assert callee.invite_count(call.call_id) == 2
    assert callee.invite_transactions(call.call_id) == [call.branch]
    assert callee.invite_count("no-such-call") == 0
    # the UAS answered the retransmission with its last response (the 180)
    assert [r.status for r in call.responses].count(180) == 2
    assert await call.cancel() == 200
    assert await call.wait_final(2) == 487


async def test_late_provisional_and_duplicate_2xx(caller: SipUA, callee: SipUA) -> None:
    def policy(inc: IncomingCall) -> None:
        inc.answer()
        inc.respond(180, force=True)  # reordered 180 after the 200
        inc.answer(body=b"")  # refused: already final
        inc.respond(200, force=True)  # duplicate 2xx

    callee.on_invite = policy
    call = await caller.invite(callee.uri)
    assert await call.wait_final(2) == 200
    await asyncio.sleep(0.1)
    assert [r.status for r in call.late_provisionals] == [180]
    assert call.status == 200
    assert call.acks_sent == 2  # each 2xx ACKed
    inc = callee.incoming[0]
    assert len(inc.acks_received) == 2
    assert inc.acks_received[0].raw == inc.acks_received[1].raw
    assert await call.bye() == 200


# ---------------------------------------------------------------------------
# Digest authentication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("proxy", "qop"), [(True, True), (True, False), (False, True)])
async def test_invite_digest_challenge(
    caller: SipUA, callee: SipUA, proxy: bool, qop: bool
) -> None:
    chal = DigestChallenger({"carrier": "secret"}, proxy=proxy, qop=qop)
    callee.on_invite = chal
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 200
    assert chal.challenges == 1 and chal.accepted == ["carrier"] and not chal.failures
    first, second = callee.received
    assert first.call_id == second.call_id and first.from_tag == second.from_tag
    assert (first.cseq, second.cseq) == ((1, "INVITE"), (2, "INVITE"))
    assert first.branch != second.branch
    name = "Proxy-Authorization" if proxy else "Authorization"
    assert name not in first and name in second
    p = parse_auth_params(second.get(name) or "")
    assert p["uri"] == call.request_uri and p["username"] == "carrier"
    assert (p.get("nc") == "00000001") is qop
    # the 407/401 was ACKed with the first INVITE's branch
    assert callee.incoming[0].acked.is_set()
    assert callee.incoming[0].acks_received[0].branch == first.branch
    assert [r.status for r in call.challenges] == [chal.status]
    assert await call.bye() == 200


async def test_invite_wrong_password_and_no_auth(caller: SipUA, callee: SipUA) -> None:
    chal = DigestChallenger({"carrier": "other"})
    callee.on_invite = chal
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 407  # second challenge is final
    assert chal.failures == ["bad response"] and len(callee.received) == 2
    call2 = await caller.invite(callee.uri, auth=False)
    assert await call2.wait_final(3) == 407
    assert len(callee.received) == 3


async def test_register_with_digest(caller: SipUA, callee: SipUA) -> None:
    callee.registrar = DigestChallenger({"carrier": "secret"}, proxy=False)
    resp = await caller.register(callee.addr, expires=60)
    assert resp.status == 200
    assert callee.registrar.accepted == ["carrier"]
    regs = [m for m in callee.requests if m.method == "REGISTER"]
    assert len(regs) == 2 and regs[0].call_id == regs[1].call_id
    assert regs[1].cseq[0] == regs[0].cseq[0] + 1
    assert regs[1].uri == "sip:127.0.0.1"
    assert callee.registrations == {"sip:carrier@127.0.0.1": f"<{caller.contact_uri}>"}
    assert regs[1].get("expires") == "60"
    resp = await caller.unregister(callee.addr)
    assert resp.status == 200 and callee.registrations == {}


def test_nonce_count_increments() -> None:
    ua = SipUA(user="u", password="p")
    chal = SipMessage.parse(
        b'SIP/2.0 401 Unauthorized\r\nWWW-Authenticate: Digest realm="r", nonce="n1", '
        b'qop="auth-int,auth", opaque="op"\r\n\r\n'
    )
    h1 = ua.authorization(chal, "REGISTER", "sip:r")
    h2 = ua.authorization(chal, "REGISTER", "sip:r")
    assert h1 is not None and h2 is not None and h1[0] == "Authorization"
    p1, p2 = parse_auth_params(h1[1]), parse_auth_params(h2[1])
    assert (p1["nc"], p2["nc"]) == ("00000001", "00000002") and p1["opaque"] == "op"

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1, ha2 = md5("u:r:p"), md5("REGISTER:sip:r")
    assert p1["response"] == md5(f"{ha1}:n1:00000001:{p1['cnonce']}:auth:{ha2}")


# ---------------------------------------------------------------------------
# Hostile headers
# ---------------------------------------------------------------------------

HOSTILE_FROMS = [
    '"Evil \\"Quote\\" \\\\ back, slash" <sip:666@127.0.0.3>;tag=h1',
    '"Ünïcødé 电话 ☎" <sip:777@127.0.0.3>;tag=h2',
    '"' + "A" * 8192 + '" <sip:888@127.0.0.3>;tag=h3',
    "<sip:127.0.0.3>;tag=h4",  # no user part
    '"unterminated <sip:999@127.0.0.3>;tag=h5',
]


@pytest.mark.parametrize(
    "from_header", HOSTILE_FROMS, ids=["quotes", "unicode", "8k", "nouser", "broken"]
)
async def test_hostile_from_passed_verbatim(
    caller: SipUA, callee: SipUA, from_header: str
) -> None:
    call = await caller.invite(
        callee.uri, from_header=from_header, extra_headers=["X-Evil: a\\b\"c", ("P-Test", "1")]
    )
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    assert inc.invite.get("from") == from_header
    assert b"\r\nFrom: " + from_header.encode() + b"\r\n" in inc.invite.raw
    assert inc.invite.get("x-evil") == 'a\\b"c' and inc.invite.get("p-test") == "1"
    assert call.final is not None and call.final.get("from") == from_header
    await inc.wait_acked(2)
    assert inc.acks_received[0].get("from") == from_header
    assert await call.bye() == 200
    assert inc.bye_received.is_set()


async def test_to_header_override_and_raw_send(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(callee.uri, to_header="<sip:someone-else@example.invalid>")
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    assert inc.invite.get("to") == "<sip:someone-else@example.invalid>"
    assert inc.request_uri == callee.uri
    assert await call.bye() == 200
    caller.send_raw(b"garbage\r\n\r\n", callee.addr)
    caller.send_raw(b"\r\n\r\n", callee.addr)  # keep-alive
    await asyncio.sleep(0.05)
    assert len(callee.errors) == 1 and callee.errors[0][0] == "parse"
    callee.errors.clear()


# ---------------------------------------------------------------------------
# Through a record-routing proxy
# ---------------------------------------------------------------------------


class MiniProxy(asyncio.DatagramProtocol):
    """Stateless, loose-routing, record-routing proxy for tests (not a SIP stack)."""

    def __init__(self, ip: str, next_hop: tuple[str, int] | None = None) -> None:
        self.ip = ip
        self.next_hop = next_hop  # where to send initial requests (else the R-URI)
        self.seen: list[SipMessage] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    @property
    def me(self) -> str:
        return f"{self.ip}:{self.port}"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        msg = SipMessage.parse(data)
        self.seen.append(msg)
        if not msg.is_request:
            vias = msg.vias[1:]
            nxt = parse_via(vias[0])
            dest = (nxt.params.get("received") or nxt.host, int(nxt.params.get("rport") or 0))
            rhdrs = [("Via", v) for v in vias]
            rhdrs += [(n, v) for n, v in msg.headers if n.lower() not in ("via", "v")]
            self.transport.sendto(build_message(msg.first_line, rhdrs, msg.body), dest)
            return
        routes = msg.values("route")
        if routes and self.me in routes[0]:
            routes = routes[1:]
        branch = "z9hG4bK" + hashlib.md5((msg.branch or "").encode()).hexdigest()[:16]
        hdrs: list[tuple[str, str]] = [("Via", f"SIP/2.0/UDP {self.me};branch={branch}")]
        first_via = True
        for n, v in msg.headers:
            if n.lower() in ("route", "max-forwards"):
                continue
            if n.lower() in ("via", "v") and first_via:
                first_via = False
                v = v.replace(";rport", "") + f";received={addr[0]};rport={addr[1]}"
            hdrs.append((n, v))
        hdrs.insert(1, ("Max-Forwards", "69"))
        hdrs[2:2] = [("Route", r) for r in routes]
        if msg.method == "INVITE" and msg.to_tag is None:
            hdrs.insert(1, ("Record-Route", f"<sip:{self.me};lr>"))
        if routes:
            dest = parse_uri(parse_name_addr(routes[0]).uri).dest
        elif self.next_hop is not None and msg.to_tag is None:
            dest = self.next_hop
        else:
            dest = parse_uri(msg.uri or "").dest
        self.transport.sendto(build_message(msg.first_line, hdrs, msg.body), dest)


async def test_route_set_through_two_record_routing_proxies(
    caller: SipUA, callee: SipUA
) -> None:
    loop = asyncio.get_running_loop()
    t2, p2 = await loop.create_datagram_endpoint(lambda: MiniProxy(PROXY2_IP), (PROXY2_IP, 0))
    t1, p1 = await loop.create_datagram_endpoint(
        lambda: MiniProxy(PROXY_IP, (PROXY2_IP, p2.port)), (PROXY_IP, 0)
    )
    rr1, rr2 = f"<sip:{p1.me};lr>", f"<sip:{p2.me};lr>"
    try:
        call = await caller.invite(f"sip:ext9@{CALLEE_IP}:{callee.port}", (PROXY_IP, p1.port))
        assert await call.wait_final(3) == 200
        inc = await callee.wait_invite(1)
        assert inc.invite.values("record-route") == [rr2, rr1]
        assert inc.source == (PROXY2_IP, p2.port)
        assert len(inc.invite.vias) == 3
        assert inc.route_set == [rr2, rr1]  # callee: not reversed
        assert call.route_set == [rr1, rr2]  # caller: reversed
        await inc.wait_acked(2)
        # the 2xx ACK went through both proxies, R-URI = callee Contact
        ack = next(m for m in p1.seen if m.method == "ACK")
        assert ack.uri == callee.contact_uri and ack.values("route") == [rr1, rr2]
        ack2 = next(m for m in p2.seen if m.method == "ACK")
        assert ack2.values("route") == [rr2]
        assert inc.acks_received[0].source == (PROXY2_IP, p2.port)
        assert not inc.acks_received[0].values("route")
        # callee hangs up: BYE via p2 then p1 to the caller's Contact
        assert await inc.bye() == 200
        bye = next(m for m in p2.seen if m.method == "BYE")
        assert bye.uri == caller.contact_uri and bye.values("route") == [rr2, rr1]
        assert call.requests[-1].source == (PROXY_IP, p1.port)
        assert call.bye_received.is_set()
        # a second call, cancelled through the proxies
        callee.on_invite = "ring"
        call2 = await caller.invite(callee.uri, proxy=(PROXY_IP, p1.port))
        await call2.wait_provisional(180, 2)
        assert await call2.cancel() == 200
        assert await call2.wait_final(2) == 487
        assert callee.incoming[1].cancelled.is_set()
        # and one answered, re-INVITEd and hung up by the caller
        callee.on_invite = "answer"
        call3 = await caller.invite(callee.uri, proxy=(PROXY_IP, p1.port))
        assert await call3.wait_final(2) == 200
        assert await call3.reinvite() == 200
        assert await call3.bye() == 200
        assert [m.method for m in p2.seen if m.is_request][-3:] == ["INVITE", "ACK", "BYE"]
    finally:
        t1.close()
        t2.close()


# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------


async def test_fifty_concurrent_calls(callee: SipUA) -> None:
    callee.answer_delay = 0.05
    uas = [SipUA(f"127.0.0.{10 + i}", user=f"c{i}") for i in range(50)]
    await asyncio.gather(*(ua.start() for ua in uas))
    try:
        calls = await asyncio.gather(*(ua.invite(callee.uri) for ua in uas))
        finals = await asyncio.gather(*(c.wait_final(5) for c in calls))
        assert finals == [200] * 50
        assert len(callee.received) == 50
        assert len({m.call_id for m in callee.received}) == 50
        assert {m.source for m in callee.received} == {ua.addr for ua in uas}
        byes = await asyncio.gather(*(c.bye() for c in calls))
        assert byes == [200] * 50
        assert all(inc.bye_received.is_set() for inc in callee.incoming)
        # and 50 calls from one UA at once
        calls = await asyncio.gather(*(uas[0].invite(callee.uri) for _ in range(50)))
        assert await asyncio.gather(*(c.wait_final(5) for c in calls)) == [200] * 50
        assert await asyncio.gather(*(c.bye() for c in calls)) == [200] * 50
    finally:
        await asyncio.gather(*(ua.close() for ua in uas))
    assert all(not ua.errors for ua in uas)


# ---------------------------------------------------------------------------
# Digest with qop=auth and nonce counting
# ---------------------------------------------------------------------------


def _challenge(qop: str | None, nonce: str = "n1", status: int = 407) -> SipMessage:
    name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    value = f'Digest realm="r", nonce="{nonce}", algorithm=MD5'
    if qop is not None:
        value += f', qop="{qop}"'
    return SipMessage.parse(f"SIP/2.0 {status} X\r\n{name}: {value}\r\n\r\n".encode())


@pytest.mark.parametrize("offered", ["auth", "auth,auth-int", "auth-int, auth", None])
def test_digest_answer_per_offered_qop(offered: str | None) -> None:
    ua = SipUA(user="u", password="p")
    hdr = ua.authorization(_challenge(offered), "INVITE", "sip:x@r")
    assert hdr is not None and hdr[0] == "Proxy-Authorization"
    p = parse_auth_params(hdr[1])
    if offered is None:  # RFC 2069: no qop, nc or cnonce
        assert not {"qop", "nc", "cnonce"} & set(p)
        return
    assert p["qop"] == "auth" and p["nc"] == "00000001" and len(p["cnonce"]) >= 8
    assert ", qop=auth" in hdr[1] and "nc=00000001" in hdr[1]  # unquoted, as RFC 2617
    # nc counts per nonce: the same nonce again is 2, a new nonce starts at 1
    again = parse_auth_params(ua.authorization(_challenge(offered), "INVITE", "sip:x@r")[1])  # type: ignore[index]
    other = parse_auth_params(ua.authorization(_challenge(offered, "n2"), "BYE", "sip:x@r")[1])  # type: ignore[index]
    assert (again["nc"], other["nc"]) == ("00000002", "00000001")
    assert again["cnonce"] != p["cnonce"]
    assert ua.nonce_count("n1") == 2 and ua.nonce_count("n2") == 1


def test_digest_auth_int_only_is_not_answered_with_auth() -> None:
    """auth-int alone is not supported: the UA falls back to no qop (the challenger
    then refuses it), it never claims qop=auth that was not offered."""
    ua = SipUA(user="u", password="p")
    hdr = ua.authorization(_challenge("auth-int"), "INVITE", "sip:x@r")
    assert hdr is not None and "qop" not in parse_auth_params(hdr[1])


def test_challenger_verifies_qop_nc_and_cnonce() -> None:
    chal = DigestChallenger({"u": "p"}, realm="r", qop="auth,auth-int")
    name, value = chal.challenge_header()
    assert name == "Proxy-Authenticate" and 'qop="auth,auth-int"' in value
    nonce = parse_auth_params(value)["nonce"]
    resp407 = SipMessage.parse(f"SIP/2.0 407 X\r\n{name}: {value}\r\n\r\n".encode())
    ua = SipUA(user="u", password="p")

    def req(hdr: tuple[str, str] | None) -> SipMessage:
        lines = "" if hdr is None else f"{hdr[0]}: {hdr[1]}\r\n"
        return SipMessage.parse(f"INVITE sip:x@r SIP/2.0\r\n{lines}\r\n".encode())

    first = ua.authorization(resp407, "INVITE", "sip:x@r")
    assert chal.verify(req(first)) == "u" and chal.nonces[nonce] == 1
    assert chal.verify(req(first)) is None and chal.failures == ["nc replay"]
    second = ua.authorization(resp407, "INVITE", "sip:x@r")  # nc=2 on the same nonce
    assert chal.verify(req(second)) == "u" and chal.nonces[nonce] == 2
    skipped = ua.authorization(resp407, "INVITE", "sip:x@r", nc=9)
    assert chal.verify(req(skipped)) == "u" and chal.nonces[nonce] == 9  # may skip ahead
    lower = ua.authorization(resp407, "INVITE", "sip:x@r", nc=5)
    assert chal.verify(req(lower)) is None and chal.failures[-1] == "nc replay"
    no_cnonce = ua.authorization(resp407, "INVITE", "sip:x@r", nc=10, cnonce="")
    assert chal.verify(req(no_cnonce)) is None and chal.failures[-1] == "cnonce missing"
    assert no_cnonce is not None
    bad_nc = (no_cnonce[0], no_cnonce[1].replace('cnonce=""', 'cnonce="c"').replace(
        "nc=0000000a", "nc=zz"))
    assert chal.verify(req(bad_nc)) is None and chal.failures[-1] == "bad nc"
    no_qop = ua.authorization(resp407, "INVITE", "sip:x@r", qop="")
    assert chal.verify(req(no_qop)) is None and chal.failures[-1] == "qop missing"
    int_qop = ua.authorization(resp407, "INVITE", "sip:x@r", qop="auth-int")
    assert chal.verify(req(int_qop)) is None and chal.failures[-1] == "bad qop"
    # a cnonce changes the response: a tampered cnonce is a bad response
    good = ua.authorization(resp407, "INVITE", "sip:x@r", nc=20)
    assert good is not None
    p = parse_auth_params(good[1])
    tampered = (good[0], good[1].replace(p["cnonce"], "0" * len(p["cnonce"])))
    assert chal.verify(req(tampered)) is None and chal.failures[-1] == "bad response"
    assert chal.verify(req(good)) == "u" and chal.nonces[nonce] == 20
    assert chal.verify(req(None)) is None  # no credentials at all


def test_challenger_without_qop_refuses_qop_answers() -> None:
    chal = DigestChallenger({"u": "p"}, realm="r", qop=False)
    name, value = chal.challenge_header()
    assert "qop" not in value
    resp407 = SipMessage.parse(f"SIP/2.0 407 X\r\n{name}: {value}\r\n\r\n".encode())
    ua = SipUA(user="u", password="p")
    hdr = ua.authorization(resp407, "INVITE", "sip:x@r")
    assert hdr is not None and "nc=" not in hdr[1]
    msg = SipMessage.parse(f"INVITE sip:x@r SIP/2.0\r\n{hdr[0]}: {hdr[1]}\r\n\r\n".encode())
    assert chal.verify(msg) == "u"
    forced = ua.authorization(resp407, "INVITE", "sip:x@r", qop="auth")
    assert forced is not None
    msg = SipMessage.parse(f"INVITE sip:x@r SIP/2.0\r\n{forced[0]}: {forced[1]}\r\n\r\n".encode())
    assert chal.verify(msg) is None and chal.failures == ["qop not offered"]


async def test_preemptive_auth_reuses_nonce_with_counting(caller: SipUA, callee: SipUA) -> None:
    chal = DigestChallenger({"carrier": "secret"}, qop="auth,auth-int")
    callee.on_invite = chal
    caller.preemptive_auth = True
    calls = []
    for _ in range(3):
        call = await caller.invite(callee.uri)
        assert await call.wait_final(3) == 200
        calls.append(call)
    assert chal.challenges == 1 and chal.accepted == ["carrier"] * 3 and not chal.failures
    sent = [parse_auth_params(m.get("proxy-authorization") or "") for m in callee.received]
    assert len(sent) == 4 and sent[0] == {}  # challenged once, then nonce reused
    assert [p["nc"] for p in sent[1:]] == ["00000001", "00000002", "00000003"]
    assert len({p["nonce"] for p in sent[1:]}) == 1
    assert len({p["cnonce"] for p in sent[1:]}) == 3
    assert [len(c.challenges) for c in calls] == [1, 0, 0]
    # a replayed credential (nc 1 again) is refused, even with a valid response
    assert caller.last_challenge is not None
    replay = caller.authorization(caller.last_challenge, "INVITE", callee.uri, nc=1)
    assert replay is not None
    forged = await caller.invite(callee.uri, extra_headers=[replay], auth=False)
    caller.preemptive_auth = False
    assert await forged.wait_final(3) == 407
    assert "nc replay" in chal.failures
    for c in calls:
        assert await c.bye() == 200


async def test_stale_nonce_is_answered_with_a_new_one(caller: SipUA, callee: SipUA) -> None:
    chal = DigestChallenger({"carrier": "secret"}, stale_after=1)
    callee.on_invite = chal
    caller.preemptive_auth = True
    first = await caller.invite(callee.uri)
    assert await first.wait_final(3) == 200
    second = await caller.invite(callee.uri)  # reused nonce refused with stale=true
    assert await second.wait_final(3) == 200
    assert chal.failures == ["nonce used up"] and chal.challenges == 2
    assert second.challenges and "stale=true" in (
        second.challenges[0].get("proxy-authenticate") or ""
    )
    nonces = [parse_auth_params(m.get("proxy-authorization") or "").get("nonce")
              for m in callee.received]
    assert nonces[1] == nonces[2] != nonces[3]
    assert parse_auth_params(callee.received[3].get("proxy-authorization") or "")["nc"] == (
        "00000001"
    )
    assert await first.bye() == 200 and await second.bye() == 200


async def test_register_preemptive_with_qop(caller: SipUA, callee: SipUA) -> None:
    callee.registrar = DigestChallenger({"carrier": "secret"}, proxy=False, qop="auth")
    caller.preemptive_auth = True
    assert (await caller.register(callee.addr, expires=60)).status == 200
    assert (await caller.register(callee.addr, expires=60)).status == 200
    regs = [m for m in callee.requests if m.method == "REGISTER"]
    assert len(regs) == 3 and "authorization" not in regs[0]
    assert [parse_auth_params(m.get("authorization") or "")["nc"] for m in regs[1:]] == [
        "00000001",
        "00000002",
    ]
    assert callee.registrar.challenges == 1


# ---------------------------------------------------------------------------
# Forged requests, CANCEL at any moment, replayed INVITEs
# ---------------------------------------------------------------------------


async def test_request_raw_forged_in_dialog(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    await inc.wait_acked(2)
    routes = ["<sip:10.9.9.9;lr;ftag=zz>", "<sip:10.9.9.8;lr>"]
    # a made-up To tag: the UAS does not know that dialog
    status = await caller.request_raw(
        "BYE",
        callee.contact_uri,
        callee.addr,
        call.call_id,
        call.local_tag,
        "made-up",
        50,
        routes=routes,
        extra_headers=[("X-Attack", "1")],
    )
    assert status == 481 and not inc.ended.is_set()
    forged = callee.requests[-1]
    assert forged.method == "BYE" and forged.uri == callee.contact_uri
    assert forged.get_all("route") == routes and forged.get("x-attack") == "1"
    assert forged.to_tag == "made-up" and forged.from_tag == call.local_tag
    assert forged.cseq == (50, "BYE") and forged.call_id == call.call_id
    assert "contact" not in forged
    # wrong Call-ID, right tags: unknown too
    assert (
        await caller.request_raw(
            "INFO", callee.contact_uri, callee.addr, "other@x", call.local_tag, inc.local_tag, 51
        )
        == 481
    )
    # a forged re-INVITE to an unknown dialog is refused and ACKed hop by hop
    resp = await caller.request_raw_response(
        "INVITE", callee.contact_uri, callee.addr, call.call_id, "evil", inc.local_tag, 52,
        body=b"v=0\r\n",
    )
    assert resp.status == 481
    # the right identifiers end the real dialog
    status = await caller.request_raw(
        "BYE", callee.contact_uri, callee.addr, call.call_id, call.local_tag, inc.local_tag, 53
    )
    assert status == 200 and inc.bye_received.is_set()


async def test_request_raw_invite_and_verbatim_headers(caller: SipUA, callee: SipUA) -> None:
    resp = await caller.request_raw_response(
        "INVITE",
        callee.uri,
        callee.addr,
        "forged-1@x",
        "ft1",
        None,
        7,
        body=b"v=0\r\n",
        from_header='"x" <sip:victim@example.invalid>;tag=ft1',
    )
    assert resp.status == 200 and resp.to_tag
    inc = await callee.wait_invite(1)
    assert inc.invite.get("from") == '"x" <sip:victim@example.invalid>;tag=ft1'
    assert inc.invite.contact_uri == caller.contact_uri and inc.invite.cseq == (7, "INVITE")
    await inc.wait_acked(2)  # the 2xx was ACKed end to end
    ack = inc.acks_received[0]
    assert ack.cseq == (7, "ACK") and ack.to_tag == inc.local_tag and ack.branch != resp.branch
    callee.on_invite = 486
    resp = await caller.request_raw_response(
        "INVITE", callee.uri, callee.addr, "forged-2@x", "ft2", None, 1
    )
    assert resp.status == 486
    inc2 = await callee.wait_invite(1)
    await inc2.wait_acked(2)
    assert inc2.acks_received[0].branch == resp.branch  # non-2xx: hop by hop
    with pytest.raises(ValueError):
        await caller.request_raw("ACK", callee.uri, callee.addr, "x", "a", "b", 1)
    data, branch = caller.build_request_raw(
        "OPTIONS", callee.uri, "o@x", None, None, 3, cseq_method="BYE", max_forwards=0
    )
    m = SipMessage.parse(data)
    assert m.branch == branch and m.cseq == (3, "BYE") and m.from_tag is None
    assert m.get("max-forwards") == "0"


async def test_cancel_forced_before_any_response(caller: SipUA, callee: SipUA) -> None:
    callee.on_invite = "ignore"
    call = await caller.invite(callee.uri)
    assert await call.cancel(force=True) == 200  # no provisional awaited
    assert await call.wait_final(2) == 487
    cancel = next(m for m in callee.requests if m.method == "CANCEL")
    assert cancel.branch == call.branch and cancel.cseq == (1, "CANCEL")
    assert cancel.uri == call.request_uri and cancel.to_tag is None
    assert call.cancels_sent == 1


async def test_cancel_forced_after_200_changes_nothing(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 200
    inc = await callee.wait_invite(1)
    assert await call.cancel() is None  # the polite CANCEL sends nothing now
    assert await call.cancel(force=True) == 200  # the UAS answers the CANCEL itself
    call.send_cancel()  # a fire-and-forget one too
    await asyncio.sleep(0.05)
    cancels = [m for m in callee.requests if m.method == "CANCEL"]
    assert len(cancels) == 2 and all(m.branch == call.branch for m in cancels)
    assert not inc.cancelled.is_set() and not inc.ended.is_set()
    assert await call.bye() == 200


async def test_cancel_with_digest_uses_the_authenticated_branch(
    caller: SipUA, callee: SipUA
) -> None:
    callee.on_invite = DigestChallenger({"carrier": "secret"}, then="ring")
    call = await caller.invite(callee.uri)
    await call.wait_provisional(180, 2)
    assert await call.cancel(force=True) == 200
    assert await call.wait_final(2) == 487
    invites = callee.raw_invites(call.call_id)
    cancel = next(m for m in callee.requests if m.method == "CANCEL")
    assert cancel.branch == invites[-1].branch == call.branch != invites[0].branch
    assert cancel.cseq == (2, "CANCEL")


async def test_replay_invite_same_bytes_and_new_branch(caller: SipUA, callee: SipUA) -> None:
    call = await caller.invite(callee.uri)
    assert await call.wait_final(3) == 200
    assert await call.bye() == 200
    # byte for byte: the UAS's server transaction still exists, it repeats its 200
    resp = await call.replay_invite()
    assert resp.status == 200 and call.replays == [call.invite_bytes]
    assert callee.invite_count(call.call_id) == 2
    assert callee.invite_transactions(call.call_id) == [call.branch]
    assert callee.raw_invites(call.call_id)[1].raw == call.invite_bytes
    assert len(callee.incoming) == 1
    # a new branch: a new transaction at the UAS, here refused
    callee.on_invite = 487
    resp = await call.replay_invite(new_branch=True)
    assert resp.status == 487 and resp.branch != call.branch
    assert callee.invite_count(call.call_id) == 3
    assert len(callee.invite_transactions(call.call_id)) == 2
    again = callee.raw_invites(call.call_id)[2]
    assert again.call_id == call.call_id and again.from_tag == call.local_tag
    assert again.cseq == (1, "INVITE")
    assert again.raw.replace(_b(resp.branch or ""), _b(call.branch)) == call.invite_bytes
    inc = callee.incoming[-1]
    await inc.wait_acked(2)
    assert inc.acks_received[0].branch == resp.branch
    assert call.final is not None and call.final.status == 200  # the call's state is kept
    assert callee.invite_count(call.call_id, initial_only=False) == 3
