"""Side by side, in one run: Kamailio limiting calls with its own dialog profiles (the
reference, bench/kamailio-native.cfg) and the project (kamailio/kamailio.cfg asking the
sidecar over HTTP, the sidecar deciding in PostgreSQL).

One command starts everything on free ports of 127.0.0.1, all torn down at the end (Ctrl-C
included): a private PostgreSQL (scripts/pgcluster.sh), `sidecar migrate` and `sidecar import`
of a benchmark configuration, `sidecar serve`, the project's Kamailio (the flags
tests/e2e/conftest.py uses: DBURL, SIDECAR_URL, LISTEN_UDP/TCP, NODE_ID, -M 32; -m from --shm,
WORKERS twice the cores (--kam-workers) for every Kamailio, HTTP_WORKERS the cores
(--http-workers) for the project's; --kamailio-args for more options of every
Kamailio, e.g. -x tlsf; everything else as the cfg ships), the native
Kamailio, and the lean load generator bench/loadgen.py (workers in C, bench/sipload.c, or
with --loadgen python its Python ones; callers on 127.0.0.2 in several processes, one
callee on 127.0.0.3 that answers 180 + 200 at once).

Configuration: one hot provider account -> one organization -> the application server `app`
(known by its source address 127.0.0.2) and the callee `callee` (a static contact at the
load generator's UAS); every call is app -> callee (or, with --route trunk, app -> an
external number through the trunk channel whose gateway is the same UAS). The native
Kamailio counts the caller's dialogs in the `account` profile and relays to the same UAS.
Limits are far above the load: nothing is refused; this measures the cost of deciding.

A third system, `floor`, is the project's own kamailio.cfg asking bench/allow_server.py, an
aiohttp server that answers every admission "relay to the callee" and decides nothing: the
architecture's cost (HTTP admission, resumed relay, dialog events, outbox) without the
sidecar's and PostgreSQL's. project/floor is what deciding costs; floor/native what asking
over HTTP costs.

Rate steps: at each offered rate (calls per second, open loop), a step of --seconds s on
each system in turn (project, floor, native). Each call holds --hold s (500 ms). A system that
fails a call in a step runs no higher step (unless --keep-going). Per step and system:

  sent/s      INVITEs actually sent per second (the generator keeping up with the offer)
  failed      calls not completed (non-200 final, INVITE or BYE timeout; see below the row)
  p50/p99     INVITE sent -> final answer, ms, seen by the caller (answered calls)
  rtx         INVITE + BYE retransmissions by the callers (T1 = 500 ms)
  drops       UDP datagrams the kernel dropped for a full receive buffer: at that
              Kamailio's socket / at the load generator's sockets (/proc/net/udp)
  kam, sc, pg CPU ms per call (calls sent) of that Kamailio, the sidecar (process tree;
              the allow server for `floor`), PostgreSQL (the postmaster and every
              backend, from /proc)
  commits     pg_stat_database.xact_commit per call. PostgreSQL learns a backend's counts
              up to 10 s late, so a project step's window runs from its start to the start
              of the next project step (at least 11 s after its end)
  wxact       transactions that wrote (xids assigned) per call, exact
  lg%, box%   the load generator's CPU and the whole machine's, % of all cores; other% is
              the part of box% used by none of the processes this benchmark started (other
              people's work on the machine)

At the end: the highest rate each system carried with zero failed calls, the ratio
project/native, p50/p99 at those rates; GET /v1/usage back to 0 (within 180 s after a step
that failed calls: calls whose BYEs were all dropped end by keepalive), `counter_drift()` empty,
and (best effort, from /metrics) the control requests the sidecar answered per call.

    .venv/bin/python bench/bench_compare.py              # ~5-8 min (steps of 150 CPS above 1,800)
    .venv/bin/python bench/bench_compare.py --quick      # ~1 min, fewer and shorter steps
    .venv/bin/python bench/bench_compare.py --rates 250,500,1000 --seconds 10 --workers 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CORES,
    NATIVE_CFG,
    PROJECT_CFG,
    CpuMeter,
    Db,
    Stack,
    box_cpu,
    control_requests,
    cpu_steal,
    finish,
    fmt,
    install_sigterm,
    loadavg,
    machine_speed,
    say,
    udp_socket_drops,
    wait_usage_zero,
)
from loadgen import LoadGen, StepResult  # noqa: E402

APP_IP = "127.0.0.2"
UAS_IP = "127.0.0.3"
BIG = 100_000
NUMBER = "+15551230000"
RATES = ("500,1000,1500,1800,1950,2100,2250,2400,2550,2700,2850,3000,3150,3300,3600,3900,"
         "4200,4500,4800,5100,5400")
QUICK_RATES = "300,600,1200,2400"
COMMIT_GAP = 11.0  # s: PostgreSQL hears an idle backend's counts within 10 s
# The project's and the floor's Kamailio: keepalives at the least interval the dialog module
# takes, one failure ending the call. After an overloaded step some calls are still up for
# Kamailio because every BYE of their caller was dropped at its socket; the load generator's
# callers answer no request, so the keepalive ends those calls (BYEs both ways, released)
# within about 30 + 10 (its timer) + 5 (the OPTIONS' 408) + 10 s (the cut lifetime).
# Calls of 500 ms never see a keepalive. A call whose ACK was dropped too never gets one
# (the module pings confirmed dialogs only): the dialog module ends it by itself, 60 s after
# its 200 (noack_timeout) at the next of its cleaning rounds (every 90 s), 10 s later.
KEEPALIVE = ["DIALOG_KEEPALIVE=30", "KEEPALIVE_FAILURES=1"]
USAGE_WAIT_AFTER_FAILURE = 180  # s for usage to come back to 0 after a step that failed calls


def bench_config(uas_port: int) -> dict[str, Any]:
    uas = f"{UAS_IP}:{uas_port}"
    return {
        "counting": "per_call",
        "accounts": [
            {"id": "provider", "name": "hot provider", "limits": {"calls": BIG}},
            {"id": "org", "parent": "provider", "limits": {"calls": BIG}},
        ],
        "extensions": [
            {"id": "app", "account": "org", "name": "application server",
             "sources": [APP_IP]},
            {"id": "callee", "account": "org", "name": "the load generator's UAS",
             "contact": f"sip:callee@{uas}"},
        ],
        "channels": [
            {"id": "trunk", "limits": {"calls": BIG}, "sources": ["127.0.0.4"],
             "gateway": f"sip:{uas}", "prefixes": ["+"], "priority": 1},
        ],
    }


@dataclass
class Row:
    system: str
    rate: float
    r: StepResult
    cpu: dict[str, float]
    box_busy: float = 0.0
    box_total: float = 0.0
    ours: float = 0.0  # CPU s of every process the benchmark started (both systems)
    drops_kam: int = 0  # datagrams dropped at the Kamailio's socket (full buffer)
    drops_lg: int = 0  # ... at the load generator's sockets
    xids: int | None = None
    commits: int | None = None  # filled in later (lagged window)
    end: float = 0.0
    c0: int | None = None
    steal: float = 0.0  # CPU s the hypervisor gave to other guests during the step

    @property
    def calls(self) -> int:
        return self.r.sent or 1

    def per_call_ms(self, group: str) -> float:
        return 1000 * self.cpu[group] / self.calls if group in self.cpu else math.nan

    def share(self, seconds: float) -> float:
        return 100 * seconds / self.box_total if self.box_total else math.nan


@dataclass
class System:
    name: str
    port: int
    to_user: str
    cpu_groups: list[str]
    rows: list[Row] = field(default_factory=list)
    stopped: bool = False
    warm: StepResult | None = None

    def best(self) -> Row | None:
        ok = [row for row in self.rows if row.r.failed == 0]
        return max(ok, key=lambda row: row.rate) if ok else None


HEAD = (f"{'CPS':>5} {'system':<8} {'sent/s':>6} {'calls':>6} {'failed':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'rtx':>5} {'drops':>9} | {'kam':>5} {'sc':>5} {'pg':>5} | {'commits':>7} "
        f"{'wxact':>5} | {'lg%':>4} {'box%':>4} {'other%':>6}")


def ms(x: float) -> str:
    return fmt(x, 1 if x >= 10 else 3)


def print_row(row: Row) -> None:
    r = row.r
    other = row.share(row.box_busy - row.ours) if row.box_total else math.nan
    commits = "..." if row.system == "project" and row.commits is None else (
        fmt(row.commits / row.calls, 2) if row.commits is not None else "-")
    wx = fmt(row.xids / row.calls, 2) if row.xids is not None else "-"
    drops = f"{row.drops_kam}/{row.drops_lg}"
    print(f"{row.rate:>5g} {row.system:<8} {r.send_rate:>6.0f} {r.sent:>6} {r.failed:>6} "
          f"{fmt(r.q(0.5), 2):>7} {fmt(r.q(0.99), 2):>7} {r.invite_rtx + r.bye_rtx:>5} "
          f"{drops:>9} | "
          f"{ms(row.per_call_ms('kam')):>5} {ms(row.per_call_ms('sidecar')):>5} "
          f"{ms(row.per_call_ms('pg')):>5} | {commits:>7} {wx:>5} | "
          f"{fmt(row.share(row.cpu['loadgen']), 0):>4} {fmt(row.share(row.box_busy), 0):>4} "
          f"{fmt(other, 0):>6}", flush=True)
    if r.failures:
        print("      failures: " + ", ".join(f"{k}: {n}" for k, n in r.failures.most_common()),
              flush=True)
        if any("(2/SL)" in k or "(2/TM)" in k for k in r.failures):
            # Kamailio's E_OUT_OF_MEM (-2) answers "500 No error (2/SL)" in release builds.
            print("      NOTE: 500 (2/SL or 2/TM) is Kamailio out of shared memory: a limit of "
                  "this run's --shm, not of the system", flush=True)
    if r.send_rate and r.send_rate < 0.97 * row.rate:
        print(f"      NOTE: the generator sent {r.send_rate:.0f}/s of {row.rate:g} offered "
              f"(max lag {r.max_lag * 1000:.0f} ms): it did not keep up", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"rates {QUICK_RATES}, 3 s steps, 1 s warm-up (about a minute)")
    ap.add_argument("--rates", help=f"offered CPS per step, comma-separated (default {RATES})")
    ap.add_argument("--seconds", type=float, help="seconds per step (default 10; quick 3)")
    ap.add_argument("--hold", type=float, default=0.5, help="call duration, s (default 0.5)")
    ap.add_argument("--workers", type=int, default=2, help="caller processes (default 2)")
    ap.add_argument("--loadgen", choices=("c", "python"), default="c",
                    help="the load generator's workers: bench/sipload.c (default, built on "
                         "first use) or the Python ones of bench/loadgen.py")
    ap.add_argument("--kamailio-args", default="",
                    help="more command line options for every Kamailio, e.g. '-x tlsf' (the "
                         "memory manager: Debian's default is q_malloc)")
    # Shared memory holds every transaction (an INVITE's lives 5 s past its final reply)
    # and dialog: at -m 512 both Kamailios ran out of it at 3,300 CPS on a fast machine
    # (500 "No error (2/SL)": E_OUT_OF_MEM), which capped the native below its CPU and made
    # the ratio look better than it is (bench/RESULTS.md, fifteenth session). Each system
    # gets what an operator would give it for this load.
    ap.add_argument("--shm", type=int, default=2048,
                    help="shared memory of every Kamailio, MB (-m; default 2048)")
    # Kamailio's usual sizing is about two SIP workers per core; on this benchmark's 2-core
    # machines 8 workers (and 4 http_async_client workers) cost both Kamailios more CPU per
    # call than 4 (and 2): bench/RESULTS.md, twelfth session.
    ap.add_argument("--kam-workers", type=int, default=2 * CORES,
                    help=f"SIP worker processes of every Kamailio (WORKERS; default twice the "
                         f"cores: {2 * CORES})")
    ap.add_argument("--http-workers", type=int, default=CORES,
                    help=f"http_async_client workers of the project's (and the floor's) "
                         f"Kamailio (HTTP_WORKERS; default the cores: {CORES})")
    ap.add_argument("--systems", default="project,floor,native",
                    help="which to run, in this order per step (default project,floor,native)")
    ap.add_argument("--route", choices=["extension", "trunk"], default="extension",
                    help="project calls go to the callee extension's static contact "
                         "(default) or to an external number through the trunk")
    ap.add_argument("--keep-going", action="store_true",
                    help="run every step even after a system failed one")
    ap.add_argument("--sync-commit", choices=["on", "off"],
                    help="SIDECAR_DB_SYNCHRONOUS_COMMIT for the sidecar (default: not set, "
                         "the sidecar's own default)")
    ap.add_argument("--quiet", action="store_true",
                    help="sidecar at WARNING, both Kamailios at LOG_LEVEL=1 (default: as "
                         "shipped, INFO and 2)")
    ap.add_argument("--define", action="append", default=[],
                    help="extra -A define for the project's Kamailio (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir with the logs")
    args = ap.parse_args()
    rates = [float(x) for x in (args.rates or (QUICK_RATES if args.quick else RATES)).split(",")]
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    warm = 1.0 if args.quick else 2.0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(systems) <= {"project", "floor", "native"} or not systems:
        ap.error("--systems takes project, floor and/or native")
    install_sigterm()

    print(f"SIP side by side: {', '.join(systems)}; steps {','.join(f'{x:g}' for x in rates)} "
          f"CPS x {seconds:g} s, calls of {args.hold * 1000:g} ms, {args.workers} caller "
          f"processes + 1 callee process; {CORES} cores, load average before: {loadavg()}; "
          f"{machine_speed()}",
          flush=True)
    print("CAVEAT: the load generator, both Kamailios, the sidecar and PostgreSQL share this "
          "machine's cores (and so does whatever else runs on it: see other%).", flush=True)

    stack = Stack(keep=args.keep)
    lg: LoadGen | None = None
    db: Db | None = None
    problems: list[str] = []
    sysmap: dict[str, System] = {}
    try:
        say(f"starting the load generator ({args.workers} callers on {APP_IP}, callee on "
            f"{UAS_IP}; {args.loadgen} workers)")
        lg = LoadGen(args.workers, APP_IP, UAS_IP, impl=args.loadgen)
        if lg.impl != args.loadgen:
            problems.append(f"the load generator runs {lg.impl} workers, not {args.loadgen}")
        uas_port = lg.uas_addr[1]
        meter = CpuMeter()
        meter.add("loadgen", lg.pids())
        sc_url = ""
        kam_log = "" if not args.quiet else "LOG_LEVEL=1"
        db_url = ""
        if "project" in systems or "floor" in systems:
            say("starting a private PostgreSQL (scripts/pgcluster.sh)")
            db_url = stack.start_postgres()
        if "project" in systems:
            say("sidecar migrate; sidecar import of the benchmark configuration")
            stack.sidecar_cli("migrate")
            stack.load_config(bench_config(uas_port))
            env: dict[str, str] = {}
            if args.sync_commit:
                env["SIDECAR_DB_SYNCHRONOUS_COMMIT"] = args.sync_commit
            if args.quiet:
                env["SIDECAR_LOG_LEVEL"] = "WARNING"
            say("starting the sidecar (sidecar serve)")
            sc, sc_url = stack.start_sidecar(**env)
            dburl = db_url.replace("postgresql://", "postgres://", 1).split("?")[0]
            defines = [f'DBURL="{dburl}"', f'SIDECAR_URL="{sc_url}"', 'NODE_ID="bench-1"',
                       f"WORKERS={args.kam_workers}", f"HTTP_WORKERS={args.http_workers}",
                       *KEEPALIVE, *([kam_log] if kam_log else []),
                       *args.define]
            say("starting the project's Kamailio (kamailio/kamailio.cfg)")
            kp, kport = stack.start_kamailio("project", PROJECT_CFG, defines,
                                                  shm_mb=args.shm,
                                                  extra=args.kamailio_args.split())
            db = Db(db_url)
            meter.add("sidecar", [sc.pid])
            meter.add("pg", [stack.postmaster_pid()])
            meter.add("kam-project", [kp.pid])
            sysmap["project"] = System("project", kport,
                                       NUMBER if args.route == "trunk" else "callee",
                                       ["kam-project", "sidecar", "pg"])
        if "floor" in systems:
            say("starting the allow server (bench/allow_server.py) and a Kamailio with "
                "kamailio/kamailio.cfg asking it")
            ap_, allow_url = stack.start_allow_server(f"sip:callee@{UAS_IP}:{uas_port}")
            dburl = db_url.replace("postgresql://", "postgres://", 1).split("?")[0]
            defines = [f'DBURL="{dburl}"', f'SIDECAR_URL="{allow_url}"', 'NODE_ID="bench-floor"',
                       f"WORKERS={args.kam_workers}", f"HTTP_WORKERS={args.http_workers}",
                       *KEEPALIVE, *([kam_log] if kam_log else []),
                       *args.define]
            fp, fport = stack.start_kamailio("floor", PROJECT_CFG, defines,
                                                  shm_mb=args.shm,
                                                  extra=args.kamailio_args.split())
            meter.add("kam-floor", [fp.pid])
            meter.add("allow", [ap_.pid])
            sysmap["floor"] = System("floor", fport, "callee", ["kam-floor", "allow"])
        if "native" in systems:
            say("starting the native Kamailio (bench/kamailio-native.cfg)")
            defines = [f'CALLEE="{UAS_IP}:{uas_port}"', f"WORKERS={args.kam_workers}",
                       f"CALL_LIMIT={BIG}", *([kam_log] if kam_log else [])]
            np_, nport = stack.start_kamailio("native", NATIVE_CFG, defines,
                                                  shm_mb=args.shm,
                                                  extra=args.kamailio_args.split())
            meter.add("kam-native", [np_.pid])
            sysmap["native"] = System("native", nport, "callee", ["kam-native"])
        print(f"sidecar: {sc_url or '-'} (SIDECAR_DB_SYNCHRONOUS_COMMIT="
              f"{args.sync_commit or 'not set'}, log level "
              f"{'WARNING' if args.quiet else 'as shipped'}); project route: {args.route}; "
              f"Kamailio log level {'1' if args.quiet else 'as shipped'}; Kamailio options "
              f"-m {args.shm} {args.kamailio_args or '(q_malloc)'}; SIP workers {args.kam_workers} "
              f"each, http_async_client workers {args.http_workers}", flush=True)

        ctl0 = control_requests(sc_url) if sc_url else None
        project_calls = 0

        for s in sysmap.values():
            say(f"warm-up: {warm:g} s at 100 CPS on {s.name}")
            s.warm = lg.step(("127.0.0.1", s.port), s.to_user, "app", 100, warm, args.hold)
            if s.name == "project":
                project_calls += s.warm.sent
            if s.warm.failed:
                problems.append(f"{s.name} warm-up: {dict(s.warm.failures)}")

        pending: Row | None = None  # the project step whose commit window is open

        def close_pending(wait: bool) -> None:
            nonlocal pending
            if pending is None or db is None:
                return
            left = pending.end + COMMIT_GAP - time.time()
            if left > 0:
                if not wait:
                    return
                time.sleep(left)
            assert pending.c0 is not None
            pending.commits = db.xact_commit() - pending.c0
            pending = None

        print()
        print(HEAD)
        for rate in rates:
            for name in systems:
                s = sysmap[name]
                if s.stopped:
                    continue
                close_pending(wait=name == "project")
                c0 = None
                if name == "project" and db is not None:
                    c0 = db.xact_commit()
                x0 = db.next_xid() if db is not None and name == "project" else None
                cpu0, box0, u0 = meter.sample(), box_cpu(), udp_socket_drops()
                st0 = cpu_steal()
                r = lg.step(("127.0.0.1", s.port), s.to_user, "app", rate, seconds, args.hold)
                cpu1, box1, u1 = meter.sample(), box_cpu(), udp_socket_drops()
                st1 = cpu_steal()
                d = CpuMeter.delta(cpu0, cpu1)
                cpu = {"loadgen": d["loadgen"]}
                for g in s.cpu_groups:
                    # (the floor's allow server in the sidecar's column)
                    cpu["kam" if g.startswith("kam") else "sidecar" if g == "allow" else g] = d[g]
                row = Row(name, rate, r, cpu, box1[0] - box0[0], box1[1] - box0[1])
                row.ours = sum(d.values())
                row.steal = st1 - st0
                kam_sock = ("127.0.0.1", s.port)
                row.drops_kam = u1.get(kam_sock, 0) - u0.get(kam_sock, 0)
                row.drops_lg = sum(u1.get(a, 0) - u0.get(a, 0) for a in lg.addrs())
                row.end = time.time()
                if x0 is not None and db is not None:
                    row.xids = db.next_xid() - x0
                if name == "project":
                    project_calls += r.sent
                    row.c0 = c0
                    pending = row
                s.rows.append(row)
                print_row(row)
                if r.failed and not args.keep_going:
                    s.stopped = True
                    say(f"{name} failed calls at {rate:g} CPS: no higher step for it")
                    # let its backlog drain before the next step measures anything
                    quiet_wait(meter, s.cpu_groups)
                else:
                    time.sleep(0.5)
            if all(sysmap[n].stopped for n in systems):
                break
        checks: list[str] = []
        if "project" in sysmap and db is not None:
            say("checking GET /v1/usage and counter_drift()")
            failed_any = any(row.r.failed for row in sysmap["project"].rows)
            wait = USAGE_WAIT_AFTER_FAILURE if failed_any else 15
            t0 = time.time()
            busy, nfig = wait_usage_zero(sc_url, timeout=wait)
            took = time.time() - t0
            checks.append(f"GET /v1/usage after the run: {'all 0' if not busy else busy} "
                          f"({nfig} active figures; {took:.1f} s after the last step)")
            if nfig == 0:
                problems.append("GET /v1/usage holds no `active` figure: its shape changed?")
            if busy:
                problems.append(f"usage not back to 0 within {wait} s: {busy}")
            drift = db.drift()
            checks.append(f"SELECT count(*) FROM counter_drift(): {drift}")
            if drift:
                problems.append(f"counter_drift() lists {drift} counters")
            ctl1 = control_requests(sc_url)
            if ctl0 is not None and ctl1 is not None:
                d = {k: ctl1.get(k, 0) - ctl0.get(k, 0) for k in ctl1}
                proj = sysmap["project"]
                completed = sum(row.r.completed for row in proj.rows) + (
                    proj.warm.completed if proj.warm else 0)
                checks.append(
                    "control requests the sidecar answered 200 (/metrics, best effort): "
                    + (", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items())) or "none")
                    + f"; calls sent {project_calls}, completed {completed}")
                checks.append(f"  (informational: the answer/release path may batch; admit "
                              f"{'=' if d.get('admit', 0) == project_calls else '!='} calls "
                              f"sent)")
            else:
                checks.append("control requests per call: /metrics has no "
                              "sidecar_http_requests_total by route (not checked)")
            if pending is not None:
                say(f"waiting for PostgreSQL's statistics of the last project step "
                    f"(up to {COMMIT_GAP:g} s after it)")
                close_pending(wait=True)

        print()
        print("Every step, commits per call included:")
        print(HEAD)
        for rate in rates:
            for name in systems:
                for row in sysmap[name].rows:
                    if row.rate == rate:
                        print_row(row)
        print()
        summary(sysmap, systems, rates, seconds, args.hold)
        if checks:
            print()
            for line in checks:
                print(line)
    except KeyboardInterrupt:
        problems.append("interrupted")
    except Exception:
        stack.failed = True  # keep the logs
        raise
    finally:
        code = finish(stack, problems, lg, db)
    return code


def quiet_wait(meter: CpuMeter, groups: list[str], limit: float = 15.0) -> None:
    """Wait (up to `limit` s) until `groups` use less than 20 % of a core."""
    end = time.time() + limit
    a = meter.sample()
    while time.time() < end:
        time.sleep(0.5)
        b = meter.sample()
        if sum(b[g] - a[g] for g in groups) < 0.1:
            return
        a = b


def summary(sysmap: dict[str, System], systems: list[str], rates: list[float], seconds: float,
            hold: float) -> None:
    print(f"Highest offered rate with zero failed calls ({seconds:g} s steps, "
          f"{hold * 1000:g} ms calls):")
    best: dict[str, Row | None] = {}
    for name in systems:
        s = sysmap[name]
        b = s.best()
        best[name] = b
        if b is None:
            print(f"  {name:<8} none (failed at the first step, {rates[0]:g} CPS)")
            continue
        top = "" if any(row.r.failed for row in s.rows) else "  (no failure up to the last step)"
        print(f"  {name:<8} {b.rate:>6g} CPS   setup p50 {fmt(b.r.q(0.5), 2)} ms, "
              f"p99 {fmt(b.r.q(0.99), 2)} ms{top}")
    if "project" in best and "native" in best:
        p, n = best["project"], best["native"]
        p_top = not any(row.r.failed for row in sysmap["project"].rows)
        n_top = not any(row.r.failed for row in sysmap["native"].rows)
        if p is not None and n is not None:
            ratio = p.rate / n.rate
            if p_top and n_top:
                print("  ratio project/native: not measured, neither failed up to the last "
                      "step (add higher --rates)")
            elif n_top:  # native's ceiling is above the last step: the true ratio is lower
                verdict = "NOT met" if ratio < 0.8 else "undetermined (add higher --rates)"
                print(f"  ratio project/native: <= {ratio:.2f}, the native never failed "
                      f"(target >= 0.80: {verdict})")
            elif p_top:
                verdict = "met" if ratio >= 0.8 else "undetermined (add higher --rates)"
                print(f"  ratio project/native: >= {ratio:.2f}, the project never failed "
                      f"(target >= 0.80: {verdict})")
            else:
                print(f"  ratio project/native: {ratio:.2f} (target >= 0.80: "
                      f"{'met' if ratio >= 0.8 else 'NOT met'})")
        elif p is None:
            print("  ratio project/native: 0 (the project failed at the first step; target "
                  ">= 0.80: NOT met)")
        common = [r for r in rates
                  if any(row.rate == r and not row.r.failed for row in sysmap["project"].rows)
                  and any(row.rate == r and not row.r.failed for row in sysmap["native"].rows)]
        if common:
            r = max(common)
            pr = next(row for row in sysmap["project"].rows if row.rate == r)
            nr = next(row for row in sysmap["native"].rows if row.rate == r)
            print(f"  at {r:g} CPS (the highest both carried): setup p50/p99 native "
                  f"{fmt(nr.r.q(0.5), 2)}/{fmt(nr.r.q(0.99), 2)} ms, project "
                  f"{fmt(pr.r.q(0.5), 2)}/{fmt(pr.r.q(0.99), 2)} ms; Kamailio CPU per call "
                  f"native {fmt(nr.per_call_ms('kam'), 3)} ms, project "
                  f"{fmt(pr.per_call_ms('kam'), 3)} ms")
    for a, b_ in (("floor", "native"), ("project", "floor")):
        if a in best and b_ in best and best[a] is not None and best[b_] is not None:
            x, y = best[a], best[b_]
            assert x is not None and y is not None
            a_top = not any(row.r.failed for row in sysmap[a].rows)
            b_top = not any(row.r.failed for row in sysmap[b_].rows)
            bound = "" if not (a_top or b_top) else ">= " if a_top and not b_top else (
                "<= " if b_top and not a_top else "? ")
            print(f"  ratio {a}/{b_}: {bound}{x.rate / y.rate:.2f}")
    if "project" in best and best["project"] is not None:
        b = best["project"]
        assert b is not None
        commits = fmt(b.commits / b.calls, 2) if b.commits is not None else "-"
        print(f"  project at {b.rate:g} CPS, per call: sidecar {fmt(b.per_call_ms('sidecar'), 3)}"
              f" ms CPU, PostgreSQL {fmt(b.per_call_ms('pg'), 3)} ms CPU, {commits} commits "
              f"({fmt(b.xids / b.calls, 2) if b.xids is not None else '-'} writing)")
    lg = [row.share(row.cpu["loadgen"]) for name in systems for row in sysmap[name].rows]
    if lg:
        worst = max(lg)
        print(f"  load generator: at most {worst:.0f} % of the {CORES} cores in any step "
              f"(about {worst * CORES:.0f} % of one core)")
    rows = [row for name in systems for row in sysmap[name].rows]
    if rows:
        # counted in box%: time this machine's cores ran another guest instead of ours
        print(f"  steal (the hypervisor's other guests): {fmt_steal(rows)}")


def fmt_steal(rows: list[Row]) -> str:
    """Steal over the steps, as a share of all cores: in all, and in the worst step."""
    total = sum(r.box_total for r in rows)
    worst = max(r.share(r.steal) for r in rows)
    return (f"{100 * sum(r.steal for r in rows) / total:.1f} % of the {CORES} cores over the "
            f"steps, at most {worst:.1f} % in one")


if __name__ == "__main__":
    sys.exit(main())
