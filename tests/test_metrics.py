"""GET /metrics parsed by prometheus_client's own parser, with the counters moving as calls are
decided; and the structured logs: JSON lines, the Call-ID on every call line, no secrets."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config_doc import ha1
from sidecar.logs import JsonFormatter
from tests.helpers import ADMIN_TOKEN, Sidecar, running_sidecar
from tests.test_admin_resources import BASE

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(sc: Sidecar) -> Samples:
    status, text = await sc.request("GET", "/metrics", admin=False)
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


LIMITED: dict[str, Any] = {
    **BASE,
    "accounts": [{"id": "acme", "limits": {"calls": 2}}, BASE["accounts"][1]],
}


async def test_metrics_move_as_calls_are_decided(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(LIMITED)
        before = await scrape(sc)
        for family in (
            "sidecar_decision_seconds_count",
            "sidecar_db_pool_size",
            "sidecar_db_pool_idle",
            "sidecar_db_pool_in_use",
            "sidecar_db_pool_max",
            "sidecar_db_up",
        ):
            assert (family, ()) in before, family
        assert value(before, "sidecar_db_pool_max") == 20
        assert value(before, "sidecar_db_up") == 1
        assert value(before, "sidecar_active_calls", state="ringing") == 0

        assert (await sc.admit("m1", to="ivr", source="127.0.0.3"))["action"] == "relay"
        assert (await sc.admit("m2", to="ivr", source="127.0.0.3"))["action"] == "relay"
        refused = await sc.admit("m3", to="ivr", source="127.0.0.3")
        assert refused["action"] == "reject" and refused["code"] == 486
        await sc.admit("m3", to="ivr", source="127.0.0.3")  # retransmission: same decision
        assert (await sc.admit("m4", to="nobody", source="127.0.0.3"))["code"] == 404
        assert (await sc.admit("m5", to="ivr", source="192.0.2.9"))["code"] == 403
        await sc.answer("m1", 0)

        after = await scrape(sc)
        d = "sidecar_decisions_total"
        assert value(after, d, outcome="relay", reason="admitted") == 2
        assert value(after, d, outcome="reject", reason="limit_destination") == 1
        assert value(after, d, outcome="reject", reason="repeat") == 1
        assert value(after, d, outcome="reject", reason="not_found") == 1
        assert value(after, d, outcome="reject", reason="forbidden") == 1
        assert value(after, "sidecar_decision_seconds_count") == 6
        assert value(after, "sidecar_decision_seconds_sum") > 0
        assert value(after, "sidecar_decision_seconds_bucket", le="+Inf") == 6
        assert value(after, "sidecar_answers_total") == 1
        assert value(after, "sidecar_active_calls", state="ringing") == 1
        assert value(after, "sidecar_active_calls", state="answered") == 1
        requests = "sidecar_http_requests_total"
        admit_route = {"method": "POST", "route": "/v1/control/admit", "status": "200"}
        assert value(after, requests, **admit_route) == 6

        await sc.release("m1")
        await sc.release("never-seen")
        status, _ = await sc.request("DELETE", "/v1/calls/m2")
        assert status == 200
        status, _ = await sc.request("GET", "/v1/accounts/ghost")
        assert status == 404

        last = await scrape(sc)
        assert value(last, "sidecar_releases_total", reason="bye") == 1
        assert value(last, "sidecar_releases_total", reason="unknown_call") == 1
        assert value(last, "sidecar_releases_total", reason="admin") == 1
        # Gauges go back to zero, not stale.
        assert value(last, "sidecar_active_calls", state="ringing") == 0
        assert value(last, "sidecar_active_calls", state="answered") == 0
        # Routes are labelled by their pattern, never by the raw path.
        assert value(last, requests, method="GET", route="/v1/accounts/{id}", status="404") == 1
        assert value(last, requests, method="DELETE", route="/v1/calls/{call_id}", status="200")
        assert not any("ghost" in str(labels) for _, labels in last)


async def test_logs_are_json_with_call_ids_and_no_secrets(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_password = "pa55-w0rd-never-logged"
    doc = {
        **BASE,
        "extensions": [
            {"id": "1001", "account": "acme-sales", "password": secret_password},
            BASE["extensions"][1],
        ],
    }
    caplog.set_level(logging.DEBUG)
    async with running_sidecar(database_url, control_secret="ctl-secret-never-logged") as sc:
        await sc.put_config(doc)
        await sc.request("PATCH", "/v1/extensions/1001", {"password": secret_password + "2"})
        await sc.admit('weird"call\u00e9\n', to="ivr", source="127.0.0.3")
        await sc.admit("c2", to="ivr", source="127.0.0.3", from_tag="t2")
        await sc.answer("c2", 0, from_tag="t2")
        await sc.release("c2", from_tag="t2")
        await sc.request("GET", "/v1/usage", admin=False, headers={"Authorization": "Bearer bad"})
        await sc.request(
            "POST",
            "/v1/control/release",
            {"call_id": "x"},
            admin=False,
            headers={"X-Control-Secret": "wrong-secret-never-logged"},
        )
        await sc.request("DELETE", "/v1/calls/weird%22call%C3%A9%0A")

    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("sidecar")]
    assert lines
    secrets = (
        secret_password,
        ADMIN_TOKEN,
        "ctl-secret-never-logged",
        "wrong-secret-never-logged",
        ha1("1001", "sidecar.local", secret_password),
    )
    call_lines = []
    for line in lines:
        assert "\n" not in line
        entry = orjson.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(entry)
        for secret in secrets:
            assert secret not in line, line
        if entry["logger"] == "sidecar.calls":
            call_lines.append(entry)
    assert len(call_lines) >= 4
    for entry in call_lines:
        assert entry.get("call_id"), entry
    assert any(e["call_id"] == 'weird"call\u00e9\n' for e in call_lines)
    released = [orjson.loads(x) for x in lines if "force-released" in x]
    assert released and released[0]["call_id"] == 'weird"call\u00e9\n'


async def test_per_account_series_busiest_first_capped_and_refusals_by_counter(
        database_url: str) -> None:
    doc = {**LIMITED, "accounts": [
        *LIMITED["accounts"],
        *({"id": f"idle-{i:02}", "limits": {"calls": 5}} for i in range(30)),
    ]}
    async with running_sidecar(database_url, metrics_max_series=3) as sc:
        await sc.put_config(doc)
        assert (await sc.admit("p1", to="ivr", source="127.0.0.3"))["action"] == "relay"
        assert (await sc.admit("p2", to="ivr", source="127.0.0.3"))["action"] == "relay"
        refused = await sc.admit("p3", to="ivr", source="127.0.0.3")
        assert refused["action"] == "reject" and refused["counter"] == "account:acme:calls"
        await sc.admit("p3", to="ivr", source="127.0.0.3")   # a retransmission: counted once
        s = await scrape(sc)
        # The busiest account first, with its limit; unlimited counters have no limit series.
        assert value(s, "sidecar_account_active_calls", account="acme", counter="calls") == 2
        assert value(s, "sidecar_account_limit", account="acme", counter="calls") == 2
        assert ("sidecar_account_limit", (("account", "acme"), ("counter", "public"))) not in s
        assert value(s, "sidecar_channel_active_calls", channel="carrier-a") == 2
        # At most 3 accounts have series (33 are configured).
        accounts = {dict(k[1])["account"] for k in s if k[0] == "sidecar_account_active_calls"}
        assert len(accounts) == 3 and "acme" in accounts, accounts
        assert value(s, "sidecar_limit_refusals_total", counter="account:acme:calls") == 1
        # No `_created` series.
        assert not [k for k in s if k[0].endswith("_created")]
        # A call released: the gauges follow at the next scrape.
        assert await sc.release("p1")
        s = await scrape(sc)
        assert value(s, "sidecar_account_active_calls", account="acme", counter="calls") == 1
