"""The OpenAPI document is true to the routes, and a bounded schemathesis run against the real
sidecar (its own thread and event loop, a real port, real PostgreSQL) finds no 5xx."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import hypothesis
import hypothesis.errors
import requests
import schemathesis
from aiohttp import web
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from sidecar.app import create_app
from sidecar.openapi import document
from sidecar.settings import Settings
from tests.helpers import ADMIN_TOKEN, running_sidecar
from tests.test_admin_resources import BASE

METHODS = {"get", "put", "post", "patch", "delete"}


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        found.add((route.method.lower(), route.resource.canonical))
    return found


def documented() -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document()["paths"].items()
        for method in item
        if method in METHODS
    }


def test_document_matches_the_routes_both_ways() -> None:
    app = create_app(Settings())
    routes = routes_of(app)
    doc = documented()
    assert routes - doc == set(), "routes missing from the OpenAPI document"
    assert doc - routes == set(), "documented operations without a route"
    assert len(routes) >= 30


def test_document_is_valid_openapi_with_resolvable_refs() -> None:
    schema = schemathesis.openapi.from_dict(document())
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) == len(documented())
    # Every request body's schema is one of sidecar/schemas' (or derived from config's $defs).
    components = document()["components"]["schemas"]
    for name in ("account", "extension", "number", "channel", "config", "admit", "release"):
        assert name in components


async def test_served_document_is_the_same(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, body = await sc.request("GET", "/openapi.json", admin=False)
        assert status == 200 and body == document()


class ThreadedSidecar:
    """The real application on a real port, served from a thread with its own event loop, so
    that schemathesis' blocking HTTP client can talk to it from the test's thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> str:
        self.runner = web.AppRunner(create_app(self.settings), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> ThreadedSidecar:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


MAX_EXAMPLES = 20
# No 5xx, and every answer is one the document declares (status, media type, body schema).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_schemathesis_finds_no_server_error(database_url: str) -> None:
    assert schemathesis.SCHEMATHESIS_VERSION.split(".")[0] == "4"
    settings = dataclasses.replace(
        Settings(),
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        janitor_interval=3600,
        max_body_bytes=64 * 1024,
    )
    schema = schemathesis.openapi.from_dict(document())
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    failures: list[str] = []
    calls = 0
    started = time.monotonic()
    with ThreadedSidecar(settings) as server:
        session = requests.Session()
        session.put(server.url + "/v1/config", json=BASE, headers=headers).raise_for_status()
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):

                @hypothesis.settings(
                    max_examples=MAX_EXAMPLES,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(hypothesis.HealthCheck),
                    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                )
                @hypothesis.given(case=op.as_strategy(generation_mode=mode))
                def run(case: schemathesis.Case) -> None:
                    nonlocal calls
                    calls += 1
                    response = case.call(base_url=server.url, session=session, headers=headers)
                    # aiohttp's HTTP parser answers a request line over 8 KiB itself (plain-text
                    # 400) before any of our code runs: only check such answers are not 5xx.
                    too_long = len(response.request.url or "") > 8000
                    checks = [not_a_server_error] if too_long else CHECKS
                    case.validate_response(response, checks=checks)

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to break
                except Exception as exc:  # noqa: BLE001 - collect every operation's failure
                    failures.append(f"{op.label} [{mode.value}]: {exc}")
    elapsed = time.monotonic() - started
    print(f"schemathesis: {calls} requests in {elapsed:.1f}s")
    assert not failures, "\n\n".join(failures)
    assert calls > 500
