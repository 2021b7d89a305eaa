"""JSON in and out: orjson, schemas from sidecar/schemas, errors that name the JSON path."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Protocol, cast

import fastjsonschema
import jsonschema
import orjson
import referencing
from aiohttp import web

from .errors import ApiError

SCHEMA_DIR = Path(__file__).parent / "schemas"


class Body(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Incoming(Protocol):
    """What a handler of a JSON body reads of its request: an aiohttp request, or one the
    call-control front end (control_http.py) parsed itself."""

    @property
    def app(self) -> web.Application: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def content(self) -> Body: ...


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
def load(name: str) -> dict[str, Any]:
    """sidecar/schemas/<name>.schema.json, parsed once."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return schema


def config_def(name: str) -> dict[str, Any]:
    """One of config.schema.json's `$defs` (ident, phone_number...), inline."""
    schema: dict[str, Any] = load("config")["$defs"][name]
    return schema


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262 regular expressions, where `$` is the end of the input;
    # in Python's re it also matches before a final newline, so "acme\n" would pass ^...$.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def compile_schema(schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for a schema (checked first), resolving references to sidecar/schemas."""
    base = jsonschema.validators.validator_for(schema)
    base.check_schema(schema)
    cls = jsonschema.validators.extend(base, {"pattern": _pattern})
    return cast(
        jsonschema.protocols.Validator,
        cls(schema, registry=_registry(), format_checker=base.FORMAT_CHECKER),
    )


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """The validator for sidecar/schemas/<name>.schema.json (loaded once)."""
    return compile_schema(load(name))


def json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def problems(
    name: str | jsonschema.protocols.Validator, document: Any
) -> list[dict[str, str]]:
    """Every schema violation as {"path": "$.a[0].b", "reason": "..."}, sorted by path."""
    fast = fast_validator(name) if isinstance(name, str) else None
    if fast is not None:
        try:
            fast(document)
            return []
        except fastjsonschema.JsonSchemaException:
            pass  # jsonschema below says what is wrong, with every path
    checker = validator(name) if isinstance(name, str) else name
    found = [
        {"path": json_path(err.absolute_path), "reason": _reason(err)}
        for err in checker.iter_errors(document)
    ]
    return sorted(found, key=lambda p: p["path"])


def _reason(err: jsonschema.ValidationError) -> str:
    """jsonschema's message; for a choice of forms that has a description (an IP address or
    network...), what the value is not, rather than "not valid under any of the given schemas"."""
    described = isinstance(err.schema, dict) and err.schema.get("description")
    if err.validator in ("anyOf", "oneOf") and described:
        return f"{err.instance!r} is not {described}"
    return str(err.message)


def integral(document: Any) -> Any:
    """The document with every float that is a whole number as an int: JSON Schema's
    "integer" admits 3.0, and PostgreSQL's integer columns want 3. (An object of strings,
    integers and nulls, every call-control body, is returned as it is without a call per
    member.)"""
    # Exact types (what orjson builds) and a plain loop: this runs on every control body,
    # and the generator with isinstance it replaces was 3 % of the sidecar's CPU.
    kind = type(document)
    if kind is dict:
        for v in document.values():
            t = type(v)
            if t is float or t is dict or t is list:
                return {k: integral(v) for k, v in document.items()}
        return document
    if kind is list:
        return [integral(v) for v in document]
    if kind is float and document.is_integer():
        return int(document)
    return document


def query_schema(properties: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of an operation's query: the parameters it takes and nothing else.
    The handler checks the query against it (read_query) and the OpenAPI document lists
    its properties as the operation's parameters."""
    return {"type": "object", "additionalProperties": False, "properties": properties}


def read_query(request: web.Request, schema: dict[str, Any]) -> dict[str, Any]:
    """The query parameters as an object checked against `schema` (query_schema): integer
    parameters converted, a parameter given twice or not in the schema refused. A problem is
    a 400 `invalid_query` whose path names the parameter (`query.limit`)."""
    props = schema["properties"]
    out: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            _bad_query(name, "given more than once")
        if name not in props:
            _bad_query(name, f"unknown query parameter (known: {', '.join(sorted(props))})")
        value: Any = values[0]
        if props[name].get("type") == "integer" and re.fullmatch(r"-?[0-9]{1,18}", value):
            value = int(value)
        out[name] = value
    found = problems(_query_validator(json.dumps(schema, sort_keys=True)), out)
    if found:
        first = found[0]
        name = first["path"][2:] or next(iter(out))
        _bad_query(name, first["reason"])
    return out


@cache
def _query_validator(schema: str) -> jsonschema.protocols.Validator:
    return compile_schema(json.loads(schema))


def _bad_query(name: str, reason: str) -> None:
    path = f"query.{name}"
    raise ApiError(400, "invalid_query", f"{path}: {reason}", [{"path": path, "reason": reason}])


def parse(raw: bytes | bytearray) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc


# The call-control bodies, checked on every call: plain schemas (no $ref, no format) that
# fastjsonschema compiles to Python, about 20 times faster than jsonschema. A body it
# refuses goes through jsonschema too, which names every problem.
# Compiled validators (fastjsonschema) for the bodies that come often or large: a 30,000-account
# configuration is checked in 0.3 s rather than 3.6. A body they refuse goes through
# jsonschema, which names every problem; tests/test_fast_validation.py holds them to the
# same verdict.
FAST_SCHEMAS = frozenset({"admit", "answer", "release", "events", "config"})


@cache
def fast_validator(name: str) -> Callable[[Any], Any] | None:
    if name not in FAST_SCHEMAS:
        return None
    return cast(Callable[[Any], Any], fastjsonschema.compile(load(name)))


def check(name: str, document: Any) -> Any:
    """The document once it matches the schema (whole floats as ints), else a 400."""
    fast = fast_validator(name)
    if fast is not None:
        try:
            fast(document)
            return integral(document)
        except fastjsonschema.JsonSchemaException:
            pass  # jsonschema below says what is wrong, with every path
    found = problems(name, document)
    if found:
        first = found[0]
        raise ApiError(400, "invalid_body", f"{first['path']}: {first['reason']}", found)
    return integral(document)


async def read_body(request: Incoming, schema: str, max_bytes: int) -> Any:
    """The request's JSON body, validated against a schema; 413/415/400 otherwise."""
    return check(schema, await read_json(request, max_bytes))


async def read_json(request: Incoming, max_bytes: int) -> Any:
    """The request's JSON body, not validated yet; 413/415/400 otherwise."""
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream") and request.body_exists:
        if ctype != "" and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "send application/json")
    return parse(await read_raw(request, max_bytes))


NDJSON = "application/x-ndjson"


def parse_lines(raw: bytes | bytearray, path: str) -> list[Any]:
    """Newline-delimited JSON: one JSON document per line (blank lines skipped), each parsed
    on its own, so that no line can change how another is read. A line that is not JSON is
    a 400 naming it as `<path>[i]` (i counts the documents before it)."""
    out: list[Any] = []
    for number, line in enumerate(bytes(raw).split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            where = f"{path}[{len(out)}]"
            reason = f"line {number} is not valid JSON: {exc}"
            raise ApiError(400, "invalid_json", f"{where}: {reason}",
                           [{"path": where, "reason": reason}]) from exc
    return out


async def read_raw(request: Incoming, max_bytes: int) -> bytearray:
    """The request's body, at most max_bytes (a 413 beyond)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    # read(n) returns what has arrived so far, up to n bytes: read until the end (or too much).
    raw = bytearray()
    while len(raw) <= max_bytes:
        chunk = await request.content.read(max_bytes + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    return raw


def respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
