"""End-to-end over real SIP: PostgreSQL, `sidecar serve` and Kamailio (kamailio/kamailio.cfg)
as real processes, SIP user agents from tests/sipua.py.

One session: a dedicated database on the server `pg_server_url` gives (tests/conftest.py:
DATABASE_URL's server or a private cluster), `sidecar migrate`, `sidecar serve` on a free
port, and Kamailio on its own free port of 127.0.0.1 with a private runtime dir, so it
never collides with `make run`. Each test loads its own configuration (PUT /v1/config)
after every active call of the previous test was force-released.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from tests.sipua import SipUA

# wait-style helpers take a timeout on purpose, like tests/sipua.py
# ruff: noqa: ASYNC109

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "kamailio" / "kamailio.cfg"
SIDECAR = ROOT / ".venv" / "bin" / "sidecar"
REALM = "sidecar.local"
ADMIN_TOKEN = "e2e-admin-token"
T1 = 0.1  # fast SIP timers for the test user agents

pytestmark = pytest.mark.e2e


def _have_kamailio() -> bool:
    mods = list(Path("/usr/lib").glob("*/kamailio/modules/http_async_client.so"))
    return shutil.which("kamailio") is not None and bool(mods)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """No Kamailio is a broken setup, not a reason to skip: `make test` installs it
    (scripts/install-system.sh). Fail every end-to-end test loudly instead."""
    if _have_kamailio() or not any("/e2e/" in str(item.fspath) for item in items):
        return
    fail = pytest.mark.usefixtures("_kamailio_missing")
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(fail)


@pytest.fixture
def _kamailio_missing() -> None:
    pytest.fail("kamailio or http_async_client.so is not installed: run `make deps` "
                "(scripts/install-system.sh) first")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def kamailio_db_url(url: str) -> str:
    """db_postgres wants postgres://user[:pass]@host:port/db, no query string."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgres", query=""))


class Proc:
    """A subprocess with its log in a file, dumped when a test fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.argv, self.log = name, argv, log
        self._fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            argv,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._fh.close()

    def tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class SidecarProc(Proc):
    def __init__(self, db_url: str, workdir: Path, port: int | None = None, **env: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = dict(
            os.environ,
            DATABASE_URL=db_url,
            SIDECAR_HOST="127.0.0.1",
            SIDECAR_PORT=str(self.port),
            SIDECAR_ADMIN_TOKEN=ADMIN_TOKEN,
            SIDECAR_SIP_REALM=REALM,
            **env,
        )
        super().__init__(
            "sidecar", [str(SIDECAR), "serve"], e, workdir / f"sidecar-{self.port}.log"
        )

    def wait_ready(self, timeout: float = 30) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise RuntimeError(f"sidecar exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sidecar not healthy:\n{self.tail()}")


class KamailioProc(Proc):
    def __init__(
        self,
        db_url: str,
        sidecar_url: str,
        workdir: Path,
        *defines: str,
        port: int | None = None,
        node: str = "e2e-1",
    ):
        self.port = port or free_port()
        self.addr = ("127.0.0.1", self.port)
        rundir = Path(tempfile.mkdtemp(prefix=f"kam-{self.port}-", dir=workdir))
        argv = [
            "kamailio",
            "-f",
            str(CFG),
            "-DD",
            "-E",
            "-Y",
            str(rundir),
            "-m",
            "128",
            "-M",
            "16",
            "-A",
            f'DBURL="{kamailio_db_url(db_url)}"',
            "-A",
            f'SIDECAR_URL="{sidecar_url}"',
            "-A",
            f"LISTEN_UDP=udp:127.0.0.1:{self.port}",
            "-A",
            f"LISTEN_TCP=tcp:127.0.0.1:{self.port}",
            "-A",
            f'NODE_ID="{node}"',
            "-A",
            "WORKERS=4",
            "-A",
            "FR_TIMER=2000",
            "-A",
            "FR_INV_TIMER=4000",
            "-A",
            "HEARTBEAT_INTERVAL=2",
            "-A",
            "SIDECAR_TIMEOUT=1000",
            "-A",
            "WITH_LIMIT_HEADER",
        ]
        for d in defines:
            argv += ["-A", d]
        super().__init__("kamailio", argv, dict(os.environ), workdir / f"kamailio-{self.port}.log")

    async def wait_ready(self, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        async with SipUA("127.0.0.1", user="probe", domain=REALM, t1=T1) as ua:
            while time.monotonic() < end:
                if not self.alive():
                    raise RuntimeError(f"kamailio exited:\n{self.tail()}")
                try:
                    if await ua.options(f"sip:127.0.0.1:{self.port}", self.addr, timeout=1) == 200:
                        return
                except TimeoutError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"kamailio not answering OPTIONS:\n{self.tail()}")


class Api:
    """The sidecar's admin API."""

    def __init__(self, base: str, session: aiohttp.ClientSession):
        self.base, self.session = base, session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as r:
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json()) if "json" in ctype else await r.text()

    async def put_config(self, doc: dict[str, Any]) -> None:
        status, body = await self.call("PUT", "/v1/config", doc)
        assert status == 200, body

    async def usage(self) -> dict[str, Any]:
        status, body = await self.call("GET", "/v1/usage")
        assert status == 200, body
        return body

    async def calls(self) -> list[dict[str, Any]]:
        status, body = await self.call("GET", "/v1/calls?limit=1000")
        assert status == 200, body
        return list(body["calls"])

    async def release_all(self) -> None:
        for c in await self.calls():
            await self.call("DELETE", "/v1/calls/" + quote(c["call_id"], safe=""))

    async def active(
        self, account: str | None = None, counter: str = "calls", channel: str | None = None
    ) -> int:
        u = await self.usage()
        if channel is not None:
            return int(u["channels"].get(channel, {}).get("calls", {}).get("active", 0))
        assert account is not None
        return int(u["accounts"].get(account, {}).get(counter, {}).get("active", 0))

    async def wait_active(
        self,
        expected: int,
        account: str | None = None,
        counter: str = "calls",
        channel: str | None = None,
        timeout: float = 5,
    ) -> int:
        end = time.monotonic() + timeout
        while True:
            n = await self.active(account, counter, channel)
            if n == expected or time.monotonic() > end:
                return n
            await asyncio.sleep(0.05)

    async def wait_idle(self, timeout: float = 5) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while True:
            calls = await self.calls()
            if not calls or time.monotonic() > end:
                return calls
            await asyncio.sleep(0.05)


