"""Admission rules beyond the seeds' examples: idempotency, answer and release, stale calls,
failure modes, limits changed live, shadow mode, and hostile input on the control API."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import asyncpg
import pytest

from tests.helpers import Sidecar, running_sidecar

BASIC: dict[str, Any] = {
    "counting": "per_call",
    "accounts": [{"id": "acme", "limits": {"calls": 2}}],
    "extensions": [
        {"id": "1001", "account": "acme", "password": "pw"},
        {"id": "1002", "account": "acme", "password": "pw"},
        {"id": "app", "account": "acme", "sources": ["127.0.0.2"]},
    ],
    "numbers": [{"number": "+15550001000", "extension": "1002"}],
    "channels": [{"id": "carrier", "sources": ["127.0.0.3"], "gateway": "sip:127.0.0.3:5070",
                  "prefixes": ["+"]}],
}


async def active(sc: Sidecar, account: str = "acme") -> int:
    return int((await sc.usage())["accounts"][account]["calls"]["active"])


async def test_retransmission_gets_first_decision_and_counts_once(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        first = await sc.admit("c1", to="1002", auth="1001")
        again = await sc.admit("c1", to="1002", auth="1001")
        assert again.pop("repeat") is True
        assert again == first
        assert await active(sc) == 1
        # A refusal is remembered too, even once room has come back.
        await sc.admit("c2", to="1002", auth="1001")
        refused = await sc.admit("c3", to="1002", auth="1001")
        assert refused["action"] == "reject"
        await sc.release("c2")
        assert (await sc.admit("c3", to="1002", auth="1001"))["action"] == "reject"
        # Another From-tag is another call (a new call reusing a Call-ID).
        assert (await sc.admit("c3", to="1002", auth="1001", from_tag="other"))["action"] \
            == "relay"


async def test_release_is_idempotent_and_unknown_calls_are_harmless(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        await sc.admit("c1", to="1002", auth="1001")
        assert await sc.release("c1") is True
        assert await sc.release("c1") is False
        assert await sc.release("never-seen") is False
        assert await sc.release("never-seen", from_tag=None) is False
        await sc.answer("never-seen", 0)
        assert await active(sc) == 0


async def test_release_without_from_tag_releases_every_call_of_the_call_id(
        database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        await sc.admit("same", to="1002", auth="1001", from_tag="a")
        await sc.admit("same", to="1002", auth="1001", from_tag="b")
        assert await active(sc) == 2
        assert await sc.release("same", from_tag=None)
        assert await active(sc) == 0


async def test_origin_rules(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        # Unknown origin: 403 Forbidden, not a limit.
        d = await sc.admit(to="1002", source="10.9.9.9", from_user="stranger")
        assert (d["action"], d["code"], d["reason"], d["limit"]) == (
            "reject", 403, "Forbidden", False)
        # A digest extension without credentials is challenged.
        assert (await sc.admit(to="1002", from_user="1001"))["action"] == "challenge"
        # Credentials for an extension without a password: forbidden.
        assert (await sc.admit(to="1002", auth="app"))["code"] == 403
        # Source-authenticated application server, whatever its From user.
        assert (await sc.admit(to="+4420000", source="127.0.0.2",
                               from_user="+1555"))["action"] == "relay"
        # Unknown local destination from a carrier: 404. A non-number outward: 404.
        d = await sc.admit(to="+15559999999", source="127.0.0.3")
        assert (d["code"], d["reason"]) == (404, "Not Found")
        assert (await sc.admit(to="nobody", auth="1001"))["code"] == 404
        assert (await sc.admit(to="", auth="1001"))["code"] == 404


async def test_limit_changed_with_sql_applies_to_next_call_and_cuts_none(
        database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        await sc.admit("c1", to="1002", auth="1001")
        await sc.admit("c2", to="1002", auth="1001")
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE accounts SET calls_limit = 3 WHERE id = 'acme'")
            assert (await sc.admit("c3", to="1002", auth="1001"))["action"] == "relay"
            # Lowered below use: nobody is cut, new calls wait until use falls below it.
            await conn.execute("UPDATE accounts SET calls_limit = 1 WHERE id = 'acme'")
            assert await active(sc) == 3
            assert (await sc.admit("c4", to="1002", auth="1001"))["action"] == "reject"
            for c in ("c1", "c2"):
                await sc.release(c)
            assert (await sc.admit("c5", to="1002", auth="1001"))["action"] == "reject"
            await sc.release("c3")
            assert (await sc.admit("c6", to="1002", auth="1001"))["action"] == "relay"
            await conn.execute("UPDATE accounts SET calls_limit = NULL WHERE id = 'acme'")
            assert (await sc.admit("c7", to="1002", auth="1001"))["action"] == "relay"
            await conn.execute("UPDATE accounts SET calls_limit = 0 WHERE id = 'acme'")
            assert (await sc.admit("c8", to="1002", auth="1001"))["action"] == "reject"
        finally:
            await conn.close()


async def test_configurable_refusal_codes(database_url: str) -> None:
    async with running_sidecar(database_url, origin_refusal_code=503,
                               destination_refusal_code=503) as sc:
        await sc.put_config({**BASIC, "accounts": [{"id": "acme", "limits": {"calls": 0}}]})
        d = await sc.admit(to="1002", auth="1001")
        assert (d["code"], d["reason"]) == (503, "REACH_PLAN_LIMIT")


async def test_shadow_mode_counts_but_never_refuses(database_url: str) -> None:
    async with running_sidecar(database_url, shadow=True) as sc:
        await sc.put_config(BASIC)
        decisions = [await sc.admit(to="1002", auth="1001") for _ in range(4)]
        assert all(d["action"] == "relay" for d in decisions)
        assert "shadow" not in decisions[0] and "shadow" not in decisions[1]
        assert decisions[2]["shadow"] == [{"leg": 0, "counter": "account:acme:calls"}]
        assert await active(sc) == 4
        status, text = await sc.request("GET", "/metrics", admin=False)
        assert 'reason="shadow_refusal"' in text


async def test_late_admission_counts_whatever_the_limit(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config({**BASIC, "accounts": [{"id": "acme", "limits": {"calls": 0}}]})
        d = await sc.admit("late-1", to="1002", auth="1001", late=True)
        assert d["action"] == "relay" and d["shadow"]
        assert await active(sc) == 1
        assert await sc.release("late-1")
        assert await active(sc) == 0


async def test_stale_calls_expire(database_url: str) -> None:
    async with running_sidecar(database_url, ringing_ttl=1, max_call_duration=1) as sc:
        await sc.put_config(BASIC)
        await sc.admit("ringing", to="1002", auth="1001")
        await sc.admit("answered", to="1002", auth="1001")
        await sc.answer("answered", 0)
        assert await active(sc) == 2
        await asyncio.sleep(1.2)
        conn = await asyncpg.connect(database_url)
        try:
            assert await conn.fetchval("SELECT expire_calls(500, interval '1 second')") == 2
            assert await active(sc) == 0
            # Their tombstones refuse a late admission for a ringing TTL, then go.
            assert await conn.fetchval(
                "SELECT count(*) FROM calls WHERE state = 'released'") == 2
            assert await conn.fetchval("SELECT purge_calls()") == 0
            await asyncio.sleep(1.2)
            assert await conn.fetchval("SELECT purge_calls()") == 2
            assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        finally:
            await conn.close()


async def test_ended_calls_kept_for_their_retention_refusals_not(database_url: str) -> None:
    """SIDECAR_ENDED_RETENTION keeps an ended call's row (and its refusal of a late
    admission) past its tombstone's time; a refusal goes at its time whatever it is."""
    from sidecar.app import janitor_run

    async with running_sidecar(database_url, ended_retention=3600) as sc:
        await sc.put_config({**BASIC, "accounts": [{"id": "acme", "limits": {"calls": 1}}]})
        assert (await sc.admit("ended", to="1002", auth="1001"))["action"] == "relay"
        assert (await sc.admit("refused", to="1002", auth="1001"))["action"] == "reject"
        assert await sc.release("ended")
        conn = await asyncpg.connect(database_url)
        try:
            # Both past their expires_at (the tombstone's and the refusal's time).
            await conn.execute("UPDATE calls SET expires_at = now() - interval '1 minute'")
            await janitor_run(sc.app)
            rows = await conn.fetch("SELECT call_id, state FROM calls")
            assert [(r["call_id"], r["state"]) for r in rows] == [("ended", "released")]
            # Still refusing a late admission of that call, and not counting it.
            late = await sc.admit("ended", to="1002", auth="1001")
            assert late["action"] == "reject" and await active(sc) == 0
            # Past the retention too: gone.
            await conn.execute("UPDATE calls SET expires_at = now() - interval '2 hours'")
            await janitor_run(sc.app)
            assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        finally:
            await conn.close()


