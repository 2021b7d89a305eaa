"""GET /health: 200 when calls can be decided; 503 with the cause when PostgreSQL is down (a
real restart of a cluster of this test's own) or the sidecar is shutting down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import db
from tests.conftest import PrivateCluster, with_database
from tests.helpers import Sidecar, running_sidecar
from tests.test_admin_resources import BASE, error_of


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    c = PrivateCluster()
    c.start()
    try:
        yield c
    finally:
        c.remove()


async def wait_for_health(sc: Sidecar, want: int, within: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + within
    while True:
        status, body = await sc.request("GET", "/health", admin=False)
        if status == want or time.monotonic() > deadline:
            assert status == want, body
            return dict(body)
        await asyncio.sleep(0.2)


def db_errors(text: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "sidecar_db_errors"
        for s in fam.samples
        if s.name == "sidecar_db_errors_total"
    )


async def test_health_follows_a_postgresql_restart(cluster: PrivateCluster) -> None:
    url = with_database(cluster.url, "sidecar")
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    async with running_sidecar(url, db_timeout=1.0) as sc:
        await sc.put_config(BASE)
        assert await wait_for_health(sc, 200) == {"status": "ok"}
        assert (await sc.admit("before", to="ivr", source="127.0.0.3"))["action"] == "relay"

        await asyncio.to_thread(cluster.stop)
        body = await wait_for_health(sc, 503, within=10)
        assert body["status"] == "unavailable" and body["cause"].startswith("database")
        # A call cannot be decided meanwhile: a clear 503 (Kamailio applies its policy).
        status, out = await sc.request(
            "POST",
            "/v1/control/admit",
            {
                "call_id": "during",
                "from_tag": "ft",
                "source_ip": "127.0.0.3",
                "to_user": "ivr",
                "node": "n",
            },
            admin=False,
        )
        assert status == 503 and error_of(out)["code"] == "database_unavailable"
        status, out = await sc.request("GET", "/v1/usage")
        assert status == 503 and error_of(out)["code"] == "database_unavailable"
        # /metrics still answers, and says the database is down.
        status, text = await sc.request("GET", "/metrics", admin=False)
        assert status == 200
        assert "sidecar_db_up 0.0" in text and db_errors(text) >= 2

        await asyncio.to_thread(cluster.start)
        assert await wait_for_health(sc, 200) == {"status": "ok"}
        # Deciding works again, with the state from before the restart.
        out = await sc.admit("after", to="ivr", source="127.0.0.3")
        assert out["action"] == "relay", out
        usage = await sc.usage()
        assert usage["accounts"]["acme"]["calls"]["active"] == 2
        status, text = await sc.request("GET", "/metrics", admin=False)
        assert "sidecar_db_up 1.0" in text


async def test_health_is_503_while_shutting_down(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        assert await wait_for_health(sc, 200) == {"status": "ok"}
        # What the server runs on SIGTERM: the on_shutdown signal sets STOPPING.
        await sc.app.shutdown()
        status, body = await sc.request("GET", "/health", admin=False)
        assert (status, body) == (503, {"status": "unavailable", "cause": "shutting down"})
