"""SPEC section 9, the seeds' own examples, at the HTTP level against the real sidecar."""

from __future__ import annotations

from typing import Any

from tests.helpers import Sidecar, running_sidecar

CARRIER = "127.0.0.3"
APP_SERVER = "127.0.0.2"


def trunk(**kw: Any) -> dict[str, Any]:
    return {"id": "trunk", "sources": [CARRIER], "gateway": "sip:127.0.0.3:5070",
            "prefixes": ["+"], **kw}


def agent(ident: str, account: str, **kw: Any) -> dict[str, Any]:
    return {"id": ident, "account": account, "password": "pw-" + ident, **kw}


def uris(decision: dict[str, Any]) -> list[str]:
    return [leg["uri"] for leg in decision["legs"]]


def assert_limit_refusal(decision: dict[str, Any], code: int, counter: str) -> None:
    assert decision["action"] == "reject", decision
    assert decision["reason"] == "REACH_PLAN_LIMIT"
    assert decision["limit"] is True
    assert decision["code"] == code, decision
    assert decision["counter"] == counter, decision


STRINGEE = {
    "counting": "per_call",
    "accounts": [{"id": "cc", "name": "Contact centre", "limits": {"calls": 7}}],
    "extensions": [
        agent("agent-a", "cc"), agent("agent-b", "cc"), agent("agent-c", "cc"),
        {"id": "queue", "account": "cc", "contact": "sip:queue@127.0.0.1:5080"},
        {"id": "hotline-mobile", "account": "cc", "forward": ["+84900000001"]},
        {"id": "otp", "account": "cc", "sources": [APP_SERVER]},
    ],
    "numbers": [{"number": "+842800", "extension": "queue"},
                {"number": "+842801", "extension": "hotline-mobile"}],
    "channels": [trunk()],
}


async def stringee_seven(sc: Sidecar) -> list[str]:
    calls = []
    # (1) two customers calling the contact centre: one answered, one ringing.
    for _ in range(2):
        d = await sc.admit(to="+842800", source=CARRIER, from_user="+84911111111")
        assert d["action"] == "relay" and uris(d) == ["sip:queue@127.0.0.1:5080"]
        calls.append(d["call_id"])
    await sc.answer(calls[0], 0)
    # (2) an agent calling a customer.
    d = await sc.admit(to="+84922222222", auth="agent-c")
    assert uris(d) == ["sip:+84922222222@127.0.0.3:5070"]
    calls.append(d["call_id"])
    # (3) agent A calling agent B.
    d = await sc.admit(to="agent-b", auth="agent-a")
    assert d["action"] == "relay" and d["legs"][0]["lookup"] is True
    calls.append(d["call_id"])
    # (4) three OTP calls from the application server.
    for i in range(3):
        d = await sc.admit(to=f"+8493333333{i}", source=APP_SERVER, from_user="otp")
        assert d["action"] == "relay"
        calls.append(d["call_id"])
    return calls


