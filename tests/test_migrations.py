"""Migrations and function files: an upgrade keeps the calls it finds, function files are
applied when they change and only then."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from sidecar import db
from tests.conftest import create_database, drop_database


@pytest.fixture
async def empty_url(pg_server_url: str) -> AsyncIterator[str]:
    url = await create_database(pg_server_url, template=None)
    yield url
    await drop_database(pg_server_url, url)


async def test_005_moves_slot_rows_onto_their_calls(empty_url: str) -> None:
    """A database at 004 with live calls is upgraded: every slot row becomes an entry of its
    call's arrays, the `slots` view shows the same slots, the counters do not drift."""
    conn = await asyncpg.connect(empty_url)
    try:
        await conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for version, path in db.migration_files():
            if version >= 5:
                break
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                               version, path.name)
        await conn.execute("""
            INSERT INTO accounts (id) VALUES ('acme');
            INSERT INTO extensions (id, account) VALUES ('1001', 'acme'), ('1002', 'acme');
            INSERT INTO channels (id, gateway, prefixes) VALUES ('trunk', 'sip:gw', '{+}');
            INSERT INTO calls (call_id, from_tag, state, decision, expires_at) VALUES
                ('two-legs', 'a', 'ringing', '{}', 'infinity'),
                ('one-leg', 'b', 'answered', '{}', 'infinity'),
                ('refused', 'c', 'refused', '{}', 'infinity');
            INSERT INTO slots (call_id, from_tag, leg, counter) VALUES
                ('two-legs', 'a', 0, 'account:acme:calls'),
                ('two-legs', 'a', 1, 'account:acme:calls'),
                ('two-legs', 'a', 1, 'channel:trunk:calls'),
                ('one-leg', 'b', 0, 'account:acme:calls');
            SELECT rebuild_counters();""")
        before = await conn.fetch("SELECT * FROM slots ORDER BY 1, 2, 3, 4")
        assert len(before) == 4

        applied = await db.migrate(conn)

        assert "005_lean_core.sql" in applied
        rows = {r["call_id"]: (r["slot_legs"], r["slot_keys"]) for r in await conn.fetch(
            "SELECT call_id, slot_legs, slot_keys FROM calls")}
        assert rows["two-legs"] == ([0, 1, 1], ["account:acme:calls", "account:acme:calls",
                                                "channel:trunk:calls"])
        assert rows["one-leg"] == ([0], ["account:acme:calls"])
        assert rows["refused"] == ([], [])
        after = await conn.fetch("SELECT * FROM slots ORDER BY 1, 2, 3, 4")
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        assert await conn.fetch("SELECT * FROM counter_drift()") == []
        # The upgraded database releases what it found.
        assert await conn.fetchval("SELECT release('two-legs', 'a')") == 1
        assert await conn.fetchval("SELECT calls_active FROM channels") == 0
        assert await conn.fetch("SELECT * FROM counter_drift()") == []
    finally:
        await conn.close()


async def test_function_files_applied_when_changed(
        empty_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await asyncpg.connect(empty_url)
    try:
        applied = await db.migrate(conn)
        files = sorted(p.name for p in db.FUNCTIONS.glob("*.sql"))
        assert files and [a for a in applied if a.startswith("functions/")] == [
            f"functions/{f}" for f in files]
        assert await db.migrate(conn) == []   # nothing changed: nothing applied

        # A copy of the files where one rule changed: only that file is applied again.
        for name in files:
            (tmp_path / name).write_text((db.FUNCTIONS / name).read_text())
        (tmp_path / files[0]).write_text(
            (db.FUNCTIONS / files[0]).read_text()
            + "\nCREATE OR REPLACE FUNCTION sidecar_probe() RETURNS int LANGUAGE sql "
              "AS 'SELECT 42';\n")
        monkeypatch.setattr(db, "FUNCTIONS", tmp_path)
        assert await db.migrate(conn) == [f"functions/{files[0]}"]
        assert await conn.fetchval("SELECT sidecar_probe()") == 42
        assert await db.migrate(conn) == []
    finally:
        await conn.close()
