"""Property: random sequences of admit (on time or late), answer (on a known or an unknown
leg), release and cancel, in both counting modes, with random limits and random forward
targets (some of which cannot be routed), give the same decisions and counters in PostgreSQL
as in the reference model; counters never go negative and always equal their rebuild from
the call records."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import classify, config_doc
from sidecar.control import AdmitRequest
from tests.model import Config, Model

ACCOUNTS = {"p": None, "a": "p", "b": "p", "b2": "b"}
EXTENSIONS: dict[str, dict[str, Any]] = {
    "a1": {"account": "a", "forward": [], "ring_self": False},
    "a2": {"account": "a", "forward": ["a1", "+1555", "b1"], "ring_self": True},
    "b1": {"account": "b2", "forward": [], "ring_self": False},
    "b2": {"account": "b", "forward": ["+1666", "+100"], "ring_self": False},
    "p1": {"account": "p", "forward": [], "ring_self": False},
}
NUMBERS = {"+100": "a2", "+200": "b1"}
CHANNELS: dict[str, dict[str, Any]] = {
    "c1": {"prefixes": ["+1"], "priority": 1, "sources": ["127.0.0.3"], "gateway": "sip:10.0.0.1"},
    "c2": {"prefixes": ["+1"], "priority": 2, "sources": [], "gateway": "sip:10.0.0.2"},
    "c3": {"prefixes": ["+"], "priority": 1, "sources": ["127.0.0.4"], "gateway": "sip:10.0.0.3"},
}
ORIGINS = ["a1", "a2", "b1", "b2", "p1", "channel:c1", "channel:c3"]
DIALLED = ["a1", "a2", "b1", "b2", "p1", "+100", "+200", "+1555", "+1777", "+4477", "+999x",
           "0800"]
# Forward targets of a2 and b2: extensions, numbers, external numbers some channel carries,
# external numbers none does ("0800", "#77": no prefix matches), and "ghost", neither an
# extension, a number nor a number at all (the API refuses it; plain SQL, or an extension
# deleted later, can leave one behind).
TARGETS = ["a1", "b1", "p1", "+100", "+200", "+1555", "+1666", "+4477", "0800", "#77", "ghost"]
FORWARDING = ["a2", "b2"]

limit = st.one_of(st.none(), st.integers(0, 3))
limits = st.fixed_dictionaries({"calls": limit, "public": limit, "internal": limit})
forwarding = st.fixed_dictionaries({
    "forward": st.lists(st.sampled_from(TARGETS), max_size=4, unique=True),
    "ring_self": st.booleans(),
})
operation = st.one_of(
    st.tuples(st.sampled_from(["admit", "late"]), st.integers(0, 7), st.sampled_from(ORIGINS),
              st.sampled_from(DIALLED)),
    st.tuples(st.just("answer"), st.integers(0, 7), st.one_of(st.none(), st.integers(0, 4))),
    st.tuples(st.sampled_from(["bye", "cancel"]), st.integers(0, 7)),
)
event = st.one_of(
    st.tuples(st.just("answer"), st.integers(0, 7), st.one_of(st.none(), st.integers(0, 4))),
    st.tuples(st.sampled_from(["bye", "cancel"]), st.integers(0, 7)),
)


def document(counting: str, acc_limits: dict[str, dict[str, Any]],
             chan_limits: dict[str, int | None],
             forwards: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    extensions = {e: {**x, **(forwards or {}).get(e, {})} for e, x in EXTENSIONS.items()}
    return {
        "counting": counting,
        "accounts": [{"id": a, "parent": p, "limits": acc_limits[a]} for a, p in ACCOUNTS.items()],
        "extensions": [{"id": e, "account": x["account"], "password": "pw", "forward": x["forward"],
                        "ring_self": x["ring_self"]} for e, x in extensions.items()],
        "numbers": [{"number": n, "extension": e} for n, e in NUMBERS.items()],
        "channels": [{"id": c, "limits": {"calls": chan_limits[c]}, **x}
                     for c, x in CHANNELS.items()],
    }


def model_for(doc: dict[str, Any]) -> Model:
    return Model(Config(
        counting=doc["counting"],
        accounts={a["id"]: {"parent": a["parent"],
                            "limits": {k: v for k, v in a["limits"].items() if v is not None}}
                  for a in doc["accounts"]},
        extensions={e["id"]: e for e in doc["extensions"]},
        numbers={n["number"]: n["extension"] for n in doc["numbers"]},
        channels={c["id"]: {**c, "limit": c["limits"]["calls"]} for c in doc["channels"]},
    ))


async def load(conn: asyncpg.Connection, doc: dict[str, Any]) -> None:
    """No call recorded, the configuration `doc`, the counters rebuilt. The configuration
    API refuses "ghost": the document is loaded without it, then it is put back with plain
    SQL."""
    api_doc = copy.deepcopy(doc)
    for ext in api_doc["extensions"]:
        ext["forward"] = [t for t in ext["forward"] if t != "ghost"]
    assert config_doc.check(api_doc) == []
    await conn.execute("DELETE FROM calls")
    async with conn.transaction():
        await config_doc.apply(conn, api_doc, "realm")
        for ext in doc["extensions"]:
            await conn.execute("UPDATE extensions SET forward = $2 WHERE id = $1",
                               ext["id"], ext["forward"])
    await conn.execute("SELECT rebuild_counters()")


async def db_admit(conn: asyncpg.Connection, call_id: str, origin: str, dialled: str,
                   late: bool, config: classify.Config | None = None) -> Any:
    """One admission through admit(), or, given the sidecar's configuration cache, through
    admit_planned() with the cache's classification, as the sidecar sends it."""
    if origin.startswith("channel:"):
        source = CHANNELS[origin.split(":")[1]]["sources"][0]
        auth = None
    else:
        source, auth = "127.0.0.1", origin
    if config is None:
        raw = await conn.fetchval(
            "SELECT admit($1, 'tag', $2::inet, $3, $4, $5, 'node', 'boot', false, 'realm', "
            "interval '3 minutes', $6, interval '1 hour')::text",
            call_id, source, auth, dialled, auth, late)
    else:
        item = AdmitRequest(call_id, "tag", source, auth, dialled, auth, "node", "boot", late)
        raw = await conn.fetchval(
            "SELECT (admit_planned($1, $2, $3, $4, $5, $6, $7::text[]::inet[], $8, $9, $10,"
            " $11, $12, $13, false, 'realm', interval '3 minutes', interval '1 hour'))[1]",
            *classify.planned_batch(config, [item]),
            *[[getattr(item, f)] for f in ("call_id", "from_tag", "source", "from_user",
                                          "to_user", "auth_user", "node", "boot", "late")])
    d = orjson.loads(raw)
    d.pop("repeat", None)
    if d["action"] == "relay":
        d = {"action": "relay", "legs": [{"leg": x["leg"], "to": x["to"], "channel": x["channel"]}
                                         for x in d["legs"]]}
    else:
        d.pop("limit", None)
        d.pop("leg", None)
    return d


