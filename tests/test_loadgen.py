"""The benchmark's load generator (bench/loadgen.py driving bench/sipload.c): the instrument
the speed figures are read from, so it is checked against its own callee and the Python
workers, and through a lossy, refusing relay that makes it retransmit and fail calls."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import loadgen  # noqa: E402


@pytest.fixture(scope="module")
def sipload() -> str:
    binary = loadgen.build_sipload()
    assert binary is not None, "bench/sipload.c does not build (a C compiler is installed by " \
        "scripts/install-system.sh)"
    return binary


@pytest.mark.parametrize(("uac", "uas"), [("c", "c"), ("c", "python"), ("python", "c")])
def test_calls_complete_between_callers_and_callee(sipload: str, uac: str, uas: str) -> None:
    """The callers talk straight to the callee (it is their "proxy"): every call is answered,
    ACKed, held and hung up, whichever implementation is on either side."""
    callee = loadgen.LoadGen(0, uas_ip="127.0.0.3", impl=uas)
    callers = loadgen.LoadGen(2, uac_ip="127.0.0.2", uas_ip="127.0.0.4", impl=uac)
    try:
        assert (callee.impl, callers.impl) == (uas, uac)
        r = callers.step(callee.uas_addr, rate=200, duration=1.0, hold=0.2, timeout=4)
        stats = callee.uas_stats()
    finally:
        callers.close()
        callee.close()
    assert (r.sent, r.answered, r.completed, r.failed) == (200, 200, 200, 0), r.failures
    assert len(r.lat) == 200 and r.lat == sorted(r.lat) and r.lat[-1] < 1.0
    assert (r.invite_rtx, r.bye_rtx) == (0, 0)
    assert 150 < r.send_rate < 260
    assert stats["invites"] == stats["acks"] == stats["byes"] == 200


class Relay(asyncio.DatagramProtocol):
    """A proxy between one caller and the callee that loses the first INVITE and the first
    BYE of every call, and answers every fifth call itself with a final refusal whose reason
    phrase holds a quote and a backslash (which the results' JSON must carry)."""

    REFUSAL = 'Busy "Here" \\ now'

    def __init__(self, uas: tuple[str, int]) -> None:
        self.uas = uas
        self.caller: tuple[str, int] | None = None
        self.seen: Counter[bytes] = Counter()
        self.acks_of_refusals = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.uas:
            if self.caller is not None:
                self.transport.sendto(data, self.caller)
            return
        self.caller = addr
        method = data.split(b" ", 1)[0]
        i = data.index(b"\r\nCall-ID: ") + 11
        cid = data[i:data.index(b"\r\n", i)]
        number = int(cid.rsplit(b"-", 1)[1])
        self.seen[method + b" " + cid] += 1
        refused = number % 5 == 0
        if method == b"INVITE" and refused:
            if self.seen[method + b" " + cid] == 1:
                return  # lost
            head = data[:data.index(b"\r\n\r\n")].split(b"\r\n")[1:]
            keep = [h for h in head if h.split(b":")[0] in (b"Via", b"From", b"Call-ID",
                                                             b"CSeq")]
            to = next(h for h in head if h.startswith(b"To:"))
            self.transport.sendto(
                b"SIP/2.0 486 " + self.REFUSAL.encode() + b"\r\n" + b"\r\n".join(keep)
                + b"\r\n" + to + b";tag=r\r\nContent-Length: 0\r\n\r\n", addr)
            return
        if method == b"ACK" and refused:
            self.acks_of_refusals += 1
            return
        if method in (b"INVITE", b"BYE") and self.seen[method + b" " + cid] == 1:
            return  # lost
        self.transport.sendto(data, self.uas)


@contextmanager
def relay(uas: tuple[str, int]) -> Iterator[tuple[Relay, tuple[str, int]]]:
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.5", 0))
    proto = Relay(uas)
    loop.run_until_complete(loop.create_datagram_endpoint(lambda: proto, sock=sock))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield proto, sock.getsockname()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        sock.close()
        loop.close()


@pytest.mark.parametrize("impl", ["c", "python"])
def test_lost_messages_are_retransmitted_and_refusals_counted(sipload: str, impl: str) -> None:
    """Timers A and E recover every lost INVITE and BYE (one retransmission each, 0.5 s
    later), a refusal is a failed call under its status and reason and is ACKed."""
    callee = loadgen.LoadGen(0, uas_ip="127.0.0.3", impl="c")
    callers = loadgen.LoadGen(1, uac_ip="127.0.0.2", uas_ip="127.0.0.4", impl=impl)
    try:
        with relay(callee.uas_addr) as (proto, addr):
            r = callers.step(addr, rate=50, duration=1.0, hold=0.1, timeout=4)
            refusal_acks = proto.acks_of_refusals
    finally:
        callers.close()
        callee.close()
    assert r.sent == 50
    assert r.failures == Counter({f"486 {Relay.REFUSAL}": 10})
    assert (r.answered, r.completed) == (40, 40)
    assert (r.invite_rtx, r.bye_rtx) == (50, 40)
    assert refusal_acks == 10
    assert all(0.45 < t < 1.0 for t in r.lat)  # each answered after one retransmission
