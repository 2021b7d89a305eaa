"""Exactness under concurrency: many simultaneous INVITEs through two sidecar instances,
each with its own pool, against one PostgreSQL. Exactly min(limit, demand) get through."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest

from tests.helpers import Sidecar, running_sidecar

DEMAND = 200
LIMIT = 10


async def two_sidecars(stack: AsyncExitStack, database_url: str) -> list[Sidecar]:
    # Exactness under a storm, not shedding (tests/test_group_commit.py): both sidecars and
    # the storm share this process's event loop, so Kamailio's 300 ms deadline would shed
    # admissions whenever the machine is busy. Every admission here is decided.
    return [await stack.enter_async_context(running_sidecar(database_url,
                                                            admit_deadline_ms=10_000))
            for _ in range(2)]


async def storm(sidecars: list[Sidecar], requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every admission at once, alternating between the sidecars."""
    return await asyncio.gather(*(
        sidecars[i % len(sidecars)].admit(f"race-{i}", **req) for i, req in enumerate(requests)
    ))


async def assert_no_drift(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetch("SELECT * FROM counter_drift()") == []
    finally:
        await conn.close()


def relayed(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in decisions if d["action"] == "relay"]


@pytest.mark.parametrize("counting", ["per_call", "per_leg"])
async def test_account_limit_exact(database_url: str, counting: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await two_sidecars(stack, database_url)
        await a.put_config({
            "counting": counting,
            "accounts": [{"id": "acme", "limits": {"calls": LIMIT}}],
            "extensions": [{"id": f"u{i}", "account": "acme", "password": "x"} for i in range(20)],
            "channels": [{"id": "gw", "gateway": "sip:127.0.0.3:5070", "prefixes": ["+"]}],
        })
        decisions = await storm([a, b], [{"to": "+15550000", "auth": f"u{i % 20}"}
                                         for i in range(DEMAND)])
        assert len(relayed(decisions)) == LIMIT
        refused = [d for d in decisions if d["action"] == "reject"]
        assert len(refused) == DEMAND - LIMIT
        assert {(d["code"], d["counter"]) for d in refused} == {(403, "account:acme:calls")}
        assert (await a.usage())["accounts"]["acme"]["calls"]["active"] == LIMIT
        await assert_no_drift(database_url)
        # Releasing them all concurrently, twice over, brings usage back to exactly zero.
        ids = [d["call_id"] for d in relayed(decisions)]
        await asyncio.gather(*(s.release(i) for i in ids for s in (a, b)))
        assert (await b.usage())["accounts"]["acme"]["calls"]["active"] == 0
        await assert_no_drift(database_url)


async def test_shared_ancestor_limit_exact(database_url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await two_sidecars(stack, database_url)
        await a.put_config({
            "accounts": [
                {"id": "provider", "limits": {"calls": LIMIT}},
                {"id": "org-a", "parent": "provider", "limits": {"calls": 50}},
                {"id": "org-b", "parent": "provider"},
                {"id": "team-b", "parent": "org-b", "limits": {"internal": 100}},
            ],
            "extensions": [
                {"id": "a1", "account": "org-a", "password": "x"},
                {"id": "b1", "account": "team-b", "password": "x"},
            ],
        })
        # Internal calls between the two organisations: every one touches the provider.
        decisions = await storm([a, b], [
            {"to": "b1", "auth": "a1"} if i % 2 else {"to": "a1", "auth": "b1"}
            for i in range(DEMAND)
        ])
        assert len(relayed(decisions)) == LIMIT
        assert {d["counter"] for d in decisions if d["action"] == "reject"} == {
            "account:provider:calls"}
        usage = await a.usage()
        assert usage["accounts"]["provider"]["calls"]["active"] == LIMIT
        assert usage["accounts"]["provider"]["internal"]["active"] == LIMIT
        await assert_no_drift(database_url)


async def test_channel_limit_exact(database_url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = await two_sidecars(stack, database_url)
        await a.put_config({
            "accounts": [{"id": "acme"}],
            "extensions": [{"id": "pbx", "account": "acme", "contact": "sip:pbx@127.0.0.1:5090"}],
            "numbers": [{"number": "+15550001000", "extension": "pbx"}],
            "channels": [{"id": "carrier", "limits": {"calls": LIMIT}, "sources": ["127.0.0.3"]}],
        })
        decisions = await storm([a, b], [{"to": "+15550001000", "source": "127.0.0.3",
                                          "from_user": "+4420000"} for _ in range(DEMAND)])
        assert len(relayed(decisions)) == LIMIT
        assert {(d["code"], d["counter"]) for d in decisions if d["action"] == "reject"} == {
            (486, "channel:carrier:calls")}
        assert (await b.usage())["channels"]["carrier"]["calls"]["active"] == LIMIT
        await assert_no_drift(database_url)


async def test_same_call_asked_concurrently_is_one_call(database_url: str) -> None:
    """Retransmissions and spirals reaching both replicas at once: one decision, one slot."""
    async with AsyncExitStack() as stack:
        a, b = await two_sidecars(stack, database_url)
        await a.put_config({
            "accounts": [{"id": "acme", "limits": {"calls": 5}}],
            "extensions": [{"id": "u1", "account": "acme", "password": "x"},
                           {"id": "u2", "account": "acme", "password": "x"}],
        })
        decisions = await asyncio.gather(*(
            (a, b)[i % 2].admit("same-call", to="u2", auth="u1") for i in range(40)))
        assert all(d["action"] == "relay" for d in decisions)
        assert sum(1 for d in decisions if "repeat" not in d) <= 1
        assert (await a.usage())["accounts"]["acme"]["calls"]["active"] == 1
        await assert_no_drift(database_url)
