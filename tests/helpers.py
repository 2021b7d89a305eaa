"""Run the real sidecar application on a real port, and talk to it over HTTP."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from sidecar.app import create_app
from sidecar.control_http import ControlSite
from sidecar.settings import Settings

ADMIN_TOKEN = "test-admin-token"


class Sidecar:
    """One running sidecar instance (its own app, pool and port) and an HTTP client."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, app: web.Application):
        self.base_url = base_url
        self.session = session
        self.app = app
        self._n = 0

    async def request(self, method: str, path: str, json: Any = None, *, admin: bool = True,
                      **kw: Any) -> tuple[int, Any]:
        headers = kw.pop("headers", {})
        if admin:
            headers.setdefault("Authorization", f"Bearer {ADMIN_TOKEN}")
        async with self.session.request(method, self.base_url + path, json=json,
                                        headers=headers, **kw) as resp:
            ctype = resp.headers.get("Content-Type", "")
            body = await (resp.json() if "json" in ctype else resp.text())
            return resp.status, body

    async def put_config(self, doc: dict[str, Any]) -> None:
        status, body = await self.request("PUT", "/v1/config", doc)
        assert status == 200, body

    async def usage(self) -> dict[str, Any]:
        status, body = await self.request("GET", "/v1/usage")
        assert status == 200, body
        return body

    async def admit(self, call_id: str | None = None, *, to: str, source: str = "127.0.0.1",
                    from_user: str | None = None, auth: str | None = None,
                    from_tag: str = "ft", **extra: Any) -> dict[str, Any]:
        if call_id is None:
            self._n += 1
            call_id = f"call-{self._n}"
        body = {"call_id": call_id, "from_tag": from_tag, "source_ip": source,
                "from_user": from_user if from_user is not None else auth, "to_user": to,
                "auth_user": auth, "node": "test-node", "boot": "boot-1", **extra}
        status, out = await self.request("POST", "/v1/control/admit", body, admin=False)
        assert status == 200, out
        out["call_id"] = call_id
        return out

    async def answer(self, call_id: str, leg: int | None, from_tag: str = "ft") -> None:
        """What Kamailio sends on the first 2xx: the leg it came from (0 for a call of one
        leg), or no leg when it does not know."""
        body: dict[str, Any] = {"call_id": call_id, "from_tag": from_tag}
        if leg is not None:
            body["leg"] = leg
        status, out = await self.request("POST", "/v1/control/answer", body, admin=False)
        assert status == 200, out

    async def release(self, call_id: str, from_tag: str | None = "ft",
                      reason: str = "bye") -> bool:
        body: dict[str, Any] = {"call_id": call_id, "reason": reason}
        if from_tag is not None:
            body["from_tag"] = from_tag
        status, out = await self.request("POST", "/v1/control/release", body, admin=False)
        assert status == 200, out
        return bool(out["released"])

    async def heartbeat(self, dialogs: list[dict[str, Any]] | None, *, node: str = "test-node",
                        boot: str = "boot-1") -> dict[str, Any]:
        body: dict[str, Any] = {"node": node, "boot": boot}
        if dialogs is not None:
            body["dialogs"] = dialogs
        status, out = await self.request("POST", "/v1/control/heartbeat", body, admin=False)
        assert status == 200, out
        return dict(out)


def briefing(call_id: str, from_tag: str = "ft", state: int = 4) -> dict[str, Any]:
    """One item of Kamailio's `dlg.briefing` RPC with format "cFs", as heartbeats carry it."""
    return {"h_entry": len(call_id) % 4096, "h_id": 1000 + len(from_tag), "call-id": call_id,
            "from_tag": from_tag, "state": state}


async def counter_drift(database_url: str) -> list[Any]:
    """Counters that differ from the call records: empty when nothing leaked."""
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch("SELECT * FROM counter_drift()"))
    finally:
        await conn.close()


@asynccontextmanager
async def running_sidecar(database_url: str, **overrides: Any) -> AsyncIterator[Sidecar]:
    """Start the real application (real pool, real HTTP on 127.0.0.1) and stop it after."""
    fields: dict[str, Any] = {"database_url": database_url, "admin_token": ADMIN_TOKEN,
                              "janitor_interval": 3600, "db_pool_max": 20, **overrides}
    settings = dataclasses.replace(Settings(), **fields)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = ControlSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        try:
            yield Sidecar(f"http://127.0.0.1:{port}", session, app)
        finally:
            await runner.cleanup()
