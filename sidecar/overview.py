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
from .errors import ApiError
from .jsonio import respond
from .state import POOL, SETTINGS

# Query parameters, one rule each; the OpenAPI document (openapi.py) is built from this table.
# name: (type, minimum, maximum, default, description)
QUERY: dict[str, tuple[str, int, int, int | None, str]] = {
    "limit": ("integer", 1, 500, 50, "Rows per page"),
    "offset": ("integer", 0, 1_000_000, 0, "Rows to skip (paging)"),
    "minutes": ("integer", 1, 1440, 15, "How many minutes back, this one included"),
    "q": ("string", 1, 128, None, "Part of the id or name, case-insensitive"),
    "under": ("string", 1, 128, None, "Only this account and the accounts below it"),
}
# The parameters each route takes.
PARAMS = {
    "/v1/usage/accounts": ("under", "q", "limit", "offset"),
    "/v1/usage/channels": ("q", "limit", "offset"),
    "/v1/refusals": ("minutes",),
    "/v1/nodes": (),
    "/v1/summary": (),
}


def query(request: web.Request, name: str) -> Any:
    """One query parameter checked against QUERY: an error names it and says why."""
    kind, low, high, default, _ = QUERY[name]
    raw = request.query.getall(name, [])
    if not raw:
        return default
    value = raw[0]
    if len(raw) > 1:
        reason = "given more than once"
    elif kind == "integer":
        if value.isascii() and value.isdigit() and low <= int(value) <= high:
            return int(value)
        reason = f"an integer from {low} to {high}"
    elif low <= len(value) <= high and "\x00" not in value:
        return value
    else:
        reason = f"{low} to {high} characters, no NUL"
    raise ApiError(400, "invalid_query", f"{name}: {reason}",
                   [{"path": f"query.{name}", "reason": reason}])


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
    limit, offset = query(request, "limit"), query(request, "offset")
    under = query(request, "under")
    search = query(request, "q")
    rows, total = await _page(request, "usage_accounts", (under, search), limit, offset)
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
    limit, offset = query(request, "limit"), query(request, "offset")
    rows, total = await _page(request, "usage_channels", (query(request, "q"),), limit, offset)
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
    minutes = query(request, "minutes")
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
