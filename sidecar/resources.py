"""The admin API's resources: accounts, extensions, numbers and channels under /v1.

One generic implementation driven by a small table per kind (`KINDS`). A resource has the
same JSON shape as the matching item of the configuration document (config.schema.json's
`$defs`, wrapped by sidecar/schemas/<kind>.schema.json):

    GET    /v1/<kind>?limit=&after=<key>   {"items": [...], "next": <key or null>}
    GET    /v1/<kind>/{key}                the item; 404 when unknown
    PUT    /v1/<kind>/{key}                create (201) or replace (200); the key comes from the URL
    PATCH  /v1/<kind>/{key}                JSON merge patch (RFC 7396) of the item; 200
    DELETE /v1/<kind>/{key}                204; 409 naming what still refers to it

Shape problems are 400 (`invalid_body`, each with its JSON path): the body breaks the JSON
Schema the OpenAPI document shows (a PATCH body: the merge patch schema derived from it). What
only the stored state decides is a 409 naming the path and the reason: a reference that does not
hold (`invalid_reference`: an unknown parent or account, a loop in the account tree), a body
that names another key than the URL (`key_mismatch`), a patch that would leave an invalid item
(`invalid_result`), something still referring to what is deleted (`still_referenced`). The
database's constraints stay the last guard (a race ends as a 409 too).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import asyncpg
from aiohttp import web

from . import config_doc
from .admin import require_token
from .errors import ApiError
from .jsonio import (
    compile_schema,
    config_def,
    integral,
    load,
    parse,
    query_schema,
    read_query,
    respond,
)
from .jsonio import problems as schema_problems
from .state import POOL, SETTINGS

log = logging.getLogger("sidecar.admin")

Item = dict[str, Any]
Problem = dict[str, str]

MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_REFERRERS = 100  # names listed in a 409


# --- JSON merge patch ---------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge recursively, null removes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# --- rows <-> items -----------------------------------------------------------------------


def _net(value: Any) -> str:
    net = ipaddress.ip_network(str(value), strict=False)
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def _networks(item: Item) -> list[str]:
    """The sources as PostgreSQL's cidr takes them: host bits cleared (10.0.0.1/8 is
    10.0.0.0/8); the schema has made sure each is an address or a network."""
    return [str(ipaddress.ip_network(s, strict=False)) for s in item.get("sources", [])]


def _limit(item: Item, key: str) -> int | None:
    value = (item.get("limits") or {}).get(key)
    return None if value is None else int(value)


def _put_if(out: Item, key: str, value: Any) -> None:
    if value is not None and value != [] and value is not False:
        out[key] = value


def _limits(row: asyncpg.Record, keys: tuple[str, ...]) -> dict[str, int]:
    """The limits object of an account or channel row: the *_limit columns named, and the
    calls-per-second burst when set."""
    out = {k: row[f"{k}_limit"] for k in keys if row[f"{k}_limit"] is not None}
    if row["cps_burst"] is not None:
        out["cps_burst"] = row["cps_burst"]
    return out


def _account_item(row: asyncpg.Record) -> Item:
    out: Item = {"id": row["id"]}
    _put_if(out, "name", row["name"])
    _put_if(out, "parent", row["parent"])
    limits = _limits(row, ("calls", "public", "internal", "cps"))
    if limits:
        out["limits"] = limits
    return out


def _account_row(item: Item, realm: str) -> Item:
    return {
        "id": item["id"],
        "name": item.get("name"),
        "parent": item.get("parent"),
        "calls_limit": _limit(item, "calls"),
        "public_limit": _limit(item, "public"),
        "internal_limit": _limit(item, "internal"),
        "cps_limit": _limit(item, "cps"),
        "cps_burst": _limit(item, "cps_burst"),
    }


def _extension_item(row: asyncpg.Record) -> Item:
    out: Item = {"id": row["id"], "account": row["account"]}
    for key in ("name", "ha1", "contact"):
        _put_if(out, key, row[key])
    _put_if(out, "sources", [_net(s) for s in row["sources"]])
    _put_if(out, "forward", list(row["forward"]))
    _put_if(out, "ring_self", row["ring_self"])
    return out


def _extension_row(item: Item, realm: str) -> Item:
    ha1: str | None
    if item.get("password") is not None:
        ha1 = config_doc.ha1(item["id"], realm, item["password"])
    else:
        ha1 = item.get("ha1")
    return {
        "id": item["id"],
        "account": item["account"],
        "name": item.get("name"),
        "ha1": ha1,
        "contact": item.get("contact"),
        "sources": _networks(item),
        "forward": item.get("forward", []),
        "ring_self": bool(item.get("ring_self", False)),
    }


def _number_item(row: asyncpg.Record) -> Item:
    return {"number": row["number"], "extension": row["extension"]}


def _number_row(item: Item, realm: str) -> Item:
    return {"number": item["number"], "extension": item["extension"]}


def _channel_item(row: asyncpg.Record) -> Item:
    out: Item = {"id": row["id"]}
    _put_if(out, "name", row["name"])
    limits = _limits(row, ("calls", "cps"))
    if limits:
        out["limits"] = limits
    _put_if(out, "sources", [_net(s) for s in row["sources"]])
    _put_if(out, "gateway", row["gateway"])
    _put_if(out, "prefixes", list(row["prefixes"]))
    if row["priority"]:
        out["priority"] = row["priority"]
    return out


def _channel_row(item: Item, realm: str) -> Item:
    return {
        "id": item["id"],
        "name": item.get("name"),
        "calls_limit": _limit(item, "calls"),
        "cps_limit": _limit(item, "cps"),
        "cps_burst": _limit(item, "cps_burst"),
        "sources": _networks(item),
        "gateway": item.get("gateway"),
        "prefixes": item.get("prefixes", []),
        "priority": item.get("priority", 0),
    }


# --- references ---------------------------------------------------------------------------


def _is_number(value: str) -> bool:
    stripped = value[1:] if value.startswith("+") else value
    return 0 < len(stripped) <= 32 and all(c in "0123456789*#" for c in stripped)


async def _account_refs(conn: asyncpg.Connection, item: Item) -> list[Problem]:
    parent = item.get("parent")
    if parent is None:
        return []
    chain = await conn.fetchval(
        """WITH RECURSIVE up(id, parent) AS (
               SELECT id, parent FROM accounts WHERE id = $1
               UNION SELECT a.id, a.parent FROM accounts a JOIN up ON a.id = up.parent)
           SELECT array_agg(id) FROM up""",
        parent,
    )
    if not chain:
        return [{"path": "$.parent", "reason": f"unknown account {parent!r}"}]
    if item["id"] in chain:
        return [
            {
                "path": "$.parent",
                "reason": f"loop in the account tree: {item['id']!r} would be its own ancestor "
                f"through {parent!r}",
            }
        ]
    return []


async def _extension_refs(conn: asyncpg.Connection, item: Item) -> list[Problem]:
    found = []
    if not await conn.fetchval("SELECT true FROM accounts WHERE id = $1", item["account"]):
        found.append({"path": "$.account", "reason": f"unknown account {item['account']!r}"})
    targets = item.get("forward", [])
    if targets:
        known = {
            r["t"]
            for r in await conn.fetch(
                """SELECT t FROM unnest($1::text[]) t
                   WHERE EXISTS (SELECT 1 FROM extensions WHERE id = t)
                      OR EXISTS (SELECT 1 FROM numbers WHERE number = t)""",
                targets,
            )
        }
        for j, target in enumerate(targets):
            if target not in known and target != item["id"] and not _is_number(target):
                found.append(
                    {
                        "path": f"$.forward[{j}]",
                        "reason": f"{target!r} is neither an extension, a number, "
                        "nor an external number",
                    }
                )
    return found


async def _number_refs(conn: asyncpg.Connection, item: Item) -> list[Problem]:
    if await conn.fetchval("SELECT true FROM extensions WHERE id = $1", item["extension"]):
        return []
    return [{"path": "$.extension", "reason": f"unknown extension {item['extension']!r}"}]


async def _no_refs(conn: asyncpg.Connection, item: Item) -> list[Problem]:
    return []  # a channel refers to nothing


Referrer = dict[str, str]


async def _account_referrers(conn: asyncpg.Connection, key: str) -> list[Referrer]:
    rows = await conn.fetch(
        """(SELECT 'account' AS kind, id FROM accounts WHERE parent = $1 ORDER BY id LIMIT $2)
           UNION ALL
           (SELECT 'extension', id FROM extensions WHERE account = $1 ORDER BY id LIMIT $2)""",
        key,
        MAX_REFERRERS,
    )
    return [
        {
            "kind": r["kind"],
            "id": r["id"],
            "reason": f"{'child account' if r['kind'] == 'account' else 'extension'} "
            f"{r['id']!r} belongs to account {key!r}",
        }
        for r in rows
    ]


async def _extension_referrers(conn: asyncpg.Connection, key: str) -> list[Referrer]:
    rows = await conn.fetch(
        """(SELECT 'number' AS kind, number AS id FROM numbers WHERE extension = $1
            ORDER BY number LIMIT $2)
           UNION ALL
           (SELECT 'extension', id FROM extensions WHERE $1 = ANY (forward) AND id <> $1
            ORDER BY id LIMIT $2)""",
        key,
        MAX_REFERRERS,
    )
    return [
        {
            "kind": r["kind"],
            "id": r["id"],
            "reason": f"number {r['id']!r} routes to extension {key!r}"
            if r["kind"] == "number"
            else f"extension {r['id']!r} forwards to {key!r}",
        }
        for r in rows
    ]


async def _no_referrers(conn: asyncpg.Connection, key: str) -> list[Referrer]:
    return []


# --- schemas --------------------------------------------------------------------------------

CONFIG_ID = load("config")["$id"]


def absolute(node: Any) -> Any:
    """A piece of config.schema.json with its `#/$defs/...` references made absolute, so that
    it validates on its own (and the OpenAPI document maps them to its components)."""
    if isinstance(node, dict):
        return {
            k: CONFIG_ID + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else
            absolute(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [absolute(v) for v in node]
    return node


def merge_patch_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a JSON merge patch (RFC 7396) of objects of `schema`: every member may be
    left out, an optional one may be null (removed), a nested object is a patch itself, and
    members that cannot go together (`not: {required: [...]}`) cannot be set together. What
    depends on the stored item (a channel's prefixes need its gateway) is checked on the
    result (a 409)."""
    if schema.get("type") != "object" or "properties" not in schema:
        return copy.deepcopy(schema)
    required = set(schema.get("required", []))
    props = {}
    for name, sub in schema["properties"].items():
        props[name] = merge_patch_schema(sub) if name in required else _nullable(sub)
    out: dict[str, Any] = {"type": "object", "properties": props}
    if "additionalProperties" in schema:
        out["additionalProperties"] = schema["additionalProperties"]
    together = schema.get("not", {}).get("required")
    if together and set(schema["not"]) == {"required"}:
        out["not"] = {
            "required": together,
            "properties": {n: {"not": {"type": "null"}} for n in together},
        }
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The member's patch, or null (so that an error still names the member's own path)."""
    patch = merge_patch_schema(schema)
    kind = patch.get("type")
    if kind is not None and not {"enum", "const"} & set(patch):
        patch["type"] = sorted({*([kind] if isinstance(kind, str) else kind), "null"})
        return patch
    return {"anyOf": [patch, {"type": "null"}]}


# --- the table of kinds -------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str  # URL segment and table: accounts, extensions, numbers, channels
    singular: str  # schema name (sidecar/schemas/<singular>.schema.json) and messages
    key: str  # primary key column and JSON member: id or number
    columns: tuple[str, ...]
    casts: dict[str, str]
    filters: tuple[str, ...]  # list filters: ?<column>=<value>
    to_item: Callable[[asyncpg.Record], Item]
    to_row: Callable[[Item, str], Item]
    check_refs: Callable[[asyncpg.Connection, Item], Awaitable[list[Problem]]]
    referrers: Callable[[asyncpg.Connection, str], Awaitable[list[Referrer]]]

    @cached_property
    def key_schema(self) -> dict[str, Any]:
        """What a key may be: config.schema.json's, for the URL and `after`."""
        return config_def("phone_number" if self.key == "number" else "ident")

    @cached_property
    def schema(self) -> dict[str, Any]:
        """The item's schema, sidecar/schemas/<singular>.schema.json resolved one level."""
        return absolute(load("config")["$defs"][self.singular])

    @cached_property
    def patch_schema(self) -> dict[str, Any]:
        """What a PATCH body may be: the merge patch schema of the item's."""
        return merge_patch_schema(self.schema)

    @cached_property
    def query(self) -> dict[str, Any]:
        """The list's query parameters, for the handler and the OpenAPI document."""
        return query_schema(
            {
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_PAGE,
                    "default": DEFAULT_PAGE,
                    "description": "page size",
                },
                "after": {
                    **self.key_schema,
                    "description": f"the previous page's `next`: the {self.name} after this "
                    f"{self.key}",
                },
                **{
                    f: {**config_def("ident"), "description": f"only the {self.name} whose "
                        f"{f} is this"}
                    for f in self.filters
                },
            }
        )

    @cached_property
    def key_validator(self) -> Any:
        return compile_schema(self.key_schema)

    @cached_property
    def patch_validator(self) -> Any:
        return compile_schema(self.patch_schema)

    def upsert_sql(self) -> str:
        cols = ", ".join(self.columns)
        values = ", ".join(
            f"${i}" + (f"::{self.casts[c]}" if c in self.casts else "")
            for i, c in enumerate(self.columns, 1)
        )
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in self.columns if c != self.key)
        return (
            f"INSERT INTO {self.name} ({cols}) VALUES ({values}) "
            f"ON CONFLICT ({self.key}) DO UPDATE SET {sets} RETURNING (xmax = 0) AS created"
        )


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "accounts",
            "account",
            "id",
            ("id", "name", "parent", "calls_limit", "public_limit", "internal_limit",
             "cps_limit", "cps_burst"),
            {},
            ("parent",),
            _account_item,
            _account_row,
            _account_refs,
            _account_referrers,
        ),
        Kind(
            "extensions",
            "extension",
            "id",
            ("id", "account", "name", "ha1", "contact", "sources", "forward", "ring_self"),
            {"sources": "cidr[]"},
            ("account",),
            _extension_item,
            _extension_row,
            _extension_refs,
            _extension_referrers,
        ),
        Kind(
            "numbers",
            "number",
            "number",
            ("number", "extension"),
            {},
            ("extension",),
            _number_item,
            _number_row,
            _number_refs,
            _no_referrers,
        ),
        Kind(
            "channels",
            "channel",
            "id",
            ("id", "name", "calls_limit", "sources", "gateway", "prefixes", "priority",
             "cps_limit", "cps_burst"),
            {"sources": "cidr[]"},
            (),
            _channel_item,
            _channel_row,
            _no_refs,
            _no_referrers,
        ),
    )
}


