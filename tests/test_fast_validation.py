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


def bodies() -> st.SearchStrategy[Any]:
    member = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=9)
    events = st.fixed_dictionaries({"events": st.lists(member, max_size=3)})
    return st.one_of(member, events, VALUES)


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
])
def test_known_bodies(name: str, body: Any) -> None:
    agree(name, body)
