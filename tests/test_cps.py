"""Calls-per-second limits (migration 006, sql/functions/20_admission.sql): a token bucket per
account and channel, kept in PostgreSQL, exact across sidecars, refusing with the same code
rules as the concurrent limits and naming the `cps` counter."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import asyncpg

from tests.helpers import Sidecar, counter_drift, running_sidecar

TRUNK = {"id": "trunk", "sources": ["127.0.0.3"], "gateway": "sip:127.0.0.3:5070",
         "prefixes": ["+"]}


def config(acme: dict[str, Any], trunk: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "counting": "per_call",
        "accounts": [{"id": "prov"}, {"id": "acme", "parent": "prov", "limits": acme}],
        "extensions": [{"id": f"u{i}", "account": "acme", "password": "pw"} for i in range(4)],
        "channels": [{**TRUNK, "limits": trunk or {}}],
    }


async def storm(sidecars: list[Sidecar], n: int, tag: str) -> list[dict[str, Any]]:
    """n admissions at once, alternating between the sidecars; each admitted call is released
    at once (the rate is what is measured, not the concurrency)."""
    async def one(i: int) -> dict[str, Any]:
        sc = sidecars[i % len(sidecars)]
        d = await sc.admit(f"{tag}-{i}", to="+15551234567", auth=f"u{i % 4}")
        if d["action"] == "relay":
            assert await sc.release(d["call_id"])
        return d

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def relayed(ds: list[dict[str, Any]]) -> int:
    return sum(1 for d in ds if d["action"] == "relay")


async def test_account_cps_burst_then_rate_exact_across_two_sidecars(database_url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(
            running_sidecar(database_url, admit_deadline_ms=10_000)) for _ in range(2)]
        await a.put_config(config({"cps": 5}))
        first = await storm([a, b], 25, "s1")
        # The bucket holds one second's worth: 5, however the 25 are split.
        assert relayed(first) == 5
        refused = [d for d in first if d["action"] == "reject"]
        assert {(d["code"], d["counter"], d["reason"]) for d in refused} == {
            (403, "account:acme:cps", "REACH_PLAN_LIMIT")}
        # One second later, about one second's worth again.
        await asyncio.sleep(1.0)
        again = relayed(await storm([a, b], 25, "s2"))
        assert 4 <= again <= 6, again
        assert await counter_drift(database_url) == []


async def test_configured_burst_channel_cps_and_no_bucket_without_a_limit(
        database_url: str) -> None:
    async with running_sidecar(database_url, admit_deadline_ms=10_000) as sc:
        await sc.put_config(config({"cps": 1, "cps_burst": 8}))
        assert relayed(await storm([sc], 20, "b")) == 8
        # A channel's rate refuses on the destination side: 486, the channel named.
        await sc.put_config(config({}, {"cps": 2}))
        ds = await storm([sc], 10, "c")
        assert relayed(ds) == 2
        assert {(d["code"], d["counter"]) for d in ds if d["action"] == "reject"} == {
            (486, "channel:trunk:cps")}
        # The configuration document and the API carry the limits back.
        status, doc = await sc.request("GET", "/v1/config")
        assert status == 200
        assert doc["channels"][0]["limits"] == {"cps": 2}
        status, chan = await sc.request("PATCH", "/v1/channels/trunk",
                                        {"limits": {"cps": 3, "cps_burst": 6}})
        assert status == 200 and chan["limits"] == {"cps": 3, "cps_burst": 6}, chan
        # 0 allows nothing.
        status, _ = await sc.request("PATCH", "/v1/channels/trunk", {"limits": {"cps": 0}})
        assert status == 200
        assert relayed(await storm([sc], 3, "z")) == 0
    conn = await asyncpg.connect(database_url)
    try:
        # The parent account never had a cps limit: its bucket was never written, though
        # every call touched it (no cost on the hot path).
        assert await conn.fetchval("SELECT cps_at FROM accounts WHERE id = 'prov'") is None
        # A bad value is refused by the table too.
        try:
            await conn.execute("UPDATE accounts SET cps_burst = 0 WHERE id = 'acme'")
            raise AssertionError("cps_burst = 0 accepted")
        except asyncpg.CheckViolationError:
            pass
    finally:
        await conn.close()


async def test_bad_cps_values_are_refused_with_their_path(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, body = await sc.request("PUT", "/v1/config", config({"cps": -1}))
        assert status == 400, body
        assert any("cps" in d["path"] for d in body["error"]["details"]), body
        status, body = await sc.request("PUT", "/v1/config", config({"cps_burst": 0}))
        assert status == 400, body
        assert any("cps_burst" in d["path"] for d in body["error"]["details"]), body
