"""The call-control endpoints on a lean HTTP/1.1 front end, in front of aiohttp, on the same
port.

Kamailio asks once per call (POST /v1/control/admit) and posts its outbox's batches (POST
/v1/control/events). aiohttp's own request and response machinery costs about 60 us of CPU
per request on this kind of machine (76 us for a handler that answers a constant, 15 us for
this front end: bench/RESULTS.md), which at a thousand calls a second is a tenth of a core
that decides nothing. So every connection starts here:

- a request this front end knows how to take (`POST` to one of the control paths, HTTP/1.1,
  a Content-Length, no Transfer-Encoding, headers in plain form) is parsed here and answered
  by the very handlers aiohttp routes to (control.py), with the same JSON error shape, the
  same failure mapping (app.failure_response) and the same request metrics;
- on the first request it does not take (the admin API, /health, /metrics, the UI, another
  method, a chunked body, anything unusual or malformed), the connection is handed, with
  every byte it has received, to aiohttp's own protocol, which answers it and everything
  after it on that connection as it always did.

Requests of one connection are answered in order, one at a time (Kamailio's libcurl sends
one at a time anyway). `Expect: 100-continue` is answered. A body above its route's limit is
refused with the handler's own 413, and the connection closed (its body is not read).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import control
from .app import failure_response
from .errors import ApiError, api_error_response
from .state import METRICS

log = logging.getLogger("sidecar.control_http")

Handler = Callable[[Any], Awaitable[web.Response]]

# path -> (handler, largest body it reads): the limits are the handlers' own (a larger
# Content-Length is refused by the handler's first check, before any body is read).
ROUTES: dict[bytes, tuple[Handler, int]] = {
    b"/v1/control/admit": (control.admit, control.CONTROL_BODY_MAX),
    b"/v1/control/answer": (control.answer, control.CONTROL_BODY_MAX),
    b"/v1/control/release": (control.release, control.CONTROL_BODY_MAX),
    b"/v1/control/events": (control.events, control.EVENTS_BODY_MAX),
    b"/v1/control/heartbeat": (control.heartbeat, control.HEARTBEAT_BODY_MAX),
}
# A request head (request line and headers) longer than this goes to aiohttp, whose limits
# and error answers apply.
_HEAD_MAX = 16 << 10
# Requests read ahead of their answers before a connection stops reading (a pipelining
# client); it reads again below _QUEUE_LOW.
_QUEUE_HIGH = 32
# A body larger than this is awaited only from a source the call-control API accepts.
_TRUST_FIRST = 64 << 10
_QUEUE_LOW = 8
_PREFIX = b"POST /v1/control/"
# A header line in plain form: a token, a colon, a value without control characters (no
# folding, no NUL, no bare CR or LF).
_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*")


class _Body:
    """The request's body, read at once (it has all arrived before the handler runs)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        data = self._data
        if n < 0 or n >= len(data):
            self._data = b""
            return data
        self._data = data[n:]
        return data[:n]


@dataclass(slots=True)
class ControlRequest:
    """A call-control request as the handlers read it (jsonio.Incoming)."""

    app: web.Application
    path: str
    headers: CIMultiDictProxy[str]
    remote: str | None
    content_length: int | None
    content: _Body

    @property
    def content_type(self) -> str:
        # As aiohttp says it: the media type, lower case, application/octet-stream if none.
        raw = self.headers.get("Content-Type")
        if raw is None:
            return "application/octet-stream"
        return raw.partition(";")[0].strip().lower()

    @property
    def body_exists(self) -> bool:
        return bool(self.content_length)


@dataclass(slots=True)
class _Parsed:
    path: bytes
    headers: CIMultiDictProxy[str]
    length: int
    head_end: int  # offset of the body in the buffer
    close: bool  # Connection: close
    expect_continue: bool


