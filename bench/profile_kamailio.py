"""Where Kamailio's CPU goes per call: the project's kamailio/kamailio.cfg against the native
dialog-profile reference (bench/kamailio-native.cfg), over a fixed number of calls at a
moderate rate, in a way that other load on the machine does not disturb much.

Starts what bench_compare.py starts (a private PostgreSQL, `sidecar migrate` + `import` of
bench_compare's configuration, `sidecar serve`, bench/loadgen.py, both Kamailios on free
ports, the same defines), then for each system: a warm-up, --calls calls at --rate CPS (500
ms each, INVITE 180 200 ACK BYE 200), a pause for the outbox to drain, the counters read
before and after. With --idle, the same window with no call is measured too and subtracted
(timers, the outbox's rtimer, http_async_client's loops: what the machine pays per second
whatever the calls).

  --tool cpu        (default) utime+stime of every Kamailio process (/proc), per call and
                    per process kind (kamcmd core.psx). CPU time, not wall time: other load
                    inflates it only through caches and frequency, a few per cent.
  --tool callgrind  every Kamailio runs under `valgrind --tool=callgrind`, twice per system
                    (forked children cannot be told to zero or dump their counters): once
                    with the calls, once idle as long, each dumping at exit; the difference
                    is instructions (Ir) per call, repeatable whatever the machine does, per
                    process kind, and the top functions (inclusive and self,
                    callgrind_annotate of every process's dump, added up). About 50 times
                    slower: keep --rate low (default 20 with this tool).
  --tool perf       CPU as --tool cpu, plus `perf record -e cpu-clock` over the Kamailio
                    processes during the calls, and the top symbols (perf report).

    .venv/bin/python bench/profile_kamailio.py                         # ~1 min
    .venv/bin/python bench/profile_kamailio.py --tool callgrind        # ~4 min
    .venv/bin/python bench/profile_kamailio.py --tool perf --calls 4000 --rate 400
    .venv/bin/python bench/profile_kamailio.py --systems project --define LOG_LEVEL=1
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compare import APP_IP, BIG, UAS_IP, bench_config  # noqa: E402
from benchlib import (  # noqa: E402
    NATIVE_CFG,
    PROJECT_CFG,
    Proc,
    Stack,
    finish,
    free_port,
    install_sigterm,
    loadavg,
    say,
    sip_options,
    wait_usage_zero,
)
from loadgen import LoadGen  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- Kamailio processes


def descendants(root: int) -> list[int]:
    """root and every process below it, alive now."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(b")") + 2:].split()[1])
        kids[ppid].append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, seconds (0 when gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    f = raw[raw.rfind(b")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def kinds(rundir: Path, pids: list[int]) -> dict[int, str]:
    """pid -> process kind, from `kamcmd core.psx` over the ctl socket (best effort)."""
    out = {p: "?" for p in pids}
    sock = rundir / "kamailio_ctl"
    try:
        r = subprocess.run(["kamcmd", "-s", f"unix:{sock}", "core.psx"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return out
    cur: int | None = None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*PID:\s*(\d+)", line)
        if m:
            cur = int(m.group(1))
            continue
        m = re.match(r"\s*DSC:\s*(.*)", line)
        if m and cur is not None:
            out[cur] = simplify(m.group(1).strip())
    return out


def simplify(dsc: str) -> str:
    """'udp receiver child=4 sock=127.0.0.1:5070' -> 'udp receiver', 'RTIMER EXEC child=0
    timer=outbox' -> 'rtimer outbox', 'Http Async Worker' -> 'http async worker'."""
    m = re.match(r"RTIMER EXEC.*timer=(\S+)", dsc)
    if m:
        return f"rtimer {m.group(1)}"
    dsc = re.sub(r"\s+(child|sock)=\S+", "", dsc)
    dsc = re.sub(r"\s*\(generic\)", "", dsc)
    return dsc.strip().lower() or "?"


# ---------------------------------------------------------------- one system


class Kam:
    """One Kamailio (optionally under callgrind) on a free port."""

    def __init__(self, stack: Stack, name: str, cfg: Path, defines: list[str], tool: str,
                 extra: list[str] | None = None):
        self.name, self.tool = name, tool
        self.outdir = Path(tempfile.mkdtemp(prefix=f"cg-{name}-", dir=stack.workdir))
        for _ in range(5):
            port = free_port()
            self.rundir = stack.workdir / f"run-{name}-{port}"
            self.rundir.mkdir()
            args = ["-f", str(cfg), "-A", f"LISTEN_UDP=udp:127.0.0.1:{port}",
                    "-A", f"LISTEN_TCP=tcp:127.0.0.1:{port}"]
            for d in defines:
                args += ["-A", d]
            r = subprocess.run(["kamailio", "-c", *args], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"kamailio -c {cfg} failed:\n{r.stdout}\n{r.stderr}")
            argv = ["kamailio", *args, "-DD", "-E", "-Y", str(self.rundir), "-m", "512",
                    "-M", "32", *(extra or [])]
            if tool == "callgrind":
                argv = ["valgrind", "--tool=callgrind", "--vgdb=no", "--separate-threads=no",
                        f"--callgrind-out-file={self.outdir}/callgrind.out.%p", *argv]
            self.proc = Proc(f"kamailio-{name}", argv, stack.workdir / f"kam-{name}-{port}.log")
            stack.procs.append(self.proc)
            end = time.monotonic() + (180 if tool == "callgrind" else 20)
            while time.monotonic() < end and self.proc.alive():
                if sip_options(("127.0.0.1", port), 1.0) == 200:
                    self.port = port
                    time.sleep(1.0 if tool != "callgrind" else 5.0)
                    self.pids = descendants(self.proc.pid)
                    self.kind = kinds(self.rundir, self.pids)
                    return
                time.sleep(0.3)
            self.proc.stop()
            if not self.proc.bind_failed():
                raise RuntimeError(f"{name} Kamailio not answering OPTIONS:\n{self.proc.tail()}")
        raise RuntimeError(f"{name} Kamailio: no free port")

    # -- CPU --------------------------------------------------------------------------
    def cpu(self) -> dict[int, float]:
        return {p: proc_cpu(p) for p in self.pids}

    # -- callgrind ----------------------------------------------------------------------
    def cg_stop_collect(self) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """Stop this Kamailio (every process dumps at exit) -> (Ir per process kind, function
        -> (self Ir, inclusive Ir) summed over every process). callgrind_annotate reads one
        file at a time: each process's dump is annotated and the figures added up."""
        self.proc.stop(timeout=120)
        per_kind: dict[str, int] = collections.Counter()
        funcs: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for f in sorted(glob.glob(str(self.outdir / "callgrind.out.*"))):
            pid = int(f.rsplit(".", 1)[1])
            ir = 0
            with open(f, errors="replace") as fh:
                for line in fh:
                    if line.startswith("summary:") or line.startswith("totals:"):
                        ir = int(line.split()[1])
                        break
            per_kind[self.kind.get(pid, "?")] += ir
            for col, incl in ((0, False), (1, True)):
                for name, n in annotate(f, incl).items():
                    funcs[name][col] += n
        return per_kind, {k: (v[0], v[1]) for k, v in funcs.items()}


def annotate(path: str, inclusive: bool) -> dict[str, int]:
    """function -> Ir from `callgrind_annotate` of one dump."""
    cmd = ["callgrind_annotate", "--threshold=100", "--auto=no",
           f"--inclusive={'yes' if inclusive else 'no'}", path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    out: dict[str, int] = {}
    for ln in r.stdout.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", ln)
        if m and "PROGRAM TOTALS" not in ln:
            name = re.sub(r"^\S*?:(?=[^:/])", "", m.group(2).strip(), count=1)
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


def run_calls(lg: LoadGen, kam: Kam, to_user: str, calls: int, rate: float,
              drain: float) -> tuple[int, int]:
    r = lg.step(("127.0.0.1", kam.port), to_user, "app", rate, calls / rate, 0.5,
                timeout=30.0 if kam.tool == "callgrind" else 8.0)
    time.sleep(drain)
    return r.sent, r.failed


def by_kind(kam: Kam, d: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = collections.Counter()
    for p, v in d.items():
        out[kam.kind.get(p, "?")] += v
    return out


def perf_top(data: Path, n: int) -> list[str]:
    r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                        "--sort", "dso,sym", "--percent-limit", "0.5"],
                       capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")][:n]


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=["cpu", "callgrind", "perf"], default="cpu")
    ap.add_argument("--calls", type=int, help="calls per system (default 3000; callgrind 300)")
    ap.add_argument("--rate", type=float, help="CPS (default 300; callgrind 20)")
    ap.add_argument("--systems", default="project,native")
    ap.add_argument("--idle", action="store_true",
                    help="also measure an idle window as long as the calls' and subtract it "
                         "(always done with callgrind)")
    ap.add_argument("--define", action="append", default=[],
                    help="extra -A define for the project's Kamailio (repeatable)")
    ap.add_argument("--native-define", action="append", default=[],
                    help="extra -A define for the native Kamailio (repeatable)")
    ap.add_argument("--project-cfg", default=str(PROJECT_CFG),
                    help="the project's config (default kamailio/kamailio.cfg)")
    ap.add_argument("--kamailio-args", default="",
                    help="extra command line options for both Kamailios, e.g. '-x tlsf' "
                         "(the memory manager)")
    ap.add_argument("--top", type=int, default=30, help="functions/symbols listed (default 30)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, dumps)")
    args = ap.parse_args()
    cg = args.tool == "callgrind"
    calls = args.calls or (300 if cg else 3000)
    rate = args.rate or (20.0 if cg else 300.0)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    install_sigterm()
    if args.tool == "perf" and not shutil.which("perf"):
        print("perf is not installed", file=sys.stderr)
        return 2
    if cg and not shutil.which("valgrind"):
        print("valgrind is not installed", file=sys.stderr)
        return 2

    print(f"Kamailio per call, tool {args.tool}: {calls} calls at {rate:g} CPS (500 ms each) "
          f"per system; {os.cpu_count()} cores, load average before: {loadavg()}", flush=True)
    stack = Stack(keep=args.keep)
    lg: LoadGen | None = None
    problems: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        lg = LoadGen(2, APP_IP, UAS_IP)
        uas_port = lg.uas_addr[1]
        setups: dict[str, tuple[Path, list[str]]] = {}
        sc_url = ""
        if "project" in systems:
            say("starting a private PostgreSQL, migrate, import, sidecar serve")
            db_url = stack.start_postgres()
            stack.sidecar_cli("migrate")
            stack.load_config(bench_config(uas_port))
            _, sc_url = stack.start_sidecar(SIDECAR_LOG_LEVEL="WARNING")
            dburl = db_url.replace("postgresql://", "postgres://", 1).split("?")[0]
            setups["project"] = (Path(args.project_cfg), [
                f'DBURL="{dburl}"', f'SIDECAR_URL="{sc_url}"', 'NODE_ID="bench-1"', "WORKERS=8",
                *(["SIDECAR_TIMEOUT=3000"] if cg else []), *args.define])
        if "native" in systems:
            setups["native"] = (NATIVE_CFG, [f'CALLEE="{UAS_IP}:{uas_port}"', "WORKERS=8",
                                             f"CALL_LIMIT={BIG}", *args.native_define])

        drain = 5.0 if cg else 1.5
        window = calls / rate + 0.5 + drain  # what run_calls takes, about
        for name in systems:
            cfg, defines = setups[name]
            res: dict[str, Any] = {}
            if cg:
                # one Kamailio per phase (forked children cannot be told to zero or dump
                # their counters): the same start and warm-up, then either the calls or as
                # long idle; the difference is the calls' cost
                for phase in ("idle", "calls"):
                    say(f"{name}: starting Kamailio under callgrind ({phase} run)")
                    kam = Kam(stack, name, cfg, defines, args.tool, args.kamailio_args.split())
                    warm_up(lg, kam, rate, drain, problems)
                    t0 = time.monotonic()
                    if phase == "calls":
                        say(f"{name}: {calls} calls at {rate:g} CPS")
                        sent, failed = run_calls(lg, kam, "callee", calls, rate, drain)
                        res["sent"], res["window"] = sent, time.monotonic() - t0
                        if failed:
                            problems.append(f"{name}: {failed} of {sent} calls failed")
                    else:
                        time.sleep(window)
                    say(f"{name}: stopping ({phase} run), reading the dumps")
                    res[f"{phase}_ir"], res[f"{phase}_fn"] = kam.cg_stop_collect()
                    stack.procs.remove(kam.proc)
                res["ir"] = res["calls_ir"]
                results[name] = res
                continue
            say(f"{name}: starting Kamailio")
            kam = Kam(stack, name, cfg, defines, args.tool, args.kamailio_args.split())
            warm_up(lg, kam, rate, drain, problems)
            c0 = kam.cpu()
            perf = None
            if args.tool == "perf":
                data = stack.workdir / f"perf-{name}.data"
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o", str(data),
                     "-p", ",".join(map(str, kam.pids))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            t0 = time.monotonic()
            say(f"{name}: {calls} calls at {rate:g} CPS")
            sent, failed = run_calls(lg, kam, "callee", calls, rate, drain)
            res["sent"], res["window"] = sent, time.monotonic() - t0
            if perf is not None:
                perf.send_signal(2)
                perf.wait(60)
            c1 = kam.cpu()
            if failed:
                problems.append(f"{name}: {failed} of {sent} calls failed")
            res["cpu"] = by_kind(kam, {p: c1[p] - c0.get(p, 0.0) for p in c1})
            if args.idle:
                say(f"{name}: idle window of {res['window']:.0f} s")
                i0 = kam.cpu()
                time.sleep(res["window"])
                i1 = kam.cpu()
                res["idle_cpu"] = by_kind(kam, {p: i1[p] - i0.get(p, 0.0) for p in i1})
            if args.tool == "perf":
                res["perf"] = perf_top(stack.workdir / f"perf-{name}.data", args.top)
            results[name] = res

        report(results, systems, cg, args.top)
        if sc_url:
            busy, _ = wait_usage_zero(sc_url, timeout=30)
            print(f"GET /v1/usage after the run: {'all 0' if not busy else busy}")
            if busy:
                problems.append(f"usage not back to 0: {busy}")
    except KeyboardInterrupt:
        problems.append("interrupted")
    except Exception:
        stack.failed = True
        raise
    finally:
        code = finish(stack, problems, lg)
    return code


def warm_up(lg: LoadGen, kam: Kam, rate: float, drain: float, problems: list[str]) -> None:
    say(f"{kam.name}: warm-up")
    n = max(20, int(rate * 2))
    sent, failed = run_calls(lg, kam, "callee", n, rate, drain)
    if failed:
        problems.append(f"{kam.name} warm-up: {failed} of {sent} calls failed")


def report(results: dict[str, dict[str, Any]], systems: list[str], cg: bool, top: int) -> None:
    print()
    if cg:
        print(f"{'system':<8} {'calls':>6} {'window s':>8} | {'Minstr/call':>11}  (calls run "
              f"minus idle run, every Kamailio process)")
    else:
        print(f"{'system':<8} {'calls':>6} {'window s':>8} | {'CPU ms/call':>11} "
              f"{'idle-adj':>8}  (utime+stime, every Kamailio process)")
    for name in systems:
        r = results.get(name)
        if r is None:
            continue
        n = r["sent"] or 1
        if cg:
            ir = sum(r["calls_ir"].values()) - sum(r["idle_ir"].values())
            print(f"{name:<8} {r['sent']:>6} {r['window']:>8.1f} | {ir / n / 1e6:>11.3f}")
            continue
        cpu = sum(r["cpu"].values())
        adj = cpu - sum(r["idle_cpu"].values()) if "idle_cpu" in r else None
        print(f"{name:<8} {r['sent']:>6} {r['window']:>8.1f} | {1000 * cpu / n:>11.3f} "
              f"{(f'{1000 * adj / n:.3f}' if adj is not None else '-'):>8}")
    for name in systems:
        r = results.get(name)
        if r is None:
            continue
        n = r["sent"] or 1
        print(f"\n{name}: per process kind, per call")
        if cg:
            ci, ii = r["calls_ir"], r["idle_ir"]
            for k in sorted(set(ci) | set(ii), key=lambda k: -(ci.get(k, 0) - ii.get(k, 0))):
                d = ci.get(k, 0) - ii.get(k, 0)
                if abs(d) / n >= 100:
                    print(f"  {k:<28} {d / n / 1e3:9.1f} kinstr")
            cf, inf = r["calls_fn"], r["idle_fn"]
            for col, title in ((1, "inclusive"), (0, "self")):
                print(f"\n{name}: top functions, {title}, kinstr per call (calls run minus "
                      f"idle run, summed over every process)")
                diffs = {f: cf[f][col] - inf.get(f, (0, 0))[col] for f in cf}
                for f, d in sorted(diffs.items(), key=lambda kv: -kv[1])[:top]:
                    print(f"  {d / n / 1e3:9.2f}  {f}")
            continue
        keys = sorted(r["cpu"], key=lambda k: -r["cpu"][k])
        for k in keys:
            line = f"  {k:<28} CPU {1000 * r['cpu'].get(k, 0) / n:7.3f} ms"
            if "idle_cpu" in r:
                line += f" (idle window {1000 * r['idle_cpu'].get(k, 0) / n:6.3f})"
            print(line)
        if "perf" in r:
            print(f"\n{name}: perf report (cpu-clock samples, self, by dso and symbol)")
            for ln in r["perf"]:
                print("  " + ln)


if __name__ == "__main__":
    sys.exit(main())