async def test_janitor_releases_expired_calls_by_itself(database_url: str) -> None:
    async with running_sidecar(database_url, ringing_ttl=1, janitor_interval=0.3) as sc:
        await sc.put_config(BASIC)
        await sc.admit("lost-bye", to="1002", auth="1001")
        for _ in range(50):
            if await active(sc) == 0:
                break
            await asyncio.sleep(0.1)
        assert await active(sc) == 0


async def test_heartbeat_reconciles_a_restarted_node(database_url: str) -> None:
    async with running_sidecar(database_url, reconcile_grace=0) as sc:
        await sc.put_config(BASIC)
        await sc.admit("k1", to="1002", auth="1001")           # node test-node, boot-1
        await sc.admit("k2", to="1002", auth="1001")
        hb = {"node": "test-node", "boot": "boot-1", "dialogs": [{"call_id": "k1",
                                                                   "from_tag": "ft"}]}
        status, body = await sc.request("POST", "/v1/control/heartbeat", hb, admin=False)
        assert status == 200 and body["released"] == 1          # k2 is unknown to the node
        assert await active(sc) == 1
        # The node restarted: everything it admitted before is gone.
        status, body = await sc.request("POST", "/v1/control/heartbeat",
                                        {"node": "test-node", "boot": "boot-2"}, admin=False)
        assert body["released"] == 1
        assert await active(sc) == 0


