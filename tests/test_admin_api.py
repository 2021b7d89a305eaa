"""The admin API's own routes (config, usage, calls), authentication on every route, the
call-control access rules, and a limit changed with plain SQL (real sidecar, real PostgreSQL)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from sidecar.app import create_app
from sidecar.settings import Settings
from tests.helpers import ADMIN_TOKEN, running_sidecar
from tests.test_admin_resources import BASE, error_of

# Every admin route with a harmless request (bodies valid, ids that may or may not exist).
ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/config", None),
    ("PUT", "/v1/config", BASE),
    ("GET", "/v1/usage", None),
    ("GET", "/v1/calls", None),
    ("DELETE", "/v1/calls/some-call", None),
    ("GET", "/v1/accounts", None),
    ("GET", "/v1/accounts/acme", None),
    ("PUT", "/v1/accounts/acme", {"limits": {"calls": 1}}),
    ("PATCH", "/v1/accounts/acme", {"name": "x"}),
    ("DELETE", "/v1/accounts/acme", None),
    ("GET", "/v1/extensions", None),
    ("GET", "/v1/extensions/ivr", None),
    ("PUT", "/v1/extensions/ivr", {"account": "acme"}),
    ("PATCH", "/v1/extensions/ivr", {"name": "x"}),
    ("DELETE", "/v1/extensions/ivr", None),
    ("GET", "/v1/numbers", None),
    ("GET", "/v1/numbers/+15550001000", None),
    ("PUT", "/v1/numbers/+15550001000", {"extension": "ivr"}),
    ("PATCH", "/v1/numbers/+15550001000", {"extension": "ivr"}),
    ("DELETE", "/v1/numbers/+15550001000", None),
    ("GET", "/v1/channels", None),
    ("GET", "/v1/channels/carrier-a", None),
    ("PUT", "/v1/channels/carrier-a", {}),
    ("PATCH", "/v1/channels/carrier-a", {"name": "x"}),
    ("DELETE", "/v1/channels/carrier-a", None),
]

BAD_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"Authorization": "Bearer"},
    {"Authorization": ADMIN_TOKEN},
]


async def test_every_admin_route_needs_the_token(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        for method, path, body in ADMIN_ROUTES:
            for headers in BAD_HEADERS:
                status, out = await sc.request(method, path, body, admin=False, headers=headers)
                assert status == 401, (method, path, headers, out)
                assert error_of(out)["code"] == "unauthorized"
                assert ADMIN_TOKEN not in str(out)
        # Nothing changed behind the 401s.
        status, doc = await sc.request("GET", "/v1/config")
        assert status == 200 and doc["accounts"] == BASE["accounts"]
        # The right token passes everywhere (the status is then the route's own).
        for method, path, body in ADMIN_ROUTES:
            status, out = await sc.request(method, path, body)
            assert status != 401, (method, path, out)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The real app with exactly these settings on a real port; yields its base URL."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_no_token_configured_means_no_admin_api(database_url: str) -> None:
    settings = dataclasses.replace(Settings(), database_url=database_url, admin_token=None)
    async with serving(settings) as url, aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            async with http.get(url + "/v1/usage", headers=headers) as resp:
                assert resp.status == 401
                assert error_of(await resp.json())["code"] == "unauthorized"


async def test_token_from_a_file(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("file-token\n")
    monkeypatch.delenv("SIDECAR_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    settings = dataclasses.replace(Settings(), database_url=database_url)
    assert settings.admin_token == "file-token"
    async with serving(settings) as url, aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/usage", headers={"Authorization": "Bearer file-token"}) as r:
            assert r.status == 200
        async with http.get(url + "/v1/usage", headers={"Authorization": "Bearer file"}) as r:
            assert r.status == 401


async def test_health_metrics_openapi_need_no_token(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        for path in ("/health", "/metrics", "/openapi.json"):
            status, _ = await sc.request("GET", path, admin=False)
            assert status == 200, path


async def test_unknown_route_and_method(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, out = await sc.request("GET", "/v1/nothing-here")
        assert status == 404 and error_of(out)["code"] == "not_found"
        status, out = await sc.request("POST", "/v1/usage", {})
        assert status == 405 and error_of(out)["code"] == "method_not_allowed"


async def test_config_round_trip_and_errors(database_url: str) -> None:
    async with running_sidecar(database_url, max_body_bytes=2048) as sc:
        status, out = await sc.request("PUT", "/v1/config?dry_run=1", BASE)
        assert status == 200 and out["dry_run"] is True
        status, out = await sc.request("PUT", "/v1/config?dry_run=maybe", BASE)
        assert status == 400 and error_of(out)["details"][0]["path"] == "query.dry_run"
        # Sources with host bits set are networks all the same (PostgreSQL's cidr refuses them).
        hosts = {"accounts": [{"id": "a"}], "extensions": [{"id": "e", "account": "a",
                 "sources": ["10.0.0.1/8"]}]}
        status, out = await sc.request("PUT", "/v1/config?dry_run=true", hosts)
        assert status == 200, out
        status, doc = await sc.request("GET", "/v1/config")
        assert doc["accounts"] == []
        await sc.put_config(BASE)
        status, doc = await sc.request("GET", "/v1/config")
        assert status == 200
        assert doc["accounts"] == BASE["accounts"] and doc["channels"] == BASE["channels"]
        # The exported document goes back in unchanged (ha1 instead of password).
        await sc.put_config(doc)
        assert (await sc.request("GET", "/v1/config"))[1] == doc

        bad = {**BASE, "accounts": [*BASE["accounts"], {"id": "x", "parent": "ghost"}]}
        status, out = await sc.request("PUT", "/v1/config", bad)
        err = error_of(out)
        assert status == 422 and err["details"][0]["path"] == "$.accounts[2].parent"
        status, out = await sc.request("PUT", "/v1/config", {"accounts": [{"id": 1}]})
        assert status == 400 and error_of(out)["details"][0]["path"] == "$.accounts[0].id"
        status, out = await sc.request("PUT", "/v1/config", {"extra": 1})
        assert status == 400 and error_of(out)["code"] == "invalid_body"
        status, out = await sc.request("PUT", "/v1/config", data=b"[")
        assert status == 400 and error_of(out)["code"] == "invalid_json"
        status, out = await sc.request(
            "PUT", "/v1/config", data=b"{}", headers={"Content-Type": "text/csv"}
        )
        assert status == 415 and error_of(out)["code"] == "unsupported_media_type"
        big = {"accounts": [{"id": f"a{i}", "name": "n" * 100} for i in range(30)]}
        status, out = await sc.request("PUT", "/v1/config", big)
        assert status == 413 and error_of(out)["code"] == "body_too_large"
        # None of it changed anything.
        assert (await sc.request("GET", "/v1/config"))[1] == doc


async def test_usage_calls_and_force_release(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        assert await sc.usage() == {
            "accounts": {
                "acme": {
                    "calls": {"active": 0, "limit": 100},
                    "public": {"active": 0, "limit": None},
                    "internal": {"active": 0, "limit": None},
                },
                "acme-sales": {
                    "calls": {"active": 0, "limit": None},
                    "public": {"active": 0, "limit": 10},
                    "internal": {"active": 0, "limit": 5},
                },
            },
            "channels": {"carrier-a": {"calls": {"active": 0, "limit": 30}}},
        }
        for i in range(3):
            out = await sc.admit(f"in-{i}", to="ivr", source="127.0.0.3", from_user="+1555999")
            assert out["action"] == "relay", out
        await sc.answer("in-0", 0)
        usage = await sc.usage()
        assert usage["accounts"]["acme"]["calls"] == {"active": 3, "limit": 100}
        assert usage["accounts"]["acme"]["public"]["active"] == 3
        assert usage["channels"]["carrier-a"]["calls"] == {"active": 3, "limit": 30}

        status, out = await sc.request("GET", "/v1/calls")
        assert status == 200 and [c["call_id"] for c in out["calls"]] == ["in-0", "in-1", "in-2"]
        assert out["next"] is None
        status, out = await sc.request("GET", "/v1/calls?state=answered")
        assert [c["call_id"] for c in out["calls"]] == ["in-0"]
        status, out = await sc.request("GET", "/v1/calls?state=ringing&account=acme")
        assert [c["call_id"] for c in out["calls"]] == ["in-1", "in-2"]
        status, out = await sc.request("GET", "/v1/calls?account=acme-sales")
        assert out["calls"] == []
        status, out = await sc.request("GET", "/v1/calls?channel=carrier-a&limit=2")
        assert [c["call_id"] for c in out["calls"]] == ["in-0", "in-1"]
        status, out = await sc.request("GET", "/v1/calls?channel=carrier-a&limit=2&after=in-1")
        assert [c["call_id"] for c in out["calls"]] == ["in-2"]
        for bad in ("state=gone", "limit=many"):
            status, out = await sc.request("GET", f"/v1/calls?{bad}")
            assert status == 400 and error_of(out)["code"] == "invalid_query"

        status, out = await sc.request("DELETE", "/v1/calls/in-1")
        assert (status, out) == (200, {"ok": True, "released": 1})
        status, out = await sc.request("DELETE", "/v1/calls/in-1")
        assert status == 404 and error_of(out)["code"] == "not_found"
        status, out = await sc.request("DELETE", "/v1/calls/in-2?from_tag=other")
        assert status == 404
        status, out = await sc.request("DELETE", "/v1/calls/in-2?from_tag=ft")
        assert status == 200
        usage = await sc.usage()
        assert usage["accounts"]["acme"]["calls"]["active"] == 1
        assert usage["channels"]["carrier-a"]["calls"]["active"] == 1


async def test_limit_changed_in_sql_applies_to_the_next_invite(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        assert (await sc.admit("c1", to="ivr", source="127.0.0.3"))["action"] == "relay"
        # One plain UPDATE, no reload: the very next INVITE sees it.
        await pool.execute("UPDATE accounts SET calls_limit = 1 WHERE id = 'acme'")
        out = await sc.admit("c2", to="ivr", source="127.0.0.3")
        assert out["action"] == "reject" and out["reason"] == "REACH_PLAN_LIMIT", out
        assert out["counter"] == "account:acme:calls"
        await pool.execute("UPDATE accounts SET calls_limit = 2 WHERE id = 'acme'")
        assert (await sc.admit("c3", to="ivr", source="127.0.0.3"))["action"] == "relay"
        # A channel limit the same way; and NULL is unlimited again.
        await pool.execute("UPDATE channels SET calls_limit = 2 WHERE id = 'carrier-a'")
        await pool.execute("UPDATE accounts SET calls_limit = NULL WHERE id = 'acme'")
        out = await sc.admit("c4", to="ivr", source="127.0.0.3")
        assert out["action"] == "reject" and out["counter"] == "channel:carrier-a:calls", out
        # Lowering below use cuts nothing.
        await pool.execute("UPDATE channels SET calls_limit = 0 WHERE id = 'carrier-a'")
        usage = await sc.usage()
        assert usage["channels"]["carrier-a"]["calls"] == {"active": 2, "limit": 0}
        # And the API shows the same limit the SQL set.
        status, chan = await sc.request("GET", "/v1/channels/carrier-a")
        assert chan["limits"] == {"calls": 0}


async def test_sql_changes_notify_sidecar_config(database_url: str, pool: asyncpg.Pool) -> None:
    """The schema NOTIFYs `sidecar_config` with the table's name on configuration changes."""
    got: list[str] = []
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener("sidecar_config", lambda *args: got.append(args[3]))
        await pool.execute("INSERT INTO accounts (id, calls_limit) VALUES ('n1', 2)")
        await pool.execute("UPDATE accounts SET calls_limit = 3 WHERE id = 'n1'")
        await pool.execute("UPDATE settings SET counting = 'per_leg'")
        for _ in range(50):
            if len(got) >= 3:
                break
            await conn.execute("SELECT 1")
        assert got[:3] == ["accounts", "accounts", "settings"]
    finally:
        await conn.close()


