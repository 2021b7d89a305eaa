"""The call-control API Kamailio calls: admit, answer, release, heartbeat.

Every handler is one PostgreSQL round trip (a function of sql/migrations/002_functions.sql,
as 003_lifecycle.sql left it). See docs/control-api.md for the contract.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from aiohttp import web

from . import db
from .batching import Overloaded, Scheduler
from .classify import planned_batch
from .errors import ApiError
from .jsonio import (
    NDJSON,
    Incoming,
    check,
    parse_lines,
    read_body,
    read_json,
    read_raw,
    respond,
)
from .state import CONFIG, METRICS, POOL, SCHEDULER, SETTINGS

log = logging.getLogger("sidecar.calls")

# The sources go as text and are cast by PostgreSQL: asyncpg's inet encoder builds a Python
# ipaddress object per element (3 us each).
# The admissions go classified by the sidecar's configuration cache when it has one
# (classify.py): the generation, the legs, the verdicts and the origins come first.
_ADMIT_BATCH = (
    "SELECT admit_planned($1, $2, $3, $4, $5, $6, $7::text[]::inet[], $8, $9, $10, $11, $12,"
    " $13, $14, $15, $16, $17)"
)
_EVENTS = "SELECT control_events($1, $2, $3, $4, $5, $6, $7)"
_TICK = ("SELECT * FROM control_tick($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
         " $12::text[]::inet[], $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)")
_ADMIT_FIELDS = ("call_id", "from_tag", "source", "from_user", "to_user", "auth_user", "node",
                 "boot", "late")
_EVENT_FIELDS = ("type", "call_id", "from_tag", "leg", "reason")
_RECONCILE = "SELECT * FROM reconcile_node($1, $2, $3, $4, $5, $6, $7, $8)"
# The node as this heartbeat shows it (GET /v1/nodes, the operator's page); a new boot id
# restarts booted_at.
_NODE_SEEN = """
    INSERT INTO nodes AS n (node, boot, booted_at, seen_at, dialogs)
    VALUES ($1, $2, now(), now(), $3)
    ON CONFLICT (node) DO UPDATE SET
        boot = EXCLUDED.boot, seen_at = EXCLUDED.seen_at, dialogs = EXCLUDED.dialogs,
        booted_at = CASE WHEN n.boot = EXCLUDED.boot THEN n.booted_at ELSE EXCLUDED.booted_at END"""
CONTROL_BODY_MAX = 256 << 10  # admit, answer, release: one call each
EVENTS_BODY_MAX = 4 << 20
# A heartbeat lists every dialog of a node: 10,000 dialogs with Call-IDs of 2048 characters
# are about 22 MB.
HEARTBEAT_BODY_MAX = 32 << 20
_HEARTBEAT_MAX_DIALOGS = 200_000

LIMIT_REASON = "REACH_PLAN_LIMIT"


def check_source(request: Incoming) -> None:
    """Only Kamailio nodes (by address) or holders of the shared secret may call."""
    settings = request.app[SETTINGS]
    secret = settings.control_secret
    given = request.headers.get("X-Control-Secret")
    if secret and given is not None:
        if hmac.compare_digest(given.encode(), secret.encode()):
            return
        raise ApiError(403, "forbidden", "wrong control secret")
    if _trusted_source(request.remote or "", settings.control_sources):
        return
    raise ApiError(403, "forbidden", "call control is open to Kamailio nodes only")


@functools.lru_cache(maxsize=4096)
def _trusted_source(peer: str, sources: tuple[Any, ...]) -> bool:
    """Whether the peer address is in one of the networks. Cached: parsing the address on
    every request was 7 % of the sidecar's CPU at 1,300 calls/s (py-spy), and the peers are
    a handful of Kamailio nodes."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in sources)


def wire_decision(decision: dict[str, Any], request: Incoming) -> dict[str, Any]:
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
    if why == "released":
        # The call ended (BYE, CANCEL, timeout...) before or while it was being decided.
        return {"action": "reject", "code": 487, "reason": "Request Terminated", "limit": False}
    return {"action": "reject", "code": 403, "reason": "Forbidden", "limit": False}


