"""Real PostgreSQL for every test: DATABASE_URL's server when set, else a private cluster
started for the session (scripts/pgcluster.sh). Each test gets its own database, copied
from a migrated template (fast, and no test sees another's rows)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from sidecar import db

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = f"sidecar_tpl_{os.getpid()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


class PrivateCluster:
    """A PostgreSQL cluster of our own, for a session or a test that stops and starts it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sidecar-pg-")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._started = False

    def _run(self, action: str) -> None:
        subprocess.run([str(ROOT / "scripts" / "pgcluster.sh"), action, self.dir, str(self.port)],
                       check=True)

    def start(self) -> None:
        """Start; on the first start, a port taken since free_port() picked it (another
        process bound it meanwhile) is traded for a new one, a few times."""
        first = not self._started
        self._started = True
        for attempt in range(5):
            try:
                self._run("start")
                return
            except subprocess.CalledProcessError:
                if not first or attempt == 4 or not self._port_taken():
                    raise
                self.port = free_port()
                self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _port_taken(self) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return True
        return False

    def stop(self) -> None:
        self._run("stop")

    def remove(self) -> None:
        """Stop, and delete the cluster's files."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# The session's private cluster's log (None when DATABASE_URL names a server): a failed
# end-to-end test prints its tail, lock waits included (scripts/pgcluster.sh).
PG_LOG: Path | None = None


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A URL to the server's `postgres` database, where tests may create databases."""
    if os.environ.get("DATABASE_URL"):
        yield with_database(os.environ["DATABASE_URL"], "postgres")
        return
    global PG_LOG
    cluster = PrivateCluster()
    cluster.start()
    PG_LOG = Path(cluster.dir) / "postgres.log"
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
async def template_url(pg_server_url: str) -> AsyncIterator[str]:
    """A database with every migration applied, the template of each test's database."""
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
    await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = with_database(pg_server_url, TEMPLATE)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    yield url
    await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    await admin.close()


async def create_database(pg_server_url: str, template: str | None = TEMPLATE) -> str:
    name = f"sidecar_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        tpl = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{tpl}')
    finally:
        await admin.close()
    return with_database(pg_server_url, name)


async def drop_database(pg_server_url: str, url: str) -> None:
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(pg_server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    url = await create_database(pg_server_url)
    yield url
    await drop_database(pg_server_url, url)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    assert p is not None
    yield p
    await p.close()