class E2E:
    def __init__(self, workdir: Path, db_url: str, sidecar: SidecarProc, kamailio: KamailioProc):
        self.workdir, self.db_url = workdir, db_url
        self.sidecar, self.kamailio = sidecar, kamailio
        self.extra: list[Proc] = []

    @property
    def proxy(self) -> tuple[str, int]:
        return self.kamailio.addr


@pytest.fixture(scope="session")
def e2e_workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sidecar-e2e-"))
    os.chmod(d, 0o755)
    yield d
    if os.environ.get("E2E_KEEP") != "1":
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
async def e2e_db(pg_server_url: str) -> AsyncIterator[str]:
    name = f"sidecar_e2e_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(pg_server_url, name)
    await asyncio.to_thread(
        subprocess.run,
        [str(SIDECAR), "migrate"],
        env=dict(os.environ, DATABASE_URL=url),
        check=True,
        capture_output=True,
    )
    yield url
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(scope="session")
async def e2e(e2e_db: str, e2e_workdir: Path) -> AsyncIterator[E2E]:
    sc = SidecarProc(e2e_db, e2e_workdir, SIDECAR_RECONCILE_GRACE="2")
    sc.wait_ready()
    kam = KamailioProc(e2e_db, sc.url, e2e_workdir)
    env = E2E(e2e_workdir, e2e_db, sc, kam)
    try:
        await kam.wait_ready()
        yield env
    finally:
        for p in [*env.extra, env.kamailio, env.sidecar]:
            p.stop()


@pytest.fixture
async def api(e2e: E2E) -> AsyncIterator[Api]:
    """Admin API of the session's sidecar; no call of an earlier test stays active."""
    async with aiohttp.ClientSession() as s:
        a = Api(e2e.sidecar.url, s)
        await a.release_all()
        yield a


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request: Any) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "e2e" in request.fixturenames:
        env: E2E = request.getfixturevalue("e2e")
        for p in [env.kamailio, env.sidecar, *env.extra]:
            print(f"\n----- {p.name} log ({p.log}) -----\n{p.tail(80)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class Phones:
    """SIP user agents of a test: started, registered, and unregistered/closed after."""

    def __init__(self, proxy: tuple[str, int]):
        self.proxy = proxy
        self.uas: list[SipUA] = []
        self.registered: list[SipUA] = []

    async def ua(
        self,
        ip: str = "127.0.0.1",
        user: str = "caller",
        password: str | None = None,
        port: int = 0,
        **kw: Any,
    ) -> SipUA:
        ua = SipUA(ip, port, user=user, password=password, domain=REALM, t1=T1, **kw)
        await ua.start()
        self.uas.append(ua)
        return ua

    async def registered_ua(
        self, user: str, password: str, ip: str = "127.0.0.1", **kw: Any
    ) -> SipUA:
        ua = await self.ua(ip, user, password, **kw)
        resp = await ua.register(self.proxy, expires=600)
        assert resp.status == 200, resp
        self.registered.append(ua)
        return ua

    async def close(self) -> None:
        for ua in self.registered:
            try:
                await ua.unregister(self.proxy, timeout=2)
            except Exception:  # noqa: BLE001 - best effort
                pass
        for ua in self.uas:
            await ua.close()


@pytest.fixture
async def phones(e2e: E2E) -> AsyncIterator[Phones]:
    p = Phones(e2e.proxy)
    yield p
    await p.close()


def dump(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(doc))
    return path
