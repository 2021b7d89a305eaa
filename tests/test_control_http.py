"""The call-control front end (sidecar/control_http.py) over raw sockets, against the real
sidecar and PostgreSQL: what it answers itself, what it hands to aiohttp, and that both give
the same answers to the same requests."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any
from urllib.parse import urlsplit

import orjson

from sidecar.control_http import parse_head
from tests.helpers import Sidecar, running_sidecar
from tests.test_group_commit import OFFICE


def admit_body(call_id: str) -> bytes:
    return orjson.dumps({"call_id": call_id, "from_tag": "ft", "source_ip": "127.0.0.2",
                         "from_user": "app", "to_user": "1002", "node": "n1", "boot": "b1"})


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: sidecar", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Raw:
    """One TCP connection, responses read one by one (Content-Length framed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, sc: Sidecar) -> Raw:
        url = urlsplit(sc.base_url)
        return cls(*await asyncio.open_connection(url.hostname, url.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 10) if length else b""
        return status, headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


def by_aiohttp(headers: dict[str, str]) -> bool:
    return "aiohttp" in headers.get("server", "")


async def active(sc: Sidecar) -> int:
    return int((await sc.usage())["accounts"]["acme"]["calls"]["active"])


async def test_keep_alive_pipelining_and_hand_over(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(OFFICE)
        conn = await Raw.open(sc)
        # Two admissions in one write (pipelined): answered here, in order.
        await conn.send(post("/v1/control/admit", admit_body("p1"))
                        + post("/v1/control/admit", admit_body("p2")))
        for _ in range(2):
            status, headers, body = await conn.response()
            assert status == 200 and not by_aiohttp(headers), (status, headers)
            assert orjson.loads(body)["action"] == "relay"
            assert "date" in headers
        # An admin request on the same connection goes to aiohttp, and so does every later
        # request on it, the control ones included.
        await conn.send(b"GET /health HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        status, headers, body = await conn.response()
        assert status == 200 and by_aiohttp(headers) and orjson.loads(body)["status"] == "ok"
        await conn.send(post("/v1/control/admit", admit_body("p1")))
        status, headers, body = await conn.response()
        assert status == 200 and by_aiohttp(headers) and orjson.loads(body)["repeat"] is True
        conn.close()
        assert await active(sc) == 2


async def test_expect_continue_and_connection_close(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(OFFICE)
        conn = await Raw.open(sc)
        body = admit_body("e1")
        whole = post("/v1/control/admit", body, "Expect: 100-continue", "Connection: close")
        await conn.send(whole[: -len(body)])
        status, _, _ = await conn.response()
        assert status == 100
        await conn.send(body)
        status, headers, answer = await conn.response()
        assert status == 200 and headers["connection"] == "close"
        assert orjson.loads(answer)["action"] == "relay"
        assert await conn.closed()


async def test_a_body_over_the_limit_is_refused_unread(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        conn = await Raw.open(sc)
        await conn.send(b"POST /v1/control/admit HTTP/1.1\r\nHost: s\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{")
        status, headers, body = await conn.response()
        assert status == 413 and not by_aiohttp(headers)
        assert orjson.loads(body)["error"]["code"] == "body_too_large"
        assert await conn.closed()


async def test_a_stranger_gets_no_large_body_buffered(database_url: str) -> None:
    """From a source the control API does not accept, a heartbeat announcing 10 MB is
    refused on its head (403), the body never awaited, as aiohttp checks before reading."""
    elsewhere = (ipaddress.ip_network("10.9.9.0/24"),)
    async with running_sidecar(database_url, control_sources=elsewhere) as sc:
        conn = await Raw.open(sc)
        await conn.send(b"POST /v1/control/heartbeat HTTP/1.1\r\nHost: s\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{")
        status, headers, body = await conn.response()
        assert status == 403 and not by_aiohttp(headers)
        assert orjson.loads(body)["error"]["code"] == "forbidden"
        assert await conn.closed()


async def test_the_same_request_gets_the_same_answer_from_both(database_url: str) -> None:
    """Each request once as the front end takes it, once chunked (which it hands to
    aiohttp): same status, same JSON, same side effects."""
    bodies: list[tuple[bytes, tuple[str, ...]]] = [
        (b'{"call_id": 1}', ()),  # schema errors, every path named
        (b'{"call_id": "x", ', ()),  # not JSON
        (b"{}", ("X-Control-Secret: wrong",)),  # a wrong secret
        (b'{"type": "answer"}\n', ()),  # NDJSON sent as JSON
    ]
    async with running_sidecar(database_url, control_secret="s3cret") as sc:
        await sc.put_config(OFFICE)
        for body, extra in bodies:
            answers: list[tuple[int, Any]] = []
            for chunked in (False, True):
                conn = await Raw.open(sc)
                if chunked:
                    head = ["POST /v1/control/admit HTTP/1.1", "Host: s",
                            "Content-Type: application/json", "Transfer-Encoding: chunked",
                            *extra]
                    await conn.send(("\r\n".join(head) + "\r\n\r\n").encode()
                                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                else:
                    await conn.send(post("/v1/control/admit", body, *extra))
                status, headers, answer = await conn.response()
                assert by_aiohttp(headers) == chunked
                answers.append((status, orjson.loads(answer)))
                conn.close()
            assert answers[0] == answers[1], (body, answers)
            assert answers[0][0] in (400, 403, 415), answers
        assert await active(sc) == 0


def test_heads_it_does_not_take_go_to_aiohttp() -> None:
    ok = post("/v1/control/events", b"{}")
    assert parse_head(ok) not in (None, False)
    assert parse_head(ok[:10]) is None  # too little to tell yet
    for head in (
        b"GET /v1/control/admit HTTP/1.1\r\n\r\n",  # another method: aiohttp's 405
        b"POST /v1/control/admit?x=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/nothing HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nBad Name: a\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/control/admit HTTP/1.1\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n",
        b"PUT /v1/config HTTP/1.1\r\n",  # known from its first bytes
        b"POST /v1/control/admit HTTP/1.1\r\n" + b"X: y\r\n" * 5000,  # a head too long
    ):
        assert parse_head(head) is False, head


async def test_shutdown_closes_idle_connections(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(OFFICE)
        conn = await Raw.open(sc)
        await conn.send(post("/v1/control/admit", admit_body("s1")))
        assert (await conn.response())[0] == 200
    # running_sidecar's exit ran the runner's cleanup: the idle connection is closed.
    assert await conn.closed()
