"""SQL administration as documented in sql/README.md: what the constraints refuse, and the
examples there work as written."""

from __future__ import annotations

import asyncpg
import pytest

from sidecar.config_doc import ha1
from tests.helpers import running_sidecar
from tests.test_admin_resources import BASE

REFUSED = [
    ("UPDATE accounts SET calls_limit = -1 WHERE id = 'acme'", asyncpg.CheckViolationError),
    ("UPDATE channels SET calls_limit = -5 WHERE id = 'carrier-a'", asyncpg.CheckViolationError),
    ("UPDATE accounts SET parent = 'acme' WHERE id = 'acme'", asyncpg.CheckViolationError),
    ("UPDATE accounts SET parent = 'acme-sales' WHERE id = 'acme'", asyncpg.CheckViolationError),
    ("UPDATE accounts SET parent = 'ghost' WHERE id = 'acme'", asyncpg.ForeignKeyViolationError),
    (
        "INSERT INTO extensions (id, account) VALUES ('e9', 'ghost')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "INSERT INTO numbers (number, extension) VALUES ('123', 'ghost')",
        asyncpg.ForeignKeyViolationError,
    ),
    ("DELETE FROM accounts WHERE id = 'acme'", asyncpg.ForeignKeyViolationError),
    ("DELETE FROM extensions WHERE id = 'ivr'", asyncpg.ForeignKeyViolationError),
    ("INSERT INTO accounts (id) VALUES ('has space')", asyncpg.CheckViolationError),
    ("INSERT INTO accounts (id) VALUES ('a@b')", asyncpg.CheckViolationError),
    ("INSERT INTO numbers (number, extension) VALUES ('12a', 'ivr')", asyncpg.CheckViolationError),
    ("UPDATE extensions SET ha1 = 'XYZ' WHERE id = 'ivr'", asyncpg.CheckViolationError),
    ("UPDATE extensions SET contact = 'http://x' WHERE id = 'ivr'", asyncpg.CheckViolationError),
    ("UPDATE channels SET gateway = 'tel:1' WHERE id = 'carrier-a'", asyncpg.CheckViolationError),
    (
        "UPDATE extensions SET forward = ARRAY['1001', NULL] WHERE id = 'ivr'",
        asyncpg.CheckViolationError,
    ),
    (
        "UPDATE channels SET sources = '{not-an-ip}' WHERE id = 'carrier-a'",
        asyncpg.InvalidTextRepresentationError,
    ),
    ("UPDATE settings SET counting = 'sometimes'", asyncpg.CheckViolationError),
]


async def test_constraints_refuse_bad_data(database_url: str, pool: asyncpg.Pool) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        status, before = await sc.request("GET", "/v1/config")
        for sql, error in REFUSED:
            with pytest.raises(error):
                await pool.execute(sql)
        status, after = await sc.request("GET", "/v1/config")
        assert after == before


async def test_readme_examples(database_url: str, pool: asyncpg.Pool) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASE)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO accounts (id, name, parent, calls_limit) "
                "VALUES ('globex', 'Globex', NULL, 20)"
            )
            await conn.execute(
                "INSERT INTO extensions (id, account, ha1) "
                "VALUES ('2001', 'globex', md5('2001:sidecar.local:s3cret'))"
            )
            await conn.execute(
                "INSERT INTO numbers (number, extension) VALUES ('+15550002000', '2001')"
            )
        # Children before parents, checked at COMMIT.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SET CONSTRAINTS ALL DEFERRED")
            await conn.execute("INSERT INTO accounts (id, parent) VALUES ('kid', 'later')")
            await conn.execute("INSERT INTO accounts (id) VALUES ('later')")
        await pool.execute("UPDATE accounts SET calls_limit = 120 WHERE id = 'acme'")
        await pool.execute(
            "UPDATE accounts SET public_limit = 10, internal_limit = NULL WHERE id = 'acme-sales'"
        )
        await pool.execute("UPDATE settings SET counting = 'per_leg'")
        assert await pool.fetch("SELECT * FROM counter_drift()") == []
        status, ext = await sc.request("GET", "/v1/extensions/2001")
        assert ext == {
            "id": "2001",
            "account": "globex",
            "ha1": ha1("2001", "sidecar.local", "s3cret"),
        }
        status, acc = await sc.request("GET", "/v1/accounts/kid")
        assert acc == {"id": "kid", "parent": "later"}
        usage = await sc.usage()
        assert usage["accounts"]["acme"]["calls"]["limit"] == 120
        assert usage["accounts"]["acme-sales"]["internal"]["limit"] is None
        status, doc = await sc.request("GET", "/v1/config")
        assert doc["counting"] == "per_leg"
