"""The configuration document: check it, make the database exactly it, and give it back.

Checks run in two layers: the JSON Schema (shape, formats) and the references between
objects (duplicates, unknown parents, loops...), each problem with its JSON path. The
database's own constraints are the last guard. Applying runs in one transaction: either the
configuration becomes the document, or nothing changes. Call records are not touched, so an
import never cuts an active call.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

import asyncpg

from .jsonio import problems as schema_problems

Problem = dict[str, str]


def ha1(user: str, realm: str, password: str) -> str:
    """The digest HA1 Kamailio's auth_db compares against: md5(user:realm:password)."""
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()  # noqa: S324


def check(doc: Any) -> list[Problem]:
    """Every problem of the document, each with its JSON path; empty when it can be applied."""
    found = schema_problems("config", doc)
    if found:
        return found
    found = []

    def dupes(kind: str, key: str) -> set[str]:
        seen: set[str] = set()
        for i, item in enumerate(doc.get(kind, [])):
            if item[key] in seen:
                found.append(
                    {"path": f"$.{kind}[{i}].{key}", "reason": f"duplicate {key} {item[key]!r}"}
                )
            seen.add(item[key])
        return seen

    accounts = dupes("accounts", "id")
    extensions = dupes("extensions", "id")
    numbers = dupes("numbers", "number")
    dupes("channels", "id")

    parents = {a["id"]: a.get("parent") for a in doc.get("accounts", [])}
    for i, acc in enumerate(doc.get("accounts", [])):
        parent = acc.get("parent")
        if parent is None:
            continue
        if parent not in accounts:
            found.append(
                {"path": f"$.accounts[{i}].parent", "reason": f"unknown account {parent!r}"}
            )
            continue
        seen = {acc["id"]}
        cur: str | None = parent
        while cur is not None:
            if cur in seen:
                found.append(
                    {
                        "path": f"$.accounts[{i}].parent",
                        "reason": f"loop in the account tree through {cur!r}",
                    }
                )
                break
            seen.add(cur)
            cur = parents.get(cur)

    for i, ext in enumerate(doc.get("extensions", [])):
        if ext["account"] not in accounts:
            found.append(
                {
                    "path": f"$.extensions[{i}].account",
                    "reason": f"unknown account {ext['account']!r}",
                }
            )
        for j, src in enumerate(ext.get("sources", [])):
            found.extend(_cidr_problem(f"$.extensions[{i}].sources[{j}]", src))
        for j, target in enumerate(ext.get("forward", [])):
            if target not in extensions and target not in numbers and not _is_number(target):
                found.append(
                    {
                        "path": f"$.extensions[{i}].forward[{j}]",
                        "reason": f"{target!r} is neither an extension, a number, "
                        "nor an external number",
                    }
                )
    for i, num in enumerate(doc.get("numbers", [])):
        if num["extension"] not in extensions:
            found.append(
                {
                    "path": f"$.numbers[{i}].extension",
                    "reason": f"unknown extension {num['extension']!r}",
                }
            )
    for i, chan in enumerate(doc.get("channels", [])):
        for j, src in enumerate(chan.get("sources", [])):
            found.extend(_cidr_problem(f"$.channels[{i}].sources[{j}]", src))
        if chan.get("prefixes") and not chan.get("gateway"):
            found.append(
                {
                    "path": f"$.channels[{i}].gateway",
                    "reason": "a channel with prefixes needs a gateway for outbound calls",
                }
            )
    return sorted(found, key=lambda p: p["path"])


def _is_number(value: str) -> bool:
    stripped = value[1:] if value.startswith("+") else value
    return 0 < len(stripped) <= 32 and all(c in "0123456789*#" for c in stripped)


def _networks(values: list[str]) -> list[str]:
    """Sources as PostgreSQL's cidr takes them: host bits cleared (10.0.0.1/8 is 10.0.0.0/8)."""
    return [str(ipaddress.ip_network(v, strict=False)) for v in values]


def _cidr_problem(path: str, value: str) -> list[Problem]:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        return [{"path": path, "reason": f"not an IP address or network: {exc}"}]
    return []