@pytest.mark.parametrize("body, path", [
    ({"call_id": "", "from_tag": "", "source_ip": "1.2.3.4", "to_user": "", "node": "n"},
     "$.call_id"),
    ({"call_id": "x", "from_tag": "", "source_ip": "not-an-ip", "to_user": "", "node": "n"},
     "$.source_ip"),
    ({"call_id": "x", "from_tag": "", "source_ip": "1.2.3.4", "to_user": "", "node": "n",
      "extra": 1}, "$"),
    ({"call_id": "x\u0000y", "from_tag": "", "source_ip": "1.2.3.4", "to_user": "", "node": "n"},
     "$.call_id"),
    ({"call_id": "x" * 5000, "from_tag": "", "source_ip": "1.2.3.4", "to_user": "", "node": "n"},
     "$.call_id"),
    ({"call_id": 5, "from_tag": "", "source_ip": "1.2.3.4", "to_user": "", "node": "n"},
     "$.call_id"),
])
async def test_bad_admission_bodies_are_400_with_path(
        database_url: str, body: dict[str, Any], path: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, out = await sc.request("POST", "/v1/control/admit", body, admin=False)
        assert status == 400, out
        assert out["error"]["code"] == "invalid_body"
        assert path in [d["path"] for d in out["error"]["details"]]
        conn = await asyncpg.connect(database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        finally:
            await conn.close()


async def test_not_json_and_wrong_media_type(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, out = await sc.request("POST", "/v1/control/admit", admin=False, data=b"{nope",
                                       headers={"Content-Type": "application/json"})
        assert (status, out["error"]["code"]) == (400, "invalid_json")
        status, out = await sc.request("POST", "/v1/control/admit", admin=False, data=b"a=b",
                                       headers={"Content-Type": "text/plain"})
        assert status == 415


@pytest.mark.parametrize("hostile", [
    '"; DROP TABLE calls; --', "\\\"'\\", "ünïcødé ☎ 📞", "x" * 500, "\u202e", "%00%27",
])
async def test_hostile_strings_are_data(database_url: str, hostile: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(BASIC)
        d = await sc.admit(hostile[:2000], to=hostile[:500], source="127.0.0.2",
                           from_user=hostile[:500], from_tag=hostile[:500])
        assert d["action"] == "reject" and d["code"] == 404
        d = await sc.admit(hostile[:2000], to="1002", source="127.0.0.2",
                           from_user=hostile[:500], from_tag=hostile[:500])
        assert d["action"] == "relay"
        status, calls = await sc.request("GET", "/v1/calls")
        assert calls["calls"][0]["call_id"] == hostile[:2000]
        assert await sc.release(hostile[:2000], from_tag=hostile[:500])


async def test_control_api_only_for_kamailio_sources(database_url: str) -> None:
    import ipaddress

    async with running_sidecar(
        database_url, control_sources=(ipaddress.ip_network("10.0.0.0/8"),),
        control_secret="s3cr3t",
    ) as sc:
        body = {"call_id": "x"}
        status, out = await sc.request("POST", "/v1/control/release", body, admin=False)
        assert (status, out["error"]["code"]) == (403, "forbidden")
        status, _ = await sc.request("POST", "/v1/control/release", body, admin=False,
                                     headers={"X-Control-Secret": "wrong"})
        assert status == 403
        status, _ = await sc.request("POST", "/v1/control/release", body, admin=False,
                                     headers={"X-Control-Secret": "s3cr3t"})
        assert status == 200


async def test_answer_sets_max_duration(database_url: str) -> None:
    async with running_sidecar(database_url, max_call_duration=7200) as sc:
        await sc.put_config(BASIC)
        await sc.admit("c1", to="1002", auth="1001")
        await sc.answer("c1", 0)
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT state, expires_at - answered_at AS left "
                                      "FROM calls WHERE call_id = 'c1'")
        finally:
            await conn.close()
        assert row["state"] == "answered"
        assert row["left"] == datetime.timedelta(hours=2)
