"""Shared by the benchmarks in bench/: the stack they start, CPU accounting from /proc,
small statistics. Relies only on the project's stable interfaces: `sidecar migrate`,
`sidecar import`, `sidecar serve`, the HTTP admin API (GET /v1/usage), scripts/pgcluster.sh,
the Kamailio configs and the SQL function counter_drift().

Everything started here is registered in a Stack and stopped by Stack.close(), which the
benchmarks call from `finally` (Ctrl-C and SIGTERM included: see `install_sigterm`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = ROOT / ".venv" / "bin" / "sidecar"
PGCLUSTER = ROOT / "scripts" / "pgcluster.sh"
PROJECT_CFG = ROOT / "kamailio" / "kamailio.cfg"
NATIVE_CFG = ROOT / "bench" / "kamailio-native.cfg"
ADMIN_TOKEN = "bench-admin-token"
REALM = "sidecar.local"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def install_sigterm() -> None:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so `finally` blocks clean up as on
    Ctrl-C."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def shield() -> None:
    """From now on Ctrl-C, SIGTERM and SIGHUP are ignored: cleanup runs to its end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 now (someone may take it before we
    bind: starters retry)."""
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


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_speed() -> str:
    """How fast this machine is now: the best of three 10M-iteration empty Python loops in a
    function, in seconds. Machines of the same kind have differed by 3 to 4 times between
    days, which moves every figure (bench/RESULTS.md). (The sessions before this figure was
    printed timed `python3 -c 'for i in range(10_000_000): pass'`, a loop at module level,
    which is 2 to 3 times slower than this one.)"""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(10_000_000):
            pass
        best = min(best, time.perf_counter() - t0)
    return f"10M-iteration Python loop {best:.2f} s"


# ---------------------------------------------------------------- CPU from /proc


def _all_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in ticks) for every process now."""
    out: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        # fields after the command: state(3) ppid(4) ... utime(14) stime(15) cutime(16)
        # cstime(17); rest[0] is field 3
        try:
            out[int(name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
        except (IndexError, ValueError):
            continue
    return out


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by the processes `roots` and all their
    descendants alive now, plus what their reaped children used (cutime/cstime). The
    difference of two samples is the CPU the trees used in between, children that exited
    meanwhile included (their time moves into their parent's cutime when reaped)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [p for p in roots if p in stats]
    ticks = 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        ticks += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return ticks / CLK_TCK


def box_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    idle = vals[3] + vals[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def cpu_steal() -> float:
    """CPU seconds the hypervisor gave to other guests since boot, all cores (/proc/stat's
    steal). A share of it beside the figures tells a run on a crowded host from one on a
    slow one: the twelfth session's machine was 1.3 times slower on a Python loop but 3 to 5
    times on the per-call figures (bench/RESULTS.md)."""
    with open("/proc/stat") as fh:
        return int(fh.readline().split()[8]) / CLK_TCK


def udp_drops() -> int:
    """Datagrams the kernel dropped for full socket buffers so far, machine-wide
    (/proc/net/snmp Udp: RcvbufErrors + SndbufErrors)."""
    with open("/proc/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Udp:")]
    names, values = rows[0][1:], [int(x) for x in rows[1][1:]]
    d = dict(zip(names, values, strict=False))
    return d.get("RcvbufErrors", 0) + d.get("SndbufErrors", 0)


def udp_socket_drops() -> dict[tuple[str, int], int]:
    """Datagrams dropped so far per UDP socket, by local (ip, port) (/proc/net/udp)."""
    out: dict[tuple[str, int], int] = {}
    with open("/proc/net/udp") as fh:
        next(fh)
        for line in fh:
            f = line.split()
            hexip, hexport = f[1].split(":")
            ip = socket.inet_ntoa(int(hexip, 16).to_bytes(4, "little"))
            key = (ip, int(hexport, 16))
            out[key] = out.get(key, 0) + int(f[-1])
    return out


class CpuMeter:
    """Named groups of process trees, sampled together: `sample()` -> {name: seconds}."""

    def __init__(self) -> None:
        self.groups: dict[str, list[int]] = {}

    def add(self, name: str, pids: Iterable[int]) -> None:
        self.groups[name] = list(pids)

    def sample(self) -> dict[str, float]:
        return {name: tree_cpu(pids) for name, pids in self.groups.items()}

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a.get(k, 0.0) for k in b}


# ---------------------------------------------------------------- statistics


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---------------------------------------------------------------- processes


class Proc:
    """A process in its own session (Ctrl-C in the terminal does not reach it), output to a
    log file, stopped with its whole process group."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name, self.argv, self.log = name, argv, log
        self._fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._fh,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._fh.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def bind_failed(self) -> bool:
        return not self.alive() and "address already in use" in self.tail(200).lower()


def http_json(method: str, url: str, body: Any = None, token: str | None = ADMIN_TOKEN,
              timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def http_text(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


def sip_options(addr: tuple[str, int], timeout: float = 1.0) -> int | None:
    """Status code of an OPTIONS to the proxy itself, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
        cid = os.urandom(6).hex()
        msg = (f"OPTIONS sip:{addr[0]}:{addr[1]} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{cid};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:probe@{REALM}>;tag={cid}\r\n"
               f"To: <sip:{addr[0]}:{addr[1]}>\r\nCall-ID: {cid}\r\nCSeq: 1 OPTIONS\r\n"
               f"Content-Length: 0\r\n\r\n").encode()
        s.settimeout(timeout)
        s.sendto(msg, addr)
        try:
            data = s.recv(65535)
        except TimeoutError:
            return None
        m = re.match(rb"SIP/2\.0 (\d{3})", data)
        return int(m.group(1)) if m else None


class Db:
    """One asyncpg connection driven from synchronous code (a private event loop)."""

    def __init__(self, url: str):
        import asyncpg

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(url))

    def fetchval(self, sql: str, *args: Any) -> Any:
        return self.loop.run_until_complete(self.conn.fetchval(sql, *args))

    def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.loop.run_until_complete(self.conn.fetch(sql, *args))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close())
        finally:
            self.loop.close()

    # -- figures --------------------------------------------------------------
    def xact_commit(self) -> int:
        """pg_stat_database.xact_commit of this database. Backends report their counts
        about once a second while busy, and up to 10 s after they go idle."""
        return int(self.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))

    def next_xid(self) -> int:
        """The next transaction id (no xid is assigned by asking): the difference of two
        samples counts the transactions that wrote something, at once and exactly."""
        return int(self.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"))

    def drift(self) -> int:
        return int(self.fetchval("SELECT count(*) FROM counter_drift()"))


class Stack:
    """What a benchmark starts: PostgreSQL (scripts/pgcluster.sh), the sidecar, Kamailio
    nodes. close() stops everything, in reverse order, whatever happened."""

    def __init__(self, keep: bool = False):
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        os.chmod(self.workdir, 0o755)
        self.keep = keep
        self.procs: list[Proc] = []
        self.pg_dir: Path | None = None
        self.pg_port: int | None = None
        self.db_url: str | None = None
        self.failed = False

    # -- PostgreSQL -------------------------------------------------------------
    def start_postgres(self) -> str:
        self.pg_dir = self.workdir / "pg"
        for _ in range(5):
            port = free_port()
            r = subprocess.run([str(PGCLUSTER), "start", str(self.pg_dir), str(port)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                self.pg_port = port
                break
            log = self.pg_dir / "postgres.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            if "already in use" not in text.lower():
                raise RuntimeError(f"pgcluster.sh start failed:\n{r.stderr}\n{text[-2000:]}")
        else:
            raise RuntimeError("PostgreSQL: no free port")
        self.db_url = subprocess.run([str(PGCLUSTER), "url", str(self.pg_dir), str(self.pg_port)],
                                     capture_output=True, text=True, check=True).stdout.strip()
        return self.db_url

    def postmaster_pid(self) -> int:
        assert self.pg_dir is not None
        return int((self.pg_dir / "data" / "postmaster.pid").read_text().split()[0])

    def sidecar_env(self, **extra: str) -> dict[str, str]:
        assert self.db_url is not None
        env = dict(os.environ, DATABASE_URL=self.db_url, SIDECAR_ADMIN_TOKEN=ADMIN_TOKEN,
                   SIDECAR_SIP_REALM=REALM, SIDECAR_HOST="127.0.0.1")
        env.update(extra)
        return env

    def sidecar_cli(self, *args: str) -> str:
        r = subprocess.run([str(SIDECAR), *args], env=self.sidecar_env(), capture_output=True,
                           text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"sidecar {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def load_config(self, doc: dict[str, Any]) -> None:
        path = self.workdir / "bench-config.json"
        path.write_text(json.dumps(doc, indent=1))
        self.sidecar_cli("import", str(path))

    # -- the sidecar (and the floor's allow server) ----------------------------------------
    def start_sidecar(self, **env: str) -> tuple[Proc, str]:
        def start(port: int) -> Proc:
            return Proc("sidecar", [str(SIDECAR), "serve"], self.workdir / f"sidecar-{port}.log",
                        env=self.sidecar_env(SIDECAR_PORT=str(port), **env), cwd=ROOT)
        return self._start_http("sidecar", start)

    def start_allow_server(self, callee: str) -> tuple[Proc, str]:
        """bench/allow_server.py: answers kamailio.cfg as the sidecar would, deciding nothing."""
        def start(port: int) -> Proc:
            return Proc("allow", [sys.executable, str(ROOT / "bench" / "allow_server.py"),
                                  str(port), callee], self.workdir / f"allow-{port}.log")
        return self._start_http("allow server", start)

    def _start_http(self, name: str, start: Any) -> tuple[Proc, str]:
        """start(port) on a free port until /health answers 200 (another port when the
        chosen one was taken meanwhile)."""
        for _ in range(5):
            port = free_port()
            p = start(port)
            self.procs.append(p)
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 30
            while time.monotonic() < end and p.alive():
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        if r.status == 200:
                            return p, url
                except OSError:
                    pass
                time.sleep(0.1)
            p.stop()
            if not p.bind_failed():
                raise RuntimeError(f"{name} did not become healthy:\n{p.tail()}")
        raise RuntimeError(f"{name}: no free port")

    # -- Kamailio -------------------------------------------------------------------
    def start_kamailio(self, name: str, cfg: Path, defines: list[str], shm_mb: int = 512,
                       check: bool = True, extra: list[str] | None = None) -> tuple[Proc, int]:
        """Kamailio on a free UDP/TCP port of 127.0.0.1 (LISTEN_UDP/LISTEN_TCP defines),
        ready when it answers OPTIONS. extra: more command line options (e.g. -x tlsf)."""
        for _ in range(5):
            port = free_port()
            rundir = Path(tempfile.mkdtemp(prefix=f"kam-{name}-", dir=self.workdir))
            args = ["-f", str(cfg), "-A", f"LISTEN_UDP=udp:127.0.0.1:{port}",
                    "-A", f"LISTEN_TCP=tcp:127.0.0.1:{port}"]
            for d in defines:
                args += ["-A", d]
            if check:
                r = subprocess.run(["kamailio", "-c", *args], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"kamailio -c {cfg} failed:\n{r.stdout}\n{r.stderr}")
                check = False
            argv = ["kamailio", *args, "-DD", "-E", "-Y", str(rundir), "-m", str(shm_mb),
                    "-M", "32", *(extra or [])]
            p = Proc(f"kamailio-{name}", argv, self.workdir / f"kamailio-{name}-{port}.log")
            self.procs.append(p)
            end = time.monotonic() + 20
            while time.monotonic() < end and p.alive():
                if sip_options(("127.0.0.1", port), 0.5) == 200:
                    return p, port
                time.sleep(0.2)
            p.stop()
            if not p.bind_failed():
                raise RuntimeError(f"{name} Kamailio not answering OPTIONS:\n{p.tail()}")
        raise RuntimeError(f"{name} Kamailio: no free port")

    # -- cleanup ----------------------------------------------------------------------
    def close(self) -> None:
        for p in reversed(self.procs):
            if not p.alive() and p.p.returncode not in (0, -15, None):
                say(f"{p.name} had exited with status {p.p.returncode}; log: {p.log}")
                self.failed = True
            try:
                p.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                say(f"stopping {p.name}: {exc}")
        if self.pg_dir is not None and self.pg_port is not None:
            subprocess.run([str(PGCLUSTER), "stop", str(self.pg_dir), str(self.pg_port)],
                           capture_output=True)
        if self.keep or self.failed:
            say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------- the admin API


def actives(usage: Any) -> dict[str, int]:
    """Every non-zero `active` figure in a GET /v1/usage answer, by path."""
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "active" and isinstance(v, int):
                    if v:
                        out[path or "/"] = v
                else:
                    walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                key = v.get("id", i) if isinstance(v, dict) else i
                walk(v, f"{path}/{key}")

    walk(usage, "")
    return out


def count_actives(usage: Any) -> int:
    """How many `active` figures the answer has at all (0: its shape changed)."""
    n = 0

    def walk(node: Any) -> None:
        nonlocal n
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "active" and isinstance(v, int):
                    n += 1
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(usage)
    return n


def wait_usage_zero(base: str, timeout: float = 15) -> tuple[dict[str, int], int]:
    """Poll GET /v1/usage until every `active` is 0: (what is still counted, how many
    figures the answer holds)."""
    end = time.monotonic() + timeout
    while True:
        status, body = http_json("GET", base + "/v1/usage")
        if status != 200:
            raise RuntimeError(f"GET /v1/usage: {status} {body}")
        busy = actives(body)
        if not busy or time.monotonic() > end:
            return busy, count_actives(body)
        time.sleep(0.2)


_METRIC = re.compile(r'^sidecar_http_requests_total\{([^}]*)\}\s+([0-9.eE+]+)$', re.M)


def control_requests(base: str) -> dict[str, float] | None:
    """Best effort: HTTP 200 answers per control route from /metrics
    (sidecar_http_requests_total{route=...,status="200"}), or None when not exposed. With
    several sidecar processes behind one port this is one process's view."""
    try:
        text = http_text(base + "/metrics")
    except OSError:
        return None
    if "sidecar_http_requests_total" not in text:
        return None
    out: dict[str, float] = {}
    for labels, value in _METRIC.findall(text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        route = lab.get("route", "")
        if route.startswith("/v1/control/") and lab.get("status") == "200":
            key = route.rsplit("/", 1)[1]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def finish(stack: Any, problems: list[str], *closeables: Any) -> int:
    """The end of a benchmark run, whatever happened: shield from a second Ctrl-C, close
    what it opened (clients first, then the database connection), stop every process
    (keeping their logs when something went wrong), print the problems, and the exit code."""
    shield()
    if "interrupted" in problems:
        say("interrupted: cleaning up")
    for c in closeables:
        if c is None:
            continue
        try:
            c.close()
        except Exception:  # noqa: BLE001 - cleaning up: the next one must still close
            pass
    if problems:
        stack.failed = True
    stack.close()
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0
