"""The aiohttp application: routes, the pool in cleanup_ctx, the janitor, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import admin, control, db, openapi, overview, resources, ui
from .classify import ConfigFollower
from .errors import error_middleware, error_response
from .jsonio import respond
from .metrics import Metrics
from .settings import Settings
from .state import CONFIG, METRICS, POOL, SCHEDULER, SETTINGS, STOPPING

log = logging.getLogger("sidecar")

# Failures that mean "PostgreSQL cannot be reached", not "the request is wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown
)


def route_name(request: web.Request) -> str:
    """The matched route's pattern (bounded label values), or "unmatched"."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count every answer by method, route pattern and status."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[METRICS].requests.labels(request.method, route_name(request), status).inc()


def failure_response(app: web.Application, route: str, path: str,
                     exc: Exception) -> web.Response:
    """What a failure of a handler answers (call it from an `except` block: it logs the
    traceback): PostgreSQL unreachable → 503; anything unexpected → 500, in the JSON error
    shape. Shared by the middleware and the call-control front end (control_http.py)."""
    if isinstance(exc, _UNAVAILABLE):
        app[METRICS].db_errors.labels(route).inc()
        log.error("database unavailable", extra={"path": path, "error": repr(exc)})
        return error_response(503, "database_unavailable", "PostgreSQL is unreachable")
    if isinstance(exc, asyncpg.PostgresError):
        app[METRICS].db_errors.labels(route).inc()
        if exc.sqlstate and exc.sqlstate.startswith("23"):  # integrity constraint violation
            return error_response(409, "constraint_violation", str(exc))
        log.exception("database error", extra={"path": path})
        return error_response(500, "database_error", "the database refused the request")
    log.exception("unexpected error", extra={"path": path})
    return error_response(500, "internal_error", "unexpected error; see the sidecar log")


