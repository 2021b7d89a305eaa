"""The operator's view over the API (sidecar/overview.py, sql/functions/40_operator_view.sql):
usage one page at a time, busiest first, searchable and by subtree; refusals per minute
counted by the admission batches; nodes from their heartbeats; the /ui/ files themselves.
Real sidecars on a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg

from sidecar.app import janitor_run
from tests.helpers import running_sidecar

PW = "pw"


def tree() -> dict[str, Any]:
    """prov -> (acme (calls 2, cps 1 with a burst of 50), globex (calls 10)) -> users; a
    trunk with limits."""
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "prov", "name": "The Provider", "limits": {"calls": 100}},
            {"id": "acme", "name": "Acme <b>Corp</b>", "parent": "prov",
             "limits": {"calls": 2, "cps": 1, "cps_burst": 50}},
            {"id": "globex", "parent": "prov", "limits": {"calls": 10}},
            {"id": "alice", "parent": "acme"},
            {"id": "bob", "parent": "globex"},
        ],
        "extensions": [
            {"id": "1001", "account": "alice", "password": PW},
            {"id": "1002", "account": "alice", "password": PW},
            {"id": "2001", "account": "bob", "password": PW},
        ],
        "channels": [{"id": "trunk", "name": "Trunk", "sources": ["127.0.0.3"],
                      "gateway": "sip:127.0.0.3:5070", "prefixes": ["+"],
                      "limits": {"calls": 4}}],
    }


async def test_accounts_busiest_first_by_subtree_and_search(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        await sc.put_config(tree())
        for i in range(2):  # acme full (2 of 2); prov 2 of 100
            assert (await sc.admit(f"c{i}", to="2001", auth="1001"))["action"] == "relay"

        status, page = await sc.request("GET", "/v1/usage/accounts")
        assert status == 200, page
        assert page["total"] == 5 and page["offset"] == 0 and page["limit"] == 50
        ids = [a["id"] for a in page["accounts"]]
        assert ids[0] == "acme"  # 2 of 2: the fullest first
        acme = page["accounts"][0]
        assert acme["usage"]["calls"] == {"active": 2, "limit": 2}
        # Two tokens taken, refilled at one a second: more than one used for a second.
        assert acme["usage"]["cps"]["limit"] == 1 and acme["usage"]["cps"]["burst"] == 50
        assert acme["usage"]["cps"]["used"] >= 1
        assert acme["path"] == ["prov", "acme"] and acme["children"] == 1
        assert acme["name"] == "Acme <b>Corp</b>"  # data, returned as it is
        globex = next(a for a in page["accounts"] if a["id"] == "globex")
        assert globex["usage"]["calls"] == {"active": 2, "limit": 10}  # bob was called

        status, sub = await sc.request("GET", "/v1/usage/accounts?under=acme")
        assert [a["id"] for a in sub["accounts"]] == ["acme", "alice"]
        assert sub["under_path"] == ["prov", "acme"] and sub["total"] == 2

        status, found = await sc.request("GET", "/v1/usage/accounts?q=PROVIDER")
        assert [a["id"] for a in found["accounts"]] == ["prov"]

        # Paging: two at a time covers every account once; past the end still says how many.
        seen = []
        for offset in (0, 2, 4):
            status, p = await sc.request("GET", f"/v1/usage/accounts?limit=2&offset={offset}")
            seen += [a["id"] for a in p["accounts"]]
        assert sorted(seen) == sorted(ids) and seen == ids
        status, past = await sc.request("GET", "/v1/usage/accounts?offset=99")
        assert past["accounts"] == [] and past["total"] == 5

        status, chans = await sc.request("GET", "/v1/usage/channels?q=trunk")
        assert status == 200
        assert chans["channels"][0]["usage"]["calls"] == {"active": 0, "limit": 4}


async def test_bad_query_parameters_name_the_parameter(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        for query, name in [("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"),
                            ("offset=-1", "offset"), ("q=" + "a" * 129, "q"),
                            ("under=a%00b", "under"), ("limit=1&limit=2", "limit")]:
            status, body = await sc.request("GET", f"/v1/usage/accounts?{query}")
            assert status == 400, (query, body)
            assert body["error"]["details"][0]["path"] == f"query.{name}", body
        status, body = await sc.request("GET", "/v1/refusals?minutes=1441")
        assert status == 400 and body["error"]["details"][0]["path"] == "query.minutes"
        for path in ("/v1/usage/accounts", "/v1/usage/channels", "/v1/nodes", "/v1/refusals",
                     "/v1/summary"):
            status, body = await sc.request("GET", path, admin=False)
            assert status == 401, path


async def test_refusals_per_minute_counted_once_per_refused_call(database_url: str) -> None:
    async with running_sidecar(database_url) as a, running_sidecar(database_url) as b:
        await a.put_config(tree())
        for i in range(2):
            assert (await a.admit(f"up{i}", to="2001", auth="1001"))["action"] == "relay"
        refused = [await (a if i % 2 else b).admit(f"no{i}", to="2001", auth="1002")
                   for i in range(5)]
        assert all(d["action"] == "reject" for d in refused)
        # A retransmission gets the same answer but is not a new refusal.
        again = await a.admit("no0", to="2001", auth="1002")
        assert again["action"] == "reject"

        status, body = await b.request("GET", "/v1/refusals?minutes=2")
        assert status == 200 and body["minutes"] == 2
        total = sum(r["refusals"] for r in body["refusals"]
                    if r["counter"] == "account:acme:calls")
        assert total == 5, body
        conn = await asyncpg.connect(database_url)
        try:
            # (Read around the summary: the minute may turn meanwhile.)
            this_minute = ("SELECT coalesce(sum(refusals), 0) FROM refusal_minutes"
                           " WHERE minute = date_trunc('minute', now())")
            before = await conn.fetchval(this_minute)
            status, summary = await a.request("GET", "/v1/summary")
            after = await conn.fetchval(this_minute)
            assert summary["calls"] == {"ringing": 2, "answered": 0}
            assert summary["refusals_this_minute"] in (before, after)
            assert summary["accounts"] == 5 and summary["channels"] == 1

            # The janitor forgets minutes past the history kept.
            await conn.execute(
                "UPDATE refusal_minutes SET minute = minute - interval '2 days'")
            await janitor_run(a.app)
            assert await conn.fetchval("SELECT count(*) FROM refusal_minutes") == 0
        finally:
            await conn.close()


async def test_nodes_from_heartbeats(database_url: str) -> None:
    async with running_sidecar(database_url, node_silent_after=30) as sc:
        await sc.heartbeat([], node="kam-a", boot="b1")
        await sc.heartbeat(None, node="kam-b", boot="b1")
        status, body = await sc.request("GET", "/v1/nodes")
        assert status == 200 and body["silent_after"] == 30
        nodes = {n["node"]: n for n in body["nodes"]}
        assert nodes["kam-a"]["alive"] and nodes["kam-a"]["dialogs"] == 0
        assert nodes["kam-b"]["dialogs"] is None
        first_boot = nodes["kam-a"]["booted_at"]

        # Same boot: booted_at stays; a new boot id starts it again. A silent node shows so.
        await sc.heartbeat([], node="kam-a", boot="b1")
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE nodes SET seen_at = now() - interval '1 minute' WHERE node = 'kam-b'")
        finally:
            await conn.close()
        status, body = await sc.request("GET", "/v1/nodes")
        nodes = {n["node"]: n for n in body["nodes"]}
        assert nodes["kam-a"]["booted_at"] == first_boot
        assert not nodes["kam-b"]["alive"] and nodes["kam-b"]["seconds_since"] >= 59
        await sc.heartbeat([], node="kam-a", boot="b2")
        status, body = await sc.request("GET", "/v1/nodes")
        assert {n["node"]: n for n in body["nodes"]}["kam-a"]["booted_at"] > first_boot


async def test_page_files_are_served_with_a_strict_policy(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, html = await sc.request("GET", "/ui/", admin=False)
        assert status == 200 and "/ui/app.js" in html and "<script>" not in html
        for name in ("app.js", "app.css"):
            async with sc.session.get(f"{sc.base_url}/ui/{name}") as resp:
                assert resp.status == 200
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "default-src 'none'" in csp
        async with sc.session.get(f"{sc.base_url}/ui", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/ui/"
        for bad in ("/ui/..%2Fapp.py", "/ui/.hidden.js", "/ui/nothing.js", "/ui/app.py"):
            async with sc.session.get(sc.base_url + bad) as resp:
                assert resp.status == 404, bad
        # Nothing the page loads comes from elsewhere (it works without a network).
        js = (await (await sc.session.get(f"{sc.base_url}/ui/app.js")).text())
        assert "http://" not in js and "https://" not in js and "innerHTML" not in js


async def test_ten_thousand_accounts_one_page_at_a_time(database_url: str) -> None:
    """5 providers, 200 organizations, 10,000 users: a page is 25 rows, the busiest first,
    and the search and the subtree narrow it in the database (times printed, not asserted)."""
    import time

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("""
            INSERT INTO accounts (id, parent, calls_limit)
            SELECT 'prov' || i, NULL, 2000 FROM generate_series(1, 5) i;
            INSERT INTO accounts (id, parent, calls_limit)
            SELECT 'org' || i, 'prov' || (1 + i % 5), 100 FROM generate_series(1, 200) i;
            INSERT INTO accounts (id, name, parent, calls_limit)
            SELECT 'user' || i, 'User ' || i, 'org' || (1 + i % 200), 4
            FROM generate_series(1, 10000) i;
            -- Counters set by hand (no call rows): only what the page reads is under test.
            UPDATE accounts SET calls_active = 3 WHERE id IN ('user77', 'user5000');
            UPDATE accounts SET calls_active = 4 WHERE id = 'user9999';""")
    finally:
        await conn.close()
    async with running_sidecar(database_url) as sc:
        started = time.perf_counter()
        status, page = await sc.request("GET", "/v1/usage/accounts?limit=25")
        first = time.perf_counter() - started
        assert status == 200 and page["total"] == 10205 and len(page["accounts"]) == 25
        assert [a["id"] for a in page["accounts"][:3]] == ["user9999", "user5000", "user77"]
        assert page["accounts"][0]["path"] == ["prov1", "org200", "user9999"]

        status, found = await sc.request("GET", "/v1/usage/accounts?q=user500&limit=25")
        assert found["total"] == 11  # user500, user5000 to user5009
        assert found["accounts"][0]["id"] == "user5000"
        status, sub = await sc.request("GET", "/v1/usage/accounts?under=org200&limit=25")
        assert sub["total"] == 51 and sub["accounts"][0]["id"] == "user9999"
        assert sub["under_path"] == ["prov1", "org200"]
        status, last = await sc.request("GET", "/v1/usage/accounts?limit=25&offset=10200")
        assert len(last["accounts"]) == 5
        print(f"10,205 accounts: first page in {first * 1000:.0f} ms")
