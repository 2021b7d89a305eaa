"""The admin API under /v1: configuration, usage, calls. Bearer token required."""

from __future__ import annotations

import hmac
import logging
from datetime import timedelta
from typing import Any

import orjson
from aiohttp import web

from . import config_doc, db
from .errors import ApiError
from .jsonio import (
    compile_schema,
    config_def,
    integral,
    load,
    problems,
    query_schema,
    read_body,
    read_query,
    respond,
)
from .state import METRICS, POOL, SETTINGS
from .usage import active_calls, usage

log = logging.getLogger("sidecar.admin")


def require_token(request: web.Request) -> None:
    """Authorization: Bearer <token>, compared in constant time."""
    expected = request.app[SETTINGS].admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if (
        not expected
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(given.strip().encode(), expected.encode())
    ):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="sidecar"'},
        )


MAX_CALLS_PAGE = 1000
_TEXT = {"type": "string", "pattern": "^[^\\u0000]*$"}  # PostgreSQL text cannot hold NUL

# The query of each operation, checked by the handler (read_query) and listed as its parameters
# by the OpenAPI document: one table for both.
CONFIG_QUERY = query_schema({})
PUT_CONFIG_QUERY = query_schema(
    {
        "dry_run": {
            "enum": ["1", "true", "yes", "0", "false", "no"],
            "description": "1, true or yes: check and apply, then roll back",
        }
    }
)
USAGE_QUERY = query_schema({})
CALLS_QUERY = query_schema(
    {
        "limit": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_CALLS_PAGE,
            "default": 100,
            "description": "page size",
        },
        "state": {"enum": ["ringing", "answered"], "description": "only calls in this state"},
        "account": {**config_def("ident"), "description": "calls holding a slot of this account"},
        "channel": {**config_def("ident"), "description": "calls holding a slot of this channel"},
        "after": {
            **_TEXT,
            "minLength": 1,
            "maxLength": 16384,
            "description": "the previous page's `next` (a JSON array), or a Call-ID: the calls "
            "after it",
        },
    }
)
# A call is named as Kamailio named it to admit it.
CALL_ID = load("admit")["properties"]["call_id"]
FROM_TAG = load("admit")["properties"]["from_tag"]
RELEASE_QUERY = query_schema(
    {"from_tag": {**FROM_TAG, "description": "only the call with this From-tag"}}
)


async def get_config(request: web.Request) -> web.Response:
    require_token(request)
    read_query(request, CONFIG_QUERY)
    async with request.app[POOL].acquire() as conn:
        return respond(await config_doc.export(conn))


async def put_config(request: web.Request) -> web.Response:
    require_token(request)
    settings = request.app[SETTINGS]
    dry_run = read_query(request, PUT_CONFIG_QUERY).get("dry_run") in ("1", "true", "yes")
    doc = integral(await read_body(request, "config", settings.max_body_bytes))
    found = config_doc.check(doc)
    if found:
        raise ApiError(422, "invalid_config", f"{found[0]['path']}: {found[0]['reason']}", found)
    async with request.app[POOL].acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            counts = await config_doc.apply(
                conn, doc, settings.sip_realm, timeout=settings.admin_db_timeout
            )
        except BaseException:
            await tr.rollback()
            raise
        if dry_run:
            await tr.rollback()
        else:
            await tr.commit()
    log.info("configuration replaced", extra={"dry_run": dry_run, **counts})
    return respond({"ok": True, "dry_run": dry_run, "counts": counts})


async def get_usage(request: web.Request) -> web.Response:
    require_token(request)
    read_query(request, USAGE_QUERY)
    return respond(await usage(request.app[POOL]))


async def get_calls(request: web.Request) -> web.Response:
    require_token(request)
    q = read_query(request, CALLS_QUERY)
    limit = q.get("limit", 100)
    calls = await active_calls(
        request.app[POOL],
        state=q.get("state"),
        account=q.get("account"),
        channel=q.get("channel"),
        after=_cursor(q["after"]) if "after" in q else None,
        limit=limit,
    )
    nxt = [calls[-1]["call_id"], calls[-1]["from_tag"]] if len(calls) == limit else None
    return respond({"calls": calls, "next": nxt})


def _cursor(after: str) -> tuple[str, str | None]:
    """`after`: a page's `next` ([Call-ID, From-tag] as JSON), else a Call-ID."""
    if after.startswith("["):
        try:
            cursor: Any = orjson.loads(after)
        except orjson.JSONDecodeError:
            cursor = None
        if (
            isinstance(cursor, list)
            and len(cursor) == 2
            and all(isinstance(c, str | None) and "\x00" not in (c or "") for c in cursor)
            and cursor[0] is not None
        ):
            return cursor[0], cursor[1]
    return after, None


async def delete_call(request: web.Request) -> web.Response:
    require_token(request)
    from_tag = read_query(request, RELEASE_QUERY).get("from_tag")
    call_id = request.match_info["call_id"]
    if problems(_CALL_ID_CHECK, call_id):  # no call can have this Call-ID
        raise ApiError(404, "not_found", f"no active call {call_id!r}")
    async with db.counters_locked(request.app[POOL]) as conn:
        released = await conn.fetchval(
            "SELECT release($1, $2, 'admin', $3)",
            call_id,
            from_tag,
            timedelta(seconds=request.app[SETTINGS].ringing_ttl),  # how long the tombstone lasts
        )
    if not released:
        raise ApiError(404, "not_found", f"no active call {call_id!r}")
    request.app[METRICS].releases.labels("admin").inc()
    log.info("force-released", extra={"call_id": call_id})
    return respond({"ok": True, "released": released})


_CALL_ID_CHECK = compile_schema(CALL_ID)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/config", get_config)
    app.router.add_put("/v1/config", put_config)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_get("/v1/calls", get_calls)
    app.router.add_delete("/v1/calls/{call_id}", delete_call)