def _limit(obj: dict[str, Any], key: str) -> int | None:
    value = (obj.get("limits") or {}).get(key)
    return None if value is None else int(value)


# The configuration's columns of each table, in the order `_rows` gives them, and the key
# an upsert matches on. Counters (*_active) are not among them: an import never moves one.
_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "accounts": (
        "id",
        (
            "id",
            "name",
            "parent",
            "calls_limit",
            "public_limit",
            "internal_limit",
            "cps_limit",
            "cps_burst",
        ),
    ),
    "channels": (
        "id",
        (
            "id",
            "name",
            "calls_limit",
            "sources",
            "gateway",
            "prefixes",
            "priority",
            "cps_limit",
            "cps_burst",
        ),
    ),
    "extensions": (
        "id",
        ("id", "account", "name", "ha1", "contact", "sources", "forward", "ring_self"),
    ),
    "numbers": ("number", ("number", "extension")),
}
# Deletions run from the leaves up (a number names an extension, an extension an account).
_DELETE_ORDER = ("numbers", "extensions", "accounts", "channels")
_UPSERT_ORDER = ("accounts", "channels", "extensions", "numbers")


def _rows(doc: dict[str, Any], realm: str) -> dict[str, list[tuple[Any, ...]]]:
    """The document as rows of each table, in `_TABLES`' column order."""
    return {
        "accounts": [
            (
                a["id"],
                a.get("name"),
                a.get("parent"),
                _limit(a, "calls"),
                _limit(a, "public"),
                _limit(a, "internal"),
                _limit(a, "cps"),
                _limit(a, "cps_burst"),
            )
            for a in doc.get("accounts", [])
        ],
        "channels": [
            (
                c["id"],
                c.get("name"),
                _limit(c, "calls"),
                _networks(c.get("sources", [])),
                c.get("gateway"),
                c.get("prefixes", []),
                c.get("priority", 0),
                _limit(c, "cps"),
                _limit(c, "cps_burst"),
            )
            for c in doc.get("channels", [])
        ],
        "extensions": [
            (
                e["id"],
                e["account"],
                e.get("name"),
                ha1(e["id"], realm, e["password"]) if "password" in e else e.get("ha1"),
                e.get("contact"),
                _networks(e.get("sources", [])),
                e.get("forward", []),
                bool(e.get("ring_self", False)),
            )
            for e in doc.get("extensions", [])
        ],
        "numbers": [(n["number"], n["extension"]) for n in doc.get("numbers", [])],
    }


async def apply(
    conn: asyncpg.Connection,
    doc: dict[str, Any],
    realm: str,
    timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's per-statement timeout
) -> dict[str, int]:
    """Make the configuration exactly `doc`. The caller holds the transaction.

    Admissions stop while the tables are locked, so everything that can run before the lock
    does: the rows are computed and copied into temporary tables (their types are the real
    columns' domains, so a bad value fails here, with nothing locked). Under the lock, a few
    set-based statements delete what the document no longer has and write only the rows
    that differ: replacing 30,000 accounts and extensions with themselves writes nothing.
    `timeout` bounds each statement (None: the connection's own command timeout).
    """
    rows = _rows(doc, realm)
    for table, (_key, cols) in _TABLES.items():
        await conn.execute(
            f"CREATE TEMP TABLE staged_{table} ON COMMIT DROP AS "
            f"SELECT {', '.join(cols)} FROM {table} WITH NO DATA",
            timeout=timeout,
        )
        await conn.copy_records_to_table(
            f"staged_{table}", records=rows[table], columns=list(cols), timeout=timeout
        )
        await conn.execute(f"ANALYZE staged_{table}", timeout=timeout)

    # Admissions lock accounts then channels: take the tables in that same order.
    await conn.execute(
        "LOCK TABLE accounts, channels, extensions, numbers IN EXCLUSIVE MODE", timeout=timeout
    )
    await conn.execute("SET CONSTRAINTS ALL DEFERRED")
    if "counting" in doc:
        await conn.execute("UPDATE settings SET counting = $1", doc["counting"], timeout=timeout)
    for table in _DELETE_ORDER:
        key = _TABLES[table][0]
        await conn.execute(
            f"DELETE FROM {table} t WHERE NOT EXISTS "
            f"(SELECT FROM staged_{table} s WHERE s.{key} = t.{key})",
            timeout=timeout,
        )
    for table in _UPSERT_ORDER:
        key, cols = _TABLES[table]
        rest = [c for c in cols if c != key]
        # Only the rows that are new or differ reach the upsert (the lock keeps the join
        # true until commit): ON CONFLICT would lock, and so write, every row it meets.
        await conn.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) "
            f"SELECT {', '.join(f's.{c}' for c in cols)} FROM staged_{table} s "
            f"LEFT JOIN {table} t ON t.{key} = s.{key} "
            f"WHERE t.{key} IS NULL OR ({', '.join(f't.{c}' for c in rest)}) "
            f"IS DISTINCT FROM ({', '.join(f's.{c}' for c in rest)}) "
            f"ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in rest),
            timeout=timeout,
        )
    await conn.execute("SET CONSTRAINTS ALL IMMEDIATE", timeout=timeout)
    for table in _TABLES:
        await conn.execute(f"DROP TABLE staged_{table}")
    return {t: len(rows[t]) for t in ("accounts", "extensions", "numbers", "channels")}


