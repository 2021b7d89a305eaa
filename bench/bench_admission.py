"""The sidecar alone: calls per second and latency over its HTTP control API, as Kamailio
would drive it, at 1, 16 and 64 calls in flight.

Starts, on free ports of 127.0.0.1, a private PostgreSQL (scripts/pgcluster.sh), `sidecar
migrate`, `sidecar import` of a benchmark configuration and `sidecar serve` (its own process,
SIDECAR_DB_SYNCHRONOUS_COMMIT=on unless --sync-commit off), and tears everything down at the
end (Ctrl-C included).

Each call is what kamailio/kamailio.cfg sends, with the same bodies (see
docs/control-api.md): /v1/control/admit (decision: relay), the answer with leg 0 (the 2xx),
the release with reason "bye". Two ways (--events): `requests`, the answer and the release
each a POST of its own (/v1/control/answer, /v1/control/release); `outbox`, as kamailio.cfg
sends them, queued and posted in batches to /v1/control/events by one drain per client
process. Every call touches one hot provider account and
one hot trunk: 64 digest extensions (auth_user set, as after proxy_authorize) in 8
organizations under one provider call an external number routed through the one trunk.

The client is lean so that it is not the limit: raw HTTP/1.1 keep-alive connections (one per
call in flight, as http_async_client reuses its connections), requests as prepared bytes,
answers read by Content-Length, in --procs processes (uvloop). Its CPU share is printed.

Per level: calls/s (admit+answer+release completed), p50/p99 of the admission
(admit sent -> decision) and of the whole call's three requests, CPU ms per call of the
sidecar (its process tree) and of PostgreSQL (postmaster and backends, /proc), commits per
call (pg_stat_database.xact_commit; PostgreSQL hears an idle backend's counts up to 10 s late,
so each level is followed by an 11 s pause before its count is read) and writing
transactions per call (xids, exact), the client's and the whole machine's CPU share. At the
end: GET /v1/usage back to 0 and `counter_drift()` empty.

    .venv/bin/python bench/bench_admission.py             # 10 s per level, ~1.5 min
    .venv/bin/python bench/bench_admission.py --quick     # 3 s per level, under a minute
    .venv/bin/python bench/bench_admission.py --levels 1,16,64 --seconds 10 \\
        --sync-commit on --procs 2 [--env SIDECAR_DB_POOL_MAX=32] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CORES,
    CpuMeter,
    Db,
    Stack,
    box_cpu,
    cpu_steal,
    finish,
    fmt,
    install_sigterm,
    loadavg,
    machine_speed,
    quantile,
    say,
    wait_usage_zero,
)

NUMBER = "+15551230000"
ORGS = 8
USERS = 64
BIG = 1_000_000
COMMIT_GAP = 11.0
REQUEST_TIMEOUT = 5.0  # s, per HTTP request


def bench_config() -> dict[str, Any]:
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "provider", "name": "hot provider", "limits": {"calls": BIG}},
            *({"id": f"org{i}", "parent": "provider", "limits": {"calls": 100_000}}
              for i in range(ORGS)),
        ],
        "extensions": [{"id": f"u{i}", "account": f"org{i % ORGS}", "password": "pw"}
                       for i in range(USERS)],
        "channels": [{"id": "trunk", "name": "hot trunk", "limits": {"calls": BIG},
                      "sources": ["127.0.0.3"], "gateway": "sip:127.0.0.3:5070",
                      "prefixes": ["+"], "priority": 1}],
    }


# ------------------------------------------------------------------------- the client


class Conn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.buf = b""
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: Any = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.fut is None:
            return
        head = self.buf[:end]
        i = head.lower().find(b"\r\ncontent-length:")
        if i < 0:
            self.fut.set_exception(ValueError("answer without Content-Length"))
            return
        j = head.find(b"\r\n", i + 2)
        n = int(head[i + 17:j if j > 0 else len(head)])
        if len(self.buf) < end + 4 + n:
            return
        body = self.buf[end + 4:end + 4 + n]
        self.buf = self.buf[end + 4 + n:]
        fut, self.fut = self.fut, None
        fut.set_result((int(head[9:12]), body))

    async def post(self, req: bytes) -> tuple[int, bytes]:
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(req)
        return await asyncio.wait_for(self.fut, REQUEST_TIMEOUT)


def _request(host: bytes, path: bytes, body: bytes) -> bytes:
    # what libcurl (http_async_client) sends
    return (b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nAccept: */*\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


OUTBOX_BATCH = 200       # kamailio.cfg's OUTBOX_BATCH
OUTBOX_INTERVAL = 0.02   # kamailio.cfg's OUTBOX_INTERVAL_MS: a look at an empty outbox


class Outbox:
    """What kamailio.cfg's outbox does: answers and releases queued in order and posted by
    one drain, one POST /v1/control/events at a time, up to OUTBOX_BATCH per POST."""

    def __init__(self, conn: Conn, host: bytes) -> None:
        self.conn = conn
        self.host = host
        self.queue: list[tuple[bytes, asyncio.Future[None] | None]] = []
        self.wake = asyncio.Event()
        self.failures: collections.Counter[str] = collections.Counter()
        self.posts = 0
        self.closing = False   # no call will add to it any more: stop once it is empty

    def add(self, event: bytes, done: asyncio.Future[None] | None = None) -> None:
        self.queue.append((event, done))
        self.wake.set()

    async def drain(self, until: float) -> None:
        while (time.monotonic() < until and not self.closing) or self.queue:
            if not self.queue:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), OUTBOX_INTERVAL)
                except TimeoutError:
                    pass
                continue
            batch, self.queue = self.queue[:OUTBOX_BATCH], self.queue[OUTBOX_BATCH:]
            body = b'{"events":[' + b",".join(e for e, _ in batch) + b"]}"
            try:
                status, _ = await self.conn.post(_request(self.host, b"/v1/control/events", body))
            except (TimeoutError, ConnectionError, OSError) as exc:
                status = 0
                self.failures[f"events {type(exc).__name__}"] += 1
            self.posts += 1
            if status != 200:
                # sent again, in order, as the drain does (after its back-off)
                self.failures[f"events HTTP {status}"] += 1
                self.queue = batch + self.queue
                await asyncio.sleep(0.2)
                continue
            for _, done in batch:
                if done is not None and not done.done():
                    done.set_result(None)


async def _run(port: int, first: int, conns: int, start: float, seconds: float,
               token: str, outbox_mode: bool) -> dict[str, Any]:
    import orjson

    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}".encode()
    admit_lat: list[float] = []
    call_lat: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    done = 0
    t_start = time.monotonic() + (start - time.time())
    t_end = t_start + seconds

    async def connect() -> Conn:
        _, proto = await loop.create_connection(Conn, "127.0.0.1", port)
        return proto

    async def worker(w: int, conn: Conn) -> None:
        nonlocal done
        user = f"u{w % USERS}".encode()
        n = 0
        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                return
            n += 1
            cid = f"{token}-{w}-{n}".encode()
            ftag = b"ft" + str(n).encode()
            admit = (b'{"call_id":"' + cid + b'","from_tag":"' + ftag
                     + b'","source_ip":"127.0.0.1","from_user":"' + user + b'","to_user":"'
                     + NUMBER.encode() + b'","node":"bench-1","boot":"bench-1-boot",'
                     b'"auth_user":"' + user + b'"}')
            try:
                if conn.closed:
                    conn = await connect()
                status, body = await conn.post(_request(host, b"/v1/control/admit", admit))
                t1 = time.monotonic()
                if status != 200:
                    failures[f"admit HTTP {status}"] += 1
                    continue
                dec = orjson.loads(body)
                if dec.get("action") != "relay" or not dec.get("legs"):
                    failures[f"admit {dec.get('action')} {dec.get('code', '')}".strip()] += 1
                    continue
                leg = int(dec["legs"][0].get("leg", 0))
                ans = (b'{"call_id":"' + cid + b'","from_tag":"' + ftag + b'","leg":'
                       + str(leg).encode() + b"}")
                if outbox is not None:
                    # The 2xx and the BYE, as the dialog module reports them: queued; the
                    # call is done when its release has been applied.
                    released: asyncio.Future[None] = loop.create_future()
                    outbox.add(b'{"type":"answer",' + ans[1:])
                    outbox.add(b'{"type":"release","call_id":"' + cid + b'","from_tag":"'
                               + ftag + b'","reason":"bye"}', released)
                    await asyncio.wait_for(released, REQUEST_TIMEOUT)
                    t2 = time.monotonic()
                    if t2 <= t_end:
                        admit_lat.append(t1 - t0)
                        call_lat.append(t2 - t0)
                        done += 1
                    continue
                status, _ = await conn.post(_request(host, b"/v1/control/answer", ans))
                if status != 200:
                    failures[f"answer HTTP {status}"] += 1
                rel = (b'{"call_id":"' + cid + b'","from_tag":"' + ftag
                       + b'","reason":"bye"}')
                status, _ = await conn.post(_request(host, b"/v1/control/release", rel))
                if status != 200:
                    failures[f"release HTTP {status}"] += 1
                    continue
            except TimeoutError:
                failures["timeout (5 s)"] += 1
                conn.transport.close()
                conn.closed = True
                continue
            except (ConnectionError, OSError, ValueError) as exc:
                failures[type(exc).__name__] += 1
                conn.closed = True
                continue
            t2 = time.monotonic()
            if t2 <= t_end:
                admit_lat.append(t1 - t0)
                call_lat.append(t2 - t0)
                done += 1

    cpu0 = time.process_time()
    pool = [await connect() for _ in range(conns)]
    outbox = Outbox(await connect(), host) if outbox_mode else None
    drain = (asyncio.ensure_future(outbox.drain(t_end + REQUEST_TIMEOUT))
             if outbox is not None else None)
    await asyncio.gather(*(worker(first + i, c) for i, c in enumerate(pool)))
    if drain is not None and outbox is not None:
        outbox.closing = True
        outbox.wake.set()
        await drain
        failures.update(outbox.failures)
        outbox.conn.transport.close()
    for c in pool:
        if c.transport is not None:
            c.transport.close()
    return {"done": done, "admit": admit_lat, "call": call_lat, "failures": dict(failures),
            "cpu": time.process_time() - cpu0, "posts": outbox.posts if outbox else 0}


def _client_main(conn: Any, idx: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    token = f"{os.urandom(4).hex()}{idx}"
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "quit":
            return
        _, port, first, conns, start, seconds, n, outbox = msg
        conn.send(loop.run_until_complete(
            _run(port, first, conns, start, seconds, f"{token}x{n}", outbox)))


class Client:
    def __init__(self, procs: int):
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.n = 0
        for i in range(procs):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(b, i), daemon=True,
                            name=f"bench-client-{i}")
            p.start()
            self.procs.append(p)
            self.conns.append(a)
        for a, p in zip(self.conns, self.procs, strict=True):
            if not a.poll(20):
                raise RuntimeError(f"{p.name} did not start")
            a.recv()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, port: int, concurrency: int, seconds: float,
            outbox: bool = False) -> dict[str, Any]:
        """`concurrency` connections spread over the processes, `seconds` of calls."""
        self.n += 1
        used = min(len(self.conns), concurrency)
        start = time.time() + 0.3
        first = 0
        for i in range(used):
            k = concurrency // used + (1 if i < concurrency % used else 0)
            self.conns[i].send(("run", port, first, k, start, seconds, self.n, outbox))
            first += k
        out: dict[str, Any] = {"done": 0, "admit": [], "call": [],
                               "failures": collections.Counter(), "cpu": 0.0, "posts": 0}
        for i in range(used):
            r = self.conns[i].recv()
            out["done"] += r["done"]
            out["admit"] += r["admit"]
            out["call"] += r["call"]
            out["failures"].update(r["failures"])
            out["cpu"] += r["cpu"]
            out["posts"] += r["posts"]
        out["admit"].sort()
        out["call"].sort()
        return out

    def close(self) -> None:
        for a in self.conns:
            try:
                a.send(("quit",))
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
                p.join(2)


# ------------------------------------------------------------------------- the benchmark

HEAD = (f"{'events':>8} {'in flight':>9} {'calls/s':>8} {'calls':>7} {'failed':>6} | "
        f"{'admit p50':>9} {'p99 ms':>7} | {'call p50':>8} {'p99 ms':>7} | {'sc ms':>6} {'pg ms':>6} | "
        f"{'commits':>7} {'wxact':>5} | {'client%':>7} {'box%':>4} {'other%':>6}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s per level")
    ap.add_argument("--seconds", type=float, help="seconds per level (default 10; quick 3)")
    ap.add_argument("--levels", default="1,16,64", help="calls in flight (default 1,16,64)")
    ap.add_argument("--sync-commit", choices=["on", "off"], default="on",
                    help="SIDECAR_DB_SYNCHRONOUS_COMMIT (default on)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--env", action="append", default=[],
                    help="extra KEY=VALUE for `sidecar serve` (repeatable)")
    ap.add_argument("--quiet", action="store_true",
                    help="SIDECAR_LOG_LEVEL=WARNING (default: as shipped)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir with the logs")
    ap.add_argument("--events", choices=["outbox", "requests", "both"], default="both",
                    help="how answers and releases are sent: batched by an outbox as "
                         "kamailio.cfg sends them, or one POST each (default: both, one "
                         "after the other)")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    levels = [int(x) for x in args.levels.split(",")]
    install_sigterm()

    env = {"SIDECAR_DB_SYNCHRONOUS_COMMIT": args.sync_commit}
    if args.quiet:
        env["SIDECAR_LOG_LEVEL"] = "WARNING"
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    print(f"Sidecar alone over HTTP: levels {args.levels} in flight x {seconds:g} s; each call "
          f"admit + answer(leg 0) + release(bye); one hot provider, one hot trunk; sidecar env "
          f"{' '.join(f'{k}={v}' for k, v in env.items())}; {args.procs} client processes; "
          f"{CORES} cores, load average before: {loadavg()}; "
          f"{machine_speed()}", flush=True)
    print("CAVEAT: the client, the sidecar and PostgreSQL share this machine's cores (and so "
          "does whatever else runs on it: see other%).", flush=True)

    stack = Stack(keep=args.keep)
    client: Client | None = None
    db: Db | None = None
    problems: list[str] = []
    try:
        client = Client(args.procs)
        say("starting a private PostgreSQL (scripts/pgcluster.sh)")
        url = stack.start_postgres()
        say("sidecar migrate; sidecar import of the benchmark configuration")
        stack.sidecar_cli("migrate")
        stack.load_config(bench_config())
        say("starting the sidecar (sidecar serve)")
        sc, base = stack.start_sidecar(**env)
        port = int(base.rsplit(":", 1)[1])
        db = Db(url)
        meter = CpuMeter()
        meter.add("sidecar", [sc.pid])
        meter.add("pg", [stack.postmaster_pid()])
        meter.add("client", client.pids())
        say("warm-up: 2 s at 16 in flight")
        w = client.run(port, 16, 2.0)
        if w["failures"]:
            problems.append(f"warm-up failures: {dict(w['failures'])}")
        time.sleep(COMMIT_GAP)
        print()
        print(HEAD, flush=True)
        results: dict[tuple[str, int], tuple[float, float]] = {}
        modes = ["requests", "outbox"] if args.events == "both" else [args.events]
        steal = steal_total = 0.0
        for mode, level in [(m, lv) for m in modes for lv in levels]:
            c0, x0 = db.xact_commit(), db.next_xid()
            cpu0, box0, st0 = meter.sample(), box_cpu(), cpu_steal()
            r = client.run(port, level, seconds, outbox=mode == "outbox")
            cpu1, box1, st1 = meter.sample(), box_cpu(), cpu_steal()
            x1 = db.next_xid()
            d = CpuMeter.delta(cpu0, cpu1)
            busy, total = box1[0] - box0[0], box1[1] - box0[1]
            steal, steal_total = steal + st1 - st0, steal_total + total
            time.sleep(COMMIT_GAP)  # let PostgreSQL hear every backend's counts
            c1 = db.xact_commit()
            n = r["done"] or 1
            failed = sum(r["failures"].values())
            other = busy - sum(d.values())
            print(f"{mode:>8} {level:>9} {r['done'] / seconds:>8.0f} {r['done']:>7} {failed:>6} | "
                  f"{fmt(quantile(r['admit'], 0.5) * 1000, 2):>9} "
                  f"{fmt(quantile(r['admit'], 0.99) * 1000, 2):>7} | "
                  f"{fmt(quantile(r['call'], 0.5) * 1000, 2):>8} "
                  f"{fmt(quantile(r['call'], 0.99) * 1000, 2):>7} | "
                  f"{1000 * d['sidecar'] / n:>6.3f} {1000 * d['pg'] / n:>6.3f} | "
                  f"{(c1 - c0) / n:>7.2f} {(x1 - x0) / n:>5.2f} | "
                  f"{100 * d['client'] / total if total else math.nan:>7.0f} "
                  f"{100 * busy / total if total else math.nan:>4.0f} "
                  f"{100 * other / total if total else math.nan:>6.0f}", flush=True)
            results[mode, level] = (r["done"] / seconds, quantile(r["admit"], 0.99) * 1000)
            if r["failures"]:
                print("          failures: " + ", ".join(
                    f"{k}: {v}" for k, v in r["failures"].most_common()), flush=True)
                problems.append(f"{mode} {level} in flight: {failed} failed calls")
        if steal_total:
            # counted in box%: time this machine's cores ran another guest instead of ours
            print(f"steal (the hypervisor's other guests): {100 * steal / steal_total:.1f} % of "
                  f"the {CORES} cores over the steps")
        for mode in modes:
            if (mode, 64) in results:
                rate, p99 = results[mode, 64]
                met = rate >= 3000 and p99 < 20 and args.sync_commit == "on"
                print(f"target (issue), events by {mode}: >= 3000 calls/s and admit p99 < 20 ms "
                      f"at 64 in flight, synchronous_commit=on: {rate:.0f}/s, p99 {p99:.1f} ms "
                      f"-> {'met' if met else 'NOT met'}")
        print("events: requests = each call POSTs admit, answer, release; outbox = each call "
              "POSTs its admit, its answer and release go through an outbox (one drain per "
              "client process, batches of up to 200 on POST /v1/control/events), as "
              "kamailio.cfg sends them. "
              "calls/s: calls whose release was applied per second; admit p50/p99: the "
              "decision; call p50/p99: admit sent -> release applied; sc/pg ms: CPU per call; "
              "commits: "
              "xact_commit per call; wxact: writing transactions per call; client%/box%/"
              "other%: share of all cores (other: neither the client, the sidecar nor "
              "PostgreSQL).")
        busy_left, nfig = wait_usage_zero(base, timeout=15)
        print(f"GET /v1/usage after the run: {'all 0' if not busy_left else busy_left} "
              f"({nfig} active figures)")
        if nfig == 0:
            problems.append("GET /v1/usage holds no `active` figure: its shape changed?")
        if busy_left:
            problems.append(f"usage not back to 0: {busy_left}")
        drift = db.drift()
        print(f"SELECT count(*) FROM counter_drift(): {drift}")
        if drift:
            problems.append(f"counter_drift() lists {drift} counters")
    except KeyboardInterrupt:
        problems.append("interrupted")
    except Exception:
        stack.failed = True  # keep the logs
        raise
    finally:
        code = finish(stack, problems, client, db)
    return code


if __name__ == "__main__":
    sys.exit(main())