async def db_counters(conn: asyncpg.Connection) -> dict[str, int]:
    out = {}
    for r in await conn.fetch("SELECT * FROM accounts"):
        for dim in ("calls", "public", "internal"):
            out[f"account:{r['id']}:{dim}"] = r[f"{dim}_active"]
    for r in await conn.fetch("SELECT * FROM channels"):
        out[f"channel:{r['id']}:calls"] = r["calls_active"]
    return out


# What both property tests draw: the hypothesis settings and a configuration.
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
CONFIGURATION = {
    "counting": st.sampled_from(["per_call", "per_leg"]),
    "acc_limits": st.fixed_dictionaries({a: limits for a in ACCOUNTS}),
    "chan_limits": st.fixed_dictionaries({c: limit for c in CHANNELS}),
    "forwards": st.fixed_dictionaries({e: forwarding for e in FORWARDING}),
}


@PROPERTY
@given(
    **CONFIGURATION,
    ops=st.lists(operation, min_size=1, max_size=30),
)
async def test_database_agrees_with_model(
    database_url: str, counting: str, acc_limits: dict[str, Any],
    chan_limits: dict[str, Any], forwards: dict[str, dict[str, Any]],
    ops: list[tuple[Any, ...]],
) -> None:
    await agrees_with_model(database_url, document(counting, acc_limits, chan_limits, forwards),
                            ops, cached=False)


