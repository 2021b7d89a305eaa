"""The call-control API Kamailio calls: admit, answer, release, heartbeat.

Every handler is one PostgreSQL round trip (a function in sql/migrations/002_functions.sql).
See docs/control-api.md for the contract.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from datetime import timedelta
from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError
from .jsonio import read_body, respond
from .state import METRICS, POOL, SETTINGS

log = logging.getLogger("sidecar.calls")

_ADMIT = "SELECT admit($1, $2, $3::inet, $4, $5, $6, $7, $8, $9, $10, $11)::text"
_ANSWER = "SELECT answer($1, $2, $3, $4)"
_RELEASE = "SELECT release($1, $2)"
_RECONCILE = "SELECT reconcile_node($1, $2, $3::jsonb, $4)"
_CONTROL_BODY_MAX = 4 << 20  # heartbeats may list every dialog of a node

LIMIT_REASON = "REACH_PLAN_LIMIT"


def check_source(request: web.Request) -> None:
    """Only Kamailio nodes (by address) or holders of the shared secret may call."""
    settings = request.app[SETTINGS]
    secret = settings.control_secret
    given = request.headers.get("X-Control-Secret")
    if secret and given is not None:
        if hmac.compare_digest(given.encode(), secret.encode()):
            return
        raise ApiError(403, "forbidden", "wrong control secret")
    peer = request.remote or ""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        addr = None
    if addr is not None and any(addr in net for net in settings.control_sources):
        return
    raise ApiError(403, "forbidden", "call control is open to Kamailio nodes only")


def wire_decision(decision: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """The database's decision in the shape Kamailio acts on (codes are deployment settings)."""
    settings = request.app[SETTINGS]
    action = decision["action"]
    if action == "relay":
        out: dict[str, Any] = {
            "action": "relay",
            "legs": [
                {"leg": leg["leg"], "uri": leg["uri"], "lookup": leg["lookup"]}
                for leg in decision["legs"]
            ],
        }
        if "shadow" in decision:
            out["shadow"] = decision["shadow"]
        return out
    if action == "challenge":
        return {"action": "challenge"}
    why = decision.get("why")
    if why in ("limit_origin", "limit_destination"):
        code = (
            settings.origin_refusal_code
            if why == "limit_origin"
            else settings.destination_refusal_code
        )
        return {
            "action": "reject",
            "code": code,
            "reason": LIMIT_REASON,
            "limit": True,
            "counter": decision.get("counter"),
        }
    if why == "not_found":
        return {"action": "reject", "code": 404, "reason": "Not Found", "limit": False}
    return {"action": "reject", "code": 403, "reason": "Forbidden", "limit": False}


async def admit(request: web.Request) -> web.Response:
    check_source(request)
    body = await read_body(request, "admit", _CONTROL_BODY_MAX)
    try:
        source = str(ipaddress.ip_address(body["source_ip"].strip("[]")))
    except ValueError as exc:
        raise ApiError(
            400,
            "invalid_body",
            f"$.source_ip: {exc}",
            [{"path": "$.source_ip", "reason": str(exc)}],
        ) from exc
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    force = settings.shadow or bool(body.get("late"))
    started = time.perf_counter()
    raw = await request.app[POOL].fetchval(
        _ADMIT,
        body["call_id"],
        body["from_tag"],
        source,
        body.get("from_user") or None,
        body.get("to_user") or "",
        body.get("auth_user") or None,
        body["node"],
        body.get("boot"),
        force,
        settings.sip_realm,
        timedelta(seconds=settings.ringing_ttl),
    )
    metrics.decision_seconds.observe(time.perf_counter() - started)
    decision = orjson.loads(raw)
    out = wire_decision(decision, request)
    if decision.get("repeat"):
        out["repeat"] = True  # a retransmission or spiral: the first decision, not a new one
    reason = (
        "repeat"
        if decision.get("repeat")
        else "shadow_refusal"
        if "shadow" in decision
        else decision.get("why", "challenge" if out["action"] == "challenge" else "admitted")
    )
    metrics.decisions.labels(out["action"], reason).inc()
    log.info(
        "decision",
        extra={
            "call_id": body["call_id"],
            "from_tag": body["from_tag"],
            "action": out["action"],
            "reason": reason,
            "counter": decision.get("counter"),
            "legs": len(decision.get("legs", ())),
            "node": body["node"],
        },
    )
    return respond(out)


async def answer(request: web.Request) -> web.Response:
    check_source(request)
    body = await read_body(request, "answer", _CONTROL_BODY_MAX)
    settings = request.app[SETTINGS]
    changed = await request.app[POOL].fetchval(
        _ANSWER,
        body["call_id"],
        body["from_tag"],
        body["leg"],
        timedelta(seconds=settings.max_call_duration),
    )
    request.app[METRICS].answers.inc()
    log.info("answered", extra={"call_id": body["call_id"], "leg": body["leg"], "changed": changed})
    return respond({"ok": True})


async def release(request: web.Request) -> web.Response:
    check_source(request)
    body = await read_body(request, "release", _CONTROL_BODY_MAX)
    reason = body.get("reason") or "unspecified"
    released = await request.app[POOL].fetchval(_RELEASE, body["call_id"], body.get("from_tag"))
    request.app[METRICS].releases.labels(reason if released else "unknown_call").inc()
    log.info("released", extra={"call_id": body["call_id"], "reason": reason, "released": released})
    return respond({"ok": True, "released": bool(released)})


async def heartbeat(request: web.Request) -> web.Response:
    check_source(request)
    body = await read_body(request, "heartbeat", _CONTROL_BODY_MAX)
    settings = request.app[SETTINGS]
    dialogs = body.get("dialogs")
    released = await request.app[POOL].fetchval(
        _RECONCILE,
        body["node"],
        body["boot"],
        None if dialogs is None else orjson.dumps(dialogs).decode(),
        timedelta(seconds=settings.reconcile_grace),
    )
    if released:
        request.app[METRICS].expired.labels("reconciled").inc(released)
        log.warning("reconciled node", extra={"node": body["node"], "released": released})
    return respond({"ok": True, "released": released})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/control/admit", admit)
    app.router.add_post("/v1/control/answer", answer)
    app.router.add_post("/v1/control/release", release)
    app.router.add_post("/v1/control/heartbeat", heartbeat)