@dataclass(frozen=True)
class AdmitRequest:
    """One initial INVITE to decide, as admit_batch() takes it."""

    call_id: str
    from_tag: str
    source: str
    from_user: str | None
    to_user: str
    auth_user: str | None
    node: str
    boot: str | None
    late: bool


@dataclass(frozen=True)
class Event:
    """An answer or a release, as control_events() takes it."""

    type: str  # "answer" | "release"
    call_id: str
    from_tag: str | None
    leg: int | None = None
    reason: str | None = None


@functools.lru_cache(maxsize=65536)
def _canonical_ip(text: str) -> str:
    """An address in the form PostgreSQL's inet prints (cached: callers come back)."""
    return str(ipaddress.ip_address(text.strip("[]")))


def admit_request(body: dict[str, Any]) -> AdmitRequest:
    try:
        source = _canonical_ip(body["source_ip"])
    except ValueError as exc:
        raise ApiError(
            400,
            "invalid_body",
            f"$.source_ip: {exc}",
            [{"path": "$.source_ip", "reason": str(exc)}],
        ) from exc
    return AdmitRequest(
        call_id=body["call_id"],
        from_tag=body["from_tag"],
        source=source,
        from_user=body.get("from_user") or None,
        to_user=body.get("to_user") or "",
        auth_user=body.get("auth_user") or None,
        node=body["node"],
        boot=body.get("boot"),
        late=bool(body.get("late")),
    )


def columns(items: list[Any], names: tuple[str, ...]) -> list[list[Any]]:
    """The requests of a batch as the parallel arrays the batch functions take, one per
    field, in the order named."""
    return [[getattr(item, name) for item in items] for name in names]


def make_scheduler(app: web.Application) -> Scheduler:
    """Group commit of the control requests: admissions and events (answers, releases)
    decided by batch in one transaction, events first; one of each kind together when both
    wait (batching.py)."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    ring_ttl = timedelta(seconds=settings.ringing_ttl)
    max_duration = timedelta(seconds=settings.max_call_duration)

    follower = app.get(CONFIG)

    def planned(items: list[AdmitRequest]) -> tuple[Any, ...]:
        return planned_batch(follower.config if follower is not None else None, items)

    async def run_admissions(items: list[AdmitRequest]) -> list[Any]:
        raw = await app[POOL].fetchval(
            _ADMIT_BATCH,
            *planned(items),
            *columns(items, _ADMIT_FIELDS),
            settings.shadow,
            settings.sip_realm,
            ring_ttl,
            max_duration,
        )
        return list(raw)

    async def run_events(items: list[Event]) -> list[Any]:
        out = await app[POOL].fetchval(
            _EVENTS,
            *columns(items, _EVENT_FIELDS),
            max_duration,
            ring_ttl,  # how long a release's tombstone lasts
        )
        return list(out)

    async def run_tick(
        events: list[Event], admissions: list[AdmitRequest]
    ) -> tuple[list[Any], list[Any]]:
        row = await app[POOL].fetchrow(
            _TICK,
            *columns(events, _EVENT_FIELDS),
            *planned(admissions),
            *columns(admissions, _ADMIT_FIELDS),
            settings.shadow,
            settings.sip_realm,
            ring_ttl,
            max_duration,
        )
        return list(row["events"]), list(row["admissions"])

    def on_batch(queue: str, size: int, seconds: float) -> None:
        metrics.child(metrics.batch_size, queue).observe(size)

    return Scheduler(run_events, run_admissions, settings.batch_max, on_batch, run_tick,
                     settings.events_batch_max, settings.batch_linger_ms / 1000)


def deadline(request: Incoming) -> float:
    """When Kamailio stops waiting for this admission (monotonic): X-Deadline-Ms, else the
    configured default."""
    ms = request.app[SETTINGS].admit_deadline_ms
    raw = request.headers.get("X-Deadline-Ms")
    if raw is not None and raw.isdigit():
        ms = min(int(raw), 60_000)
    return time.monotonic() + ms / 1000


async def decide(request: Incoming, item: AdmitRequest, due: float | None) -> dict[str, Any]:
    """Decide one INVITE through the group commit; returns Kamailio's answer."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        raw = await request.app[SCHEDULER].admission(item, due)
    except Overloaded:
        metrics.shed.inc()
        log.warning("admission shed", extra={"call_id": item.call_id, "node": item.node})
        raise ApiError(503, "overloaded", "the admission could not be decided in time") from None
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
    metrics.child(metrics.decisions, out["action"], reason).inc()
    if decision.get("limit") and decision.get("counter") and not decision.get("repeat"):
        metrics.limit_refusals.labels(decision["counter"]).inc()
    # Refusals and challenges at INFO; the routine lines of a call (admitted, answered,
    # released) at DEBUG: at 1,000 calls per second they would be 3,000 lines a second and a
    # quarter of the sidecar's CPU (bench/RESULTS.md); the metrics count them all.
    level = logging.DEBUG if out["action"] == "relay" else logging.INFO
    if not log.isEnabledFor(level):
        return out
    log.log(
        level,
        "decision",
        extra={
            "call_id": item.call_id,
            "from_tag": item.from_tag,
            "action": out["action"],
            "reason": reason,
            "counter": decision.get("counter"),
            "legs": len(decision.get("legs", ())),
            "node": item.node,
        },
    )
    return out


