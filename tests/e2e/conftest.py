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
import re
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

import tests.conftest
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


# The patched dialog module kamailio.cfg loads (switch DIALOG_MODULE), built by
# scripts/build-kamailio-modules.sh.
PATCHED_DIALOG = Path("/usr/local/lib/kamailio/modules/dialog.so")


def _have_kamailio() -> bool:
    mods = list(Path("/usr/lib").glob("*/kamailio/modules/http_async_client.so"))
    return shutil.which("kamailio") is not None and bool(mods) and PATCHED_DIALOG.exists()


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
    pytest.fail(
        "kamailio, http_async_client.so or the patched dialog.so is not installed: "
        "run `make deps` "
        "(scripts/install-system.sh) first"
    )


ADDR_IN_USE = "address already in use"  # aiohttp's and Kamailio's bind failure, lower-cased
START_TRIES = 5


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both UDP and TCP on 127.0.0.1 *now*: another process may take it
    before ours binds it, so whoever starts a process on it must retry on a bind failure
    (start_sidecar, start_kamailio) or hold it (PortHold)."""
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


class PortHold:
    """A TCP port of 127.0.0.1 kept from everyone else until released: a socket bound with
    SO_REUSEADDR but not listening. Connections to it are refused (as to a stopped
    server), the kernel never hands it out for bind(port 0), other binders without
    SO_REUSEADDR fail, and a server that sets SO_REUSEADDR (asyncio/aiohttp do) can bind
    and listen on it meanwhile. So a sidecar may stay "down" on a known port and come up
    there later without a race."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.sock.close()

    def __enter__(self) -> PortHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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

    def text(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (a :meth:`mark`) on."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def mark(self) -> int:
        """The log's current end: pass it as ``since`` to see only what comes after."""
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def bind_failed(self) -> bool:
        """The process exited because its port was taken."""
        return not self.alive() and ADDR_IN_USE in self.text().lower()


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
            # the tests read the per-call lines (decision, answered, released): DEBUG
            **{"SIDECAR_LOG_LEVEL": "DEBUG", **env},
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

    def records(
        self, msg: str | None = None, since: int = 0, **fields: Any
    ) -> list[dict[str, Any]]:
        """The sidecar's JSON log lines (sidecar/logs.py) from ``since`` on whose "msg" is
        ``msg`` (any when None) and whose fields equal ``fields`` (e.g. call_id=...)."""
        out = []
        for line in self.text(since).splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if not isinstance(rec, dict):
                continue
            if msg is not None and rec.get("msg") != msg:
                continue
            if all(rec.get(k) == v for k, v in fields.items()):
                out.append(rec)
        return out

    async def wait_records(
        self,
        msg: str,
        count: int = 1,
        since: int = 0,
        timeout: float = 5,
        settle: float = 0.3,
        **fields: Any,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` matching lines are logged, then ``settle`` seconds
        more (so that a duplicate would show), and return all matching lines."""
        end = time.monotonic() + timeout
        while True:
            if len(self.records(msg, since, **fields)) >= count or time.monotonic() > end:
                break
            await asyncio.sleep(0.05)
        if settle:
            await asyncio.sleep(settle)
        return self.records(msg, since, **fields)


# Kamailio's -A defines for every e2e node; a test passes "FR_INV_TIMER=30000" to change one.
KAMAILIO_DEFAULTS = {
    "WORKERS": "4",
    "FR_TIMER": "2000",
    "FR_INV_TIMER": "4000",
    "HEARTBEAT_INTERVAL": "2",
    "SIDECAR_TIMEOUT": "1000",
}
KAMAILIO_SWITCHES = ("WITH_LIMIT_HEADER",)


class KamailioProc(Proc):
    def __init__(
        self,
        db_url: str,
        sidecar_url: str,
        workdir: Path,
        *defines: str,
        port: int | None = None,
        node: str = "e2e-1",
        shm_mb: int = 128,
    ):
        defines = (*KAMAILIO_SWITCHES, *defines)
        self.port = port or free_port()
        self.addr = ("127.0.0.1", self.port)
        self.node = node
        rundir = Path(tempfile.mkdtemp(prefix=f"kam-{self.port}-", dir=workdir))
        # KEY=VALUE defines replace these defaults; bare names are switches
        settings = dict(KAMAILIO_DEFAULTS)
        switches = []
        for d in defines:
            key, eq, value = d.partition("=")
            if eq:
                settings[key] = value
            else:
                switches.append(d)
        argv = [
            "kamailio",
            "-f",
            str(CFG),
            "-DD",
            "-E",
            "-Y",
            str(rundir),
            "-m",
            str(shm_mb),
            "-M",
            "32",
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
        ]
        for key, value in settings.items():
            argv += ["-A", f"{key}={value}"]
        for d in switches:
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

    def events(self, event: str, since: int = 0, contains: str | None = None) -> list[str]:
        """Kamailio's xlog lines ``event=<event> ...`` from ``since`` on (whole lines, the
        log prefix `{method cseq call-id}` included when the route has a message), those
        containing ``contains`` only (e.g. a Call-ID) when given."""
        pat = re.compile(rf"(?:^|\s)event={re.escape(event)}(?:\s|$)")
        return [
            line
            for line in self.text(since).splitlines()
            if pat.search(line) and (contains is None or contains in line)
        ]


def kv(line: str) -> dict[str, str]:
    """The key=value fields of a Kamailio xlog line."""
    return dict(re.findall(r"(?:^|\s)([a-z_]+)=(\S*)", line))


def start_sidecar(
    db_url: str, workdir: Path, port: int | None = None, tries: int = START_TRIES, **env: str
) -> SidecarProc:
    """Start `sidecar serve` and wait until healthy. On a port someone took between
    free_port() and the bind, start again on another port (not when ``port`` is fixed:
    hold such a port with PortHold instead)."""
    for attempt in range(tries):
        sc = SidecarProc(db_url, workdir, port=port, **env)
        try:
            sc.wait_ready()
            return sc
        except RuntimeError:
            sc.stop()
            if port is None and sc.bind_failed() and attempt + 1 < tries:
                continue
            raise
    raise AssertionError("unreachable")


async def start_kamailio(
    db_url: str,
    sidecar_url: str,
    workdir: Path,
    *defines: str,
    node: str = "e2e-1",
    tries: int = START_TRIES,
) -> KamailioProc:
    """Start Kamailio on a free port and wait until it answers OPTIONS; on a bind failure
    (its port taken meanwhile) start it again on another port."""
    for attempt in range(tries):
        kam = KamailioProc(db_url, sidecar_url, workdir, *defines, node=node)
        try:
            await kam.wait_ready()
            return kam
        except RuntimeError:
            await asyncio.to_thread(kam.stop)
            if kam.bind_failed() and attempt + 1 < tries:
                continue
            raise
    raise AssertionError("unreachable")


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
        """Active count of one counter in /v1/usage. A missing account, channel or counter
        is an assertion error (a misspelled id must not read as 0)."""
        u = await self.usage()
        if channel is not None:
            kind, key, table = "channel", channel, u["channels"]
        else:
            assert account is not None, "active(): name an account or a channel"
            kind, key, table = "account", account, u["accounts"]
        assert key in table, f"no {kind} {key!r} in /v1/usage; {kind}s: {sorted(table)}"
        counters = table[key]
        assert counter in counters, (
            f"{kind} {key!r} has no counter {counter!r}; counters: {sorted(counters)}"
        )
        entry = counters[counter]
        assert isinstance(entry, dict) and "active" in entry, f"{kind} {key!r} {counter}: {entry}"
        return int(entry["active"])

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

    async def steady_active(
        self,
        expected: int,
        account: str | None = None,
        counter: str = "calls",
        channel: str | None = None,
        seconds: float = 1.0,
    ) -> list[int]:
        """Poll for ``seconds``; return every value seen that differs from ``expected``
        (empty: it held all along). Catches a slot taken and given back meanwhile."""
        end = time.monotonic() + seconds
        other: list[int] = []
        while time.monotonic() < end:
            n = await self.active(account, counter, channel)
            if n != expected:
                other.append(n)
            await asyncio.sleep(0.05)
        return other

    async def call_record(self, call_id: str) -> dict[str, Any] | None:
        """The active call with that Call-ID in /v1/calls, or None."""
        found = [c for c in await self.calls() if c["call_id"] == call_id]
        assert len(found) <= 1, found
        return found[0] if found else None

    async def wait_call_state(self, call_id: str, state: str | None, timeout: float = 5) -> Any:
        """Wait until the call is in ``state`` (None: gone); return the state seen last."""
        end = time.monotonic() + timeout
        while True:
            rec = await self.call_record(call_id)
            seen = rec["state"] if rec else None
            if seen == state or time.monotonic() > end:
                return seen
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
    sc = await asyncio.to_thread(start_sidecar, e2e_db, e2e_workdir, SIDECAR_RECONCILE_GRACE="2")
    try:
        kam = await start_kamailio(e2e_db, sc.url, e2e_workdir)
    except BaseException:
        sc.stop()
        raise
    env = E2E(e2e_workdir, e2e_db, sc, kam)
    try:
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
        pg_log = tests.conftest.PG_LOG
        if pg_log is not None and pg_log.exists():
            lines = pg_log.read_text(errors="replace").splitlines()[-40:]
            print(f"\n----- postgres log ({pg_log}) -----\n" + "\n".join(lines))


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
        self.registered: list[tuple[SipUA, tuple[str, int]]] = []

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
        self,
        user: str,
        password: str,
        ip: str = "127.0.0.1",
        proxy: tuple[str, int] | None = None,
        **kw: Any,
    ) -> SipUA:
        """A UA registered at `proxy` (default: the session's node); unregistered after the
        test, so no later test forks to a contact that is gone."""
        ua = await self.ua(ip, user, password, **kw)
        at = proxy or self.proxy
        resp = await ua.register(at, expires=600)
        assert resp.status == 200, resp
        self.registered.append((ua, at))
        return ua

    async def close(self) -> None:
        for ua, at in self.registered:
            try:
                await ua.unregister(at, timeout=2)
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
