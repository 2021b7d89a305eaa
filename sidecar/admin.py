"""The admin API under /v1: configuration, usage, calls. Bearer token required."""

from __future__ import annotations

import hmac
import logging
from datetime import timedelta

from aiohttp import web

from . import config_doc, db
from .errors import ApiError
from .jsonio import parse, read_body, respond
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
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


def text_param(value: str | None, what: str) -> str | None:
    """A query or path value bound for PostgreSQL text, which cannot hold NUL."""
    if value is not None and ("\x00" in value or len(value) > 4096):
        raise ApiError(400, "invalid_query", f"{what} is not a valid value")
    return value


async def get_config(request: web.Request) -> web.Response:
    require_token(request)
    async with request.app[POOL].acquire() as conn:
        return respond(await config_doc.export(conn))


async def put_config(request: web.Request) -> web.Response:
    require_token(request)
    settings = request.app[SETTINGS]
    doc = await read_body(request, "config", settings.max_body_bytes)
    found = config_doc.check(doc)
    if found:
        raise ApiError(422, "invalid_config", f"{found[0]['path']}: {found[0]['reason']}", found)
    dry_run = request.query.get("dry_run", "").lower() in ("1", "true", "yes")
    async with request.app[POOL].acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            counts = await config_doc.apply(conn, doc, settings.sip_realm)
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
    return respond(await usage(request.app[POOL]))


async def get_calls(request: web.Request) -> web.Response:
    require_token(request)
    q = request.query
    try:
        limit = min(max(int(q.get("limit", "100")), 1), 1000)
    except ValueError as exc:
        raise ApiError(400, "invalid_query", "limit must be an integer") from exc
    state = q.get("state")
    if state not in (None, "ringing", "answered"):
        raise ApiError(400, "invalid_query", "state must be ringing or answered")
    after = None
    if "after" in q:
        raw = text_param(q["after"], "after") or ""
        cursor = parse(raw.encode()) if raw.startswith("[") else [raw, None]
        if (
            not isinstance(cursor, list)
            or len(cursor) != 2
            or not isinstance(cursor[0], str)
            or not isinstance(cursor[1], str | None)
            or "\x00" in "".join(c for c in cursor if c)
        ):
            raise ApiError(400, "invalid_query", "after must be a Call-ID or a `next` value")
        after = (cursor[0], cursor[1])
    calls = await active_calls(
        request.app[POOL],
        state=state,
        account=text_param(q.get("account"), "account"),
        channel=text_param(q.get("channel"), "channel"),
        after=after,
        limit=limit,
    )
    nxt = [calls[-1]["call_id"], calls[-1]["from_tag"]] if len(calls) == limit else None
    return respond({"calls": calls, "next": nxt})


async def delete_call(request: web.Request) -> web.Response:
    require_token(request)
    call_id = text_param(request.match_info["call_id"], "call_id") or ""
    from_tag = text_param(request.query.get("from_tag"), "from_tag")
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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/config", get_config)
    app.router.add_put("/v1/config", put_config)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_get("/v1/calls", get_calls)
    app.router.add_delete("/v1/calls/{call_id}", delete_call)
