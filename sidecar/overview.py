"""What the operator watches (the /ui/ page reads only these and the rest of /v1): usage
against every limit one page at a time, busiest first; the Kamailio nodes as their heartbeats
last showed them; refusals for a limit per minute; a summary. Bearer token required.

Everything here is read from PostgreSQL, so every sidecar serves the same picture."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from .admin import require_token
from .jsonio import config_def, query_schema, read_query, respond
from .state import POOL, SETTINGS

# The query each route takes: the handler checks it (read_query) and the OpenAPI document
# lists it (openapi.py), from these schemas.
_PAGE = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50,
              "description": "rows per page"},
    "offset": {"type": "integer", "minimum": 0, "maximum": 1_000_000, "default": 0,
               "description": "rows to skip"},
}
_SEARCH = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\u0000]*$",
           "description": "part of the id or name, case-insensitive"}
ACCOUNTS_QUERY = query_schema({
    "under": {**config_def("ident"), "description": "only this account and those below it"},
    "q": _SEARCH,
    **_PAGE,
})
CHANNELS_QUERY = query_schema({"q": _SEARCH, **_PAGE})
REFUSALS_QUERY = query_schema({
    "minutes": {"type": "integer", "minimum": 1, "maximum": 1440, "default": 15,
                "description": "how many minutes back, the current one included"},
})
NO_QUERY = query_schema({})


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# The chain from the root down to one account (NULL when there is no such account).
_PATH = """
    WITH RECURSIVE up AS (
        SELECT id, parent, 0 AS depth FROM accounts WHERE id = $1
        UNION ALL
        SELECT a.id, a.parent, up.depth + 1 FROM accounts a JOIN up ON a.id = up.parent
        WHERE up.depth < 100
    )
    SELECT array_agg(id::text ORDER BY depth DESC) FROM up"""


async def usage_accounts(request: web.Request) -> web.Response:
    require_token(request)
    q = read_query(request, ACCOUNTS_QUERY)
    limit, offset, under = q.get("limit", 50), q.get("offset", 0), q.get("under")
    rows, total = await _page(request, "usage_accounts", (under, q.get("q")), limit, offset)
    under_path = await request.app[POOL].fetchval(_PATH, under) if under else None
    accounts = [
        {
            "id": r["id"],
            "name": r["name"],
            "parent": r["parent"],
            "path": list(r["path"]),
            "children": r["children"],
            "usage": orjson.loads(r["usage"]),
            "fullness": r["fullness"],
        }
        for r in rows
    ]
    return respond({
        "accounts": accounts, "total": total, "limit": limit, "offset": offset,
        "under_path": list(under_path) if under_path else None,
    })


async def usage_channels(request: web.Request) -> web.Response:
    require_token(request)
    q = read_query(request, CHANNELS_QUERY)
    limit, offset = q.get("limit", 50), q.get("offset", 0)
    rows, total = await _page(request, "usage_channels", (q.get("q"),), limit, offset)
    channels = [
        {"id": r["id"], "name": r["name"], "usage": orjson.loads(r["usage"]),
         "fullness": r["fullness"]}
        for r in rows
    ]
    return respond({"channels": channels, "total": total, "limit": limit, "offset": offset})


async def _page(
    request: web.Request, function: str, args: tuple[Any, ...], limit: int, offset: int
) -> tuple[list[Any], int]:
    """One page of usage_accounts() or usage_channels(), and how many rows match in all (a
    page past the end asks again for the count)."""
    pool = request.app[POOL]
    marks = ", ".join(f"${i}" for i in range(1, len(args) + 3))
    sql = f"SELECT * FROM {function}({marks})"  # noqa: S608 - function is one of two names
    rows = await pool.fetch(sql, *args, limit, offset)
    if rows or offset == 0:
        return rows, rows[0]["total"] if rows else 0
    first = await pool.fetch(sql, *args, 1, 0)
    return rows, first[0]["total"] if first else 0


_NODES = """
    SELECT node, boot, booted_at, seen_at, dialogs,
           extract(epoch FROM now() - seen_at)::float8 AS age
    FROM nodes ORDER BY node"""


async def nodes(request: web.Request) -> web.Response:
    require_token(request)
    read_query(request, NO_QUERY)
    silent_after = request.app[SETTINGS].node_silent_after
    rows = await request.app[POOL].fetch(_NODES)
    return respond({
        "silent_after": silent_after,
        "nodes": [
            {
                "node": r["node"],
                "boot": r["boot"],
                "booted_at": _iso(r["booted_at"]),
                "seen_at": _iso(r["seen_at"]),
                "seconds_since": round(r["age"], 1),
                "alive": r["age"] <= silent_after,
                "dialogs": r["dialogs"],
            }
            for r in rows
        ],
    })


_REFUSALS = """
    SELECT minute, counter, refusals FROM refusal_minutes
    WHERE minute >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
    ORDER BY minute, counter"""


async def refusals(request: web.Request) -> web.Response:
    require_token(request)
    minutes = read_query(request, REFUSALS_QUERY).get("minutes", 15)
    rows = await request.app[POOL].fetch(_REFUSALS, minutes)
    return respond({
        "minutes": minutes,
        "refusals": [
            {"minute": _iso(r["minute"]), "counter": r["counter"], "refusals": r["refusals"]}
            for r in rows
        ],
    })


_SUMMARY = """
    SELECT (SELECT count(*) FROM calls WHERE state = 'ringing') AS ringing,
           (SELECT count(*) FROM calls WHERE state = 'answered') AS answered,
           (SELECT count(*) FROM accounts) AS accounts,
           (SELECT count(*) FROM channels) AS channels,
           (SELECT coalesce(sum(refusals), 0) FROM refusal_minutes
            WHERE minute = date_trunc('minute', now())) AS refusals_this_minute,
           now() AS at"""


async def summary(request: web.Request) -> web.Response:
    require_token(request)
    read_query(request, NO_QUERY)
    r = await request.app[POOL].fetchrow(_SUMMARY)
    return respond({
        "calls": {"ringing": r["ringing"], "answered": r["answered"]},
        "accounts": r["accounts"],
        "channels": r["channels"],
        "refusals_this_minute": r["refusals_this_minute"],
        "at": _iso(r["at"]),
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage/accounts", usage_accounts)
    app.router.add_get("/v1/usage/channels", usage_channels)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/refusals", refusals)
    app.router.add_get("/v1/summary", summary)
