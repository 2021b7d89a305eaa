"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json.

Built from what the handlers themselves check and answer, never from lines written beside them:

- request bodies: the JSON Schemas of sidecar/schemas (the configuration document's `$defs`
  become components); a PATCH body is the merge patch schema derived from the item's;
- path and query parameters: the query schemas the handlers check the query against
  (admin.*_QUERY, resources.Kind.query) and the key schemas they check keys against;
- responses: sidecar/schemas/responses.schema.json, and the one error shape of errors.py.

tests/test_openapi.py compares its operations with the application's routes and runs
schemathesis with every check against a real sidecar.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from aiohttp import web

from . import admin, overview
from .jsonio import load, respond
from .resources import CONFIG_ID, KINDS, Kind

_REF = "#/components/schemas/"
_RESPONSES_ID = load("responses")["$id"]


def _rewrite(node: Any) -> Any:
    """JSON Schema references (`#/$defs/x`, or absolute to config.schema.json's or
    responses.schema.json's `$defs`) become OpenAPI's `#/components/schemas/x`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for prefix in ("#/$defs/", f"{CONFIG_ID}#/$defs/", f"{_RESPONSES_ID}#/$defs/"):
                    if value.startswith(prefix):
                        value = _REF + value[len(prefix) :]
                out[key] = value
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


# Every error the middlewares and handlers answer, in the one shape of errors.py.
_ERRORS = {
    "400": "The body is not JSON or breaks its schema, or a query parameter breaks its own "
    "(`invalid_json`, `invalid_body`, `invalid_query`); `details` names each path and reason",
    "401": "Missing or wrong bearer token",
    "403": "Not a Kamailio source and no valid control secret",
    "404": "No such item (or a key no item can have)",
    "405": "Method not allowed here; `Allow` lists the methods that are",
    "413": "Body larger than the limit (SIDECAR_MAX_BODY_BYTES for the admin API)",
    "415": "Body is not application/json",
    "503": "PostgreSQL is unreachable, or the admission could not be decided in time",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json(_ref("error"))}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _error(_ERRORS[code]) for code in codes}


def _parameters(query: dict[str, Any]) -> list[dict[str, Any]]:
    """A query schema (jsonio.query_schema) as OpenAPI parameters, one per property."""
    out = []
    for name, schema in query["properties"].items():
        schema = copy.deepcopy(schema)
        description = schema.pop("description", "")
        out.append(
            {
                "name": name,
                "in": "query",
                "required": name in query.get("required", []),
                "description": description,
                "schema": schema,
            }
        )
    return out


_ADMIN: list[dict[str, Any]] = [{"bearer": []}]
_CONTROL: list[dict[str, Any]] = [{"controlSecret": []}, {}]
_OPEN: list[dict[str, Any]] = []


def _events() -> dict[str, Any]:
    """events.schema.json with each event as control.event_list checks it: its `type`, and the
    members of an admit (which must be late), answer or release body, checked by that body's
    own schema."""
    envelope = copy.deepcopy(load("events"))
    events = envelope["properties"]["events"]
    variants = []
    for kind in ("admit", "answer", "release"):
        body = {k: v for k, v in copy.deepcopy(load(kind)).items() if k != "$schema"}
        body["properties"] = {"type": {"const": kind}, **body["properties"]}
        body["required"] = ["type", *body["required"]]
        if kind == "admit":
            body["properties"]["late"] = {"const": True}
            body["required"].append("late")
        variants.append(body)
    events["items"] = {"description": events["items"]["description"], "oneOf": variants}
    return envelope


def _components() -> dict[str, Any]:
    config = load("config")
    schemas: dict[str, Any] = {name: _rewrite(d) for name, d in config["$defs"].items()}
    schemas["config"] = _rewrite(config)
    for name in ("admit", "answer", "release", "heartbeat"):
        schemas[name] = _rewrite(load(name))
    schemas["events"] = _rewrite(_events())
    for name, d in load("responses")["$defs"].items():
        schemas[name] = _rewrite(d)
    for kind in KINDS.values():
        body = _rewrite(kind.schema)
        body["required"] = [r for r in body.get("required", []) if r != kind.key]
        body["description"] = (
            f"The {kind.singular}. `{kind.key}` may be left out: it is the URL's (another is "
            "a 409 key_mismatch)."
        )
        schemas[f"{kind.singular}_put"] = body
        patch = _rewrite(kind.patch_schema)
        patch["description"] = (
            f"JSON merge patch (RFC 7396) of the {kind.singular}: members replace, null "
            "removes a member, objects merge."
        )
        schemas[f"{kind.singular}_patch"] = patch
        schemas[f"{kind.singular}_page"] = {
            "type": "object",
            "additionalProperties": False,
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": _ref(kind.singular)},
                "next": {
                    "oneOf": [_rewrite(kind.key_schema), {"type": "null"}],
                    "description": "Pass as `after` for the next page; null on the last.",
                },
            },
        }
    return schemas


def _resource_paths(kind: Kind) -> dict[str, Any]:
    tag = kind.name
    key_param = {
        "name": kind.key,
        "in": "path",
        "required": True,
        "description": f"the {kind.singular}'s {kind.key}",
        "schema": _rewrite(kind.key_schema),
    }
    item = _json(_ref(kind.singular))
    # What the stored item's key leads to (schemathesis' stateful phase follows these).
    links = {
        f"{verb}_{kind.singular}": {
            "operationId": f"{verb}_{kind.singular}",
            "parameters": {kind.key: f"$response.body#/{kind.key}"},
        }
        for verb in ("get", "patch", "delete")
    }
    stored = {**item, "links": links}
    refs = (
        "A reference the stored configuration does not hold (`invalid_reference`: an unknown "
        "parent, account, extension or forward target, a loop in the account tree)"
    )
    return {
        f"/v1/{kind.name}": {
            "get": {
                "operationId": f"list_{kind.name}",
                "summary": f"List {kind.name}, ordered by {kind.key}",
                "tags": [tag],
                "security": _ADMIN,
                "parameters": _parameters(kind.query),
                "responses": {
                    "200": {"description": "One page", **_json(_ref(f"{kind.singular}_page"))},
                    **_errors("400", "401", "503"),
                },
            }
        },
        f"/v1/{kind.name}/{{{kind.key}}}": {
            "parameters": [key_param],
            "get": {
                "operationId": f"get_{kind.singular}",
                "summary": f"One {kind.singular}",
                "tags": [tag],
                "security": _ADMIN,
                "responses": {
                    "200": {"description": f"The {kind.singular}", **item},
                    **_errors("401", "404", "503"),
                },
            },
            "put": {
                "operationId": f"put_{kind.singular}",
                "summary": f"Create or replace a {kind.singular}",
                "tags": [tag],
                "security": _ADMIN,
                "requestBody": {"required": True, **_json(_ref(f"{kind.singular}_put"))},
                "responses": {
                    "200": {"description": "Replaced", **stored},
                    "201": {"description": "Created", **stored},
                    **_errors("400", "401"),
                    "409": _error(
                        f"{refs}; or the body's `{kind.key}` differs from the URL's "
                        "(`key_mismatch`)"
                    ),
                    **_errors("413", "415", "503"),
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
                        "application/merge-patch+json": {"schema": _ref(f"{kind.singular}_patch")},
                        "application/json": {"schema": _ref(f"{kind.singular}_patch")},
                    },
                },
                "responses": {
                    "200": {"description": "Changed", **item},
                    **_errors("400", "401", "404"),
                    "409": _error(
                        f"{refs}; or the patched {kind.singular} is not a valid one "
                        f"(`invalid_result`, e.g. prefixes without a gateway); or the patch's "
                        f"`{kind.key}` differs from the URL's (`key_mismatch`)"
                    ),
                    **_errors("413", "415", "503"),
                },
            },
            "delete": {
                "operationId": f"delete_{kind.singular}",
                "summary": f"Delete a {kind.singular}",
                "tags": [tag],
                "security": _ADMIN,
                "responses": {
                    "204": {"description": "Deleted"},
                    **_errors("401", "404"),
                    "409": _error(
                        "Still referred to (`still_referenced`); `details` names each referrer"
                    ),
                    **_errors("503"),
                },
            },
        },
    }


def _control(name: str, summary: str, ok: str, description: str = "") -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"control_{name}",
            "summary": summary,
            **({"description": description} if description else {}),
            "tags": ["call control"],
            "security": _CONTROL,
            "requestBody": {"required": True, **_json(_ref(name))},
            "responses": {
                "200": {"description": "Done", **_json(_ref(ok))},
                **_errors("400", "403", "413", "415", "503"),
            },
        }
    }


def _admin_get(
    op: str, summary: str, tag: str, ok: str, query: dict[str, Any], **links: Any
) -> dict[str, Any]:
    return {
        "operationId": op,
        "summary": summary,
        "tags": [tag],
        "security": _ADMIN,
        "parameters": _parameters(query),
        "responses": {
            "200": {
                "description": summary,
                **_json(_ref(ok)),
                **({"links": links} if links else {}),
            },
            **_errors("400", "401", "503"),
        },
    }


@cache
def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "200 when calls can be decided, 503 with the cause otherwise",
                "tags": ["monitoring"],
                "security": _OPEN,
                "responses": {
                    "200": {"description": "Ready", **_json(_ref("health"))},
                    "503": {"description": "Cannot decide calls", **_json(_ref("health"))},
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
            "get": _admin_get(
                "get_config",
                "The whole configuration (as `sidecar export`)",
                "configuration",
                "config",
                admin.CONFIG_QUERY,
            ),
            "put": {
                "operationId": "put_config",
                "summary": "Make the configuration exactly this document (as `sidecar import`)",
                "tags": ["configuration"],
                "security": _ADMIN,
                "parameters": _parameters(admin.PUT_CONFIG_QUERY),
                "requestBody": {"required": True, **_json(_ref("config"))},
                "responses": {
                    "200": {"description": "Applied", **_json(_ref("config_applied"))},
                    **_errors("400", "401"),
                    "409": _error("Refused by a database constraint (a concurrent change)"),
                    **_errors("413", "415", "503"),
                    "422": _error(
                        "The document's members do not hold together (`invalid_config`: an "
                        "unknown parent, account or extension, a loop, a key given twice); "
                        "`details` names each path and reason"
                    ),
                },
            },
        },
        "/v1/usage": {
            "get": _admin_get(
                "get_usage",
                "Use of every counter against its limit (null: unlimited)",
                "usage",
                "usage",
                admin.USAGE_QUERY,
            )
        },
        "/v1/calls": {
            "get": _admin_get(
                "list_calls",
                "Active calls, oldest first",
                "usage",
                "calls_page",
                admin.CALLS_QUERY,
                release_call={
                    "operationId": "release_call",
                    "parameters": {"call_id": "$response.body#/calls/0/call_id"},
                },
            )
        },
        "/v1/usage/accounts": {
            "get": _admin_get(
                "usage_accounts",
                "Accounts' use of every limit, the busiest first, one page at a time",
                "usage",
                "accounts_usage_page",
                overview.ACCOUNTS_QUERY,
            )
        },
        "/v1/usage/channels": {
            "get": _admin_get(
                "usage_channels",
                "Channels' use of their limits, the busiest first, one page at a time",
                "usage",
                "channels_usage_page",
                overview.CHANNELS_QUERY,
            )
        },
        "/v1/nodes": {
            "get": _admin_get(
                "nodes", "Kamailio nodes and their last heartbeat", "usage", "nodes",
                overview.NO_QUERY,
            )
        },
        "/v1/refusals": {
            "get": _admin_get(
                "refusals", "Calls refused for a limit, per minute and counter", "usage",
                "refusals", overview.REFUSALS_QUERY,
            )
        },
        "/v1/summary": {
            "get": _admin_get(
                "summary", "Calls up, accounts, channels, refusals this minute", "usage",
                "summary", overview.NO_QUERY,
            )
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
                        "description": "the Call-ID, as admitted",
                        "schema": admin.CALL_ID,
                    },
                    *_parameters(admin.RELEASE_QUERY),
                ],
                "responses": {
                    "200": {"description": "Released", **_json(_ref("call_released"))},
                    **_errors("400", "401"),
                    "404": _error("No active call with this Call-ID (and From-tag)"),
                    **_errors("503"),
                },
            }
        },
        "/v1/control/admit": _control(
            "admit", "Decide one initial INVITE (see docs/control-api.md)", "decision"
        ),
        "/v1/control/answer": _control("answer", "A 2xx came from one leg", "ok"),
        "/v1/control/release": _control("release", "Give back every slot of a call", "released"),
        "/v1/control/events": _control(
            "events",
            "Answers, releases and late admissions in one batch, applied in order",
            "events_result",
            "The body is the `events` document, or, with `Content-Type: application/x-ndjson`"
            " (what Kamailio's outbox sends), the same events one JSON object per line; a line"
            " that is not JSON is a 400 naming it as `$.events[i]`.",
        ),
        "/v1/control/heartbeat": _control(
            "heartbeat", "A Kamailio node reports its boot id and dialogs", "heartbeat_result"
        ),
    }
    for kind in KINDS.values():
        paths.update(_resource_paths(kind))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sidecar: concurrent-call limits at the SIP edge",
            "version": "1",
            "description": "Admin API (bearer token), call control (Kamailio sources or "
            "X-Control-Secret), health and metrics (open). Every error is "
            '{"error": {"code", "message", "details": [{"path", "reason"}]}}. A method a '
            "path does not take is a 405 naming the ones it does in `Allow`.",
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
