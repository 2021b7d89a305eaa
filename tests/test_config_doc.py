"""The configuration document: schema and references checked with JSON paths, applied in one
transaction by `sidecar import` (or not at all), exported back unchanged; and the database's
own constraints as the last guard against bad SQL."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidecar import config_doc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.json"


def sidecar_cli(
    database_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "SIDECAR_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())


def test_example_config_is_valid_and_exercises_every_feature() -> None:
    doc = example()
    assert config_doc.check(doc) == []
    exts = doc["extensions"]
    assert any("password" in e for e in exts)
    assert any(e.get("forward") for e in exts) and any(e.get("ring_self") for e in exts)
    assert any("contact" in e for e in exts) and any("sources" in e for e in exts)
    assert doc["numbers"] and len(doc["channels"]) >= 2
    assert any(a.get("parent") for a in doc["accounts"])


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda d: d["accounts"].append({"id": "acme"}), "$.accounts[4].id", "duplicate"),
        (
            lambda d: d["accounts"][0].update(parent="acme-support-alice"),
            "$.accounts[0].parent",
            "loop",
        ),
        (
            lambda d: d["accounts"][1].update(parent="ghost"),
            "$.accounts[1].parent",
            "unknown account",
        ),
        (
            lambda d: d["accounts"][0]["limits"].update(calls=-1),
            "$.accounts[0].limits.calls",
            "minimum",
        ),
        (
            lambda d: d["extensions"][0].update(account="ghost"),
            "$.extensions[0].account",
            "unknown",
        ),
        (
            lambda d: d["extensions"][0].update(forward=["not a number"]),
            "$.extensions[0].forward[0]",
            "does not match",
        ),
        (
            lambda d: d["extensions"][0].update(forward=["ghost"]),
            "$.extensions[0].forward[0]",
            "neither",
        ),
        (
            lambda d: d["extensions"][5].update(sources=["999.1.1.1"]),
            "$.extensions[5].sources[0]",
            "not an IP",
        ),
        (lambda d: d["numbers"][0].update(extension="ghost"), "$.numbers[0].extension", "unknown"),
        (
            lambda d: d["channels"][0].update(gateway="http://x"),
            "$.channels[0].gateway",
            "not valid",
        ),
        (lambda d: d.update(colour="blue"), "$", "colour"),
        (lambda d: d.update(counting="per_minute"), "$.counting", "per_minute"),
    ],
)
def test_problems_name_path_and_reason(mutate: Any, path: str, words: str) -> None:
    doc = example()
    mutate(doc)
    found = config_doc.check(doc)
    assert any(p["path"] == path and words in p["reason"] for p in found), found


async def test_import_export_round_trip(database_url: str) -> None:
    out = sidecar_cli(database_url, "import", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "imported 4 accounts, 6 extensions, 2 numbers, 2 channels" in out.stdout
    exported = json.loads(sidecar_cli(database_url, "export").stdout)
    # Passwords come back only as their digest hashes.
    assert "password" not in json.dumps(exported)
    assert all(len(e["ha1"]) == 32 for e in exported["extensions"] if "ha1" in e)
    # Importing the export changes nothing; exporting again gives the same document.
    out = sidecar_cli(database_url, "import", "-", stdin=json.dumps(exported))
    assert out.returncode == 0, out.stderr
    assert json.loads(sidecar_cli(database_url, "export").stdout) == exported
    conn = await asyncpg.connect(database_url)
    try:
        ha1 = await conn.fetchval("SELECT ha1 FROM subscriber WHERE username = '1001'")
    finally:
        await conn.close()
    assert ha1 == config_doc.ha1("1001", "sidecar.local", "s3cret")


async def test_bad_import_changes_nothing_and_prints_paths(database_url: str) -> None:
    assert sidecar_cli(database_url, "import", str(EXAMPLE)).returncode == 0
    before = sidecar_cli(database_url, "export").stdout
    doc = example()
    doc["accounts"] = doc["accounts"][:1]  # children and extensions now dangle
    doc["channels"][0]["limits"]["calls"] = -5
    out = sidecar_cli(database_url, "import", "-", stdin=json.dumps(doc))
    assert out.returncode == 1
    assert "$.channels[0].limits.calls: -5 is less than the minimum of 0" in out.stderr
    assert "nothing changed" in out.stderr
    doc["channels"][0]["limits"]["calls"] = 5
    out = sidecar_cli(database_url, "import", "-", stdin=json.dumps(doc))
    assert "$.extensions[0].account: unknown account 'acme-sales'" in out.stderr
    assert sidecar_cli(database_url, "export").stdout == before
    out = sidecar_cli(database_url, "import", "-", stdin="{not json")
    assert out.returncode == 2 and "not valid JSON" in out.stderr


async def test_dry_run_changes_nothing(database_url: str) -> None:
    out = sidecar_cli(database_url, "import", "--dry-run", str(EXAMPLE))
    assert out.returncode == 0 and out.stdout.startswith("dry run")
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0
    finally:
        await conn.close()


async def test_import_never_cuts_active_calls(database_url: str, pool: asyncpg.Pool) -> None:
    assert sidecar_cli(database_url, "import", str(EXAMPLE)).returncode == 0
    decision = await pool.fetchval(
        "SELECT admit('live', 't', '127.0.0.1', '1001', '+15551112222', '1001', 'n', 'b', "
        "false, 'r', interval '3 minutes')"
    )
    assert '"relay"' in decision
    # The account of the live call leaves the configuration, then comes back.
    doc = example()
    doc["accounts"] = [a for a in doc["accounts"] if a["id"] != "acme-sales"]
    doc["extensions"] = [e for e in doc["extensions"] if e["account"] != "acme-sales"]
    doc["extensions"] = [{**e, "forward": []} for e in doc["extensions"]]
    assert sidecar_cli(database_url, "import", "-", stdin=json.dumps(doc)).returncode == 0
    assert await pool.fetchval("SELECT count(*) FROM calls") == 1
    assert sidecar_cli(database_url, "import", str(EXAMPLE)).returncode == 0
    assert await pool.fetchval("SELECT calls_active FROM accounts WHERE id = 'acme-sales'") == 1
    assert await pool.fetchval("SELECT release('live', 't')") == 1
    assert await pool.fetch("SELECT * FROM counter_drift()") == []
    assert await pool.fetchval("SELECT sum(calls_active) FROM accounts") == 0


async def test_switching_counting_mode_recounts(pool: asyncpg.Pool, database_url: str) -> None:
    doc = copy.deepcopy(example())
    assert sidecar_cli(database_url, "import", "-", stdin=json.dumps(doc)).returncode == 0
    await pool.fetchval(
        "SELECT admit('fwd', 't', '127.0.0.3', 'x', '+15550002000', NULL, 'n', "
        "'b', false, 'r', interval '3 minutes')"
    )
    assert await pool.fetchval("SELECT calls_active FROM accounts WHERE id='acme'") == 1
    doc["counting"] = "per_leg"
    assert sidecar_cli(database_url, "import", "-", stdin=json.dumps(doc)).returncode == 0
    assert await pool.fetchval("SELECT calls_active FROM accounts WHERE id='acme'") == 3
    assert await pool.fetch("SELECT * FROM counter_drift()") == []


@pytest.mark.parametrize(
    "statement, words",
    [
        ("UPDATE accounts SET calls_limit = -1 WHERE id = 'acme'", "limit_check"),
        ("UPDATE accounts SET parent = 'acme-support-alice' WHERE id = 'acme'", "own ancestor"),
        ("UPDATE accounts SET parent = 'acme' WHERE id = 'acme'", "own ancestor"),
        ("INSERT INTO extensions (id, account) VALUES ('x', 'ghost')", "foreign key"),
        ("INSERT INTO numbers VALUES ('+1', 'ghost')", "foreign key"),
        ("DELETE FROM accounts WHERE id = 'acme-sales'", "foreign key"),
        ("INSERT INTO accounts (id) VALUES ('has space')", "ident_check"),
        ("UPDATE channels SET gateway = 'http://x' WHERE id = 'carrier-a'", "gateway_check"),
        ("UPDATE accounts SET calls_active = -1 WHERE id = 'acme'", "active_check"),
        ("UPDATE accounts SET name = repeat('x', 257) WHERE id = 'acme'", "name_check"),
        ("UPDATE accounts SET cps_burst = 0 WHERE id = 'acme'", "burst_check"),
        ("UPDATE channels SET prefixes = ARRAY[NULL] WHERE id = 'carrier-a'", "prefixes_check"),
        ("UPDATE channels SET calls_active = -1 WHERE id = 'carrier-a'", "active_check"),
        ("INSERT INTO calls (call_id, from_tag, state, decision, expires_at)"
         " VALUES ('c', 'f', 'lost', '{}', now())", "call_state_check"),
        ("INSERT INTO calls (call_id, from_tag, state, decision, expires_at)"
         " VALUES ('', 'f', 'ringing', '{}', now())", "call_id_check"),
        ("INSERT INTO numbers VALUES ('abc', 'ivr')", "number_check"),
    ],
)
async def test_constraints_refuse_bad_sql(
    database_url: str, pool: asyncpg.Pool, statement: str, words: str
) -> None:
    assert sidecar_cli(database_url, "import", str(EXAMPLE)).returncode == 0
    with pytest.raises(asyncpg.PostgresError) as err:
        await pool.execute(statement)
    assert words in str(err.value) or words in str(getattr(err.value, "constraint_name", ""))


async def test_reapplying_writes_only_what_changed(pool: asyncpg.Pool) -> None:
    """Admissions wait while a configuration change holds its locks: the same document
    applied again writes no row (xmin stays), and one changed limit writes one row."""
    doc = example()

    async def apply(d: dict[str, Any]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await config_doc.apply(conn, d, "sidecar.local")

    async def versions() -> dict[str, str]:
        rows = await pool.fetch(
            "SELECT 'a:' || id AS k, xmin::text AS v FROM accounts UNION ALL "
            "SELECT 'c:' || id, xmin::text FROM channels UNION ALL "
            "SELECT 'e:' || id, xmin::text FROM extensions UNION ALL "
            "SELECT 'n:' || number, xmin::text FROM numbers"
        )
        return {r["k"]: r["v"] for r in rows}

    async def export() -> dict[str, Any]:
        async with pool.acquire() as conn:
            return await config_doc.export(conn)

    await apply(doc)
    before = await versions()
    exported = await export()
    await apply(doc)
    assert await versions() == before
    doc["accounts"][1].setdefault("limits", {})["calls"] = 77
    await apply(doc)
    after = await versions()
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {f"a:{doc['accounts'][1]['id']}"}
    assert set(after) == set(before)
    # Removing an item deletes it, and the export is the document again.
    doc["numbers"] = doc["numbers"][:1]
    await apply(doc)
    assert len([k for k in await versions() if k.startswith("n:")]) == 1
    kept = doc["numbers"][0]["number"]
    assert (await export())["numbers"] == [n for n in exported["numbers"] if n["number"] == kept]


async def test_config_change_outlasts_the_call_control_timeout(database_url: str) -> None:
    """A configuration change waits for its table locks as long as SIDECAR_ADMIN_DB_TIMEOUT
    says, not the 2 s meant for call control (CI once saw a PUT fail after 2.4 s behind
    autovacuum's lock)."""
    from tests.helpers import running_sidecar

    blocker = await asyncpg.connect(database_url)
    try:
        async with running_sidecar(database_url, db_timeout=0.3, admin_db_timeout=10) as sc:
            tr = blocker.transaction()
            await tr.start()
            # What a running (auto)vacuum holds: it conflicts with the change's EXCLUSIVE.
            await blocker.execute("LOCK TABLE accounts IN SHARE UPDATE EXCLUSIVE MODE")
            put = asyncio.ensure_future(sc.request("PUT", "/v1/config", example()))
            await asyncio.sleep(1.0)
            assert not put.done()
            await tr.rollback()
            status, out = await put
            assert status == 200, out
            assert out["counts"]["accounts"] == len(example()["accounts"])
    finally:
        await blocker.close()