async def test_stringee_seven_concurrent_calls(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(STRINGEE)
        calls = await stringee_seven(sc)
        usage = await sc.usage()
        assert usage["accounts"]["cc"]["calls"] == {"active": 7, "limit": 7}
        # An eighth call of any kind is refused with REACH_PLAN_LIMIT: 403 when the caller's
        # own plan is full (agents, OTP), 486 when the called side is (inbound).
        assert_limit_refusal(await sc.admit(to="+842800", source=CARRIER), 486,
                             "account:cc:calls")
        assert_limit_refusal(await sc.admit(to="+84922222223", auth="agent-c"), 403,
                             "account:cc:calls")
        assert_limit_refusal(await sc.admit(to="agent-c", auth="agent-a"), 403,
                             "account:cc:calls")
        assert_limit_refusal(await sc.admit(to="+8490", source=APP_SERVER, from_user="otp"),
                             403, "account:cc:calls")
        assert (await sc.usage())["accounts"]["cc"]["calls"]["active"] == 7
        # One call ends: the next one fits.
        assert await sc.release(calls[-1])
        d = await sc.admit(to="+842800", source=CARRIER)
        assert d["action"] == "relay"


async def test_stringee_forward_to_agent_mobile_counts_one(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(STRINGEE)
        d = await sc.admit(to="+842801", source=CARRIER, from_user="+84911111111")
        assert uris(d) == ["sip:+84900000001@127.0.0.3:5070"]
        usage = await sc.usage()
        assert usage["accounts"]["cc"]["calls"]["active"] == 1
        # In and out on the same trunk: one call, one slot on it too.
        assert usage["channels"]["trunk"]["calls"]["active"] == 1
        await sc.answer(d["call_id"], 1)
        assert (await sc.usage())["accounts"]["cc"]["calls"]["active"] == 1
        assert await sc.release(d["call_id"])
        assert (await sc.usage())["accounts"]["cc"]["calls"]["active"] == 0


def voipnow(public: int, internal: int) -> dict[str, Any]:
    return {
        "counting": "per_leg",
        "accounts": [
            {"id": "sp", "name": "Service provider"},
            {"id": "org", "parent": "sp", "name": "Organization"},
            {"id": "client", "parent": "org", "limits": {"public": public, "internal": internal}},
        ],
        "extensions": [
            agent("0003*001", "client", forward=["0003*002", "0003*011", "0804993222"],
                  ring_self=True),
            agent("0003*002", "client"),
            agent("0003*011", "client"),
        ],
        "numbers": [{"number": "08040", "extension": "0003*001"}],
        "channels": [{"id": "pstn", "sources": [CARRIER], "gateway": "sip:127.0.0.3:5070",
                      "prefixes": ["0"]}],
    }


async def test_voipnow_transfer_only_first_extension_rings(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(voipnow(public=1, internal=1))
        d = await sc.admit(to="08040", source=CARRIER, from_user="0804188581")
        assert d["action"] == "relay"
        assert [leg["leg"] for leg in d["legs"]] == [1]
        assert uris(d) == ["sip:0003*002@sidecar.local"]
        client = (await sc.usage())["accounts"]["client"]
        assert client["public"] == {"active": 1, "limit": 1}
        assert client["internal"] == {"active": 1, "limit": 1}


async def test_voipnow_transfer_all_four_legs_ring(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(voipnow(public=2, internal=3))
        d = await sc.admit(to="08040", source=CARRIER, from_user="0804188581")
        assert uris(d) == ["sip:0003*002@sidecar.local", "sip:0003*011@sidecar.local",
                           "sip:0804993222@127.0.0.3:5070", "sip:0003*001@sidecar.local"]
        usage = await sc.usage()
        assert usage["accounts"]["client"]["public"]["active"] == 2
        assert usage["accounts"]["client"]["internal"]["active"] == 3
        # The whole tree counts every leg; the channel carries the inbound and the external leg.
        assert usage["accounts"]["sp"]["calls"]["active"] == 5
        assert usage["channels"]["pstn"]["calls"]["active"] == 2
        # 0003*011 answers: the other forward legs are given back, leg 0 and leg 2 stay.
        await sc.answer(d["call_id"], 2)
        usage = await sc.usage()
        assert usage["accounts"]["client"]["public"]["active"] == 1
        assert usage["accounts"]["client"]["internal"]["active"] == 1
        assert usage["channels"]["pstn"]["calls"]["active"] == 1
        assert await sc.release(d["call_id"])
        usage = await sc.usage()
        assert all(c["active"] == 0 for acc in usage["accounts"].values() for c in acc.values())
        assert usage["channels"]["pstn"]["calls"]["active"] == 0


HIERARCHY = {
    "counting": "per_call",
    "accounts": [
        {"id": "provider", "limits": {"calls": 3}},
        {"id": "org-a", "parent": "provider", "limits": {"calls": 2}},
        {"id": "org-b", "parent": "provider", "limits": {"calls": 5}},
    ],
    "extensions": [agent("a1", "org-a"), agent("b1", "org-b")],
    "channels": [trunk()],
}


async def test_hierarchy_parent_limit_applies_to_children(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(HIERARCHY)
        for _ in range(2):
            assert (await sc.admit(to="+15550001", auth="a1"))["action"] == "relay"
        assert_limit_refusal(await sc.admit(to="+15550001", auth="a1"), 403,
                             "account:org-a:calls")
        assert (await sc.admit(to="+15550002", auth="b1"))["action"] == "relay"
        # B's own limit (5) is far, the provider's (3) is reached: refused for the provider.
        assert_limit_refusal(await sc.admit(to="+15550002", auth="b1"), 403,
                             "account:provider:calls")
        usage = await sc.usage()
        assert usage["accounts"]["provider"]["calls"]["active"] == 3
        assert usage["accounts"]["org-a"]["calls"]["active"] == 2
        assert usage["accounts"]["org-b"]["calls"]["active"] == 1


async def test_channel_overflow(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config({
            "accounts": [{"id": "acme"}],
            "extensions": [agent("1001", "acme")],
            "channels": [
                {"id": "first", "limits": {"calls": 1}, "gateway": "sip:127.0.0.3:5070",
                 "prefixes": ["+1"], "priority": 1},
                {"id": "second", "limits": {"calls": 1}, "gateway": "sip:127.0.0.4:5070",
                 "prefixes": ["+1"], "priority": 2},
            ],
        })
        d1 = await sc.admit(to="+15551230001", auth="1001")
        assert uris(d1) == ["sip:+15551230001@127.0.0.3:5070"]
        d2 = await sc.admit(to="+15551230002", auth="1001")
        assert uris(d2) == ["sip:+15551230002@127.0.0.4:5070"]
        assert_limit_refusal(await sc.admit(to="+15551230003", auth="1001"), 486,
                             "channel:first:calls")
        await sc.release(d1["call_id"])
        d4 = await sc.admit(to="+15551230004", auth="1001")
        assert uris(d4) == ["sip:+15551230004@127.0.0.3:5070"]
