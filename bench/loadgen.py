"""A lean SIP load generator over UDP: open-loop calls at a fixed rate, in several processes.

The processes are bench/sipload.c (built into .build/sipload on first use, with `cc`), or
with impl="python" (`--impl python`) the Python workers below, which behave the same and
cost about twice the CPU: on a 2-core machine the generator's CPU is taken from what it
measures, so the C workers are the default.

Callers (UAC): `workers` processes, each with its own UDP socket on `uac_ip` (127.0.0.2 by
default: the benchmark's application server, known to the sidecar by that address), its own
Call-IDs, and an equal share of the rate. A call is

    INVITE -> (100/180) -> 200 -> ACK, hold `hold` s, BYE -> 200

and is a failure when any of it goes wrong: a final answer other than 200, no final answer
within `timeout` s of the INVITE, a BYE not answered 200 within `timeout` s. INVITEs are
retransmitted at T1 = 0.5 s doubling until a provisional or final answer, BYEs at T1
doubling up to 4 s (RFC 3261 timers A and E), so a datagram lost under load costs time, not
the call. Per call: INVITE sent -> final answer seen (the setup time).

Callee (UAS): one process on `uas_ip` (127.0.0.3), one socket, answering every INVITE at
once with 180 and 200 (its 200 retransmitted until the ACK), every BYE with 200. One
process is enough: a proxy sends from one socket, so every datagram to the UAS has the same
source and destination, which the kernel cannot spread over several sockets anyway.

Lean on purpose: messages are bytes built by concatenation; an answer is read by looking
up its status code, Call-ID and CSeq number only (the 200 of an INVITE also for To,
Record-Route and Contact); one small object per call, none per message; timers are one
5 ms tick per process walking time-ordered queues.

Use from Python (bench/bench_compare.py does):

    lg = LoadGen(workers=2)              # starts the processes
    r = lg.step(("127.0.0.1", 5060), to_user="callee", rate=600, duration=10)
    lg.close()

or on its own, against a running proxy that relays to the UAS (`--uas-port`):

    .venv/bin/python bench/loadgen.py --proxy 127.0.0.1:5060 --uas-port 5090 \\
        --rate 500 --seconds 10 [--workers 2] [--to callee] [--from app]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing as mp
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

T1 = 0.5
T2 = 4.0
TICK = 0.005
DOMAIN = b"sidecar.local"
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


def _big_buffers(sock: socket.socket, size: int = 8 << 20) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # root: past rmem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# ------------------------------------------------------------------------- caller (UAC)

CALLING, PROCEEDING, HOLDING, BYEING, DONE = range(5)


class Call:
    __slots__ = ("cid", "state", "t0", "invite", "head", "ack", "bye")

    def __init__(self, cid: bytes, t0: float, invite: bytes, head: bytes):
        self.cid = cid
        self.state = CALLING
        self.t0 = t0
        self.invite = invite
        self.head = head  # "From: ...\r\nCall-ID: ...\r\n" shared by ACK/BYE
        self.ack = b""
        self.bye = b""


class Uac(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, ip: str, token: str):
        self.loop = loop
        self.ip = ip
        self.token = token.encode()
        self.calls: dict[bytes, Call] = {}
        self.seq = 0
        self.transport: Any = None
        self.done_cb: Any = None
        self.reset()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        self.via = f"Via: SIP/2.0/UDP {self.ip}:{self.port};branch=z9hG4bK".encode()

    def reset(self) -> None:
        self.sent = self.answered = self.completed = 0
        self.invite_rtx = self.bye_rtx = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.lat: list[float] = []
        self.max_lag = 0.0
        self.hold_q: collections.deque[tuple[float, Call]] = collections.deque()
        self.inv_rtx: list[collections.deque[tuple[float, Call]]] = [
            collections.deque() for _ in range(6)]
        self.bye_rtx_q: list[collections.deque[tuple[float, Call]]] = [
            collections.deque() for _ in range(8)]
        self.inv_to: collections.deque[tuple[float, Call]] = collections.deque()
        self.bye_to: collections.deque[tuple[float, Call]] = collections.deque()

    # -- a step ---------------------------------------------------------------------
    def start_step(self, p: dict[str, Any], done_cb: Any) -> None:
        self.reset()
        self.proxy = (p["proxy"][0], int(p["proxy"][1]))
        self.rate = float(p["rate"])
        self.phase = float(p["phase"])
        self.total = int(p["total"])
        self.hold = float(p["hold"])
        self.timeout = float(p["timeout"])
        fu = p["from_user"].encode()
        tu = p["to_user"].encode()
        host = f"{self.proxy[0]}:{self.proxy[1]}".encode()
        self.ruri = b"sip:" + tu + b"@" + host
        self.inv_line = b"INVITE " + self.ruri + b" SIP/2.0\r\n"
        self.from_pre = b"From: <sip:" + fu + b"@" + DOMAIN + b">;tag=f"
        self.to_line = b"To: <sip:" + tu + b"@" + DOMAIN + b">\r\n"
        self.contact = (b"Contact: <sip:" + fu + b"@" + f"{self.ip}:{self.port}".encode()
                        + b">\r\n")
        self.t_start = time.monotonic() + (float(p["start"]) - time.time())
        self.t_first = self.t_last = 0.0
        self.deadline = self.t_start + self.total / max(self.rate, 1e-9) + self.hold \
            + 2 * self.timeout + 2.0
        self.done_cb = done_cb
        self.cpu0 = time.process_time()
        self.loop.call_at(self._loop_time(self.t_start), self.tick)

    def _loop_time(self, mono: float) -> float:
        return self.loop.time() + (mono - time.monotonic())

    def new_call(self, now: float) -> None:
        self.seq += 1
        n = str(self.seq).encode()
        cid = self.token + b"-" + n
        head = self.from_pre + n + b"\r\nCall-ID: " + cid + b"\r\n"
        invite = (self.inv_line + self.via + cid + b"i;rport\r\nMax-Forwards: 70\r\n" + head
                  + self.to_line + b"CSeq: 1 INVITE\r\n" + self.contact
                  + b"Content-Length: 0\r\n\r\n")
        call = Call(cid, now, invite, head)
        self.calls[cid] = call
        self.transport.sendto(invite, self.proxy)
        self.sent += 1
        self.inv_rtx[0].append((now + T1, call))
        self.inv_to.append((now + self.timeout, call))

    def fail(self, call: Call, why: str) -> None:
        if call.state != DONE:
            call.state = DONE
            self.failures[why] += 1
            self.calls.pop(call.cid, None)

    def tick(self) -> None:
        now = time.monotonic()
        tr = self.transport
        # new calls, at their scheduled times
        if self.sent < self.total:
            due = min(self.total, int((now - self.t_start) * self.rate - self.phase) + 1)
            if due > self.sent:
                lag = now - (self.t_start + (self.sent + self.phase) / self.rate)
                if lag > self.max_lag:
                    self.max_lag = lag
                if not self.t_first:
                    self.t_first = now
                while self.sent < due:
                    self.new_call(now)
                self.t_last = now
        # answered calls whose hold is over: BYE
        q = self.hold_q
        while q and q[0][0] <= now:
            call = q.popleft()[1]
            if call.state == HOLDING:
                call.state = BYEING
                tr.sendto(call.bye, self.proxy)
                self.bye_rtx_q[0].append((now + T1, call))
                self.bye_to.append((now + self.timeout, call))
        # INVITE retransmissions (timer A) while nothing was heard
        for lvl, q in enumerate(self.inv_rtx):
            while q and q[0][0] <= now:
                call = q.popleft()[1]
                if call.state == CALLING:
                    tr.sendto(call.invite, self.proxy)
                    self.invite_rtx += 1
                    if lvl + 1 < len(self.inv_rtx):
                        self.inv_rtx[lvl + 1].append((now + T1 * 2 ** (lvl + 1), call))
        # BYE retransmissions (timer E)
        for lvl, q in enumerate(self.bye_rtx_q):
            while q and q[0][0] <= now:
                call = q.popleft()[1]
                if call.state == BYEING:
                    tr.sendto(call.bye, self.proxy)
                    self.bye_rtx += 1
                    if lvl + 1 < len(self.bye_rtx_q):
                        self.bye_rtx_q[lvl + 1].append((now + min(T1 * 2 ** (lvl + 1), T2), call))
        q = self.inv_to
        while q and q[0][0] <= now:
            call = q.popleft()[1]
            if call.state in (CALLING, PROCEEDING):
                self.fail(call, "INVITE timeout" if call.state == CALLING
                          else "no final answer (timeout)")
        q = self.bye_to
        while q and q[0][0] <= now:
            call = q.popleft()[1]
            if call.state == BYEING:
                self.fail(call, "BYE timeout")
        if self.sent >= self.total and (not self.calls or now > self.deadline):
            for call in list(self.calls.values()):
                self.fail(call, "unfinished at the deadline")
            self.finish()
            return
        self.loop.call_later(TICK, self.tick)

    def finish(self) -> None:
        window = (self.t_last - self.t_first) if self.sent > 1 else 0.0
        res = {
            "sent": self.sent, "answered": self.answered, "completed": self.completed,
            "failures": dict(self.failures), "lat": self.lat, "invite_rtx": self.invite_rtx,
            "bye_rtx": self.bye_rtx, "window": window, "max_lag": self.max_lag,
            "cpu": time.process_time() - self.cpu0,
        }
        cb, self.done_cb = self.done_cb, None
        if cb is not None:
            cb(res)

    # -- answers --------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:8] != b"SIP/2.0 ":
            return
        i = data.find(b"\r\nCall-ID: ")
        if i < 0:
            return
        j = data.find(b"\r\n", i + 11)
        call = self.calls.get(data[i + 11:j])
        if call is None:
            return
        code = int(data[8:11])
        k = data.find(b"\r\nCSeq: ")
        if data[k + 8:k + 9] == b"1":  # the INVITE
            st = call.state
            if code < 200:
                if st == CALLING:
                    call.state = PROCEEDING
                return
            if st <= PROCEEDING:
                if code == 200:
                    self.lat.append(time.monotonic() - call.t0)
                    self.answered += 1
                    self._answered(call, data)
                else:
                    self._ack_failure(call, data)
                    self.fail(call, f"{code} {self._reason(data)}")
            elif code == 200 and call.ack:
                self.transport.sendto(call.ack, self.proxy)  # 200 retransmitted: ACK again
            return
        if call.state == BYEING and code >= 200:  # the BYE
            if code == 200:
                call.state = DONE
                self.completed += 1
                del self.calls[call.cid]
            else:
                self.fail(call, f"BYE {code}")

    @staticmethod
    def _reason(data: bytes) -> str:
        return data[12:data.find(b"\r\n")].decode(errors="replace")

    def _answered(self, call: Call, data: bytes) -> None:
        head = data[:data.find(b"\r\n\r\n")].split(b"\r\n")
        rr: list[bytes] = []
        to = contact = b""
        for line in head:
            c = line[:3]
            if c == b"Rec":
                if line[:14] == b"Record-Route: ":
                    rr.append(line[14:])
            elif c == b"To:":
                to = line
            elif c == b"Con" and line[:9] == b"Contact: ":
                a = line.find(b"<")
                contact = line[a + 1:line.find(b">", a)] if a >= 0 else line[9:].split(b";")[0]
        if not to or not contact:
            self.fail(call, "200 without To or Contact")
            return
        route = (b"Route: " + b", ".join(reversed(rr)) + b"\r\n") if rr else b""
        common = route + b"Max-Forwards: 70\r\n" + call.head + to + b"\r\n"
        call.ack = (b"ACK " + contact + b" SIP/2.0\r\n" + self.via + call.cid + b"a;rport\r\n"
                    + common + b"CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        call.bye = (b"BYE " + contact + b" SIP/2.0\r\n" + self.via + call.cid + b"b;rport\r\n"
                    + common + b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
        call.state = HOLDING
        self.transport.sendto(call.ack, self.proxy)
        self.hold_q.append((time.monotonic() + self.hold, call))

    def _ack_failure(self, call: Call, data: bytes) -> None:
        """ACK of a non-2xx final answer: hop by hop, same branch as the INVITE."""
        i = data.find(b"\r\nTo: ")
        to = data[i + 2:data.find(b"\r\n", i + 2)]
        ack = (b"ACK " + self.ruri + b" SIP/2.0\r\n" + self.via + call.cid
               + b"i;rport\r\nMax-Forwards: 70\r\n" + call.head + to
               + b"\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
        self.transport.sendto(ack, self.proxy)


def _uac_main(conn: Any, ip: str, token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    loop = _event_loop()
    asyncio.set_event_loop(loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((ip, 0))
    uac = Uac(loop, ip, token)
    loop.run_until_complete(loop.create_datagram_endpoint(lambda: uac, sock=sock))

    def on_cmd() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            loop.stop()
            return
        if msg[0] == "step":
            uac.start_step(msg[1], send)
        elif msg[0] == "quit":
            loop.stop()

    def send(result: Any) -> None:
        # The event loop made the pipe non-blocking (add_reader): a long step's latencies
        # are more than the pipe holds, so the step's result is written blocking (the
        # parent is reading it).
        os.set_blocking(conn.fileno(), True)
        try:
            conn.send(result)
        finally:
            os.set_blocking(conn.fileno(), False)

    loop.add_reader(conn.fileno(), on_cmd)
    conn.send(("ready", uac.port))
    loop.run_forever()


# ------------------------------------------------------------------------- callee (UAS)


class Uas(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, ip: str):
        self.loop = loop
        self.ip = ip
        self.calls: dict[bytes, bytes] = {}  # Call-ID -> its 200, until the BYE
        # Call-ID -> [200, addr, due, interval, first sent], until the ACK (timer G)
        self.unacked: dict[bytes, list[Any]] = {}
        self.n = 0
        self.stats = collections.Counter[str]()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        self.contact = f"Contact: <sip:callee@{self.ip}:{self.port}>\r\n".encode()
        self.loop.call_later(0.05, self.tick)

    @staticmethod
    def _headers(data: bytes) -> tuple[list[bytes], bytes, bytes]:
        """(Via/Record-Route/From/Call-ID/CSeq lines in order, the To line, the Call-ID)."""
        keep: list[bytes] = []
        to = cid = b""
        for line in data[:data.find(b"\r\n\r\n")].split(b"\r\n")[1:]:
            c = line[:2]
            if c == b"Vi" or c == b"Fr" or c == b"CS" or c == b"v:":
                keep.append(line)
            elif c == b"Ca":
                keep.append(line)
                cid = line[9:].strip()
            elif c == b"To":
                to = line
            elif c == b"Re" and line[:13] == b"Record-Route:":
                keep.append(line)
        return keep, to, cid

    def datagram_received(self, data: bytes, addr: Any) -> None:
        m = data[:3]
        tr = self.transport
        if m == b"INV":
            keep, to, cid = self._headers(data)
            known = self.calls.get(cid)
            if known is not None:
                self.stats["invite_rtx"] += 1
                tr.sendto(known, addr)
                return
            self.n += 1
            self.stats["invites"] += 1
            common = (b"\r\n".join(keep) + b"\r\n" + to + b";tag=u" + str(self.n).encode()
                      + b"\r\n" + self.contact + b"Content-Length: 0\r\n\r\n")
            ok = b"SIP/2.0 200 OK\r\n" + common
            tr.sendto(b"SIP/2.0 180 Ringing\r\n" + common, addr)
            tr.sendto(ok, addr)
            self.calls[cid] = ok
            now = time.monotonic()
            self.unacked[cid] = [ok, addr, now + T1, T1, now]
        elif m == b"ACK":
            i = data.find(b"\r\nCall-ID: ")
            cid = data[i + 11:data.find(b"\r\n", i + 11)]
            self.unacked.pop(cid, None)
            self.stats["acks"] += 1
        elif m == b"SIP":
            return
        else:  # BYE, CANCEL, OPTIONS...: 200
            keep, to, cid = self._headers(data)
            if m == b"BYE":
                self.stats["byes"] += 1
                self.calls.pop(cid, None)
                self.unacked.pop(cid, None)
            tr.sendto(b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\n" + to
                      + b"\r\nContent-Length: 0\r\n\r\n", addr)

    def tick(self) -> None:
        if self.unacked:
            now = time.monotonic()
            for cid, e in list(self.unacked.items()):
                if now - e[4] > 32:  # timer H: give up
                    del self.unacked[cid]
                elif e[2] <= now:
                    self.transport.sendto(e[0], e[1])
                    self.stats["ok_rtx"] += 1
                    e[3] = min(e[3] * 2, T2)
                    e[2] = now + e[3]
        self.loop.call_later(0.05, self.tick)


def _uas_main(conn: Any, ip: str, port: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = _event_loop()
    asyncio.set_event_loop(loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((ip, port))
    uas = Uas(loop, ip)
    loop.run_until_complete(loop.create_datagram_endpoint(lambda: uas, sock=sock))

    def on_cmd() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            loop.stop()
            return
        if msg[0] == "stats":
            conn.send(dict(uas.stats))
        elif msg[0] == "quit":
            loop.stop()

    loop.add_reader(conn.fileno(), on_cmd)
    conn.send(("ready", uas.port))
    loop.run_forever()


# ------------------------------------------------------------------------- controller


@dataclass
class StepResult:
    rate: float  # offered, calls per second
    duration: float
    sent: int = 0
    answered: int = 0
    completed: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    lat: list[float] = field(default_factory=list)  # setup times of answered calls, sorted, s
    invite_rtx: int = 0
    bye_rtx: int = 0
    send_rate: float = 0.0  # INVITEs actually sent per second
    max_lag: float = 0.0  # worst lateness of the sender, s
    wall: float = 0.0  # step start -> last call done, s
    cpu: float = 0.0  # CPU seconds of the callers (their own count)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def q(self, p: float) -> float:
        from math import ceil, nan

        if not self.lat:
            return nan
        return self.lat[max(0, min(len(self.lat) - 1, ceil(p * len(self.lat)) - 1))] * 1000


SIPLOAD_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipload.c")
SIPLOAD_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           ".build", "sipload")


def build_sipload() -> str | None:
    """bench/sipload.c compiled into .build/sipload (again when the source is newer); None,
    with the reason on stderr, when no C compiler can build it."""
    try:
        if os.path.getmtime(SIPLOAD_BIN) >= os.path.getmtime(SIPLOAD_SRC):
            return SIPLOAD_BIN
    except OSError:
        pass
    os.makedirs(os.path.dirname(SIPLOAD_BIN), exist_ok=True)
    tmp = f"{SIPLOAD_BIN}.{os.getpid()}"
    try:
        subprocess.run(["cc", "-O2", "-Wall", "-o", tmp, SIPLOAD_SRC], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        print(f"loadgen: cannot build {SIPLOAD_SRC} ({detail}); using the Python workers",
              file=sys.stderr)
        return None
    os.replace(tmp, SIPLOAD_BIN)
    return SIPLOAD_BIN


class _CWorker:
    """One bench/sipload.c process, driven by lines on its stdin, answering JSON lines on
    its stdout: the same commands and results as a Python worker's pipe."""

    def __init__(self, binary: str, args: list[str], name: str):
        self.name = name
        self.proc = subprocess.Popen([binary, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid

    def ready(self, timeout: float = 20) -> int:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"{self.name} did not start")
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"{self.name} did not start: {line!r}")
        return int(line[1])

    def send(self, msg: tuple[Any, ...]) -> None:
        assert self.proc.stdin is not None
        if msg[0] == "step":
            p = msg[1]
            line = " ".join(str(v) for v in (
                "step", p["proxy"][0], int(p["proxy"][1]), repr(float(p["rate"])),
                repr(float(p["phase"])), int(p["total"]), repr(float(p["hold"])),
                repr(float(p["timeout"])), repr(float(p["start"])), p["from_user"],
                p["to_user"]))
        else:
            line = msg[0]
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def recv(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"{self.name} exited ({self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send(("quit",))
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2)