def parse_head(buf: bytes | bytearray) -> _Parsed | None | bool:
    """The head at the start of buf when this front end takes the request; None when more
    bytes are needed to tell; False when the request goes to aiohttp."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > _HEAD_MAX:
            return False
        # As soon as the start of the request line shows it is not ours, hand it over.
        n = min(len(buf), len(_PREFIX))
        return None if buf[:n] == _PREFIX[:n] else False
    if end > _HEAD_MAX:
        return False
    lines = bytes(buf[:end]).split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"POST" or version != b"HTTP/1.1" or target not in ROUTES:
        return False
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if _HEADER.fullmatch(line) is None:
            return False  # folded, malformed or odd: aiohttp's parser decides
        name, _, value = line.partition(b":")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    if "Transfer-Encoding" in headers:
        return False
    lengths = headers.getall("Content-Length", [])
    if len(lengths) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
        return False
    connection = headers.get("Connection", "").lower()
    expect = headers.get("Expect")
    if expect is not None and expect.lower() != "100-continue":
        return False
    return _Parsed(target, CIMultiDictProxy(headers), int(lengths[0]), end + 4,
                   "close" in connection, expect is not None)


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value (RFC 9110 wants one from a server with a clock), formatted
    once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def _head(status: int, response: web.Response, length: int, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             f"Content-Type: {response.content_type}", f"Content-Length: {length}",
             f"Date: {_http_date()}"]
    for name, value in response.headers.items():
        if name.lower() not in ("content-type", "content-length", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ControlProtocol(asyncio.Protocol):
    """One connection: control requests answered here, the rest handed to aiohttp."""

    def __init__(self, app: web.Application, fallback: Callable[[], asyncio.Protocol],
                 connections: set[ControlProtocol]) -> None:
        self._app = app
        self._fallback = fallback
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._ready: deque[tuple[_Parsed, bytes]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._handoff = False  # the next request goes to aiohttp once the queue is answered
        self._closing = False
        self._paused = False
        self._continued = False  # 100 Continue sent for the request at the head of _buf

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without deriving from it)
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A request being answered goes on to its end, as with aiohttp (a decision taken is
        # counted whether or not its answer can still be written); nothing more is read.
        self._connections.discard(self)
        self._closing = True
        self._ready.clear()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._take()

    # --- requests

    def _take(self) -> None:
        """Move every complete request of the buffer to the queue; start answering."""
        while not self._handoff and not self._closing:
            parsed = parse_head(self._buf)
            if parsed is None:
                break
            if parsed is False:
                self._handoff = True
                break
            assert isinstance(parsed, _Parsed)
            limit = ROUTES[parsed.path][1]
            if parsed.length > limit or (
                    parsed.length > _TRUST_FIRST and not self._trusted(parsed)):
                # The handler refuses it on its Content-Length, or its source (its first
                # check: no stranger gets a heartbeat's 32 MiB buffered, as with aiohttp,
                # which checks before reading); the body is never read.
                self._ready.append((parsed, b""))
                self._buf.clear()
                self._closing = True
                break
            end = parsed.head_end + parsed.length
            if len(self._buf) < end:
                if parsed.expect_continue and not self._continued and self._transport:
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._continued = True
                break
            self._continued = False
            body = bytes(self._buf[parsed.head_end:end])
            del self._buf[:end]
            self._ready.append((parsed, body))
            if parsed.close:
                self._closing = True
        if len(self._ready) >= _QUEUE_HIGH and self._transport and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        if self._task is None and (self._ready or self._handoff or self._closing):
            self._task = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        """Answer the queue in order (what arrives meanwhile joins it); then close, or hand
        the connection over, when that is what comes next."""
        try:
            while self._ready:
                parsed, body = self._ready.popleft()
                close = parsed.close or (self._closing and not self._ready)
                await self._respond(parsed, body, close)
            if self._closing:
                if self._transport is not None:
                    self._transport.close()
            elif self._handoff:
                self._hand_over()
        except asyncio.CancelledError:
            pass  # the connection is gone
        finally:
            self._task = None

    def _request(self, parsed: _Parsed, body: bytes) -> ControlRequest:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return ControlRequest(self._app, parsed.path.decode(), parsed.headers,
                              peer[0] if isinstance(peer, tuple) else None,
                              parsed.length, _Body(body))

    def _trusted(self, parsed: _Parsed) -> bool:
        try:
            control.check_source(self._request(parsed, b""))
        except ApiError:
            return False
        return True

    async def _respond(self, parsed: _Parsed, body: bytes, close: bool) -> None:
        handler = ROUTES[parsed.path][0]
        route = parsed.path.decode()
        transport = self._transport
        assert transport is not None
        request = self._request(parsed, body)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = api_error_response(exc)
        except Exception as exc:  # noqa: BLE001 - every failure gets the JSON error shape
            response = failure_response(self._app, route, route, exc)
        metrics = self._app[METRICS]
        metrics.child(metrics.requests, "POST", route, response.status).inc()
        payload = response.body
        assert isinstance(payload, bytes | bytearray)
        if transport.is_closing():
            return
        transport.write(_head(response.status, response, len(payload), close) + payload)
        if self._paused and len(self._ready) < _QUEUE_LOW:
            transport.resume_reading()
            self._paused = False

    def _hand_over(self) -> None:
        """aiohttp's protocol takes the connection, with the bytes not answered here."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._connections.discard(self)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            protocol.data_received(data)
        self._transport = None

    def close_when_idle(self) -> asyncio.Task[None] | None:
        """Shutdown: close now if nothing is being answered, else after the answer (the
        task answering it is returned)."""
        self._closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()
        return self._task


class ControlSite(web.TCPSite):
    """aiohttp's TCP site with this front end on its connections."""

    __slots__ = ("_connections",)

    def __init__(self, runner: web.AppRunner, host: str | None, port: int | None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._connections: set[ControlProtocol] = set()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        runner = self._runner
        assert isinstance(runner, web.AppRunner)
        server = runner.server
        assert server is not None
        app = runner.app
        connections = self._connections
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ControlProtocol(app, server, connections),
            self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)

    async def stop(self) -> None:
        await super().stop()
        busy = []
        for connection in list(self._connections):
            task = connection.close_when_idle()
            if task is not None:
                busy.append(task)
        if busy:  # answers being written: up to 2 s for them
            await asyncio.wait(busy, timeout=2)