# --- handlers -----------------------------------------------------------------------------


async def _body(request: web.Request) -> Item:
    """The JSON object in the body: 413 above the size limit, 415 if not JSON, 400 if bad."""
    max_bytes = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream") and not ctype.endswith(
        "+json"
    ):
        raise ApiError(415, "unsupported_media_type", "send application/json")
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
    doc = integral(parse(raw))
    if not isinstance(doc, dict):
        raise ApiError(
            400,
            "invalid_body",
            "$: the body must be a JSON object",
            [{"path": "$", "reason": "the body must be a JSON object"}],
        )
    return doc


def _problems(found: list[Problem], status: int = 400, code: str = "invalid_body") -> None:
    if found:
        first = found[0]
        raise ApiError(status, code, f"{first['path']}: {first['reason']}", found)


def _url_key(request: web.Request, kind: Kind, *, existing: bool = True) -> str:
    """The key from the URL; a key that cannot exist is a 404 (PUT's shape check says why)."""
    key = request.match_info[kind.key]
    if existing and schema_problems(kind.key_validator, key):
        raise _not_found(kind, key)
    return key


def _not_found(kind: Kind, key: str) -> ApiError:
    return ApiError(404, "not_found", f"no {kind.singular} {key!r}")


def _same_key(kind: Kind, key: str, body: Item) -> None:
    """A body may repeat the URL's key, not name another item: 409 (it is not this one)."""
    if kind.key in body and body[kind.key] != key:
        raise ApiError(
            409,
            "key_mismatch",
            f"$.{kind.key}: {body[kind.key]!r} differs from the URL's {key!r}",
            [{"path": f"$.{kind.key}", "reason": f"differs from the URL's {key!r}"}],
        )