@web.middleware
async def failure_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """PostgreSQL unreachable → 503; anything unexpected → 500 with the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure gets the JSON error shape
        return failure_response(request.app, route_name(request), request.path, exc)


async def health(request: web.Request) -> web.Response:
    """200 when calls can be decided; 503 with the cause otherwise."""
    if request.app[STOPPING].is_set():
        return respond({"status": "unavailable", "cause": "shutting down"}, 503)
    try:
        async with asyncio.timeout(1.0):
            await request.app[POOL].fetchval("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot decide
        return respond({"status": "unavailable", "cause": f"database: {exc!r}"}, 503)
    return respond({"status": "ok"})


_ACCOUNT_SERIES = """
    SELECT id, calls_active, public_active, internal_active,
           calls_limit, public_limit, internal_limit
    FROM accounts
    ORDER BY calls_active + public_active + internal_active DESC, id
    LIMIT $1"""
_CHANNEL_SERIES = """
    SELECT id, calls_active, calls_limit FROM channels
    ORDER BY calls_active DESC, id LIMIT $1"""


async def _plan_series(app: web.Application) -> None:
    """Active calls and limits per account and channel, from the counters, busiest first and
    at most metrics_max_series of each: a platform of 10,000 accounts does not become 60,000
    series. Series of accounts that left the top (or the configuration) are dropped."""
    m, pool, cap = app[METRICS], app[POOL], app[SETTINGS].metrics_max_series
    accounts = await pool.fetch(_ACCOUNT_SERIES, cap)
    channels = await pool.fetch(_CHANNEL_SERIES, cap)
    for gauge in (m.account_active, m.account_limit, m.channel_active, m.channel_limit):
        gauge.clear()
    for a in accounts:
        for counter in ("calls", "public", "internal"):
            m.account_active.labels(a["id"], counter).set(a[f"{counter}_active"])
            if a[f"{counter}_limit"] is not None:
                m.account_limit.labels(a["id"], counter).set(a[f"{counter}_limit"])
    for c in channels:
        m.channel_active.labels(c["id"]).set(c["calls_active"])
        if c["calls_limit"] is not None:
            m.channel_limit.labels(c["id"]).set(c["calls_limit"])


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    pool = request.app[POOL]
    m.pool_size.set(pool.get_size())
    m.pool_idle.set(pool.get_idle_size())
    m.pool_in_use.set(pool.get_size() - pool.get_idle_size())
    m.pool_max.set(pool.get_max_size())
    try:
        async with asyncio.timeout(1.0):
            rows = await pool.fetch(
                "SELECT state, count(*) AS n FROM calls"
                " WHERE state IN ('ringing', 'answered') GROUP BY state"
            )
    except Exception:  # noqa: BLE001 - the scrape still answers; sidecar_db_up says why
        m.db_up.set(0)
        m.db_errors.labels("metrics").inc()
    else:
        m.db_up.set(1)
        counts = {"ringing": 0, "answered": 0} | {r["state"]: r["n"] for r in rows}
        for state, n in counts.items():
            m.active_calls.labels(state).set(n)
        try:
            async with asyncio.timeout(1.0):
                await _plan_series(request.app)
        except Exception:  # noqa: BLE001 - the rest of the scrape still answers
            m.db_errors.labels("metrics").inc()
    resp = web.Response(body=generate_latest(m.registry))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await db.create_pool(settings)
    if settings.migrate_on_start:
        async with pool.acquire() as conn:
            applied = await db.migrate(conn)
        if applied:
            log.info("migrations applied", extra={"applied": applied})
    app[POOL] = pool
    if settings.config_cache:
        follower = ConfigFollower(lambda: asyncpg.connect(
            settings.database_url, timeout=settings.db_timeout,
            server_settings={"application_name": "sidecar-config"}))
        await follower.start()
        app[CONFIG] = follower
    app[SCHEDULER] = control.make_scheduler(app)
    yield
    if settings.config_cache:
        await app[CONFIG].stop()
    await pool.close()


# Rows the janitor handles per statement (one short transaction each). A run goes on, statement
# after statement, until one comes back short: whatever has piled up (a node that died with its
# calls, a flood of short calls leaving tombstones) goes in that run. A fixed number of
# statements per run would cap what the janitor can delete per second below what the sidecar
# can admit (20 x 500 rows per 5 s: 2,000 calls/s, where one sidecar decides 3,500), and the
# calls table would then grow without end (bench/RESULTS.md, thirteenth session).
_JANITOR_BATCH = 500


async def janitor_run(app: web.Application) -> None:
    """One run: release live calls whose time is up (ringing past the INVITE transaction's
    lifetime, answered past the maximum duration), then forget refusals and tombstones past
    theirs. Every replica runs it; SKIP LOCKED shares the rows."""
    settings = app[SETTINGS]
    pool = app[POOL]
    tombstone_ttl = timedelta(seconds=settings.ringing_ttl)
    while True:
        async with db.counters_locked(pool) as conn:
            released = await conn.fetchval(
                "SELECT expire_calls($1, $2)", _JANITOR_BATCH, tombstone_ttl
            )
        if released:
            app[METRICS].expired.labels("timeout").inc(released)
            log.warning("expired calls released", extra={"released": released})
        # Fewer than a batch: done (a call expire_calls could not release counts as not
        # released and is retried at the next run, see the WARNING in PostgreSQL's log).
        if released < _JANITOR_BATCH:
            break
    keep = timedelta(seconds=settings.ended_retention)
    # (Two kinds of rows, up to a batch each: a statement that took less than a batch of
    # either in all has caught up.)
    while await pool.fetchval("SELECT purge_calls($1, $2)", _JANITOR_BATCH, keep) >= _JANITOR_BATCH:
        pass
    await pool.execute(
        "DELETE FROM refusal_minutes WHERE minute < now() - $1::interval",
        timedelta(minutes=settings.refusal_history),
    )


async def _janitor(app: web.Application) -> None:
    """Run the janitor every janitor_interval seconds, whatever happens to one run: a
    failure is counted and logged, and the next run comes as usual."""
    while True:
        await asyncio.sleep(app[SETTINGS].janitor_interval)
        try:
            await janitor_run(app)
        except Exception as exc:  # noqa: BLE001 - never stop; health shows the database
            app[METRICS].db_errors.labels("janitor").inc()
            log.warning("janitor failed", extra={"error": repr(exc)})


async def _janitor_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_janitor(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    app[STOPPING].set()


# The longest request line accepted (aiohttp's default is 8190 bytes): the longest URL the
# OpenAPI document allows, every character a 4-byte one percent-encoded (the `after` of
# GET /v1/calls, 16,384 characters, is 196,608 bytes); tests/test_openapi.py checks it.
MAX_REQUEST_LINE = 256 << 10


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(
        middlewares=[metrics_middleware, failure_middleware, error_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args={"max_line_size": MAX_REQUEST_LINE},
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_janitor_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    control.add_routes(app)
    admin.add_routes(app)
    resources.add_routes(app)
    openapi.add_routes(app)
    overview.add_routes(app)
    ui.add_routes(app)
    return app