async def admit(request: Incoming) -> web.Response:
    check_source(request)
    body = await read_body(request, "admit", CONTROL_BODY_MAX)
    item = admit_request(body)
    # A late admission (the call is up already) is never shed: it has no one waiting.
    return respond(await decide(request, item, None if item.late else deadline(request)))


async def apply_event(request: Incoming, event: Event) -> int:
    """Apply one answer or release through the group commit (ahead of admissions)."""
    result = int(await request.app[SCHEDULER].event(event))
    _count_events(request, [event], [result])
    return result


async def apply_events(request: Incoming, events: list[Event]) -> list[int]:
    """Apply answers and releases through the group commit, in order, queued together."""
    results = [int(r) for r in await request.app[SCHEDULER].events(events)]
    _count_events(request, events, results)
    return results


def _count_events(request: Incoming, events: list[Event], results: list[int]) -> None:
    """The metrics of applied events, one increment per label for the lot (an outbox POST
    carries a hundred), and their DEBUG lines when DEBUG is on."""
    metrics = request.app[METRICS]
    answers = 0
    releases: dict[str, int] = {}
    debug = log.isEnabledFor(logging.DEBUG)
    for event, result in zip(events, results, strict=True):
        if event.type == "answer":
            answers += 1
            if debug:
                log.debug("answered", extra={"call_id": event.call_id, "leg": event.leg,
                                            "changed": bool(result)})
            continue
        reason = event.reason or "unspecified"
        label = reason if result else "unknown_call"
        releases[label] = releases.get(label, 0) + 1
        if debug:
            log.debug("released", extra={"call_id": event.call_id, "reason": reason,
                                        "released": result})
    if answers:
        metrics.answers.inc(answers)
    for label, n in releases.items():
        metrics.child(metrics.releases, label).inc(n)


async def answer(request: Incoming) -> web.Response:
    check_source(request)
    body = await read_body(request, "answer", CONTROL_BODY_MAX)
    # leg None: unknown, every slot is kept
    await apply_event(request, Event("answer", body["call_id"], body["from_tag"], body.get("leg")))
    return respond({"ok": True})


async def release(request: Incoming) -> web.Response:
    check_source(request)
    body = await read_body(request, "release", CONTROL_BODY_MAX)
    released = await apply_event(
        request,
        Event("release", body["call_id"], body.get("from_tag"),
              reason=body.get("reason") or "unspecified"),
    )
    return respond({"ok": True, "released": bool(released)})


