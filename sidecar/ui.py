"""The operator's live usage page at /ui/: three static files shipped in the package
(sidecar/ui/), no build step, nothing loaded from elsewhere. The page itself holds no data:
it asks for the admin token and reads /v1 like any other client; every action (a forced
release) goes through the same API.

The files are public (they hold no secret); a strict Content-Security-Policy allows only
this origin's script, style and API, so that an account name that is HTML stays text."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).resolve().parent / "ui"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _file(name: str) -> tuple[bytes, str] | None:
    """A file of sidecar/ui by its bare name, or None (no subdirectories, no dot files)."""
    path = UI_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        return None
    return path.read_bytes(), _TYPES[path.suffix]


async def serve(request: web.Request) -> web.Response:
    found = _file(request.match_info.get("name") or "index.html")
    if found is None:
        raise web.HTTPNotFound(reason="no such file in the page")
    body, content_type = found
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", serve)
    app.router.add_get("/ui/{name}", serve)
