"""The aiohttp application: routes, the pool in cleanup_ctx, the janitor, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import admin, control, db
from .errors import error_middleware, error_response
from .jsonio import respond
from .metrics import Metrics
from .settings import Settings
from .state import METRICS, POOL, SETTINGS, STOPPING

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


@web.middleware
async def failure_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """PostgreSQL unreachable → 503; anything unexpected → 500 with the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except _UNAVAILABLE as exc:
        request.app[METRICS].db_errors.labels(request.path).inc()
        log.error("database unavailable", extra={"path": request.path, "error": repr(exc)})
        return error_response(503, "database_unavailable", "PostgreSQL is unreachable")
    except asyncpg.PostgresError as exc:
        request.app[METRICS].db_errors.labels(request.path).inc()
        if exc.sqlstate and exc.sqlstate.startswith("23"):  # integrity constraint violation
            return error_response(409, "constraint_violation", str(exc))
        log.exception("database error", extra={"path": request.path})
        return error_response(500, "database_error", "the database refused the request")
    except Exception:
        log.exception("unexpected error", extra={"path": request.path})
        return error_response(500, "internal_error", "unexpected error; see the sidecar log")


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


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    pool = request.app[POOL]
    m.pool_size.set(pool.get_size())
    m.pool_idle.set(pool.get_idle_size())
    with contextlib.suppress(Exception):
        for row in await pool.fetch(
            "SELECT state, count(*) AS n FROM calls WHERE state <> 'refused' GROUP BY state"
        ):
            m.active_calls.labels(row["state"]).set(row["n"])
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
    yield
    await pool.close()


async def _janitor(app: web.Application) -> None:
    """Release calls whose time is up, on every replica (SKIP LOCKED shares the work)."""
    settings = app[SETTINGS]
    while True:
        await asyncio.sleep(settings.janitor_interval)
        try:
            n = await app[POOL].fetchval("SELECT expire_calls(500)")
        except Exception as exc:  # noqa: BLE001 - keep running; health shows the database
            log.warning("janitor failed", extra={"error": repr(exc)})
            continue
        if n:
            app[METRICS].expired.labels("timeout").inc(n)
            log.warning("expired calls released", extra={"released": n})


async def _janitor_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_janitor(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    app[STOPPING].set()


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(
        middlewares=[failure_middleware, error_middleware],
        client_max_size=settings.max_body_bytes,
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
    return app
