#!/usr/bin/env python3
"""llmtap's benchmark harness: one command, targets side by side in the same run.

    python3 bench/run.py            # full run (about 10 minutes on 2 cores)
    python3 bench/run.py --quick    # shorter scenarios, for a smoke check

Targets, alternating within each round: the mock upstream directly; nginx as a plain
reverse proxy (proxy_buffering off, upstream keepalive); llmtap with capture on (local
log); llmtap shipping to the ClickHouse engine (chdb behind the test adapter, from the
venv `make test` uses, created when missing; `--no-clickhouse` skips this target).
Scenarios: non-streaming at 1,000 and 5,000 req/s (open loop), streaming (20 chunks) at 500 req/s, closed loop with 64 connections,
and 1,000 streams held open (a chunk every 50 ms for 10 s).

Cores: on a machine with two or more, the proxy under test (nginx or llmtap) runs on cores
of its own and the load generator, the mock and the ClickHouse engine on core 0
(`--no-pin` shares every core, as the harness did before). A sidecar gets a CPU limit of its
own in production; sharing two cores with the load generator measured the load generator's
interference more than the proxy.

Open-loop scenarios: direct, nginx and llmtap take turns of one second within a single load
run (`llmtap-load` with several `--url`s), until each has had the scenario's duration; the
ClickHouse target runs on its own after them. Measured one after another, ten seconds apart,
two targets met different machines (the host's and the load core's background moved a p99
by half from one ten seconds to the next); turns spread that over all of them alike.

Open-loop requests come one in each 1/rate slot, at a random point of it, from a schedule
seeded with the run's number, so every target in a round gets the same one (`--arrivals`;
`even`, exactly 1/rate apart, phase-locks with the mock's millisecond timer ticks: each run's
stream TTFT then depends on a random offset, not on the target).

Per target: achieved rate, errors, p50/p90/p99/p99.9/max of time to first byte (TTFT for
streams) and total time, latency added over direct (difference of p50s and of p99s in the
same round), proxy CPU microseconds per request (/proc utime+stime), peak RSS (VmHWM), and
the host's steal time on the proxy's and the load side's cores during the run.
Results: bench/results/<UTC time>.json and .md; the table is printed at the end, followed by
whether each of llmtap's performance targets held against nginx in each run (`verdicts`).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
CLK = os.sysconf("SC_CLK_TCK")

# Cores for the load side (load generator, mock, ClickHouse engine) and for the proxy under
# test; None: no pinning. Set in main().
LOAD_CPUS = None
PROXY_CPUS = None


def pinned(cpus):
    """A preexec_fn that pins the child (and every thread it starts) to `cpus`."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def steal_ticks(cpus):
    """Ticks the hypervisor ran something else on `cpus` (all when None): /proc/stat steal."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and (cpus is None or int(name[3:]) in cpus):
                total += int(fields[7])
    return total


def thread_ticks(pids):
    """CPU ticks per thread name (comm), summed over `pids`: where a proxy's CPU goes."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[comm] = out.get(comm, 0) + int(fields[11]) + int(fields[12])
    return out


def peak_rss_mb(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children_of(pid):
    out = [pid]
    try:
        for c in open(f"/proc/{pid}/task/{pid}/children").read().split():
            out += children_of(int(c))
    except OSError:
        pass
    return out


class Proc:
    def __init__(self, name, args, env=None, port=None, cwd=None, cpus=None):
        self.name = name
        self.port = port
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(args, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  start_new_session=True, preexec_fn=pinned(cpus))

    def pids(self):
        return children_of(self.p.pid)

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=30)
        except Exception:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except Exception:
                pass


def ensure_nginx():
    if shutil.which("nginx"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def start_mock():
    p = Proc("mock", [os.path.join(REL, "llmtap-mock"), "--listen", "127.0.0.1:0"], cpus=LOAD_CPUS)
    addr = p.p.stdout.readline().strip()
    p.port = int(addr.rsplit(":", 1)[1])
    return p


def build():
    """The release binaries the harness runs: llmtap, the mock and the load generator."""
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "llmtap", "-p", "llmtap-testkit", "--bins"], cwd=ROOT,
                   check=True)


