"""The PostgreSQL pool; the migrations in sql/migrations applied in order, then the function
files in sql/functions (CREATE OR REPLACE, re-applied whenever their text changes)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from .settings import Settings

log = logging.getLogger("sidecar.db")

MIGRATIONS = Path(__file__).resolve().parent.parent / "sql" / "migrations"
# Functions that change more often than tables: each file is idempotent (CREATE OR REPLACE)
# and applied, in name order, after the migrations, whenever its text differs from what was
# applied last (schema_functions, migration 005).
FUNCTIONS = MIGRATIONS.parent / "functions"
_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")
# Serialises migrations between replicas starting at once.
_LOCK_KEY = 0x51DECA7


async def create_pool(settings: Settings) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        command_timeout=settings.db_timeout,
        # A data node that went away without a word (packets dropped, not refused) must not
        # hold a batch for asyncpg's default 60 s: after a failover the next host is tried.
        timeout=settings.db_timeout,
        reset=_keep_session,
        init=_warm_up,
        server_settings={
            "application_name": "sidecar",
            "synchronous_commit": settings.db_synchronous_commit,
        },
    )
    assert pool is not None
    return pool


# One call through every function of the hot path (admission with a forward and a channel,
# classified here and by the sidecar's cache, answer, release), on made-up rows, rolled
# back: nothing stays, nobody is notified. The rows move the configuration's generation
# (migration 012), whose row a long configuration transaction (an import) holds until it
# commits: rather than wait for it, the warm-up gives up (lock_timeout) and is skipped.
_WARM_UP = """
SET LOCAL lock_timeout = '100ms';
INSERT INTO accounts (id) VALUES ('sidecar.warm-up');
INSERT INTO channels (id, gateway, prefixes) VALUES ('sidecar.warm-up', 'sip:warm.up', '{+}');
INSERT INTO extensions (id, account, ha1, forward)
    VALUES ('sidecar.warm-up', 'sidecar.warm-up', repeat('0', 32), '{+1}');
SELECT admit_batch('{sidecar.warm-up}', '{t}', '{127.0.0.1}', '{sidecar.warm-up}',
                   '{sidecar.warm-up}', '{sidecar.warm-up}', '{n}', '{b}', '{false}', false,
                   'warm.up', '1 minute', '1 hour');
SELECT admit_planned((SELECT n FROM config_generation),
    '[{"call_no": 1, "leg": 0, "to_ext": null, "number": "+1", "class": "public",
       "keys": ["account:sidecar.warm-up:calls", "account:sidecar.warm-up:public"],
       "chans": ["sidecar.warm-up"], "rings": true, "contact": null,
       "origin_accounts": ["sidecar.warm-up"]}]',
    '{NULL}', '{extension:sidecar.warm-up}', '{sidecar.warm-up.2}', '{t}', '{127.0.0.1}',
    '{sidecar.warm-up}', '{+1}', '{sidecar.warm-up}', '{n}', '{b}', '{false}', false,
    'warm.up', '1 minute', '1 hour');
SELECT control_events('{answer,release}', '{sidecar.warm-up,sidecar.warm-up}', '{t,t}',
                      '{1,NULL}', '{NULL,bye}', '1 hour', '1 minute');
"""


async def _warm_up(conn: asyncpg.Connection) -> None:
    """Run the hot path once on a new connection, rolled back. PostgreSQL compiles PL/pgSQL
    functions on their first call in each session: without this the first batches of a
    fresh connection take tens of milliseconds more, and the scheduler, which sheds
    admissions by how long batches take, sheds a burst of calls after every start."""
    try:
        async with conn.transaction():
            await conn.execute(_WARM_UP)
            raise _RollBack
    except _RollBack:
        pass
    except asyncpg.PostgresError as exc:  # not migrated yet: nothing to warm
        log.debug("connection warm-up skipped", extra={"error": str(exc)})


class _RollBack(Exception):
    pass


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes back to the pool with. asyncpg's default reset
    (pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL) is one more round trip after
    every request; the sidecar leaves no session state behind (its advisory locks are
    transaction-level or released in `finally`, no cursors, no LISTEN, no SET outside a
    transaction). An open transaction is still rolled back by asyncpg before this runs."""


@contextlib.asynccontextmanager
async def counters_locked(
    pool: asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction holding the counters' advisory lock (sql/migrations/004_group_commit.sql):
    what changes counters outside the control batches (janitor, reconciliation, force-release)
    runs one at a time with the batches, so that no two of them can deadlock."""
    if isinstance(pool, asyncpg.Pool):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT sidecar_counters_lock()")
            yield conn
    else:
        async with pool.transaction():
            await pool.execute("SELECT sidecar_counters_lock()")
            yield pool


def migration_files() -> list[tuple[int, Path]]:
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded in schema_version. Returns the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, path in migration_files():
            if version in done:
                continue
            log.info("applying migration", extra={"migration": path.name})
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)", version, path.name
                )
            applied.append(path.name)
        # After a migration, every file again: a migration may drop a function whose file
        # did not change (to change its signature), and nothing else would create it again.
        applied += await _apply_functions(conn, every=bool(applied))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def _apply_functions(conn: asyncpg.Connection, every: bool = False) -> list[str]:
    done = {r["name"]: r["sha256"] for r in await conn.fetch(
        "SELECT name, sha256 FROM schema_functions")}
    applied = []
    for path in sorted(FUNCTIONS.glob("*.sql")):
        text = path.read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if done.get(path.name) == digest and not every:
            continue
        log.info("applying functions", extra={"functions": path.name})
        async with conn.transaction():
            await conn.execute(text)
            await conn.execute(
                """INSERT INTO schema_functions (name, sha256) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET sha256 = $2, applied_at = now()""",
                path.name, digest)
        applied.append(f"functions/{path.name}")
    return applied


async def pending(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
    return [p.name for v, p in migration_files() if v not in done]