@settings(PROPERTY, max_examples=100)
@given(
    **CONFIGURATION,
    ops=st.lists(operation, min_size=1, max_size=30),
)
async def test_planned_admission_agrees_with_model(
    database_url: str, counting: str, acc_limits: dict[str, Any],
    chan_limits: dict[str, Any], forwards: dict[str, dict[str, Any]],
    ops: list[tuple[Any, ...]],
) -> None:
    """The same, every call classified by the sidecar's cache (admit_planned())."""
    await agrees_with_model(database_url, document(counting, acc_limits, chan_limits, forwards),
                            ops, cached=True)


async def agrees_with_model(database_url: str, doc: dict[str, Any],
                            ops: list[tuple[Any, ...]], cached: bool) -> None:
    model = model_for(doc)
    conn = await asyncpg.connect(database_url)
    try:
        await load(conn, doc)
        config = await classify.load(conn) if cached else None
        for op in ops:
            if op[0] in ("admit", "late"):
                _, n, origin, dialled = op
                late = op[0] == "late"
                got = await db_admit(conn, f"c{n}", origin, dialled, late, config)
                want = model.admit(f"c{n}", origin, dialled, late)
                assert got == want, (op, got, want)
            elif op[0] == "answer":
                await conn.execute("SELECT answer($1, 'tag', $2, $3)", f"c{op[1]}", op[2],
                                   datetime.timedelta(hours=1))
                model.answer(f"c{op[1]}", op[2])
            else:
                await conn.execute("SELECT release($1, 'tag', $2)", f"c{op[1]}", op[0])
                model.release(f"c{op[1]}", op[0])
            states = {r["call_id"]: r["state"] for r in await conn.fetch("SELECT * FROM calls")}
            assert states == model.states(), op
            counters = await db_counters(conn)
            assert counters == model.counters(), op
            assert min(counters.values()) >= 0
            assert await conn.fetch("SELECT * FROM counter_drift()") == []
        if config is not None:  # every call was classified by the cache, none overruled
            assert await conn.fetchval("SELECT n FROM config_generation") == config.generation
    finally:
        await conn.close()


async def db_events(conn: asyncpg.Connection, ops: list[tuple[Any, ...]]) -> list[int]:
    """Answers and releases in one control_events() batch, as the outbox posts them."""
    out = await conn.fetchval(
        "SELECT control_events($1, $2, $3, $4, $5, interval '1 hour', interval '3 minutes')",
        ["answer" if op[0] == "answer" else "release" for op in ops],
        [f"c{op[1]}" for op in ops], ["tag"] * len(ops),
        [op[2] if op[0] == "answer" else None for op in ops],
        [None if op[0] == "answer" else op[0] for op in ops])
    return list(out)


def model_events(model: Model, ops: list[tuple[Any, ...]]) -> list[int]:
    """Apply answers and releases to the model in order; per event, what control_events()
    must return: 1 when it changed its call (an answer of a ringing call, a release of a
    live one; a CANCEL only of a ringing one)."""
    changed = []
    for op in ops:
        call_id = f"c{op[1]}"
        state = model.states().get(call_id)
        if op[0] == "answer":
            changed.append(int(state == "ringing"))
            model.answer(call_id, op[2])
        else:
            changed.append(int(state == "ringing"
                               or (state == "answered" and op[0] != "cancel")))
            model.release(call_id, op[0])
    return changed