def nginx_conf(work, mock_port, port, workers, single_process=False):
    """nginx as a plain reverse proxy to the mock: no buffering, upstream keepalive. With
    `single_process`, one process and no daemon (for valgrind, which follows no fork)."""
    conf = os.path.join(work, "nginx.conf")
    head = "master_process off;\ndaemon off;\n" if single_process else ""
    with open(conf, "w") as f:
        f.write(f"""{head}worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
""")
    return conf


def start_nginx(mock_port, work, name="nginx"):
    port = free_port()
    # One worker per core it may use, as `auto` would choose on a machine of that size.
    workers = len(PROXY_CPUS) if PROXY_CPUS else os.cpu_count()
    work = os.path.join(work, name)
    os.makedirs(work, exist_ok=True)
    conf = nginx_conf(work, mock_port, port, workers)
    p = Proc(name, ["nginx", "-c", conf, "-p", work, "-g", "daemon off;"], port=port, cpus=PROXY_CPUS)
    wait_port(port)
    return p


def start_llmtap(mock_port, work, name, clickhouse_url=None, binary=None):
    port, admin = free_port(), free_port()
    data = os.path.join(work, name)
    env = {"LLMTAP_UPSTREAM_OPENAI": f"http://127.0.0.1:{mock_port}", "LLMTAP_LOG_LEVEL": "warn"}
    if clickhouse_url:
        env["LLMTAP_CLICKHOUSE_URL"] = clickhouse_url
    p = Proc(name, [binary or os.path.join(REL, "llmtap"), "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen",
                    f"127.0.0.1:{admin}", "--data-dir", data], env=env, port=port, cpus=PROXY_CPUS)
    p.admin = admin
    wait_port(port)
    return p


def start_chdb(work):
    py = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(py):
        return None
    p = Proc("chdb", [py, os.path.join(ROOT, "tests", "chdb", "adapter.py"), "--listen", "127.0.0.1:0", "--path",
                      os.path.join(work, "chdb")], cpus=LOAD_CPUS)
    addr = p.p.stdout.readline().strip()
    p.port = int(addr.rsplit(":", 1)[1])
    return p


def metric(p, name):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/metrics", timeout=5).read().decode()
    except Exception:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# How open-loop requests are spread (llmtap-load --arrivals): one in each 1/rate slot at a
# random point, which `even` spacing is not (see the docstring).
ARRIVALS = "slotted"


# Open-loop targets take turns of this many seconds within one llmtap-load run (see the
# README: targets measured 10 s apart meet different machines).
SLICE = 1.0


def load(target_port, sc, path="/v1/chat/completions", arrivals=ARRIVALS, seed=1):
    """One llmtap-load run against one port, or, given a list of ports (open loop), against
    each in turns of SLICE seconds: then a list of reports, in the order of the ports."""
    ports = target_port if isinstance(target_port, list) else [target_port]
    args = [os.path.join(REL, "llmtap-load")]
    for port in ports:
        args += ["--url", f"http://127.0.0.1:{port}{path}"]
    args += ["--mode", sc["mode"], "--duration", str(sc["duration"])]
    if len(ports) > 1:
        args += ["--slice", str(SLICE)]
    if sc["mode"] == "open":
        args += ["--rate", str(sc["rate"]), "--arrivals", arrivals, "--seed", str(seed)]
    else:
        args += ["--connections", str(sc["connections"])]
    if sc.get("stream"):
        args += ["--body", '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}']
    for h in sc.get("headers", []):
        args += ["--header", h]
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True,
                                    preexec_fn=pinned(LOAD_CPUS)).stdout)
    reports = out["targets"] if len(ports) > 1 else [out]
    return reports if isinstance(target_port, list) else reports[0]


