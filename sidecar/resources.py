"""The admin API's resources: accounts, extensions, numbers and channels under /v1.

One generic implementation driven by a small table per kind (`KINDS`). A resource has the
same JSON shape as the matching item of the configuration document (config.schema.json's
`$defs`, wrapped by sidecar/schemas/<kind>.schema.json):

    GET    /v1/<kind>?limit=&after=<key>   {"items": [...], "next": <key or null>}
    GET    /v1/<kind>/{key}                the item; 404 when unknown
    PUT    /v1/<kind>/{key}                create (201) or replace (200); the key comes from the URL
    PATCH  /v1/<kind>/{key}                JSON merge patch (RFC 7396) of the item; 200
    DELETE /v1/<kind>/{key}                204; 409 naming what still refers to it

Shape problems are 400 (`invalid_body`, each with its JSON path); references that do not hold
(an unknown parent or account, a loop in the account tree) are 422 (`invalid_reference`, with
the path). The database's constraints stay the last guard (a race ends as a 409).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from . import config_doc
from .admin import require_token
from .errors import ApiError
from .jsonio import parse, respond
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
        "sources": item.get("sources", []),
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
        "sources": item.get("sources", []),
        "gateway": item.get("gateway"),
        "prefixes": item.get("prefixes", []),
        "priority": item.get("priority", 0),
    }


# --- references ---------------------------------------------------------------------------


def _is_number(value: str) -> bool:
    stripped = value[1:] if value.startswith("+") else value
    return 0 < len(stripped) <= 32 and all(c in "0123456789*#" for c in stripped)


def _cidr_problems(item: Item) -> list[Problem]:
    found = []
    for i, src in enumerate(item.get("sources", [])):
        try:
            ipaddress.ip_network(src, strict=False)
        except ValueError as exc:
            found.append(
                {"path": f"$.sources[{i}]", "reason": f"not an IP address or network: {exc}"}
            )
    return found


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
    found = _cidr_problems(item)
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


async def _channel_refs(conn: asyncpg.Connection, item: Item) -> list[Problem]:
    found = _cidr_problems(item)
    if item.get("prefixes") and not item.get("gateway"):
        found.append(
            {
                "path": "$.gateway",
                "reason": "a channel with prefixes needs a gateway for outbound calls",
            }
        )
    return found


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

    @property
    def key_pattern(self) -> str:
        return r"^\+?[0-9*#]{1,32}$" if self.key == "number" else r'^[^\s:@;<>"\\/?]{1,128}$'

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
            _channel_refs,
            _no_referrers,
        ),
    )
}


# --- handlers -----------------------------------------------------------------------------


def _clean(value: str, what: str) -> str:
    """Query values and URL keys reach PostgreSQL as text, which cannot hold NUL."""
    if "\x00" in value or len(value) > 2048:
        raise ApiError(400, "invalid_query", f"{what} is not a valid value")
    return value


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
    doc = parse(raw)
    if not isinstance(doc, dict):
        raise ApiError(
            400,
            "invalid_body",
            "$: the body must be a JSON object",
            [{"path": "$", "reason": "the body must be a JSON object"}],
        )
    return doc


def _check_shape(kind: Kind, item: Item) -> None:
    found = schema_problems(kind.singular, item)
    if found:
        first = found[0]
        raise ApiError(400, "invalid_body", f"{first['path']}: {first['reason']}", found)


def _url_key(request: web.Request, kind: Kind, *, existing: bool = True) -> str:
    """The key from the URL; a key that cannot exist is a 404 (PUT's shape check says why)."""
    key = _clean(request.match_info[kind.key], kind.key)
    if existing and not re.match(kind.key_pattern, key):
        raise _not_found(kind, key)
    return key


def _not_found(kind: Kind, key: str) -> ApiError:
    return ApiError(404, "not_found", f"no {kind.singular} {key!r}")


async def _write(
    request: web.Request, kind: Kind, conn: asyncpg.Connection, key: str, item: Item
) -> tuple[bool, Item]:
    """Check an item (shape, then references) and store it. The caller holds a transaction."""
    item = {kind.key: key, **item}
    _check_shape(kind, item)
    if item[kind.key] != key:
        raise ApiError(
            422,
            "key_mismatch",
            f"$.{kind.key}: {item[kind.key]!r} differs from the URL's {key!r}",
            [{"path": f"$.{kind.key}", "reason": f"differs from the URL's {key!r}"}],
        )
    found = await kind.check_refs(conn, item)
    if found:
        raise ApiError(422, "invalid_reference", f"{found[0]['path']}: {found[0]['reason']}", found)
    row = kind.to_row(item, request.app[SETTINGS].sip_realm)
    created = await conn.fetchval(kind.upsert_sql(), *(row[c] for c in kind.columns))
    stored = await conn.fetchrow(f"SELECT * FROM {kind.name} WHERE {kind.key} = $1::text", key)
    return bool(created), kind.to_item(stored)


async def list_items(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    q = request.query
    unknown = sorted(set(q) - {"limit", "after", *kind.filters})
    if unknown:
        raise ApiError(400, "invalid_query", f"unknown query parameter {unknown[0]!r}")
    try:
        limit = int(q.get("limit", str(DEFAULT_PAGE)))
    except ValueError as exc:
        raise ApiError(400, "invalid_query", "limit must be an integer") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, "invalid_query", f"limit must be between 1 and {MAX_PAGE}")
    after = _clean(q["after"], "after") if "after" in q else None
    args: list[Any] = [after]
    where = [f"($1::text IS NULL OR {kind.key} > $1)"]
    for column in kind.filters:
        if column in q:
            args.append(_clean(q[column], column))
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
    async with request.app[POOL].acquire() as conn, conn.transaction():
        created, item = await _write(request, kind, conn, key, body)
    log.info(
        f"{kind.singular} {'created' if created else 'replaced'}",
        extra={"kind": kind.singular, "key": key},
    )
    return respond(item, 201 if created else 200)


async def patch_item(request: web.Request, kind: Kind) -> web.Response:
    require_token(request)
    key = _url_key(request, kind)
    patch = await _body(request)
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
        _, item = await _write(request, kind, conn, key, merge_patch(current, patch))
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
