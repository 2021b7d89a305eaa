"""tests/udp_relay.py on its own: two plain UDP sockets (a client and a fake proxy), no
Kamailio."""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from tests.udp_relay import UdpRelay, call_id_of, request_method, top_branch

Addr = tuple[str, int]


class Sock:
    """A plain UDP socket driven from the event loop."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind((ip, 0))
        self.s.setblocking(False)
        self.addr: Addr = self.s.getsockname()

    def send(self, data: bytes, to: Addr) -> None:
        self.s.sendto(data, to)

    async def recv(self, timeout: float = 1.0) -> tuple[bytes, Addr]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.s, 65535), timeout)
        return data, (addr[0], addr[1])

    async def nothing(self, timeout: float = 0.2) -> bool:
        """True when nothing arrives within timeout."""
        try:
            await self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.s.close()


def req(method: str, branch: str, call_id: str = "c1@x", compact: bool = False) -> bytes:
    via, cid = ("v", "i") if compact else ("Via", "Call-ID")
    return (
        f"{method} sip:b@example.test SIP/2.0\r\n"
        f"{via}: SIP/2.0/UDP 127.0.0.2:5070;rport;branch={branch}\r\n"
        "From: <sip:a@example.test>;tag=1\r\n"
        "To: <sip:b@example.test>;tag=2\r\n"
        f"{cid}: {call_id}\r\n"
        f"CSeq: 2 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def resp(code: int, branch: str) -> bytes:
    return (
        f"SIP/2.0 {code} OK\r\nVia: SIP/2.0/UDP 127.0.0.2:5070;branch={branch}\r\n"
        "Call-ID: c1@x\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
async def server() -> AsyncIterator[Sock]:
    s = Sock()
    yield s
    s.close()


def test_parsing_helpers() -> None:
    assert request_method(req("BYE", "z9hG4bKa")) == "BYE"
    assert request_method(resp(200, "z9hG4bKa")) is None
    assert request_method(b"\x00\x01garbage") is None
    assert top_branch(req("BYE", "z9hG4bKa")) == "z9hG4bKa"
    assert top_branch(req("BYE", "z9hG4bKb", compact=True)) == "z9hG4bKb"
    assert call_id_of(req("BYE", "z9hG4bKa", "abc@h")) == "abc@h"
    assert call_id_of(req("BYE", "z9hG4bKa", "abc@h", compact=True)) == "abc@h"


async def test_relays_both_ways_with_one_socket_per_client(server: Sock) -> None:
    a, b = Sock("127.0.0.1"), Sock("127.0.0.2")
    try:
        async with UdpRelay(server.addr) as relay:
            a.send(req("INVITE", "z9hG4bK1"), relay.addr)
            data, src_a = await server.recv()
            assert data == req("INVITE", "z9hG4bK1")
            assert src_a[0] == "127.0.0.1" and src_a != relay.addr
            b.send(req("INVITE", "z9hG4bK2"), relay.addr)
            data, src_b = await server.recv()
            assert src_b[0] == "127.0.0.2"  # the proxy still sees the client's source IP
            assert src_b != src_a
            # answers (and requests the proxy starts) go back to the right client
            server.send(resp(200, "z9hG4bK2"), src_b)
            data, frm = await b.recv()
            assert data == resp(200, "z9hG4bK2") and frm == relay.addr
            server.send(req("BYE", "z9hG4bKsrv"), src_a)
            data, _ = await a.recv()
            assert request_method(data) == "BYE"
            assert await b.nothing()
            # the mapping is stable: a second datagram of a uses the same socket
            a.send(b"\r\n\r\n", relay.addr)  # keep-alive, not SIP: relayed as is
            data, src = await server.recv()
            assert data == b"\r\n\r\n" and src == src_a
            assert relay.stats.to_upstream == 3 and relay.stats.to_client == 2
            assert relay.stats.dropped == 0
    finally:
        a.close()
        b.close()


async def test_lost_transaction_stays_lost_retransmissions_included(server: Sock) -> None:
    a = Sock()
    try:
        async with UdpRelay(
            server.addr, drop=lambda m, _d: m == "BYE", probability=1.0, seed=1
        ) as relay:
            a.send(req("INVITE", "z9hG4bKi"), relay.addr)
            assert request_method((await server.recv())[0]) == "INVITE"
            for _ in range(4):  # the BYE and its retransmissions
                a.send(req("BYE", "z9hG4bKbye", "lost@h"), relay.addr)
            assert await server.nothing(0.3)
            assert relay.stats.dropped == 4
            assert relay.stats.dropped_transactions == 1
            assert relay.dropped_call_ids == ["lost@h"]
            assert relay.stats.by_method == {"BYE": 4}
            # responses are never dropped, whatever the predicate
            server.send(resp(200, "z9hG4bKi"), (await _any_client_src(relay)))
            assert (await a.recv())[0] == resp(200, "z9hG4bKi")
    finally:
        a.close()


async def _any_client_src(relay: UdpRelay) -> Addr:
    (t,) = relay.clients.values()
    host, port = t.get_extra_info("sockname")[:2]
    return (host, port)


async def test_kept_transaction_keeps_its_retransmissions(server: Sock) -> None:
    a = Sock()
    try:
        async with UdpRelay(
            server.addr, drop=lambda m, _d: m == "BYE", probability=0.0, seed=1
        ) as relay:
            for _ in range(3):
                a.send(req("BYE", "z9hG4bKkeep"), relay.addr)
            for _ in range(3):
                assert request_method((await server.recv())[0]) == "BYE"
            assert relay.stats.matched_transactions == 1
            assert relay.stats.dropped == 0
    finally:
        a.close()


async def test_seeded_probability_is_per_transaction_and_reproducible(server: Sock) -> None:
    """p = 5 % over 2000 BYE transactions sent twice each (original + retransmission): about
    100 lost, both copies of each lost one lost, the same ones for the same seed."""
    a = Sock()
    n = 2000
    lost: list[list[str]] = []
    try:
        for _ in range(2):
            async with UdpRelay(
                server.addr, drop=lambda m, _d: m == "BYE", probability=0.05, seed=42
            ) as relay:
                # decisions are made on the event loop as datagrams arrive: feed them directly
                for i in range(n):
                    for _copy in range(2):
                        relay._from_client(req("BYE", f"z9hG4bK{i}", f"c{i}@h"), a.addr)
                    relay._from_client(req("INVITE", f"z9hG4bKinv{i}"), a.addr)
                await asyncio.sleep(0.05)
                assert relay.stats.matched_transactions == n  # INVITEs never matched
                assert relay.stats.dropped == 2 * relay.stats.dropped_transactions
                assert 50 <= relay.stats.dropped_transactions <= 160
                lost.append(list(relay.dropped_call_ids))
            # drain what reached the server
            while not await server.nothing(0.05):
                pass
        assert lost[0] == lost[1]
    finally:
        a.close()


async def test_upstream_down_is_harmless(server: Sock) -> None:
    dead = Sock()
    dead_addr = dead.addr
    dead.close()
    a = Sock()
    try:
        async with UdpRelay(dead_addr) as relay:
            for _ in range(3):
                a.send(req("OPTIONS", "z9hG4bKo"), relay.addr)
                await asyncio.sleep(0.02)
            assert relay.stats.to_upstream == 3
    finally:
        a.close()