def scenarios(quick):
    d = 4 if quick else 10
    return [
        {"name": "json 1k/s", "mode": "open", "rate": 1000, "duration": d},
        {"name": "json 5k/s", "mode": "open", "rate": 5000, "duration": 6 if quick else 20},
        {"name": "sse 20 chunks 500/s", "mode": "open", "rate": 500, "duration": d, "stream": True,
         "headers": ["x-mock-chunks: 20", "x-mock-chunk-delay-ms: 5"]},
        {"name": "closed 64 conns", "mode": "closed", "connections": 64, "duration": d},
        {"name": "1000 open streams", "mode": "streams", "connections": 1000, "duration": 10, "stream": True,
         # 200 pieces need 200 characters of content: the mock never splits finer than one.
         "headers": ["x-mock-chunks: 200", "x-mock-chunk-delay-ms: 50", "x-mock-content: " + "abcdefghij" * 20]},
    ]


# The open-loop scenarios whose latency is judged against nginx's.
LATENCY_SCENARIOS = ("json 1k/s", "json 5k/s", "sse 20 chunks 500/s")


def verdicts(results):
    """Issue 5's targets for llmtap (capture on) against nginx, per run: Markdown lines.

    Latency compares the two targets' own ttfb percentiles from the same round (TTFT for
    streams). Scenarios left out with --only are left out here too."""
    rows = {(r["scenario"], r["run"], r["target"]): r for r in results}
    runs = sorted({r["run"] for r in results})
    checks = []  # (target, {run: (met, text)})

    def per_run(label, fn):
        got = {}
        for run in runs:
            v = fn(run)
            if v is not None:
                got[run] = v
        if got:
            checks.append((label, got))

    def pair(scenario, run, who="llmtap"):
        a, b = rows.get((scenario, run, who)), rows.get((scenario, run, "nginx"))
        return (a, b) if a and b else (None, None)

    def steal(a, b):
        """The host's steal during the two runs, when there was any: such a run's tail is
        the host's (see the README), and the verdict says so beside the numbers."""
        ms = [(r.get("steal_ms") or {}).get(k, 0) for r in (a, b) for k in ("proxy_cores", "load_cores")]
        if not any(ms):
            return ""
        return f"; host steal ms, proxy/load cores: {a['target']} {ms[0]:.0f}/{ms[1]:.0f}, nginx {ms[2]:.0f}/{ms[3]:.0f}"

    # The latency verdicts, for llmtap and then for the control (a second nginx judged the
    # same way, with `--control`): how often the same proxy "misses" says what a single
    # round's verdict can resolve on this machine.
    for who in ("llmtap", "nginx-control"):
        for sc in LATENCY_SCENARIOS:
            def p50(run, sc=sc, who=who):
                a, b = pair(sc, run, who)
                if not a:
                    return None
                d = a["ttfb_ms"]["p50"] - b["ttfb_ms"]["p50"]
                return d <= 0.1, f"{a['ttfb_ms']['p50']:.3f} vs {b['ttfb_ms']['p50']:.3f} ({d:+.3f}{steal(a, b)})"

            def p99(run, sc=sc, who=who):
                a, b = pair(sc, run, who)
                if not a:
                    return None
                x = a["ttfb_ms"]["p99"] / max(b["ttfb_ms"]["p99"], 1e-9)
                return x <= 1.25, f"{a['ttfb_ms']['p99']:.3f} vs {b['ttfb_ms']['p99']:.3f} ({x:.2f}×{steal(a, b)})"

            prefix = "" if who == "llmtap" else "control (second nginx): "
            per_run(f"{prefix}{sc} p50 ≤ nginx + 0.1 ms", p50)
            per_run(f"{prefix}{sc} p99 ≤ 1.25 × nginx", p99)

    def throughput(run):
        a, b = pair("closed 64 conns", run)
        if not a:
            return None
        x = a["achieved_rate"] / max(b["achieved_rate"], 1e-9)
        return x >= 0.8, f"{a['achieved_rate']:.0f} vs {b['achieved_rate']:.0f} req/s ({x:.2f}×{steal(a, b)})"

    def cpu(run):
        worst = None
        for (sc, r, t), a in rows.items():
            b = rows.get((sc, r, "nginx"))
            if r != run or t != "llmtap" or not b or not a["cpu_us_per_req"] or not b["cpu_us_per_req"]:
                continue
            x = a["cpu_us_per_req"] / b["cpu_us_per_req"]
            if worst is None or x > worst[0]:
                worst = (x, sc, a["cpu_us_per_req"], b["cpu_us_per_req"])
        if worst is None:
            return None
        x, sc, a, b = worst
        return x <= 2, f"worst {sc}: {a:.0f} vs {b:.0f} µs ({x:.2f}×)"

    def rss(sc, cap):
        def check(run):
            a = rows.get((sc, run, "llmtap"))
            return None if not a else (a["peak_rss_mb"] < cap, f"{a['peak_rss_mb']:.1f} MB")
        return check

    def clean(run):
        a = rows.get(("json 5k/s", run, "llmtap"))
        if not a:
            return None
        dropped = a.get("records_dropped")
        ok = a["errors"] == 0 and dropped == 0
        return ok, f"{a['errors']} errors, {'?' if dropped is None else f'{dropped:.0f}'} dropped"

    per_run("closed-loop throughput ≥ 0.8 × nginx", throughput)
    per_run("CPU per request ≤ 2 × nginx", cpu)
    per_run("peak RSS at json 1k/s < 50 MB", rss("json 1k/s", 50))
    per_run("peak RSS with 1,000 open streams < 150 MB", rss("1000 open streams", 150))
    per_run("json 5k/s: 0 errors, 0 dropped records", clean)
    if not checks:
        return []
    lines = ["| target | " + " | ".join(f"run {r}" for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for label, got in checks:
        cells = [("met: " if got[r][0] else "**missed**: ") + got[r][1] if r in got else "-" for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def across_runs(results):
    """Markdown lines: each open-loop scenario's median over the runs of each target's ttfb
    p99, and its ratio to nginx's. One run's p99 moves with the machine's stalls (see the
    README); the median of several says more than any one of them. Empty with fewer than
    two runs."""
    targets = ("nginx", "llmtap", "nginx-control")
    lines = []
    for sc in LATENCY_SCENARIOS:
        p99 = {t: [r["ttfb_ms"]["p99"] for r in results if r["scenario"] == sc and r["target"] == t] for t in targets}
        if len(p99["nginx"]) < 2 or not p99["llmtap"]:
            continue
        med = {t: statistics.median(v) for t, v in p99.items() if v}
        cells = [f"{med[t]:.3f}" + ("" if t == "nginx" else f" ({med[t] / med['nginx']:.2f}×)") if t in med else "-"
                 for t in targets]
        lines.append(f"| {sc} | {len(p99['nginx'])} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["| scenario | runs | nginx | llmtap | control (second nginx) |", "|---|---:|---:|---:|---:|"] + lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--only", help="comma-separated scenario name prefixes")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-clickhouse", action="store_true", help="skip the llmtap+clickhouse target")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another llmtap binary (an earlier build, say) to run as target 'baseline' in every round")
    ap.add_argument("--control", action="store_true",
                    help="run a second nginx as target 'nginx-control' in the open-loop rounds and judge it "
                         "against nginx as llmtap is: the verdicts' noise floor on this machine")
    ap.add_argument("--arrivals", choices=["even", "slotted", "poisson"], default=ARRIVALS,
                    help="open-loop schedule (llmtap-load --arrivals; default slotted: one request in each "
                         "1/rate slot at a random point); every target in a round gets the same one")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="proxy on cores of its own, load side on core 0 (default; needs 2+ cores)")
    args = ap.parse_args()
    global LOAD_CPUS, PROXY_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        LOAD_CPUS, PROXY_CPUS = {cpus[0]}, set(cpus[1:])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    ensure_nginx()
    if not args.no_clickhouse:
        # The ClickHouse engine (chdb) lives in the venv the test suite uses.
        subprocess.run(["make", "-s", ".venv/.installed"], cwd=ROOT, check=True)
    if not args.no_build:
        build()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = []
    for sc in scenarios(args.quick):
        if args.only and not any(sc["name"].startswith(o.strip()) for o in args.only.split(",")):
            continue
        work = tempfile.mkdtemp(prefix="llmtap-bench-")
        mock = start_mock()
        chdb = None if args.no_clickhouse else start_chdb(work)
        targets = [("direct", mock), ("nginx", start_nginx(mock.port, work)), ("llmtap", start_llmtap(mock.port, work, "llmtap"))]
        if args.control and sc["mode"] == "open":
            targets.append(("nginx-control", start_nginx(mock.port, work, "nginx-control")))
        if args.baseline:
            targets.append(("baseline", start_llmtap(mock.port, work, "baseline", binary=os.path.abspath(args.baseline))))
        if chdb:
            targets.append(("llmtap+clickhouse", start_llmtap(mock.port, work, "llmtap-ch", f"http://127.0.0.1:{chdb.port}")))
        time.sleep(1)
        for run in range(1, args.runs + 1):
            order = targets if run % 2 else list(reversed(targets))
            round_rows = {}
            # Open loop: direct, nginx and llmtap take turns within one load run; the
            # ClickHouse target runs on its own, so the engine's inserts (on the load side's
            # core) stay out of the others' turns.
            if sc["mode"] == "open":
                groups = [[t for t in order if t[0] != "llmtap+clickhouse"]]
                groups += [[t] for t in order if t[0] == "llmtap+clickhouse"]
            else:
                groups = [[t] for t in order]
            for group in groups:
                engine = chdb if chdb and any(name == "llmtap+clickhouse" for name, _ in group) else None
                engine_before = cpu_ticks(engine.pids()) if engine else 0
                before = {name: (cpu_ticks(proc.pids()), thread_ticks(proc.pids())) for name, proc in group}
                steal_before = steal_ticks(PROXY_CPUS), steal_ticks(LOAD_CPUS)
                reports = load([proc.port for _, proc in group], sc, arrivals=args.arrivals, seed=run)
                steal_after = steal_ticks(PROXY_CPUS), steal_ticks(LOAD_CPUS)
                engine_after = cpu_ticks(engine.pids()) if engine else 0
                for (name, proc), r in zip(group, reports):
                    r.pop("url", None)
                    after, threads_after = cpu_ticks(proc.pids()), thread_ticks(proc.pids())
                    ticks_before, threads_before = before[name]
                    row = {"scenario": sc["name"], "run": run, "target": name, **r}
                    per_req = lambda ticks, n=max(r["requests"], 1): ticks / CLK * 1e6 / n
                    # With turns, a target's CPU includes its idle time in the others' turns.
                    row["cpu_us_per_req"] = None if name == "direct" else per_req(after - ticks_before)
                    # A virtual machine's cores can be taken away by the host for 100 ms at a
                    # time: such a run's tail is the host's, whatever the target. With turns,
                    # every target of the load run shares the run's steal.
                    row["steal_ms"] = {"proxy_cores": (steal_after[0] - steal_before[0]) * 1000 / CLK,
                                       "load_cores": (steal_after[1] - steal_before[1]) * 1000 / CLK}
                    if name.startswith("llmtap") or name == "baseline":
                        row["cpu_us_per_req_by_thread"] = {
                            t: per_req(v - threads_before.get(t, 0)) for t, v in sorted(threads_after.items())
                            if v - threads_before.get(t, 0) > 0}
                    if engine and name == "llmtap+clickhouse":
                        # The test engine shares the machine's 2 cores; its inserts are part of
                        # what this target's tail latency pays for.
                        row["cpu_us_per_req_by_thread"]["(clickhouse engine process)"] = per_req(engine_after - engine_before)
                    if name.startswith("llmtap") or name == "baseline":
                        row["records_dropped"] = metric(proc, "llmtap_trace_log_records_dropped_total")
                    round_rows[name] = row
                    print(f"  {sc['name']:<22} run {run} {name:<18} {r['achieved_rate']:>8.0f}/s errors {r['errors']:<5} "
                          f"ttfb p50 {r['ttfb_ms']['p50']:.3f} p99 {r['ttfb_ms']['p99']:.3f} ms", file=sys.stderr)
                time.sleep(1)
            direct = round_rows["direct"]
            for name, row in round_rows.items():
                row["added_p50_ms"] = row["ttfb_ms"]["p50"] - direct["ttfb_ms"]["p50"]
                row["added_p99_ms"] = row["ttfb_ms"]["p99"] - direct["ttfb_ms"]["p99"]
                results.append(row)
        for name, proc in targets:
            for row in results:
                if row["scenario"] == sc["name"] and row["target"] == name:
                    row["peak_rss_mb"] = peak_rss_mb(proc.pids())
        for _, proc in targets:
            proc.stop()
        if chdb:
            chdb.stop()
        shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    cores = {"load": sorted(LOAD_CPUS), "proxy": sorted(PROXY_CPUS)} if PROXY_CPUS else "shared"
    meta = {"commit": commit, "utc": stamp, "cores": os.cpu_count(), "pinned": cores, "quick": args.quick,
            "arrivals": args.arrivals}
    with open(os.path.join(out_dir, f"{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    where = (f"proxy on cores {sorted(PROXY_CPUS)}, load generator, mock and engine on {sorted(LOAD_CPUS)}"
             if PROXY_CPUS else "every process on every core")
    lines = [f"llmtap benchmark at {commit}, {stamp}, {os.cpu_count()} cores ({where}), {args.arrivals} arrivals", "",
             "| scenario | run | target | req/s | errors | ttfb p50 | p90 | p99 | p99.9 | max | total p99 | added p50 | added p99 | CPU µs/req | peak RSS MB | host steal ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["ttfb_ms"]
        cpu = "-" if r["cpu_us_per_req"] is None else f"{r['cpu_us_per_req']:.0f}"
        st = r["steal_ms"]
        steal = f"{st['proxy_cores']:.0f}" if PROXY_CPUS is None else f"{st['proxy_cores']:.0f} / {st['load_cores']:.0f}"
        lines.append(f"| {r['scenario']} | {r['run']} | {r['target']} | {r['achieved_rate']:.0f} | {r['errors']} | {t['p50']:.3f} | "
                     f"{t['p90']:.3f} | {t['p99']:.3f} | {t['p999']:.3f} | {t['max']:.3f} | {r['total_ms']['p99']:.3f} | "
                     f"{r['added_p50_ms']:+.3f} | {r['added_p99_ms']:+.3f} | {cpu} | {r.get('peak_rss_mb', 0):.1f} | {steal} |")
    md = "\n".join(lines) + "\n\nLatency in ms; ttfb is time to first body byte (TTFT for streams), measured from each request's scheduled send time. Host steal: time the hypervisor ran something else on the machine's cores during the run (proxy's cores / load side's), counted in 10 ms ticks; a run with steal has its tail set by the host, whatever the target. Dropped records: " + \
        ", ".join(f"{r['scenario']}/{r['target']}/run{r['run']}={r['records_dropped']:.0f}" for r in results if r.get("records_dropped") is not None) + "\n"
    md += "\nCPU µs per request by thread (llmtap targets; `llmtap` is the runtime's workers):\n\n" + "\n".join(
        f"- {r['scenario']} run {r['run']} {r['target']}: " +
        ", ".join(f"{t} {v:.1f}" for t, v in r["cpu_us_per_req_by_thread"].items())
        for r in results if r.get("cpu_us_per_req_by_thread")) + "\n"
    verdict = verdicts(results)
    if verdict:
        md += "\nTargets (llmtap with capture on against nginx, same round):\n\n" + "\n".join(verdict) + "\n"
    spread = across_runs(results)
    if spread:
        md += "\nTTFB p99 across the runs (median of each target's, ms; × nginx's median):\n\n" + "\n".join(spread) + "\n"
    with open(os.path.join(out_dir, f"{stamp}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