async def events(request: Incoming) -> web.Response:
    """A batch of answers, releases and late admissions from Kamailio's outbox, applied in
    order: `{"events": [...]}`, or (application/x-ndjson) one event per line. The batch is
    idempotent: a batch sent again after a timeout changes nothing."""
    check_source(request)
    if request.content_type == NDJSON:
        # Kamailio's outbox: one event per line, each built by jansson on its own (a batch
        # grown by jansson_append is parsed and written again for every event it takes:
        # 0.2 ms of Kamailio's CPU per call at 1,500 calls/s, bench/RESULTS.md).
        body: Any = {"events": parse_lines(await read_raw(request, EVENTS_BODY_MAX), "$.events")}
    else:
        body = await read_json(request, EVENTS_BODY_MAX)
    items = event_list(body)
    results: list[Any] = []
    # Runs of answers and releases are queued together, in order (they share batches: the
    # counters move once per batch); a late admission is a barrier between them.
    run: list[Event] = []
    for kind, item in [*items, ("end", None)]:
        if kind != "admit" and kind != "end":
            run.append(item)
            continue
        if run:
            results += [{"ok": True, "changed": bool(r)} for r in await apply_events(request, run)]
            run = []
        if kind == "admit":
            results.append(await decide(request, item, None))
    return respond({"ok": True, "results": results})


def event_list(body: Any) -> list[tuple[str, Any]]:
    """Check each event against the schema of its kind; the JSON path names the event."""
    check("events", body)  # the envelope; each event below against its own kind's schema
    out: list[tuple[str, Any]] = []
    for i, raw in enumerate(body["events"]):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in ("admit", "answer", "release"):
            reason = 'type must be "admit", "answer" or "release"'
            raise ApiError(400, "invalid_body", f"$.events[{i}]: {reason}",
                           [{"path": f"$.events[{i}].type", "reason": reason}])
        fields = {k: v for k, v in raw.items() if k != "type"}
        try:
            checked = check(kind, fields)
        except ApiError as exc:
            details = [{**d, "path": f"$.events[{i}]" + d["path"][1:]} for d in exc.details]
            first = details[0]
            raise ApiError(400, "invalid_body", f"{first['path']}: {first['reason']}",
                           details) from None
        if kind == "admit":
            if not checked.get("late"):
                reason = "only late admissions (late: true) come as events"
                raise ApiError(400, "invalid_body", f"$.events[{i}].late: {reason}",
                               [{"path": f"$.events[{i}].late", "reason": reason}])
            out.append((kind, admit_request(checked)))
        elif kind == "answer":
            out.append((kind, Event("answer", checked["call_id"], checked["from_tag"],
                                    checked.get("leg"))))
        else:
            out.append((kind, Event("release", checked["call_id"], checked.get("from_tag"),
                                    reason=checked.get("reason") or "unspecified")))
    return out


@dataclass
class Dialogs:
    """A node's dialogs as the parallel arrays reconcile_node() takes."""

    call_ids: list[str] = field(default_factory=list)
    from_tags: list[str | None] = field(default_factory=list)  # None: any From-tag
    states: list[int | None] = field(default_factory=list)  # None: unknown


def _bad_dialog(index: int, member: str, reason: str) -> ApiError:
    path = f"$.dialogs[{index}]" + (f".{member}" if member else "")
    return ApiError(400, "invalid_body", f"{path}: {reason}", [{"path": path, "reason": reason}])


def _text(item: dict[str, Any], key: str, max_length: int) -> bool:
    value = item[key]
    return isinstance(value, str) and len(value) <= max_length and "\x00" not in value