class LoadGen:
    """The UAS process and `workers` UAC processes, kept across steps: bench/sipload.c
    (impl "c", the default, built on first use) or the Python workers above (impl "python",
    or when no C compiler is there)."""

    def __init__(self, workers: int = 2, uac_ip: str = "127.0.0.2", uas_ip: str = "127.0.0.3",
                 uas_port: int = 0, impl: str = "c"):
        binary = build_sipload() if impl == "c" else None
        self.impl = "c" if binary else "python"
        if binary:
            self._init_c(binary, workers, uac_ip, uas_ip, uas_port)
        else:
            self._init_python(workers, uac_ip, uas_ip, uas_port)

    def _init_c(self, binary: str, workers: int, uac_ip: str, uas_ip: str,
                uas_port: int) -> None:
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.uac_addrs: list[tuple[str, int]] = []
        token = os.urandom(4).hex()
        try:
            uas = _CWorker(binary, ["uas", uas_ip, str(uas_port)], "sipload-uas")
            self.procs.append(uas)
            self.uas_conn: Any = uas
            self.uas_addr = (uas_ip, uas.ready())
            for w in range(workers):
                uac = _CWorker(binary, ["uac", uac_ip, f"{token}{w}"], f"sipload-uac-{w}")
                self.procs.append(uac)
                self.uac_addrs.append((uac_ip, uac.ready()))
                self.conns.append(uac)
        except BaseException:
            self.close()
            raise

    def _init_python(self, workers: int, uac_ip: str, uas_ip: str, uas_port: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs = []
        self.conns = []
        self.uac_addrs = []
        token = os.urandom(4).hex()
        try:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_uas_main, args=(child, uas_ip, uas_port), daemon=True,
                            name="loadgen-uas")
            p.start()
            self.procs.append(p)
            self.uas_conn = parent
            self.uas_addr = (uas_ip, self._ready(parent, p))
            for w in range(workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_uac_main, args=(child, uac_ip, f"{token}{w}"),
                                daemon=True, name=f"loadgen-uac-{w}")
                p.start()
                self.procs.append(p)
                self.uac_addrs.append((uac_ip, self._ready(parent, p)))
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ready(conn: Any, p: Any) -> int:
        if not conn.poll(20):
            raise RuntimeError(f"{p.name} did not start")
        msg = conn.recv()
        return int(msg[1])

    def addrs(self) -> list[tuple[str, int]]:
        """Every UDP socket of the generator (callers and callee)."""
        return [*self.uac_addrs, self.uas_addr]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def uas_stats(self) -> dict[str, int]:
        self.uas_conn.send(("stats",))
        return dict(self.uas_conn.recv())

    def step(self, proxy: tuple[str, int], to_user: str = "callee", from_user: str = "app",
             rate: float = 100, duration: float = 10, hold: float = 0.5,
             timeout: float = 8.0) -> StepResult:
        n = len(self.conns)
        total = int(round(rate * duration))
        start = time.time() + 0.1
        for w, conn in enumerate(self.conns):
            share = total // n + (1 if w < total % n else 0)
            conn.send(("step", {"proxy": proxy, "to_user": to_user, "from_user": from_user,
                                "rate": rate / n, "phase": w / n, "total": share,
                                "hold": hold, "timeout": timeout, "start": start}))
        r = StepResult(rate, duration)
        windows = []
        for conn in self.conns:
            res = conn.recv()
            r.sent += res["sent"]
            r.answered += res["answered"]
            r.completed += res["completed"]
            r.failures.update(res["failures"])
            r.lat.extend(res["lat"])
            r.invite_rtx += res["invite_rtx"]
            r.bye_rtx += res["bye_rtx"]
            r.max_lag = max(r.max_lag, res["max_lag"])
            r.cpu += res["cpu"]
            windows.append(res["window"])
        r.wall = time.time() - start
        r.lat.sort()
        window = max(windows) if windows else 0.0
        # n calls over a window of (n - 1) intervals
        r.send_rate = (r.sent - n) / window if window > 0 and r.sent > n else 0.0
        return r

    def close(self) -> None:
        if self.impl == "c":
            for w in self.procs:
                w.close()
            return
        for conn in [*self.conns, getattr(self, "uas_conn", None)]:
            if conn is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                conn.send(("quit",))
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
                p.join(2)


