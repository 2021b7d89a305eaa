"""A small asyncio UDP relay that loses chosen SIP requests, for chaos tests.

Placed between SIP user agents and a proxy: the agents send to ``relay.addr``, the relay
forwards each datagram to ``upstream`` from a socket of its own per client address (bound to
the client's IP, so the proxy still sees the client's source IP), and whatever the proxy sends
to that socket goes back to that client, from ``relay.addr``::

    relay = UdpRelay(kamailio_addr, drop=lambda method, data: method == "BYE",
                     probability=0.05, seed=7)
    await relay.start()
    ...                                   # agents send to relay.addr
    relay.dropped_call_ids                # Call-IDs of the requests that were lost
    await relay.close()

A request matched by ``drop`` is lost with ``probability``, decided once per transaction
(top Via branch + method) with a seeded RNG: every retransmission of a lost request is lost
too, so the request really never reaches the proxy, and every retransmission of a kept one
goes through. Responses and anything the proxy sends are always relayed.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Addr = tuple[str, int]
DropPredicate = Callable[[str, bytes], bool]

_REQUEST_LINE = re.compile(rb"^\s*([A-Za-z]+) \S+ SIP/2\.0\r?\n")
_VIA = re.compile(rb"^(?:via|v)[ \t]*:[^\r\n]*?;[ \t]*branch[ \t]*=[ \t]*([^;, \t\r\n]+)",
                  re.I | re.M)
_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.I | re.M)


def request_method(data: bytes) -> str | None:
    """The method of a SIP request datagram, None for a response or garbage."""
    m = _REQUEST_LINE.match(data)
    return m.group(1).decode("ascii").upper() if m else None


def top_branch(data: bytes) -> str | None:
    """The branch parameter of the first Via line, if any."""
    m = _VIA.search(data)
    return m.group(1).decode("utf-8", "replace") if m else None


def call_id_of(data: bytes) -> str | None:
    m = _CALL_ID.search(data)
    return m.group(1).decode("utf-8", "replace") if m else None


@dataclass
class RelayStats:
    to_upstream: int = 0  # datagrams forwarded client -> upstream
    to_client: int = 0  # datagrams relayed upstream -> client
    dropped: int = 0  # datagrams lost (retransmissions included)
    matched_transactions: int = 0  # transactions the predicate matched (kept or lost)
    dropped_transactions: int = 0  # transactions lost
    by_method: dict[str, int] = field(default_factory=dict)  # datagrams lost per method


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes, Addr], None]) -> None:
        self.on_data = on_data

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_data(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: the peer is down
        pass


class UdpRelay:
    def __init__(
        self,
        upstream: Addr,
        *,
        listen: Addr = ("127.0.0.1", 0),
        drop: DropPredicate | None = None,
        probability: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.drop = drop
        self.probability = probability
        self.rng = random.Random(seed)
        self.stats = RelayStats()
        self.decisions: dict[tuple[str, str], bool] = {}  # (branch, method) -> lost
        self.dropped_call_ids: list[str] = []  # one per lost transaction, in order
        self.clients: dict[Addr, asyncio.DatagramTransport] = {}
        self._front: asyncio.DatagramTransport | None = None
        self._pending: dict[Addr, list[bytes]] = {}

    @property
    def addr(self) -> Addr:
        assert self._front is not None, "relay not started"
        host, port = self._front.get_extra_info("sockname")[:2]
        return (host, port)

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(self._from_client), local_addr=self.listen
        )
        return self

    async def close(self) -> None:
        for t in self.clients.values():
            t.close()
        self.clients.clear()
        if self._front is not None:
            self._front.close()
            self._front = None

    async def __aenter__(self) -> UdpRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- decisions ---------------------------------------------------------
    def _lose(self, data: bytes) -> bool:
        if self.drop is None:
            return False
        method = request_method(data)
        if method is None or not self.drop(method, data):
            return False
        key = (top_branch(data) or "", method)
        lost = self.decisions.get(key)
        if lost is None:
            lost = self.rng.random() < self.probability
            self.decisions[key] = lost
            self.stats.matched_transactions += 1
            if lost:
                self.stats.dropped_transactions += 1
                self.dropped_call_ids.append(call_id_of(data) or "")
        if lost:
            self.stats.dropped += 1
            self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
        return lost

    # -- plumbing ----------------------------------------------------------
    def _from_client(self, data: bytes, client: Addr) -> None:
        if self._lose(data):
            return
        t = self.clients.get(client)
        if t is not None:
            self.stats.to_upstream += 1
            t.sendto(data, self.upstream)
            return
        pending = self._pending.get(client)
        if pending is not None:  # its upstream socket is being opened
            pending.append(data)
            return
        self._pending[client] = [data]
        asyncio.get_running_loop().create_task(self._open(client))

    async def _open(self, client: Addr) -> None:
        loop = asyncio.get_running_loop()

        def back(data: bytes, _src: Addr) -> None:
            if self._front is not None:
                self.stats.to_client += 1
                self._front.sendto(data, client)

        try:
            t, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(back), local_addr=(client[0], 0)
            )
        except OSError:  # the client's IP is not ours to bind: use the listener's
            t, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(back), local_addr=(self.listen[0], 0)
            )
        if self._front is None:  # closed meanwhile
            t.close()
            return
        self.clients[client] = t
        for data in self._pending.pop(client, []):
            self.stats.to_upstream += 1
            t.sendto(data, self.upstream)