def _net(value: Any) -> str:
    net = ipaddress.ip_network(str(value), strict=False)
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def _limits(row: asyncpg.Record, keys: tuple[str, ...]) -> dict[str, int]:
    """The limits object of an account or channel row: the *_limit columns named, and the
    calls-per-second burst when set."""
    out = {k: row[f"{k}_limit"] for k in keys if row[f"{k}_limit"] is not None}
    if row["cps_burst"] is not None:
        out["cps_burst"] = row["cps_burst"]
    return out


async def export(conn: asyncpg.Connection) -> dict[str, Any]:
    """The configuration as a document that `apply` takes back unchanged."""
    counting = await conn.fetchval("SELECT counting FROM settings")
    accounts = []
    for r in await conn.fetch(
        """WITH RECURSIVE t AS (
               SELECT a.*, 0 AS depth FROM accounts a WHERE parent IS NULL
               UNION ALL SELECT a.*, t.depth + 1 FROM accounts a JOIN t ON a.parent = t.id)
           SELECT * FROM t ORDER BY depth, id"""
    ):
        acc: dict[str, Any] = {"id": r["id"]}
        if r["name"] is not None:
            acc["name"] = r["name"]
        if r["parent"] is not None:
            acc["parent"] = r["parent"]
        limits = _limits(r, ("calls", "public", "internal", "cps"))
        if limits:
            acc["limits"] = limits
        accounts.append(acc)
    extensions = []
    for r in await conn.fetch("SELECT * FROM extensions ORDER BY id"):
        ext: dict[str, Any] = {"id": r["id"], "account": r["account"]}
        for key in ("name", "ha1", "contact"):
            if r[key] is not None:
                ext[key] = r[key]
        if r["sources"]:
            ext["sources"] = [_net(s) for s in r["sources"]]
        if r["forward"]:
            ext["forward"] = list(r["forward"])
        if r["ring_self"]:
            ext["ring_self"] = True
        extensions.append(ext)
    numbers = [
        {"number": r["number"], "extension": r["extension"]}
        for r in await conn.fetch("SELECT * FROM numbers ORDER BY number")
    ]
    channels = []
    for r in await conn.fetch("SELECT * FROM channels ORDER BY priority, id"):
        chan: dict[str, Any] = {"id": r["id"]}
        if r["name"] is not None:
            chan["name"] = r["name"]
        limits = _limits(r, ("calls", "cps"))
        if limits:
            chan["limits"] = limits
        if r["sources"]:
            chan["sources"] = [_net(s) for s in r["sources"]]
        if r["gateway"] is not None:
            chan["gateway"] = r["gateway"]
        if r["prefixes"]:
            chan["prefixes"] = list(r["prefixes"])
        if r["priority"]:
            chan["priority"] = r["priority"]
        channels.append(chan)
    return {
        "counting": counting,
        "accounts": accounts,
        "extensions": extensions,
        "numbers": numbers,
        "channels": channels,
    }