# ------------------------------------------------------------------------- CLI


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import CORES, tree_cpu

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", required=True, help="host:port of the proxy")
    ap.add_argument("--rate", type=float, default=200, help="calls per second (default 200)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--hold", type=float, default=0.5, help="call duration, s (default 0.5)")
    ap.add_argument("--workers", type=int, default=2, help="UAC processes (default 2)")
    ap.add_argument("--to", default="callee", help="Request-URI user (default callee)")
    ap.add_argument("--from", dest="from_user", default="app", help="From user (default app)")
    ap.add_argument("--uac-ip", default="127.0.0.2")
    ap.add_argument("--uas-ip", default="127.0.0.3")
    ap.add_argument("--uas-port", type=int, default=5090)
    ap.add_argument("--impl", choices=("c", "python"), default="c",
                    help="the workers: bench/sipload.c (default) or Python")
    args = ap.parse_args()
    host, port = args.proxy.rsplit(":", 1)
    lg = LoadGen(args.workers, args.uac_ip, args.uas_ip, args.uas_port, args.impl)
    try:
        c0 = tree_cpu(lg.pids())
        r = lg.step((host, int(port)), args.to, args.from_user, args.rate, args.seconds,
                    args.hold)
        cpu = tree_cpu(lg.pids()) - c0
        print(f"offered {r.rate:g} CPS, sent {r.send_rate:.0f}/s, {r.sent} calls, "
              f"{r.completed} completed, {r.failed} failed {dict(r.failures) or ''}")
        print(f"setup p50 {r.q(0.5):.2f} ms, p99 {r.q(0.99):.2f} ms, max {r.q(1.0):.2f} ms; "
              f"INVITE rtx {r.invite_rtx}, BYE rtx {r.bye_rtx}, sender max lag "
              f"{r.max_lag * 1000:.1f} ms")
        print(f"load generator CPU: {cpu:.2f} s over {r.wall:.1f} s = "
              f"{100 * cpu / r.wall / CORES:.1f} % of {CORES} cores "
              f"({1000 * cpu / max(r.sent, 1):.3f} ms per call); UAS {lg.uas_stats()}")
        return 0 if r.failed == 0 else 1
    finally:
        lg.close()


if __name__ == "__main__":
    sys.exit(main())
