"""The sidecar's classification (sidecar/classify.py) against PostgreSQL's own (call_origin(),
call_legs()): for random configurations, every origin and every dialled user part give the
same verdict, origin and legs (counters, channels, classes, forward targets). Then the cache
itself: the generation moves with every configuration change and only with those, a stale
cache is overruled by PostgreSQL, and the follower picks up changes from NOTIFY."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import classify
from tests.test_model_property import (
    CONFIGURATION,
    DIALLED,
    EXTENSIONS,
    PROPERTY,
    TARGETS,
    document,
    load,
)

SOURCES = ["127.0.0.1", "127.0.0.3", "127.0.0.4", "10.9.0.7", "10.9.1.1", "::1", "2001:db8::5"]
USERS = [None, "", "nobody", "ghost", *EXTENSIONS]
CALLED = sorted(set(DIALLED) | set(TARGETS) | {""})
# source networks an extension may authenticate by (application servers)
EXT_SOURCES = st.lists(st.sampled_from(["10.9.0.0/24", "10.9.0.7/32", "2001:db8::/64",
                                        "127.0.0.3/32"]), max_size=2, unique=True)

_SQL_PLAN = """
    SELECT o.verdict::text AS verdict, o.ext, o.chan,
           to_jsonb(call_legs(o.ext, o.account, o.chan, $4)) AS legs
    FROM call_origin($1::inet, $2, $3) o"""


async def sql_plan(conn: asyncpg.Connection, source: str, from_user: str | None,
                   auth_user: str | None, to_user: str) -> tuple[Any, ...]:
    row = await conn.fetchrow(_SQL_PLAN, source, from_user, auth_user, to_user)
    verdict = orjson.loads(row["verdict"]) if row["verdict"] else None
    if verdict is not None:
        return verdict, None, None
    origin = f"extension:{row['ext']}" if row["ext"] else f"channel:{row['chan']}"
    legs = orjson.loads(row["legs"]) if row["legs"] else None
    for leg in legs or ():
        leg.pop("call_no")
    return None, origin, legs


def cache_plan(config: classify.Config, source: str, from_user: str | None,
               auth_user: str | None, to_user: str) -> tuple[Any, ...]:
    plan = config.plan(source, from_user, to_user, auth_user, 1)
    if plan.verdict is not None and plan.verdict != classify.NOT_FOUND:
        return orjson.loads(plan.verdict), None, None
    legs = None if plan.verdict == classify.NOT_FOUND else [dict(x) for x in plan.legs]
    for leg in legs or ():
        leg.pop("call_no")
    return None, plan.origin, legs


# (Each example asks both sides about 3,000 calls.)
@settings(PROPERTY, max_examples=50)
@given(
    **CONFIGURATION,
    ext_sources=st.fixed_dictionaries({e: EXT_SOURCES for e in EXTENSIONS}),
    no_password=st.lists(st.sampled_from(sorted(EXTENSIONS)), max_size=2, unique=True),
    priorities=st.lists(st.integers(0, 2), min_size=3, max_size=3),
)
async def test_cache_classifies_as_postgresql(
    database_url: str, counting: str, acc_limits: dict[str, Any],
    chan_limits: dict[str, Any], forwards: dict[str, dict[str, Any]],
    ext_sources: dict[str, list[str]], no_password: list[str], priorities: list[int],
) -> None:
    doc = document(counting, acc_limits, chan_limits, forwards)
    conn = await asyncpg.connect(database_url)
    try:
        await load(conn, doc)
        for ext, nets in ext_sources.items():
            await conn.execute("UPDATE extensions SET sources = $2::text[]::cidr[] WHERE id = $1",
                               ext, nets)
        await conn.execute("UPDATE extensions SET ha1 = NULL WHERE id = ANY ($1)", no_password)
        for cid, prio in zip(("c1", "c2", "c3"), priorities, strict=True):
            await conn.execute("UPDATE channels SET priority = $2 WHERE id = $1", cid, prio)
        config = await classify.load(conn)
        for source in SOURCES:
            for from_user in USERS:
                for auth_user in (None, from_user):
                    for to_user in CALLED:
                        args = (source, from_user or None, auth_user or None, to_user)
                        want = await sql_plan(conn, *args)
                        assert cache_plan(config, *args) == want, args
    finally:
        await conn.close()


async def _generation(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT n FROM config_generation"))


async def test_generation_moves_with_configuration_only(pool: asyncpg.Pool) -> None:
    """Every statement that changes the configuration moves the generation (TRUNCATE too);
    call control, which moves counters and buckets, does not."""
    async with pool.acquire() as conn:
        g = await _generation(conn)
        await conn.execute("INSERT INTO accounts (id, calls_limit, cps_limit) VALUES ('g', 5, 50)")
        await conn.execute("INSERT INTO extensions (id, account, ha1) VALUES"
                           " ('g1', 'g', repeat('a', 32))")
        assert await _generation(conn) == g + 2
        raw = await conn.fetchval(
            "SELECT admit('gc', 't', '127.0.0.1', 'g1', 'g1', 'g1', 'n', 'b', false, 'realm',"
            " interval '1 minute')::text")
        assert orjson.loads(raw)["action"] == "relay"
        await conn.execute("SELECT answer('gc', 't', 0, interval '1 hour')")
        await conn.execute("SELECT release('gc', 't', 'bye')")
        await conn.execute("UPDATE accounts SET calls_active = calls_active")
        await conn.execute("UPDATE channels SET cps_tokens = 1")
        assert await _generation(conn) == g + 2
        await conn.execute("UPDATE accounts SET parent = NULL WHERE id = 'g'")
        await conn.execute("UPDATE channels SET priority = priority")
        await conn.execute("DELETE FROM numbers")
        await conn.execute("UPDATE settings SET counting = counting")
        assert await _generation(conn) == g + 6
        await conn.execute("TRUNCATE numbers")
        assert await _generation(conn) == g + 7


async def _setup_pair(conn: asyncpg.Connection) -> None:
    await conn.execute("""
        INSERT INTO accounts (id, calls_limit) VALUES ('acme', 1), ('other', 5);
        INSERT INTO extensions (id, account, ha1) VALUES ('alice', 'acme', repeat('a', 32)),
                                                          ('bob', 'other', repeat('b', 32));
    """)


def _admit_args(config: classify.Config, call_id: str, caller: str,
                callee: str) -> list[Any]:
    item = type("Item", (), {"source": "127.0.0.1", "from_user": caller, "to_user": callee,
                             "auth_user": caller})()
    return [*classify.planned_batch(config, [item]), [call_id], ["t"], ["127.0.0.1"], [caller],
            [callee], [caller], ["n"], ["b"], [False]]


_ADMIT = ("SELECT (admit_planned($1, $2, $3, $4, $5, $6, $7::text[]::inet[], $8, $9, $10, $11,"
          " $12, $13, false, 'realm', interval '1 minute', interval '1 hour'))[1]")


async def test_stale_cache_is_overruled(pool: asyncpg.Pool) -> None:
    """A cache that has not followed a change yet does not decide: the call is classified
    by PostgreSQL, as the configuration is now."""
    async with pool.acquire() as conn:
        await _setup_pair(conn)
        stale = await classify.load(conn)
        # alice now belongs to 'other': her calls count there, not on acme
        await conn.execute("UPDATE extensions SET account = 'other' WHERE id = 'alice'")
        out = orjson.loads(await conn.fetchval(_ADMIT, *_admit_args(stale, "s1", "alice", "bob")))
        assert out["action"] == "relay"
        keys = await conn.fetchval("SELECT slot_keys FROM calls WHERE call_id = 's1'")
        assert "account:other:calls" in keys and "account:acme:calls" not in keys
        # the same plan with the current generation would have counted on acme: the cache
        # is trusted only at its own generation
        fresh = await classify.load(conn)
        args = _admit_args(fresh, "s2", "alice", "bob")
        assert orjson.loads(args[1])[0]["keys"][0] == "account:other:calls"
        args[1] = args[1].replace("account:other:calls", "account:acme:calls")
        out = orjson.loads(await conn.fetchval(_ADMIT, *args))
        keys = await conn.fetchval("SELECT slot_keys FROM calls WHERE call_id = 's2'")
        assert "account:acme:calls" in keys  # (PostgreSQL trusts a current cache's plan)
        assert await conn.fetch("SELECT * FROM counter_drift()") == []


async def test_follower_follows_notify(database_url: str, pool: asyncpg.Pool) -> None:
    """The follower loads the configuration, reloads it after each change, drops it while
    its connection is gone and comes back with it."""
    follower = classify.ConfigFollower(lambda: asyncpg.connect(database_url),
                                       retry_seconds=0.05)
    await follower.start()
    try:
        async def until(check: Any) -> None:
            for _ in range(500):  # 5 s
                if check():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the follower did not catch up in 5 s")

        await until(lambda: follower.config is not None)
        async with pool.acquire() as conn:
            await _setup_pair(conn)
            g = await _generation(conn)
        await until(lambda: follower.config is not None and follower.config.generation == g)
        assert follower.config is not None and "alice" in follower.config.extensions
        # the follower's connection killed: no cache meanwhile, then a fresh one
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                               " AND query LIKE 'LISTEN%'")
            await conn.execute("DELETE FROM extensions WHERE id = 'bob'")
        await until(lambda: follower.config is not None
                    and "bob" not in follower.config.extensions)
    finally:
        await follower.stop()


@pytest.mark.parametrize("cache", [True, False])
async def test_sidecar_admits_with_or_without_cache(cache: bool, database_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the sidecar's own HTTP API: the limit holds with the cache on or off."""
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app import create_app
    from sidecar.settings import Settings

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("SIDECAR_CONFIG_CACHE", "on" if cache else "off")
    monkeypatch.setenv("SIDECAR_CONTROL_SOURCES", "127.0.0.0/8,::1/128")
    conn = await asyncpg.connect(database_url)
    try:
        await _setup_pair(conn)
    finally:
        await conn.close()
    async with TestClient(TestServer(create_app(Settings()))) as client:
        answers = []
        for n in range(3):
            resp = await client.post("/v1/control/admit", json={
                "call_id": f"h{n}", "from_tag": "t", "source_ip": "127.0.0.1",
                "from_user": "alice", "to_user": "bob", "auth_user": "alice", "node": "n"})
            assert resp.status == 200, await resp.text()
            answers.append((await resp.json())["action"])
        assert answers == ["relay", "reject", "reject"]