def parse_dialogs(items: list[Any]) -> Dialogs:
    """Check the dialogs item by item, as heartbeat.schema.json says (jsonschema would take a
    third of a second for 10,000 dialogs, on the event loop), and turn them into arrays.
    An item is a dlg.briefing "cFs" entry ({"h_entry", "h_id", "call-id", "from_tag",
    "state"}) or {"call_id", "from_tag"}; members other than these are ignored."""
    if len(items) > _HEARTBEAT_MAX_DIALOGS:
        reason = f"more than {_HEARTBEAT_MAX_DIALOGS} dialogs"
        raise ApiError(400, "invalid_body", f"$.dialogs: {reason}",
                       [{"path": "$.dialogs", "reason": reason}])
    out = Dialogs()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad_dialog(i, "", "is not an object")
        key = "call_id" if "call_id" in item else "call-id"
        if key not in item:
            raise _bad_dialog(i, "", "has neither call_id nor call-id")
        for name in ("call_id", "call-id"):  # both checked when both are given
            if name in item and (not _text(item, name, 2048) or not item[name]):
                raise _bad_dialog(i, name, "is not a string of 1 to 2048 characters without NUL")
        if "from_tag" in item and not _text(item, "from_tag", 512):
            raise _bad_dialog(i, "from_tag", "is not a string of at most 512 characters")
        state = item.get("state")
        if isinstance(state, float) and state.is_integer():
            state = int(state)  # JSON Schema's integer: 4.0 is 4
        if state is not None and (
            not isinstance(state, int) or isinstance(state, bool) or not 0 <= state <= 1000
        ):
            raise _bad_dialog(i, "state", "is not an integer from 0 to 1000")
        out.call_ids.append(item[key])
        out.from_tags.append(item.get("from_tag"))
        out.states.append(state)
    return out


def from_rpc_reply(body: Any, headers: Mapping[str, str]) -> Any:
    """Kamailio's own heartbeat: the body is the JSON-RPC reply of dlg.briefing, passed on
    whole (a cfg script can only copy a list that large, not rebuild it), with the node and
    boot id in X-Node and X-Boot. Turned into the documented heartbeat shape; an RPC error
    reply means no list (the boot id is still judged)."""
    if not isinstance(body, dict) or "jsonrpc" not in body:
        return body
    out: dict[str, Any] = {"node": headers.get("X-Node", ""), "boot": headers.get("X-Boot", "")}
    if isinstance(body.get("result"), list):
        out["dialogs"] = body["result"]
    return out


def heartbeat_body(body: Any) -> tuple[dict[str, Any], Dialogs | None]:
    """The heartbeat's members checked against its schema, and its dialogs (None: no list)."""
    if not isinstance(body, dict) or not isinstance(body.get("dialogs"), list):
        return check("heartbeat", body), None
    dialogs = body["dialogs"]
    check("heartbeat", {**body, "dialogs": []})  # every member but the dialogs themselves
    return body, parse_dialogs(dialogs)


async def heartbeat(request: Incoming) -> web.Response:
    check_source(request)
    raw = await read_json(request, HEARTBEAT_BODY_MAX)
    body, dialogs = heartbeat_body(from_rpc_reply(raw, request.headers))
    settings = request.app[SETTINGS]
    listed = dialogs or Dialogs()
    started = time.perf_counter()
    async with db.counters_locked(request.app[POOL]) as conn:
        row = await conn.fetchrow(
            _RECONCILE,
            body["node"],
            body["boot"],
            None if dialogs is None else listed.call_ids,  # NULL: no list, judge the boot id only
            listed.from_tags,
            listed.states,
            timedelta(seconds=settings.reconcile_grace),
            timedelta(seconds=settings.ringing_ttl),
            timedelta(seconds=settings.max_call_duration),
        )
        await conn.execute(
            _NODE_SEEN, body["node"], body["boot"],
            None if dialogs is None else len(listed.call_ids),
        )
    released, answered = row["released"], row["answered"]
    if released:
        request.app[METRICS].expired.labels("reconciled").inc(released)
    if released or answered:
        log.warning(
            "reconciled node",
            extra={
                "node": body["node"],
                "released": released,
                "answered": answered,
                "dialogs": None if dialogs is None else len(dialogs.call_ids),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
    return respond({"ok": True, "released": released, "answered": answered})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/control/admit", admit)
    app.router.add_post("/v1/control/answer", answer)
    app.router.add_post("/v1/control/release", release)
    app.router.add_post("/v1/control/heartbeat", heartbeat)
    app.router.add_post("/v1/control/events", events)
