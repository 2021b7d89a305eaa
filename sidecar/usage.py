"""Usage of every counter against its limit, and the active calls."""

from __future__ import annotations

from typing import Any

import asyncpg

_USAGE_ACCOUNTS = """
SELECT id, calls_active, calls_limit, public_active, public_limit, internal_active, internal_limit
FROM accounts ORDER BY id"""
_USAGE_CHANNELS = "SELECT id, calls_active, calls_limit FROM channels ORDER BY id"


async def usage(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, Any]:
    """{"accounts": {id: {"calls": {"active", "limit"}, "public": ..., "internal": ...}},
    "channels": {id: {"calls": {...}}}}; limit is null when unlimited."""
    accounts = {
        r["id"]: {
            dim: {"active": r[f"{dim}_active"], "limit": r[f"{dim}_limit"]}
            for dim in ("calls", "public", "internal")
        }
        for r in await conn.fetch(_USAGE_ACCOUNTS)
    }
    channels = {
        r["id"]: {"calls": {"active": r["calls_active"], "limit": r["calls_limit"]}}
        for r in await conn.fetch(_USAGE_CHANNELS)
    }
    return {"accounts": accounts, "channels": channels}


_CALLS = """
SELECT c.call_id, c.from_tag, c.state, c.origin, c.destination, c.node, c.late,
       c.answered_leg, c.created_at, c.answered_at, c.expires_at, c.decision -> 'legs' AS legs,
       (SELECT array_agg(DISTINCT s.counter ORDER BY s.counter) FROM slots s
        WHERE s.call_id = c.call_id AND s.from_tag = c.from_tag) AS counters
FROM calls c
WHERE c.state IN ('ringing', 'answered')
  AND ($1::text IS NULL OR c.state = $1)
  AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM slots s WHERE s.call_id = c.call_id
        AND s.from_tag = c.from_tag AND s.counter LIKE 'account:' || $2 || ':%'))
  AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM slots s WHERE s.call_id = c.call_id
        AND s.from_tag = c.from_tag AND s.counter = 'channel:' || $3 || ':calls'))
  AND ($4::text IS NULL OR (c.created_at, c.call_id, c.from_tag) >
        (SELECT created_at, call_id, from_tag FROM calls
         WHERE call_id = $4 AND from_tag = coalesce($5, from_tag) LIMIT 1))
ORDER BY c.created_at, c.call_id, c.from_tag
LIMIT $6"""


async def active_calls(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    state: str | None = None,
    account: str | None = None,
    channel: str | None = None,
    after: tuple[str, str | None] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    import orjson

    rows = await conn.fetch(
        _CALLS,
        state,
        account,
        channel,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    out = []
    for r in rows:
        item = dict(r)
        for key in ("created_at", "answered_at", "expires_at"):
            item[key] = item[key].isoformat() if item[key] else None
        item["legs"] = orjson.loads(item["legs"]) if item["legs"] else []
        item["counters"] = list(item["counters"] or [])
        out.append(item)
    return out
