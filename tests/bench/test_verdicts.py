"""The benchmark's target verdicts (bench/run.py `verdicts`) on hand-made rows."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import run as bench  # noqa: E402


def row(scenario, run, target, p50=0.2, p99=0.5, rate=1000.0, cpu=50.0, rss=20.0, errors=0, dropped=0.0,
        steal=(0, 0)):
    r = {"scenario": scenario, "run": run, "target": target, "achieved_rate": rate, "errors": errors,
         "ttfb_ms": {"p50": p50, "p99": p99}, "cpu_us_per_req": None if target == "direct" else cpu,
         "peak_rss_mb": rss, "steal_ms": {"proxy_cores": steal[0], "load_cores": steal[1]}}
    if target.startswith("llmtap"):
        r["records_dropped"] = dropped
    return r


def table(rows):
    out = {}
    for line in bench.verdicts(rows)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_latency_bounds_are_inclusive_and_per_run():
    rows = [
        row("json 1k/s", 1, "nginx", p50=0.200, p99=0.800),
        row("json 1k/s", 1, "llmtap", p50=0.300, p99=1.000),  # +0.100, 1.25x: both met
        row("json 1k/s", 2, "nginx", p50=0.200, p99=0.800),
        row("json 1k/s", 2, "llmtap", p50=0.301, p99=1.008),  # +0.101, 1.26x: both missed
        row("json 1k/s", 1, "llmtap+clickhouse", p50=9.0, p99=99.0),  # not judged
    ]
    t = table(rows)
    assert t["json 1k/s p50 ≤ nginx + 0.1 ms"] == ["met: 0.300 vs 0.200 (+0.100)", "**missed**: 0.301 vs 0.200 (+0.101)"]
    assert t["json 1k/s p99 ≤ 1.25 × nginx"] == ["met: 1.000 vs 0.800 (1.25×)", "**missed**: 1.008 vs 0.800 (1.26×)"]
    assert t["CPU per request ≤ 2 × nginx"][0] == "met: worst json 1k/s: 50 vs 50 µs (1.00×)"
    assert t["peak RSS at json 1k/s < 50 MB"] == ["met: 20.0 MB", "met: 20.0 MB"]


def test_throughput_cpu_rss_and_dropped_records():
    rows = [
        row("closed 64 conns", 1, "nginx", rate=30000, cpu=30),
        row("closed 64 conns", 1, "llmtap", rate=23000, cpu=61),
        row("json 5k/s", 1, "nginx"),
        row("json 5k/s", 1, "llmtap", dropped=None),
        row("1000 open streams", 1, "llmtap", rss=150.0),
    ]
    t = table(rows)
    assert t["closed-loop throughput ≥ 0.8 × nginx"] == ["**missed**: 23000 vs 30000 req/s (0.77×)"]
    assert t["CPU per request ≤ 2 × nginx"] == ["**missed**: worst closed 64 conns: 61 vs 30 µs (2.03×)"]
    assert t["peak RSS with 1,000 open streams < 150 MB"] == ["**missed**: 150.0 MB"]
    # A count the proxy did not report is not a zero.
    assert t["json 5k/s: 0 errors, 0 dropped records"] == ["**missed**: 0 errors, ? dropped"]
    # Scenarios that did not run are not judged.
    assert "json 1k/s p50 ≤ nginx + 0.1 ms" not in t
    assert "sse 20 chunks 500/s p99 ≤ 1.25 × nginx" not in t


def test_no_rows_no_table():
    assert bench.verdicts([]) == []


def test_a_verdict_names_the_hosts_steal_beside_its_numbers():
    rows = [
        row("sse 20 chunks 500/s", 1, "nginx", p50=0.5, p99=1.0),
        row("sse 20 chunks 500/s", 1, "llmtap", p50=0.5, p99=2.0, steal=(120, 80)),
        row("sse 20 chunks 500/s", 2, "nginx", p50=0.5, p99=1.0),
        row("sse 20 chunks 500/s", 2, "llmtap", p50=0.5, p99=1.0),
    ]
    t = table(rows)
    # Still judged on the numbers: steal explains a miss, it does not excuse it.
    assert t["sse 20 chunks 500/s p99 ≤ 1.25 × nginx"] == [
        "**missed**: 2.000 vs 1.000 (2.00×; host steal ms, proxy/load cores: llmtap 120/80, nginx 0/0)",
        "met: 1.000 vs 1.000 (1.00×)",
    ]


def test_the_control_is_judged_against_nginx_as_llmtap_is():
    rows = [
        row("json 5k/s", 1, "nginx", p50=0.190, p99=0.300),
        row("json 5k/s", 1, "llmtap", p50=0.195, p99=0.360),
        row("json 5k/s", 1, "nginx-control", p50=0.188, p99=0.690),
    ]
    t = table(rows)
    assert t["json 5k/s p99 ≤ 1.25 × nginx"] == ["met: 0.360 vs 0.300 (1.20×)"]
    # The same proxy as nginx, and a miss: what one round's verdict can resolve here.
    assert t["control (second nginx): json 5k/s p50 ≤ nginx + 0.1 ms"] == ["met: 0.188 vs 0.190 (-0.002)"]
    assert t["control (second nginx): json 5k/s p99 ≤ 1.25 × nginx"] == ["**missed**: 0.690 vs 0.300 (2.30×)"]
    # Without the control target, no control lines.
    assert not any(k.startswith("control") for k in table(rows[:2]))


def test_across_runs_takes_each_targets_median_p99():
    rows = [
        row("json 5k/s", 1, "nginx", p99=0.300), row("json 5k/s", 1, "llmtap", p99=0.900),
        row("json 5k/s", 2, "nginx", p99=0.500), row("json 5k/s", 2, "llmtap", p99=0.400),
        row("json 5k/s", 3, "nginx", p99=0.400), row("json 5k/s", 3, "llmtap", p99=0.600),
        row("json 1k/s", 1, "nginx", p99=0.400), row("json 1k/s", 1, "llmtap", p99=0.500),
        row("json 1k/s", 1, "nginx-control", p99=0.200),
        row("json 1k/s", 2, "nginx", p99=0.600), row("json 1k/s", 2, "llmtap", p99=0.500),
        row("json 1k/s", 2, "nginx-control", p99=0.800),
        row("sse 20 chunks 500/s", 1, "nginx", p99=1.0), row("sse 20 chunks 500/s", 1, "llmtap", p99=1.0),
    ]
    assert bench.across_runs(rows) == [
        "| scenario | runs | nginx | llmtap | control (second nginx) |",
        "|---|---:|---:|---:|---:|",
        # Two runs: the mean of the two; the control when it ran.
        "| json 1k/s | 2 | 0.500 | 0.500 (1.00×) | 0.500 (1.00×) |",
        # Three: the middle one, each target's own (run 1's 0.900 is not llmtap's median).
        "| json 5k/s | 3 | 0.400 | 0.600 (1.50×) | - |",
        # One run of sse: no line.
    ]
    assert bench.across_runs(rows[-2:]) == []
