"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json.

Request bodies are the JSON Schemas of sidecar/schemas (the configuration document's `$defs`
become components), so the document cannot drift from what the handlers validate;
tests/test_openapi.py compares its paths and methods with the application's routes.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from aiohttp import web

from .jsonio import SCHEMA_DIR, respond
from .resources import KINDS, MAX_PAGE

_REF = "#/components/schemas/"


def _load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return schema


def _rewrite(node: Any) -> Any:
    """JSON Schema `#/$defs/x` references become OpenAPI `#/components/schemas/x`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = _REF + value[len("#/$defs/") :]
            elif key not in ("$schema", "$id", "$defs"):
                out[key] = _rewrite(value)
        return out
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json(_ref("Error"))}


_ERRORS = {
    "400": "Malformed JSON, a body that breaks the schema, or a bad query parameter",
    "401": "Missing or wrong bearer token",
    "403": "Not a Kamailio source and no valid control secret",
    "404": "Unknown object",
    "409": "Still referenced, or refused by a database constraint",
    "413": "Body larger than SIDECAR_MAX_BODY_BYTES",
    "415": "Body is not application/json",
    "422": "A reference that does not hold (unknown parent, loop...)",
    "503": "PostgreSQL is unreachable",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _error(_ERRORS[code]) for code in codes}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TEXT = {"type": "string", "maxLength": 256}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}
_ADMIN: list[dict[str, Any]] = [{"bearer": []}]
_CONTROL: list[dict[str, Any]] = [{"controlSecret": []}, {}]
_OPEN: list[dict[str, Any]] = []


def _components() -> dict[str, Any]:
    config = _load("config")
    schemas: dict[str, Any] = {name: _rewrite(d) for name, d in config["$defs"].items()}
    schemas["config"] = _rewrite(config)
    for name in ("admit", "answer", "release", "heartbeat"):
        schemas[name] = _rewrite(_load(name))
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {}},
                },
            }
        },
    }
    schemas["MergePatch"] = {
        "type": "object",
        "description": "JSON merge patch (RFC 7396): members replace, null removes a member. "
        "The patched object must match the resource's schema.",
    }
    for kind in KINDS.values():
        body = copy.deepcopy(schemas[kind.singular])
        body["required"] = [r for r in body.get("required", []) if r != kind.key]
        body["description"] = f"The {kind.singular}; `{kind.key}` may be left out (the URL's)."
        schemas[f"{kind.singular}_put"] = body
        schemas[f"{kind.singular}_page"] = {
            "type": "object",
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": _ref(kind.singular)},
                "next": {
                    "type": ["string", "null"],
                    "description": "Pass as `after` for the next page; null on the last.",
                },
            },
        }
    return schemas


def _resource_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for kind in KINDS.values():
        tag = kind.name
        filters = [
            _query(f, f"only the {kind.name} whose {f} is this", _TEXT) for f in kind.filters
        ]
        paths[f"/v1/{kind.name}"] = {
            "get": {
                "operationId": f"list_{kind.name}",
                "summary": f"List {kind.name}, ordered by {kind.key}",
                "tags": [tag],
                "security": _ADMIN,
                "parameters": [
                    _query("limit", "page size (default 100)", _LIMIT),
                    _query("after", f"the `next` of the previous page (a {kind.key})", _TEXT),
                    *filters,
                ],
                "responses": {
                    "200": {"description": "One page", **_json(_ref(f"{kind.singular}_page"))},
                    **_errors("400", "401"),
                },
            }
        }
        key_param = {
            "name": kind.key,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "maxLength": 256},
        }
        item = _json(_ref(kind.singular))
        paths[f"/v1/{kind.name}/{{{kind.key}}}"] = {
            "parameters": [key_param],
            "get": {
                "operationId": f"get_{kind.singular}",
                "summary": f"One {kind.singular}",
                "tags": [tag],
                "security": _ADMIN,
                "responses": {
                    "200": {"description": f"The {kind.singular}", **item},
                    **_errors("401", "404"),
                },
            },
            "put": {
                "operationId": f"put_{kind.singular}",
                "summary": f"Create or replace a {kind.singular}",
                "tags": [tag],
                "security": _ADMIN,
                "requestBody": {"required": True, **_json(_ref(f"{kind.singular}_put"))},
                "responses": {
                    "200": {"description": "Replaced", **item},
                    "201": {"description": "Created", **item},
                    **_errors("400", "401", "409", "413", "415", "422"),
                },
            },
            "patch": {
                "operationId": f"patch_{kind.singular}",
                "summary": f"Change some members of a {kind.singular} (JSON merge patch)",
                "tags": [tag],
                "security": _ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/merge-patch+json": {"schema": _ref("MergePatch")},
                        "application/json": {"schema": _ref("MergePatch")},
                    },
                },
                "responses": {
                    "200": {"description": "Changed", **item},
                    **_errors("400", "401", "404", "409", "413", "415", "422"),
                },
            },
            "delete": {
                "operationId": f"delete_{kind.singular}",
                "summary": f"Delete a {kind.singular}; 409 names what still refers to it",
                "tags": [tag],
                "security": _ADMIN,
                "responses": {
                    "204": {"description": "Deleted"},
                    **_errors("401", "404", "409"),
                },
            },
        }
    return paths


def _control(name: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"control_{name}",
            "summary": summary,
            "tags": ["call control"],
            "security": _CONTROL,
            "requestBody": {"required": True, **_json(_ref(name))},
            "responses": {
                "200": {"description": "Done", **_json(ok)},
                **_errors("400", "403", "413", "415", "503"),
            },
        }
    }


_COUNTER = {
    "type": "object",
    "required": ["active", "limit"],
    "properties": {
        "active": {"type": "integer", "minimum": 0},
        "limit": {"type": ["integer", "null"]},
    },
}


@cache
def document() -> dict[str, Any]:
    usage = {
        "type": "object",
        "required": ["accounts", "channels"],
        "properties": {
            "accounts": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"calls": _COUNTER, "public": _COUNTER, "internal": _COUNTER},
                },
            },
            "channels": {
                "type": "object",
                "additionalProperties": {"type": "object", "properties": {"calls": _COUNTER}},
            },
        },
    }
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}, "cause": {"type": "string"}},
    }
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "200 when calls can be decided, 503 with the cause otherwise",
                "tags": ["monitoring"],
                "security": _OPEN,
                "responses": {
                    "200": {"description": "Ready", **_json(status)},
                    "503": {"description": "Cannot decide calls", **_json(status)},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition",
                "tags": ["monitoring"],
                "security": _OPEN,
                "responses": {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["monitoring"],
                "security": _OPEN,
                "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
            }
        },
        "/v1/config": {
            "get": {
                "operationId": "get_config",
                "summary": "The whole configuration (as `sidecar export`)",
                "tags": ["configuration"],
                "security": _ADMIN,
                "responses": {
                    "200": {"description": "The document", **_json(_ref("config"))},
                    **_errors("401"),
                },
            },
            "put": {
                "operationId": "put_config",
                "summary": "Make the configuration exactly this document (as `sidecar import`)",
                "tags": ["configuration"],
                "security": _ADMIN,
                "parameters": [
                    _query(
                        "dry_run",
                        "check and roll back",
                        {"type": "string", "enum": ["1", "true", "yes", "0", "false", "no"]},
                    )
                ],
                "requestBody": {"required": True, **_json(_ref("config"))},
                "responses": {
                    "200": {"description": "Applied", **_json({"type": "object"})},
                    **_errors("400", "401", "409", "413", "415", "422"),
                },
            },
        },
        "/v1/usage": {
            "get": {
                "operationId": "get_usage",
                "summary": "Use of every counter against its limit (null: unlimited)",
                "tags": ["usage"],
                "security": _ADMIN,
                "responses": {"200": {"description": "Usage", **_json(usage)}, **_errors("401")},
            }
        },
        "/v1/calls": {
            "get": {
                "operationId": "list_calls",
                "summary": "Active calls, oldest first",
                "tags": ["usage"],
                "security": _ADMIN,
                "parameters": [
                    _query("limit", "page size (default 100)", _LIMIT),
                    _query("state", "ringing or answered", {"enum": ["ringing", "answered"]}),
                    _query("account", "calls holding a slot of this account", _TEXT),
                    _query("channel", "calls holding a slot of this channel", _TEXT),
                    _query(
                        "after",
                        "the Call-ID of the previous page's last call, or the `next` array as JSON",
                        _TEXT,
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "One page",
                        **_json(
                            {
                                "type": "object",
                                "required": ["calls", "next"],
                                "properties": {
                                    "calls": {"type": "array", "items": {"type": "object"}},
                                    "next": {"type": ["array", "null"]},
                                },
                            }
                        ),
                    },
                    **_errors("400", "401"),
                },
            }
        },
        "/v1/calls/{call_id}": {
            "delete": {
                "operationId": "release_call",
                "summary": "Force-release a call (every From-tag unless from_tag is given)",
                "tags": ["usage"],
                "security": _ADMIN,
                "parameters": [
                    {
                        "name": "call_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 2048},
                    },
                    _query("from_tag", "only this From-tag", {"type": "string", "maxLength": 512}),
                ],
                "responses": {
                    "200": {"description": "Released", **_json({"type": "object"})},
                    **_errors("400", "401", "404"),
                },
            }
        },
        "/v1/control/admit": _control(
            "admit", "Decide one initial INVITE (see docs/control-api.md)", {"type": "object"}
        ),
        "/v1/control/answer": _control("answer", "A 2xx came from one leg", {"type": "object"}),
        "/v1/control/release": _control(
            "release", "Give back every slot of a call", {"type": "object"}
        ),
        "/v1/control/events": _control(
            "events",
            "Answers, releases and late admissions in one batch, applied in order",
            {"type": "object"},
        ),
        "/v1/control/heartbeat": _control(
            "heartbeat", "A Kamailio node reports its boot id and dialogs", {"type": "object"}
        ),
        **_resource_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sidecar: concurrent-call limits at the SIP edge",
            "version": "1",
            "description": "Admin API (bearer token), call control (Kamailio sources or "
            "X-Control-Secret), health and metrics (open). Every error is "
            '{"error": {"code", "message", "details"}}.',
        },
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "controlSecret": {"type": "apiKey", "in": "header", "name": "X-Control-Secret"},
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return respond(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", serve)
