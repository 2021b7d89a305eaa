"""The compiled validators of the hot call-control bodies accept exactly what jsonschema
accepts: random bodies near each schema's shape, both validators, the same verdict."""

from __future__ import annotations

from typing import Any

import fastjsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.jsonio import FAST_SCHEMAS, fast_validator, validator

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=False),
    st.text(max_size=8), st.sampled_from(["", "a\x00b", "x" * 513, "x" * 2049, "bye", "answer"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
KEYS = ["call_id", "from_tag", "source_ip", "from_user", "to_user", "auth_user", "node",
        "boot", "late", "leg", "reason", "type", "events", "extra"]


# Configuration documents: near-valid values of each field (identifiers with a forbidden
# character, addresses out of range, negative limits...).
NEAR = st.sampled_from([
    "a", "org-1", "a b", "a:b", "x" * 129, "\u00a0a", "10.0.0.1", "10.0.0.0/8", "10.0.0.1/33",
    "1.2.3.999", "::1", "fe80::1/64", "::g", "+4930123", "12a", "sip:gw.example:5060",
    "sip:a b", "0123456789abcdef0123456789abcdef", "", 0, -1, 1, 3.0, 2.5, True, None, [], {},
])
# A valid item of each kind, then up to two of its fields replaced or added: most documents
# sit right at the schema's edges.
VALID_ITEMS = {
    "accounts": {"id": "o", "name": "Org", "parent": "p",
                 "limits": {"calls": 10, "public": 5, "internal": 5, "cps": 2, "cps_burst": 4}},
    "extensions": {"id": "1001", "account": "o", "password": "s", "contact": "sip:ivr@h",
                   "sources": ["10.0.0.0/8"], "forward": ["1002"], "ring_self": False},
    "numbers": {"number": "+4930", "extension": "1001"},
    "channels": {"id": "t", "sources": ["192.0.2.1"], "gateway": "sip:gw", "prefixes": ["49"],
                 "priority": 1, "limits": {"calls": 2, "cps": 1}},
}
CONFIG_KEYS = sorted({k for item in VALID_ITEMS.values() for k in item}
                     | {"ha1", "calls", "cps_burst", "extra"})
FIELD = st.one_of(NEAR, st.lists(NEAR, max_size=3),
                  st.dictionaries(st.sampled_from(CONFIG_KEYS), NEAR, max_size=3))


def config_item(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    changes = st.dictionaries(st.sampled_from(CONFIG_KEYS), FIELD, max_size=2)
    return changes.map(lambda c: {**VALID_ITEMS[kind], **c})


CONFIG = st.fixed_dictionaries({}, optional={
    kind: st.lists(st.one_of(st.just(VALID_ITEMS[kind]), config_item(kind)), max_size=3)
    for kind in VALID_ITEMS
} | {"counting": st.sampled_from(["per_call", "per_leg", "x"])})


def bodies() -> st.SearchStrategy[Any]:
    member = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=9)
    events = st.fixed_dictionaries({"events": st.lists(member, max_size=3)})
    return st.one_of(member, events, CONFIG, VALUES)


def agree(name: str, body: Any) -> None:
    fast = fast_validator(name)
    assert fast is not None
    try:
        fast(body)
        fast_ok = True
    except fastjsonschema.JsonSchemaException:
        fast_ok = False
    assert fast_ok == validator(name).is_valid(body), (name, body)


@pytest.mark.parametrize("name", sorted(FAST_SCHEMAS))
@settings(max_examples=400, deadline=None)
@given(body=bodies())
def test_same_verdict_as_jsonschema(name: str, body: Any) -> None:
    agree(name, body)


@pytest.mark.parametrize("name,body", [
    ("admit", {"call_id": "c", "from_tag": "f", "source_ip": "127.0.0.1", "node": "n",
               "to_user": "1002", "auth_user": None, "late": True}),
    ("answer", {"call_id": "c", "from_tag": "f", "leg": 0}),
    ("answer", {"call_id": "c", "from_tag": "f", "leg": None}),
    ("release", {"call_id": "c", "from_tag": "f", "reason": "bye"}),
    ("release", {"call_id": "c\x00", "from_tag": "f"}),
    ("events", {"events": [{"type": "answer", "call_id": "c"}]}),
    ("events", {"events": [{"type": "hangup", "call_id": "c"}]}),
    ("config", {"accounts": [{"id": "p", "limits": {"calls": 10, "cps": 5, "cps_burst": 1}},
                             {"id": "o", "parent": "p"}],
                "extensions": [{"id": "1001", "account": "o", "password": "s",
                                "sources": ["10.0.0.0/8", "::1"], "forward": ["+4930"]}],
                "numbers": [{"number": "+4930", "extension": "1001"}],
                "channels": [{"id": "t", "sources": ["192.0.2.1"], "gateway": "sip:gw",
                              "prefixes": ["49"], "limits": {"calls": 2}}]}),
    ("config", {"extensions": [{"id": "e", "account": "a", "sources": ["1.2.3.999"]}]}),
    ("config", {"accounts": [{"id": "a\u00a0"}]}),
])
def test_known_bodies(name: str, body: Any) -> None:
    agree(name, body)