@PROPERTY
@given(
    **CONFIGURATION,
    # events drawn three times as often, so that batches of several calls are common
    ops=st.lists(st.one_of(operation, event, event, st.just(("flush",))), min_size=5,
                 max_size=40),
)
async def test_batched_events_agree_with_model(
    database_url: str, counting: str, acc_limits: dict[str, Any],
    chan_limits: dict[str, Any], forwards: dict[str, dict[str, Any]],
    ops: list[tuple[Any, ...]],
) -> None:
    """The same, with the answers and releases between two admissions (or a "flush")
    applied as one batch of control_events(): a batch naming each call once is applied
    set-based, one naming a call twice event by event; both must be the model's sequence."""
    doc = document(counting, acc_limits, chan_limits, forwards)
    model = model_for(doc)
    conn = await asyncpg.connect(database_url)
    try:
        await load(conn, doc)
        pending: list[tuple[Any, ...]] = []

        async def flush() -> None:
            if not pending:
                return
            want = model_events(model, pending)
            assert await db_events(conn, pending) == want, pending
            pending.clear()
            states = {r["call_id"]: r["state"] for r in await conn.fetch("SELECT * FROM calls")}
            assert states == model.states(), ops
            counters = await db_counters(conn)
            assert counters == model.counters(), ops
            assert await conn.fetch("SELECT * FROM counter_drift()") == []

        for op in ops:
            if op[0] in ("admit", "late"):
                await flush()
                _, n, origin, dialled = op
                late = op[0] == "late"
                got = await db_admit(conn, f"c{n}", origin, dialled, late)
                assert got == model.admit(f"c{n}", origin, dialled, late), (op, got)
            elif op[0] == "flush":
                await flush()
            else:
                pending.append(op)
        await flush()
    finally:
        await conn.close()


async def test_batched_events_of_forked_and_crossed_calls(database_url: str) -> None:
    """The cases a batch of events must get right, each in a batch of several calls (the
    set-based path) and again in one naming a call twice (event by event): an answer of a
    forked call gives the other legs back, a CANCEL crossing the 200 releases nothing, a
    release of an unknown call leaves a tombstone, a release of a refused call changes
    nothing."""
    unlimited = {"calls": None, "public": None, "internal": None}
    for twice in (False, True):
        doc = document("per_leg", {a: dict(unlimited) for a in ACCOUNTS} | {
            "b2": {"calls": 0, "public": None, "internal": None}},
            {c: None for c in CHANNELS},
            {"a2": {"forward": ["a1", "+1555"], "ring_self": True},
             "b2": {"forward": [], "ring_self": False}})
        model = model_for(doc)
        conn = await asyncpg.connect(database_url)
        try:
            await load(conn, doc)
            for n, origin, dialled in ((0, "p1", "a2"), (1, "a1", "p1"), (2, "p1", "a1"),
                                       (3, "a1", "b1")):
                got = await db_admit(conn, f"c{n}", origin, dialled, False)
                assert got == model.admit(f"c{n}", origin, dialled, False)
            assert model.states()["c3"] == "refused"  # b2 (b1's account) holds no call
            batches: list[list[tuple[Any, ...]]] = [
                [("answer", 0, 2), ("answer", 1, 0), ("bye", 3), ("bye", 5)],
                [("cancel", 1), ("bye", 2)],
            ]
            if twice:  # the same, each with a call named twice: event by event
                batches = [b + [b[0]] for b in batches]
            for batch in batches:
                want = model_events(model, batch)
                assert await db_events(conn, batch) == want, batch
                states = {r["call_id"]: r["state"] for r in await conn.fetch("SELECT * FROM calls")}
                assert states == model.states(), batch
                assert await db_counters(conn) == model.counters(), batch
            assert model.states() == {"c0": "answered", "c1": "answered", "c2": "released",
                                      "c3": "refused", "c5": "released"}
            assert await conn.fetch("SELECT * FROM counter_drift()") == []
        finally:
            await conn.close()