async def _write(
    request: web.Request, kind: Kind, conn: asyncpg.Connection, key: str, item: Item
) -> tuple[bool, Item]:
    """Store a checked item once its references hold. The caller holds a transaction."""
    _problems(await kind.check_refs(conn, item), 409, "invalid_reference")
    row = kind.to_row(item, request.app[SETTINGS].sip_realm)
    created = await conn.fetchval(kind.upsert_sql(), *(row[c] for c in kind.columns))
    stored = await conn.fetchrow(f"SELECT * FROM {kind.name} WHERE {kind.key} = $1::text", key)
    return bool(created), kind.to_item(stored)


async def list_items(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    q = read_query(request, kind.query)
    limit = q.get("limit", DEFAULT_PAGE)
    args: list[Any] = [q.get("after")]
    where = [f"($1::text IS NULL OR {kind.key} > $1)"]
    for column in kind.filters:
        if column in q:
            args.append(q[column])
            where.append(f"{column} = ${len(args)}::text")
    args.append(limit + 1)
    rows = await request.app[POOL].fetch(
        f"SELECT * FROM {kind.name} WHERE {' AND '.join(where)} "
        f"ORDER BY {kind.key} LIMIT ${len(args)}",
        *args,
    )
    items = [kind.to_item(r) for r in rows[:limit]]
    nxt = items[-1][kind.key] if len(rows) > limit else None
    return respond({"items": items, "next": nxt})


async def get_item(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    key = _url_key(request, kind)
    row = await request.app[POOL].fetchrow(
        f"SELECT * FROM {kind.name} WHERE {kind.key} = $1::text", key
    )
    if row is None:
        raise _not_found(kind, key)
    return respond(kind.to_item(row))


async def put_item(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    key = _url_key(request, kind, existing=False)
    body = await _body(request)
    item = {kind.key: key, **body}
    _problems(schema_problems(kind.singular, item))
    _same_key(kind, key, body)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        created, item = await _write(request, kind, conn, key, item)
    log.info(
        f"{kind.singular} {'created' if created else 'replaced'}",
        extra={"kind": kind.singular, "key": key},
    )
    return respond(item, 201 if created else 200)


async def patch_item(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    key = _url_key(request, kind)
    patch = await _body(request)
    _problems(schema_problems(kind.patch_validator, patch))
    _same_key(kind, key, patch)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT * FROM {kind.name} WHERE {kind.key} = $1::text FOR UPDATE", key
        )
        if row is None:
            raise _not_found(kind, key)
        current = kind.to_item(row)
        # A new password replaces the stored HA1, and a new HA1 any password.
        if patch.get("password") is not None:
            current.pop("ha1", None)
        if patch.get("ha1") is not None:
            current.pop("password", None)
        item = {kind.key: key, **merge_patch(current, patch)}
        # The patch is well formed; what it makes of this item may still be wrong.
        found = schema_problems(kind.singular, item)
        _problems(
            [{**p, "reason": f"the patched {kind.singular}: {p['reason']}"} for p in found],
            409,
            "invalid_result",
        )
        _, item = await _write(request, kind, conn, key, item)
    log.info(f"{kind.singular} patched", extra={"kind": kind.singular, "key": key})
    return respond(item)


async def delete_item(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    key = _url_key(request, kind)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        exists = await conn.fetchval(
            f"SELECT true FROM {kind.name} WHERE {kind.key} = $1::text FOR UPDATE", key
        )
        if not exists:
            raise _not_found(kind, key)
        referrers = await kind.referrers(conn, key)
        if referrers:
            names = ", ".join(f"{r['kind']} {r['id']!r}" for r in referrers[:10])
            raise ApiError(
                409,
                "still_referenced",
                f"{kind.singular} {key!r} is still referred to by {names}"
                + (" and more" if len(referrers) > 10 else ""),
                list(referrers),
            )
        await conn.execute(f"DELETE FROM {kind.name} WHERE {kind.key} = $1::text", key)
    log.info(f"{kind.singular} deleted", extra={"kind": kind.singular, "key": key})
    return web.Response(status=204)


Handler = Callable[[web.Request, Kind], Awaitable[web.Response]]


def _bind(handler: Handler, kind: Kind) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def bound(request: web.Request) -> web.Response:
        return await handler(request, kind)

    bound.__name__ = f"{handler.__name__}_{kind.name}"
    return bound


def add_routes(app: web.Application) -> None:
    for kind in KINDS.values():
        app.router.add_get(f"/v1/{kind.name}", _bind(list_items, kind))
        path = f"/v1/{kind.name}/{{{kind.key}}}"
        app.router.add_get(path, _bind(get_item, kind))
        app.router.add_put(path, _bind(put_item, kind))
        app.router.add_patch(path, _bind(patch_item, kind))
        app.router.add_delete(path, _bind(delete_item, kind))
