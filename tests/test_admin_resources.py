"""The JSON admin API's resources (accounts, extensions, numbers, channels) against the real
sidecar and PostgreSQL: every route, every status, pagination, merge patches, references."""

from __future__ import annotations

from typing import Any

import asyncpg

from sidecar.config_doc import ha1
from tests.helpers import Sidecar, running_sidecar

BASE: dict[str, Any] = {
    "counting": "per_call",
    "accounts": [
        {"id": "acme", "name": "Acme Telecom", "limits": {"calls": 100}},
        {"id": "acme-sales", "parent": "acme", "limits": {"public": 10, "internal": 5}},
    ],
    "extensions": [
        {"id": "1001", "account": "acme-sales", "password": "s3cret"},
        {"id": "ivr", "account": "acme", "contact": "sip:ivr@127.0.0.1:5080"},
    ],
    "numbers": [{"number": "+15550001000", "extension": "ivr"}],
    "channels": [
        {
            "id": "carrier-a",
            "limits": {"calls": 30},
            "sources": ["127.0.0.3"],
            "gateway": "sip:127.0.0.3:5070",
            "prefixes": ["+1"],
            "priority": 1,
        }
    ],
}


def error_of(body: Any) -> dict[str, Any]:
    """Every failure has one shape: {"error": {"code", "message", "details": [...]}}."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert isinstance(err["code"], str) and isinstance(err["message"], str)
    assert isinstance(err["details"], list)
    return dict(err)


async def _loaded(sc: Sidecar) -> None:
    await sc.put_config(BASE)


async def test_get_and_list_every_kind(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await _loaded(sc)
        status, body = await sc.request("GET", "/v1/accounts")
        assert status == 200
        assert body == {"items": BASE["accounts"], "next": None}
        status, body = await sc.request("GET", "/v1/accounts/acme-sales")
        assert (status, body) == (200, BASE["accounts"][1])

        status, body = await sc.request("GET", "/v1/extensions")
        assert status == 200 and body["next"] is None
        assert body["items"] == [
            {"id": "1001", "account": "acme-sales", "ha1": ha1("1001", "sidecar.local", "s3cret")},
            BASE["extensions"][1],
        ]
        status, body = await sc.request("GET", "/v1/numbers/+15550001000")
        assert (status, body) == (200, BASE["numbers"][0])
        status, body = await sc.request("GET", "/v1/numbers/%2B15550001000")
        assert (status, body) == (200, BASE["numbers"][0])
        status, body = await sc.request("GET", "/v1/channels/carrier-a")
        assert (status, body) == (200, BASE["channels"][0])
        status, body = await sc.request("GET", "/v1/channels")
        assert (status, body) == (200, {"items": BASE["channels"], "next": None})

        # Filters.
        status, body = await sc.request("GET", "/v1/extensions?account=acme")
        assert [e["id"] for e in body["items"]] == ["ivr"]
        status, body = await sc.request("GET", "/v1/accounts?parent=acme")
        assert [a["id"] for a in body["items"]] == ["acme-sales"]
        status, body = await sc.request("GET", "/v1/numbers?extension=1001")
        assert body == {"items": [], "next": None}

        # The whole configuration reads back unchanged after all those reads.
        status, doc = await sc.request("GET", "/v1/config")
        assert status == 200 and doc["accounts"] == BASE["accounts"]


async def test_pagination_walks_every_item_once(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        ids = [f"acc-{i:02d}" for i in range(23)]
        for ident in ids:
            status, _ = await sc.request("PUT", f"/v1/accounts/{ident}", {"limits": {"calls": 1}})
            assert status == 201
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            path = "/v1/accounts?limit=10" + (f"&after={after}" if after else "")
            status, body = await sc.request("GET", path)
            assert status == 200
            seen += [a["id"] for a in body["items"]]
            pages += 1
            after = body["next"]
            if after is None:
                break
        assert seen == sorted(ids) and pages == 3
        # Exactly a page's worth: no empty extra page.
        status, body = await sc.request("GET", "/v1/accounts?limit=23")
        assert len(body["items"]) == 23 and body["next"] is None
        for bad in ("limit=0", "limit=1001", "limit=x", "bogus=1"):
            status, body = await sc.request("GET", f"/v1/accounts?{bad}")
            assert status == 400, bad
            assert error_of(body)["code"] == "invalid_query"


async def test_put_creates_then_replaces(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, body = await sc.request("PUT", "/v1/accounts/acme", {"name": "Acme"})
        assert (status, body) == (201, {"id": "acme", "name": "Acme"})
        status, body = await sc.request(
            "PUT", "/v1/accounts/acme", {"id": "acme", "limits": {"calls": 3}}
        )
        assert (status, body) == (200, {"id": "acme", "limits": {"calls": 3}})  # name gone

        status, body = await sc.request(
            "PUT", "/v1/extensions/1001", {"account": "acme", "password": "pw"}
        )
        assert status == 201
        assert body == {"id": "1001", "account": "acme", "ha1": ha1("1001", "sidecar.local", "pw")}
        assert "password" not in body  # write-only
        status, body = await sc.request(
            "PUT", "/v1/extensions/1001", {"account": "acme", "ha1": "0" * 32, "ring_self": True}
        )
        assert (status, body) == (
            200,
            {"id": "1001", "account": "acme", "ha1": "0" * 32, "ring_self": True},
        )

        status, body = await sc.request("PUT", "/v1/numbers/+15550001", {"extension": "1001"})
        assert (status, body) == (201, {"number": "+15550001", "extension": "1001"})

        chan = {"sources": ["10.0.0.0/8", "192.0.2.1/32"], "limits": {"calls": 2}}
        status, body = await sc.request("PUT", "/v1/channels/c1", chan)
        assert status == 201
        assert body == {"id": "c1", "limits": {"calls": 2}, "sources": ["10.0.0.0/8", "192.0.2.1"]}
        # Host bits are cleared, as PostgreSQL's cidr wants them.
        status, body = await sc.request("PUT", "/v1/channels/c2", {"sources": ["10.1.2.3/8"]})
        assert (status, body["sources"]) == (201, ["10.0.0.0/8"])


async def test_patch_is_a_json_merge_patch(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await _loaded(sc)
        status, body = await sc.request(
            "PATCH", "/v1/accounts/acme-sales", {"limits": {"public": 20, "internal": None}}
        )
        assert status == 200
        assert body == {"id": "acme-sales", "parent": "acme", "limits": {"public": 20}}
        status, body = await sc.request("PATCH", "/v1/accounts/acme-sales", {"parent": None})
        assert body == {"id": "acme-sales", "limits": {"public": 20}}
        status, body = await sc.request(
            "PATCH",
            "/v1/accounts/acme-sales",
            {"name": "Sales"},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert status == 200 and body["name"] == "Sales"

        # A new password replaces the stored HA1.
        status, body = await sc.request("PATCH", "/v1/extensions/1001", {"password": "new"})
        assert status == 200 and body["ha1"] == ha1("1001", "sidecar.local", "new")
        status, body = await sc.request(
            "PATCH", "/v1/extensions/ivr", {"forward": ["1001", "+15551230000"], "ring_self": True}
        )
        assert status == 200
        assert body["forward"] == ["1001", "+15551230000"] and body["ring_self"] is True
        status, body = await sc.request("PATCH", "/v1/channels/carrier-a", {"limits": None})
        assert status == 200 and "limits" not in body
        status, body = await sc.request("PATCH", "/v1/numbers/+15550001000", {"extension": "1001"})
        assert (status, body) == (200, {"number": "+15550001000", "extension": "1001"})

        # The patched object must still be valid, and the key cannot change.
        status, body = await sc.request("PATCH", "/v1/accounts/acme", {"limits": {"calls": -1}})
        assert status == 400 and error_of(body)["details"][0]["path"] == "$.limits.calls"
        status, body = await sc.request("PATCH", "/v1/accounts/acme", {"id": "other"})
        assert status == 409 and error_of(body)["code"] == "key_mismatch"
        # A well-formed patch whose result is not a valid item: the stored state decides.
        status, body = await sc.request("PATCH", "/v1/channels/carrier-a", {"gateway": None})
        err = error_of(body)
        assert (status, err["code"]) == (409, "invalid_result"), body
        assert err["details"][0]["path"] == "$" and "gateway" in err["details"][0]["reason"]
        # A patch that is wrong whatever is stored: its own schema says so.
        status, body = await sc.request(
            "PATCH", "/v1/extensions/1001", {"password": "p", "ha1": "0" * 32}
        )
        assert status == 400 and error_of(body)["code"] == "invalid_body"
        status, body = await sc.request("PATCH", "/v1/accounts/acme", {"colour": "red"})
        assert status == 400 and error_of(body)["details"][0]["path"] == "$"
        status, body = await sc.request("PATCH", "/v1/accounts/nobody", {"name": "x"})
        assert status == 404 and error_of(body)["code"] == "not_found"


async def test_delete_and_references(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await _loaded(sc)
        # An account with a child account and extensions: 409 naming them all.
        status, body = await sc.request("DELETE", "/v1/accounts/acme")
        err = error_of(body)
        assert status == 409 and err["code"] == "still_referenced"
        named = {(d["kind"], d["id"]) for d in err["details"]}
        assert named == {("account", "acme-sales"), ("extension", "ivr")}
        assert "acme-sales" in err["message"] and "ivr" in err["message"]

        # An extension a number routes to, or another extension forwards to.
        status, body = await sc.request("PATCH", "/v1/extensions/1001", {"forward": ["ivr"]})
        assert status == 200
        status, body = await sc.request("DELETE", "/v1/extensions/ivr")
        err = error_of(body)
        assert status == 409
        assert {(d["kind"], d["id"]) for d in err["details"]} == {
            ("number", "+15550001000"),
            ("extension", "1001"),
        }

        # Take the tree down leaves first.
        for path in (
            "/v1/numbers/+15550001000",
            "/v1/extensions/1001",
            "/v1/extensions/ivr",
            "/v1/accounts/acme-sales",
            "/v1/accounts/acme",
            "/v1/channels/carrier-a",
        ):
            status, body = await sc.request("DELETE", path)
            assert status == 204, (path, body)
            status, body = await sc.request("GET", path)
            assert status == 404 and error_of(body)["code"] == "not_found"
            status, body = await sc.request("DELETE", path)
            assert status == 404
        status, doc = await sc.request("GET", "/v1/config")
        assert doc == {
            "counting": "per_call",
            "accounts": [],
            "extensions": [],
            "numbers": [],
            "channels": [],
        }


async def test_references_that_do_not_hold_are_409(database_url: str) -> None:
    """What only the stored configuration decides (the body is schema-valid) is a conflict with
    it: 409, naming the path and the reason."""
    async with running_sidecar(database_url) as sc:
        await _loaded(sc)
        cases = [
            ("PUT", "/v1/accounts/x", {"parent": "nobody"}, "$.parent", "unknown account"),
            ("PATCH", "/v1/accounts/acme", {"parent": "acme-sales"}, "$.parent", "loop"),
            ("PUT", "/v1/extensions/e", {"account": "nobody"}, "$.account", "unknown account"),
            (
                "PUT",
                "/v1/extensions/e",
                {"account": "acme", "forward": ["ghost"]},
                "$.forward[0]",
                "neither",
            ),
            ("PUT", "/v1/numbers/123", {"extension": "ghost"}, "$.extension", "unknown extension"),
            ("PUT", "/v1/accounts/a", {"id": "b"}, "$.id", "differs"),
        ]
        for method, path, body, where, why in cases:
            status, out = await sc.request(method, path, body)
            err = error_of(out)
            assert status == 409, (path, out)
            assert err["details"][0]["path"] == where, (path, out)
            assert why in err["details"][0]["reason"], (path, out)
        # Nothing was written.
        status, doc = await sc.request("GET", "/v1/config")
        assert doc["accounts"] == BASE["accounts"]
        assert [e["id"] for e in doc["extensions"]] == ["1001", "ivr"]


async def test_bodies_are_checked(database_url: str) -> None:
    async with running_sidecar(database_url, max_body_bytes=4096) as sc:
        await _loaded(sc)
        # Unknown field, wrong type, negative limit, password and ha1 together, bad id.
        for path, body, where in [
            ("/v1/accounts/a", {"color": "red"}, "$"),
            ("/v1/accounts/a", {"limits": {"calls": "3"}}, "$.limits.calls"),
            ("/v1/channels/c", {"limits": {"calls": -2}}, "$.limits.calls"),
            ("/v1/extensions/e", {"account": "acme", "password": "p", "ha1": "0" * 32}, "$"),
            ("/v1/accounts/a%20b", {}, "$.id"),
            ("/v1/accounts/a%1Fb", {}, "$.id"),  # a control character is no identifier
            ("/v1/numbers/abc", {"extension": "ivr"}, "$.number"),
            ("/v1/extensions/e", {"account": "acme", "sources": ["1.2.3.4/99"]}, "$.sources[0]"),
            ("/v1/extensions/e", {"account": "acme", "forward": ["1001\n"]}, "$.forward[0]"),
            ("/v1/channels/c", {"prefixes": ["+1"]}, "$"),  # prefixes need a gateway
        ]:
            status, out = await sc.request("PUT", path, body)
            err = error_of(out)
            assert (status, err["code"]) == (400, "invalid_body"), (path, out)
            assert err["details"][0]["path"] == where, (path, out)
        status, out = await sc.request("PUT", "/v1/accounts/a", [1, 2])
        assert status == 400 and error_of(out)["code"] == "invalid_body"
        status, out = await sc.request("PUT", "/v1/accounts/a", data=b"{nope")
        assert status == 400 and error_of(out)["code"] == "invalid_json"
        status, out = await sc.request(
            "PUT", "/v1/accounts/a", data=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert status == 415 and error_of(out)["code"] == "unsupported_media_type"
        big = {"name": "x" * 5000}
        status, out = await sc.request("PUT", "/v1/accounts/a", big)
        assert status == 413 and error_of(out)["code"] == "body_too_large"
        status, out = await sc.request("PATCH", "/v1/accounts/acme", big)
        assert status == 413
        # A key that cannot exist is simply not found.
        status, out = await sc.request("GET", "/v1/accounts/a%20b")
        assert status == 404 and error_of(out)["code"] == "not_found"
        status, out = await sc.request("DELETE", "/v1/numbers/not-a-number")
        assert status == 404
        status, out = await sc.request("GET", "/v1/accounts?after=%00")
        assert status == 400


async def test_constraints_still_guard_sql_races(database_url: str, pool: asyncpg.Pool) -> None:
    """The database is the last guard: a loop closed behind the API's back is refused."""
    async with running_sidecar(database_url) as sc:
        await _loaded(sc)
        status, _ = await sc.request("PUT", "/v1/accounts/leaf", {"parent": "acme-sales"})
        assert status == 201
        try:
            await pool.execute("UPDATE accounts SET parent = 'leaf' WHERE id = 'acme'")
        except asyncpg.CheckViolationError as exc:
            assert "loop" in str(exc)
        else:
            raise AssertionError("the loop was accepted")
