"""JSON in and out: orjson, schemas from sidecar/schemas, errors that name the JSON path."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, cast

import fastjsonschema
import jsonschema
import orjson
import referencing
from aiohttp import web

from .errors import ApiError

SCHEMA_DIR = Path(__file__).parent / "schemas"


@cache
def _registry() -> referencing.Registry[Any]:
    """Every schema of sidecar/schemas that has an $id, so that one may $ref another's $defs
    (the admin API's resource schemas wrap config.schema.json's)."""
    pairs = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        contents = json.loads(path.read_text())
        if "$id" in contents:
            pairs.append((contents["$id"], referencing.Resource.from_contents(contents)))
    return referencing.Registry().with_resources(pairs)


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """The validator for sidecar/schemas/<name>.schema.json (loaded once)."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=_registry(), format_checker=cls.FORMAT_CHECKER)


def json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def problems(name: str, document: Any) -> list[dict[str, str]]:
    """Every schema violation as {"path": "$.a[0].b", "reason": "..."}, sorted by path."""
    found = [
        {"path": json_path(err.absolute_path), "reason": err.message}
        for err in validator(name).iter_errors(document)
    ]
    return sorted(found, key=lambda p: p["path"])


def parse(raw: bytes | bytearray) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc


# The call-control bodies, checked on every call: plain schemas (no $ref, no format) that
# fastjsonschema compiles to Python, about 20 times faster than jsonschema. A body it
# refuses goes through jsonschema too, which names every problem.
FAST_SCHEMAS = frozenset({"admit", "answer", "release", "events"})


@cache
def fast_validator(name: str) -> Callable[[Any], Any] | None:
    if name not in FAST_SCHEMAS:
        return None
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return cast(Callable[[Any], Any], fastjsonschema.compile(schema))


def check(name: str, document: Any) -> Any:
    fast = fast_validator(name)
    if fast is not None:
        try:
            fast(document)
            return document
        except fastjsonschema.JsonSchemaException:
            pass  # jsonschema below says what is wrong, with every path
    found = problems(name, document)
    if found:
        first = found[0]
        raise ApiError(400, "invalid_body", f"{first['path']}: {first['reason']}", found)
    return document


async def read_body(request: web.Request, schema: str, max_bytes: int) -> Any:
    """The request's JSON body, validated against a schema; 413/415/400 otherwise."""
    return check(schema, await read_json(request, max_bytes))


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The request's JSON body, not validated yet; 413/415/400 otherwise."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream") and request.body_exists:
        if ctype != "" and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "send application/json")
    # read(n) returns what has arrived so far, up to n bytes: read until the end (or too much).
    raw = bytearray()
    while len(raw) <= max_bytes:
        chunk = await request.content.read(max_bytes + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    return parse(raw)


def respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
