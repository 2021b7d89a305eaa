"""The OpenAPI document is true to the routes, and schemathesis with every check, run against
the real sidecar (its own thread and event loop, a real port, real PostgreSQL), finds nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
import schemathesis
from aiohttp import web

from sidecar.app import MAX_REQUEST_LINE, create_app
from sidecar.openapi import document
from sidecar.settings import Settings
from tests.helpers import ADMIN_TOKEN, running_sidecar
from tests.test_admin_resources import BASE

METHODS = {"get", "put", "post", "patch", "delete"}


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """The API's routes: everything but the operator's web page (/ui), which is HTML, not API."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        if path == "/ui" or path.startswith("/ui/"):
            continue
        found.add((route.method.lower(), path))
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


def test_the_longest_documented_url_fits_the_request_line() -> None:
    """Every URL the document allows reaches the handlers (aiohttp answers a longer request line
    itself, in plain text): each parameter at its maxLength, every character 4 bytes of UTF-8
    percent-encoded."""
    longest = 0
    for path, item in document()["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            size = len(method) + len(path) + len(" HTTP/1.1")
            for p in params:
                schema = p["schema"]
                if "$ref" in schema:
                    name = schema["$ref"].rsplit("/", 1)[1]
                    schema = document()["components"]["schemas"][name]
                width = schema.get("maxLength", 20 if schema.get("type") == "integer" else 0)
                if not width and "enum" in schema:
                    width = max(len(str(v)) for v in schema["enum"])
                if not width and "pattern" in schema:
                    width = int(re.findall(r"\{(?:\d+,)?(\d+)\}", schema["pattern"])[-1])
                assert width, (path, p["name"])
                size += len(p["name"]) + 2 + 12 * width
            longest = max(longest, size)
    assert 8190 < longest <= MAX_REQUEST_LINE


async def test_errors_name_the_parameter_and_405_says_allow(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, body = await sc.request("GET", "/v1/accounts?limit=5000")
        err = body["error"]
        assert (status, err["code"]) == (400, "invalid_query")
        assert err["details"][0]["path"] == "query.limit"
        assert "5000" in err["details"][0]["reason"] and err["message"].startswith("query.limit")
        status, body = await sc.request("GET", "/v1/calls?limit=2&limit=3")
        assert status == 400 and "more than once" in body["error"]["message"]
        status, body = await sc.request("GET", "/v1/extensions?account=" + "a" * 129)
        assert status == 400 and body["error"]["details"][0]["path"] == "query.account"
        async with sc.session.request("TRACE", sc.base_url + "/v1/usage") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET,HEAD"
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with sc.session.get(sc.base_url + "/v1/usage") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        # A request line as long as the document allows reaches the handler (JSON answer).
        status, body = await sc.request("DELETE", "/v1/calls/" + "%F0%9F%98%8D" * 2048)
        assert status == 404 and body["error"]["code"] == "not_found"


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


REPO = Path(__file__).resolve().parent.parent
# Test cases per operation and phase: the whole run (coverage, fuzzing, stateful, ~30
# operations) stays within about a minute on two cores.
MAX_EXAMPLES = 25


def test_schemathesis_every_check_finds_nothing(database_url: str, tmp_path: Path) -> None:
    """schemathesis as a new user runs it: its command line, every check (status codes, media
    types, response schemas and headers, schema-valid requests accepted and schema-violating
    ones refused, unsupported methods answered 405 with Allow, auth not ignored, deleted items
    gone...), every phase (coverage, fuzzing, stateful), against a real sidecar. Deterministic
    (no seed, no example database), with the repository's schemathesis.toml (its two additions
    are explained there), its cache in a temporary directory."""
    assert schemathesis.SCHEMATHESIS_VERSION.split(".")[0] == "4"
    settings = dataclasses.replace(
        Settings(),
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        janitor_interval=3600,
        max_body_bytes=64 * 1024,
    )
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    started = time.monotonic()
    with ThreadedSidecar(settings) as server:
        session = requests.Session()
        session.put(server.url + "/v1/config", json=BASE, headers=headers).raise_for_status()
        for n in range(3):  # calls for GET /v1/calls and DELETE /v1/calls/{call_id}
            admit = {"call_id": f"st-{n}", "from_tag": "ft", "source_ip": "127.0.0.3",
                     "to_user": "ivr", "node": "n1", "boot": "b1"}
            session.post(server.url + "/v1/control/admit", json=admit).raise_for_status()
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "--config-file",
                str(REPO / "schemathesis.toml"),
                "run",
                server.url + "/openapi.json",
                "--checks",
                "all",
                "-H",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "--generation-deterministic",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    elapsed = time.monotonic() - started
    out = run.stdout + run.stderr
    figures = re.search(r"(\d+) generated, (.*)", out)
    print(f"schemathesis: {figures.group(0) if figures else '?'} in {elapsed:.1f}s")
    # The report from its first failure on, each line cut short (bodies can be megabytes).
    report = "\n".join(line[:400] for line in out[out.find("FAILURES") :].splitlines())
    assert run.returncode == 0, report[:30000]
    assert figures is not None and int(figures.group(1)) > 1000, out[-5000:]