async def test_control_api_sources_and_secret(database_url: str) -> None:
    admit = {
        "call_id": "x1",
        "from_tag": "ft",
        "source_ip": "127.0.0.3",
        "from_user": "",
        "to_user": "ivr",
        "node": "n",
    }
    elsewhere = (ipaddress.ip_network("10.9.9.0/24"),)
    async with running_sidecar(
        database_url, control_sources=elsewhere, control_secret="kama-secret"
    ) as sc:
        await sc.put_config(BASE)
        for path, body in [
            ("/v1/control/admit", admit),
            ("/v1/control/answer", {"call_id": "x1", "from_tag": "ft", "leg": 0}),
            ("/v1/control/release", {"call_id": "x1"}),
            ("/v1/control/heartbeat", {"node": "n", "boot": "b"}),
        ]:
            # Not from a Kamailio source, no secret: refused.
            status, out = await sc.request("POST", path, body, admin=False)
            assert status == 403 and error_of(out)["code"] == "forbidden", (path, out)
            # The admin token is not a control credential.
            status, out = await sc.request("POST", path, body)
            assert status == 403, path
            status, out = await sc.request(
                "POST", path, body, admin=False, headers={"X-Control-Secret": "nope"}
            )
            assert status == 403 and "kama-secret" not in str(out)
            status, out = await sc.request(
                "POST", path, body, admin=False, headers={"X-Control-Secret": "kama-secret"}
            )
            assert status == 200, (path, out)
    # From a configured source (loopback by default), no secret needed.
    async with running_sidecar(database_url) as sc:
        status, out = await sc.request("POST", "/v1/control/release", {"call_id": "x"}, admin=False)
        assert (status, out) == (200, {"ok": True, "released": False})
        status, out = await sc.request("POST", "/v1/control/release", {"nope": 1}, admin=False)
        assert status == 400 and error_of(out)["code"] == "invalid_body"
