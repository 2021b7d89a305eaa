"""A do-nothing "allow" server for bench_compare.py's `floor` system: it answers the project's
kamailio.cfg exactly as the sidecar would for an admitted call, and decides nothing.

With it, the project's Kamailio does all of its own work (the HTTP admission through
http_async_client, the resumed relay, the dialog events, the outbox's NDJSON batches, the
heartbeat) and the decision costs nothing: what the architecture costs by itself, against
which the sidecar's and PostgreSQL's share of a call can be read. Same stack as the sidecar
(aiohttp on uvloop, orjson), and every body is read and parsed, as the sidecar must.

    python bench/allow_server.py PORT CALLEE_URI
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web


def json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def make_app(callee: str) -> web.Application:
    relay = orjson.dumps({"action": "relay", "legs": [{"leg": 0, "uri": callee, "lookup": False}]})

    async def admit(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=relay, content_type="application/json")

    async def events(request: web.Request) -> web.Response:
        raw = await request.read()
        if request.content_type == "application/x-ndjson":
            items = [orjson.loads(line) for line in raw.split(b"\n") if line.strip()]
        else:
            items = orjson.loads(raw)["events"]
        return json({"ok": True, "results": [{"ok": True, "changed": True} for _ in items]})

    async def heartbeat(request: web.Request) -> web.Response:
        await request.read()
        return json({"ok": True, "released": 0, "answered": 0})

    async def health(request: web.Request) -> web.Response:
        return json({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/control/admit", admit)
    app.router.add_post("/v1/control/events", events)
    app.router.add_post("/v1/control/heartbeat", heartbeat)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    port, callee = int(sys.argv[1]), sys.argv[2]
    uvloop.install()
    # The sidecar's listen backlog (SIDECAR_LISTEN_BACKLOG's default): with aiohttp's 128,
    # http_async_client's bursts of connections overflowed it near 3,000 CPS, and each
    # dropped SYN, retried a second later, became an admission timeout (a 503) that the
    # sidecar would not have had.
    web.run_app(make_app(callee), host="127.0.0.1", port=port, access_log=None, print=None,
                backlog=4096)
