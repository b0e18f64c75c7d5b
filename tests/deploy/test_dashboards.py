"""The Grafana dashboards in deploy/grafana/dashboards/: the static checks of
deploy/grafana/check_dashboards.py, and every ClickHouse query expanded as the plugin expands
it and run on the real ClickHouse engine (chdb) against the schema `llmtap migrate --dry-run`
prints, with exact values on known rows. Prometheus expressions go through promtool.

Run with: make deploy-rules   (or .venv/bin/pytest -q tests/deploy). Needs target/debug/llmtap
(`cargo build -p llmtap`; `make deploy-rules` builds it) and promtool (`make deps`); without
them these tests fail rather than skip.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from chdb import session

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
CHECKER = GRAFANA / "check_dashboards.py"
LLMTAP = ROOT / "target" / "debug" / "llmtap"
ADAPTER = ROOT / "tests" / "chdb" / "adapter.py"


# The checkers are scripts in deploy/grafana, importable from there.
sys.path.insert(0, str(CHECKER.parent))
import check_dashboards as cd  # noqa: E402
ALL = cd.ALL
DASHBOARD_FILES = sorted(cd.DASHBOARD_DIR.glob("*.json"))
DASHBOARDS = {p.stem: json.loads(p.read_text()) for p in DASHBOARD_FILES}
TRAFFIC, QUALITY, SIDECAR = DASHBOARDS["llmtap-traffic"], DASHBOARDS["llmtap-quality"], DASHBOARDS["llmtap-sidecar"]
# 12:00:00 to 13:00:00 UTC two days ago, one-minute buckets: recent, because rows older than
# the tables' TTL are dropped as they are inserted.
DAY = (datetime.now(timezone.utc) - timedelta(days=2)).strftime("%Y-%m-%d")
NOON = int(datetime.strptime(f"{DAY} 12:00:00 +0000", "%Y-%m-%d %H:%M:%S %z").timestamp())
RANGE = cd.TimeRange(start=NOON, end=NOON + 3600, interval_s=60)
# One value per variable, for the queries that must also run filtered.
ONE_EACH = {"app": ["a"], "route": ["openai"], "model": ["gpt-4o"], "judge": ["cites_plan"]}


def _id(n: int) -> str:
    return f"{n:032x}"


# Calls in the range: app a (5: three fast successes, a 429, a timeout), app b (2), app "it's"
# (1, a quote in a variable value). One before and one after the range, which nothing counts.
TRACES = f"""
INSERT INTO llm_traces (trace_id, span_id, ts, app, route, provider, operation, request_model, response_model,
    status, error_kind, streamed, duration_ms, ttft_ms, input_tokens, output_tokens, cache_read_tokens,
    cache_write_tokens, reasoning_tokens, cost_usd, tool_calls) VALUES
('{_id(1)}', 's1', '{DAY} 12:00:10.000', 'a', 'openai', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    200, '', true, 100, 50, 100, 20, 10, 0, 0, 0.25, ['search']),
('{_id(2)}', 's2', '{DAY} 12:00:20.000', 'a', 'openai', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    200, '', true, 200, 60, 200, 40, 20, 0, 0, 0.5, ['search', 'search', 'answer']),
('{_id(3)}', 's3', '{DAY} 12:00:30.000', 'a', 'openai', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    200, '', true, 300, 70, 300, 60, 0, 0, 0, 0.75, []),
('{_id(4)}', 's4', '{DAY} 12:01:05.000', 'a', 'openai', 'openai', 'chat', 'gpt-4o', '',
    429, 'http_error', false, 40, 0, 0, 0, 0, 0, 0, 0, []),
('{_id(5)}', 's5', '{DAY} 12:01:10.000', 'a', 'openai', 'openai', 'chat', 'gpt-4o-mini', '',
    504, 'upstream_timeout', true, 30000, 0, 0, 0, 0, 0, 0, 0, []),
('{_id(6)}', 's6', '{DAY} 12:00:40.000', 'b', 'anthropic', 'anthropic', 'messages', 'claude-sonnet-4', 'claude-sonnet-4',
    200, '', true, 1000, 400, 1000, 500, 0, 100, 50, 2.0, ['lookup']),
('{_id(7)}', 's7', '{DAY} 12:30:00.000', 'b', 'anthropic', 'anthropic', 'messages', 'claude-sonnet-4', 'claude-sonnet-4',
    200, '', false, 2000, 800, 10, 5, 0, 0, 0, 1.0, []),
('{_id(11)}', 's11', '{DAY} 12:45:00.000', 'it''s', 'openai', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    200, '', false, 500, 100, 1, 1, 0, 0, 0, 0.25, []),
('{_id(8)}', 's8', '{DAY} 11:59:59.000', 'early', 'early-route', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    500, 'http_error', false, 5, 0, 7, 7, 0, 0, 0, 9.0, ['early_tool']),
('{_id(9)}', 's9', '{DAY} 13:01:00.000', 'late', 'late-route', 'openai', 'chat', 'gpt-4o', 'gpt-4o',
    500, 'http_error', false, 5, 0, 7, 7, 0, 0, 0, 9.0, ['late_tool'])
"""
SCORES_COLUMNS = """INSERT INTO llm_scores (ts, trace_id, span_id, judge, judge_version, judge_kind, app, route,
    request_model, score, passed, label, reasoning, needs_review, error, judge_model, judge_ms, judge_cost_usd) VALUES"""
# cites_plan's first verdict on call 1 failed; its re-run (a later insert, same key) passed.
SCORES = f"""{SCORES_COLUMNS}
('{DAY} 12:00:15.000', '{_id(1)}', 's1', 'cites_plan', '1', 'rule', 'a', 'openai', 'gpt-4o', 0, 0, '', '', 0, '', '', 1, 0),
('{DAY} 12:00:25.000', '{_id(2)}', 's2', 'cites_plan', '1', 'rule', 'a', 'openai', 'gpt-4o', 0, 0, '', '', 0, '', '', 3, 0),
('{DAY} 12:00:35.000', '{_id(3)}', 's3', 'helpfulness', '1', 'llm', 'a', 'openai', 'gpt-4o', 4, 1, 'good', 'cites it', 1, '',
    'gpt-4o-mini', 800, 0.125),
('{DAY} 12:00:36.000', '{_id(2)}', 's2', 'helpfulness', '1', 'llm', 'a', 'openai', 'gpt-4o', 3.5, 0, 'fair', 'vague', 1, '',
    'gpt-4o-mini', 1200, 0.125),
('{DAY} 12:00:45.000', '{_id(6)}', 's6', 'helpfulness', '1', 'llm', 'b', 'anthropic', 'claude-sonnet-4', 0, 0, '', '', 0,
    'timeout after 3 retries', 'gpt-4o-mini', 30000, 0)
"""
SCORES_RERUN = f"""{SCORES_COLUMNS}
('{DAY} 12:00:50.000', '{_id(1)}', 's1', 'cites_plan', '1', 'rule', 'a', 'openai', 'gpt-4o', 1, 1, '', '', 0, '', '', 1, 0)
"""
FEEDBACK = f"""
INSERT INTO llm_feedback (ts, trace_id, name, value, label, comment, correction, annotator) VALUES
('{DAY} 12:05:00.000', '{_id(2)}', 'thumbs', 1, 'up', 'good', '', 'ann'),
('{DAY} 12:06:00.000', '{_id(6)}', 'thumbs', 0, 'down', 'wrong plan', 'Plan: pro', 'bob'),
('{DAY} 12:07:00.000', '{_id(1)}', 'rating', 4, '', '', '', 'ann'),
('{DAY} 11:00:00.000', '{_id(1)}', 'thumbs', 1, 'up', 'before the range', '', 'ann')
"""
# A prompt episode that resolved, a model episode app-wide (route and model '*'), one on app b,
# and a TTFT episode still firing since before the range.
DRIFT = f"""
INSERT INTO llm_drift_events (ts, signal, app, route, model, judge, method, statistic, threshold, baseline_n,
    current_n, baseline_value, current_value, severity, state, control_surface) VALUES
('{DAY} 12:10:00.000', 'judge_pass_rate', 'a', 'openai', 'gpt-4o', 'cites_plan', 'cusum', 6.5, 5, 5000, 500, 0.9, 0.75,
    'warning', 'firing', 'prompt'),
('{DAY} 12:20:00.000', 'judge_pass_rate', 'a', 'openai', 'gpt-4o', 'cites_plan', 'z', 1.2, 2, 5000, 500, 0.9, 0.88,
    'warning', 'resolved', 'prompt'),
('{DAY} 12:15:00.000', 'cost_per_call', 'a', '*', '*', '', 'ks', 0.4, 0.2, 5000, 300, 0.01, 0.03,
    'critical', 'firing', 'model'),
('{DAY} 12:25:00.000', 'error_rate', 'b', 'anthropic', 'claude-sonnet-4', '', 'cusum', 7, 5, 5000, 500, 0.01, 0.2,
    'warning', 'firing', 'model'),
('{DAY} 11:00:00.000', 'ttft_ms', 'a', 'openai', 'gpt-4o', '', 'psi', 0.3, 0.2, 5000, 300, 400, 900,
    'warning', 'firing', 'model')
"""


class Engine:
    """A chdb session holding llmtap's schema and the rows above."""

    def __init__(self, s: session.Session):
        self.s = s

    def query(self, sql: str) -> tuple[list[dict], list[dict]]:
        """(columns as {name, type}, rows as dicts) of one SELECT."""
        out = json.loads(self.s.query(sql, "JSON").bytes())
        return out["meta"], out["data"]

    def rows(self, sql: str) -> list[tuple]:
        return [tuple(r.values()) for r in self.query(sql)[1]]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, "promtool is not on PATH: install it (make deps, or apt-get install prometheus)"
    return path


@pytest.fixture(scope="module")
def schema_sql(tmp_path_factory) -> str:
    """What `llmtap migrate --dry-run` prints for an empty ClickHouse (the adapter over chdb)."""
    assert LLMTAP.is_file(), f"{LLMTAP} is missing: run `cargo build -p llmtap` (make deploy-rules does)"
    tmp = tmp_path_factory.mktemp("migrate")
    with open(tmp / "adapter.log", "w") as log:
        adapter = subprocess.Popen(
            [sys.executable, str(ADAPTER), "--listen", "127.0.0.1:0", "--path", str(tmp / "chdb")],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
        try:
            addr = adapter.stdout.readline().strip()
            assert addr, (tmp / "adapter.log").read_text()
            env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "LLMTAP_CLICKHOUSE_URL": f"http://{addr}"}
            res = subprocess.run([str(LLMTAP), "migrate", "--dry-run"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=120)
        finally:
            adapter.terminate()
            adapter.wait(timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def engine(schema_sql, tmp_path_factory):
    s = session.Session(str(tmp_path_factory.mktemp("engine") / "chdb"))
    s.query("SET output_format_json_quote_64bit_integers = 0")
    for stmt in schema_sql.split(";\n\n"):
        if stmt.strip():
            s.query(stmt)
    for stmt in (TRACES, SCORES, SCORES_RERUN, FEEDBACK, DRIFT):
        s.query(stmt)
    yield Engine(s)
    s.close()


def _panel(doc: dict, title: str) -> dict:
    found = [p for p in cd.panels(doc) if p.get("title") == title]
    assert len(found) == 1, f"{len(found)} panels titled {title!r}"
    return found[0]


def _expand(doc: dict, sql: str, selected: dict[str, list[str]]) -> str:
    return cd.expand(sql, {name: selected.get(name, [ALL]) for name in cd.variable_names(doc)}, RANGE)


def run_panel(engine: Engine, doc: dict, title: str, **selected: list[str]) -> list[tuple]:
    (target,) = _panel(doc, title)["targets"]
    return engine.rows(_expand(doc, target["rawSql"], selected))


def run_variable(engine: Engine, doc: dict, name: str, **selected: list[str]) -> list[str]:
    (var,) = [v for v in doc["templating"]["list"] if v["name"] == name]
    return [r[0] for r in engine.rows(_expand(doc, var["query"], selected))]


def _t(hhmm: str) -> str:
    """A bucket's start, as ClickHouse prints a DateTime."""
    return f"{DAY} {hhmm}:00"


def _ts(hhmmss: str) -> str:
    """A call's time, as ClickHouse prints a DateTime64(3)."""
    return f"{DAY} {hhmmss}"


# ---------------------------------------------------------------------------------------------
# Static checks


def test_dashboards_pass_the_checker(promtool):
    assert {d["uid"] for d in DASHBOARDS.values()} == {"llmtap-traffic", "llmtap-quality", "llmtap-sidecar"}
    assert {p: e for p, e in cd.check_files(DASHBOARD_FILES).items() if e} == {}
    res = subprocess.run([sys.executable, str(CHECKER)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(DASHBOARD_FILES), res.stdout


def _target(doc: dict, title: str) -> dict:
    return _panel(doc, title)["targets"][0]


def _and(doc: dict, title: str, clause: str) -> None:
    _target(doc, title)["rawSql"] += f"\n  AND {clause}"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _and(d, "Calls", "$__conditionalAll(tenant IN (${tenant:singlequote}), $tenant)"), "undefined variable $tenant"),
        (lambda d: _panel(d, "Calls").__setitem__("datasource", {"type": cd.CLICKHOUSE, "uid": "clickhouse-prod"}),
         "not one of the provisioned uids"),
        (lambda d: _target(d, "Calls").__setitem__("datasource", {"type": "prometheus", "uid": "prometheus"}),
         "differs from the panel's"),
        (lambda d: _panel(d, "Cost").__setitem__("id", _panel(d, "Calls")["id"]), "used twice"),
        (lambda d: _and(d, "Calls", "app IN (${app:singlequote})"), "is All outside $__conditionalAll"),
        (lambda d: _and(d, "Calls", "app = '$app'"), "use ${app:singlequote}"),
        (lambda d: _and(d, "Calls", "$__conditionalAll(app IN (${route:singlequote}), $app)"), "must use ${app:singlequote}"),
        (lambda d: _and(d, "Calls", "$__timeFilter_ms(minute)"), "unsupported macro $__timeFilter_ms"),
        (lambda d: _target(d, "Calls").__setitem__("format", 0), "format/queryType"),
        (lambda d: _target(d, "Calls").__setitem__("editorType", "builder"), "editorType must be sql"),
        (lambda d: _panel(d, "Calls per second by app").pop("interval"), "interval must be >= 1m"),
        (lambda d: d["templating"]["list"][1].__setitem__("query", "SELECT DISTINCT route FROM llm_traces_minute WHERE "
                                                          "$__conditionalAll(model IN (${model:singlequote}), $model)"),
         "undefined variable $model"),
        (lambda d: d["templating"]["list"][0].__setitem__("includeAll", False), "All option"),
        (lambda d: _panel(d, "Calls").__setitem__("type", "graph"), "type 'graph'"),
        (lambda d: d.__setitem__("uid", "llmtap traffic"), "uid 'llmtap traffic'"),
    ],
)
def test_checker_catches_mistakes(mutate, message):
    doc = copy.deepcopy(TRAFFIC)
    mutate(doc)
    errors = cd.check_dashboard(doc)
    assert any(message in e for e in errors), errors


def test_checker_rejects_variables_in_prometheus_queries():
    doc = copy.deepcopy(SIDECAR)
    _target(doc, "ClickHouse lag")["expr"] = "max by (instance) (llmtap_clickhouse_lag_seconds{instance=~\"$instance\"})"
    assert any("must not use Grafana variables" in e for e in cd.check_dashboard(doc))


def test_checker_catches_a_uid_used_twice(tmp_path):
    copies = []
    for name in ("one.json", "two.json"):
        copies.append(tmp_path / name)
        copies[-1].write_text(json.dumps(QUALITY))
    errors = cd.check_files(copies)
    assert errors[copies[0]] == []
    assert errors[copies[1]] == [f"{copies[1]}: uid 'llmtap-quality' also used by {copies[0]}"]


def test_prometheus_queries_name_only_registered_metrics():
    queries = cd.prometheus_queries(SIDECAR)
    assert len(queries) == 16
    assert cd.check_metric_names(queries) == []
    assert "llmtap_overhead_seconds" in cd.exported_metrics()[1], "a histogram, so its _bucket series exist"
    bad = [("p", "max(llmtap_clickhouse_lag_secs)"), ("q", "sum(llmtap_clickhouse_up_count)")]
    assert cd.check_metric_names(bad) == [
        "p: llmtap_clickhouse_lag_secs is not a metric llmtap registers",
        "q: llmtap_clickhouse_up_count is not a metric llmtap registers",
    ]


def test_prometheus_queries_parse_with_promtool(promtool):
    assert cd.check_promql(cd.prometheus_queries(SIDECAR)) == []
    errors = cd.check_promql([("panel 9 query A", "sum(rate(llmtap_clickhouse_rows_shipped_total[5m])")])
    assert len(errors) == 1 and "promtool check rules" in errors[0] and "panel 9 query A" in errors[0], errors


def test_provisioning_names_the_dashboards_data_sources():
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "llmtap.yaml").read_text())
    assert {d["uid"]: d["type"] for d in doc["datasources"]} == cd.DATASOURCES
    for d in doc["datasources"]:
        for key, value in (d.get("secureJsonData") or {}).items():
            assert value.startswith("${") and value.endswith("}"), f"{d['uid']}.{key} must come from the environment"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llmtap.yaml").read_text())["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", "/var/lib/grafana/dashboards/llmtap")]
    used = {(ds["uid"], ds["type"]) for d in DASHBOARDS.values() for p in cd.panels(d) if (ds := p.get("datasource"))}
    assert used == set(cd.DATASOURCES.items())


# ---------------------------------------------------------------------------------------------
# Expansion, against the plugin's documented outputs


def test_expansion_follows_the_plugin():
    loc = "SELECT * FROM t WHERE $__conditionalAll(location IN (${loc:singlequote}), $loc)"
    assert cd.expand(loc, {"loc": ["Berlin"]}, RANGE) == "SELECT * FROM t WHERE location IN ('Berlin')"
    assert cd.expand(loc, {"loc": ["Berlin", "O'Hare"]}, RANGE) == "SELECT * FROM t WHERE location IN ('Berlin','O\\'Hare')"
    assert cd.expand(loc, {"loc": [ALL]}, RANGE) == "SELECT * FROM t WHERE 1=1"
    tr = cd.TimeRange(start=1415792726, end=1447328726, interval_s=20)
    assert cd.expand("$__timeFilter(time)", {}, tr) == "time >= toDateTime(1415792726) AND time <= toDateTime(1447328726)"
    assert cd.expand("$__timeInterval(column)", {}, tr) == "toStartOfInterval(toDateTime(column), INTERVAL 20 second)"
    assert cd.expand("$__fromTime $__toTime $__interval_s", {}, tr) == "toDateTime(1415792726) toDateTime(1447328726) 20"
    assert cd.expand("$__interval_s", {}, cd.TimeRange(0, 1, 0)) == "1", "the plugin's interval is at least 1 s"


# ---------------------------------------------------------------------------------------------
# Every ClickHouse query on the engine

QUERIES = [
    pytest.param(doc, where, owner, sql, id=f"{uid}: {where}")
    for uid, doc in DASHBOARDS.items()
    for where, owner, sql in cd.clickhouse_queries(doc)
]


def test_the_schema_is_llmtaps(schema_sql):
    for table in ("llm_traces", "llm_traces_minute", "llm_traces_minute_mv", "llm_scores", "llm_feedback", "llm_drift_events"):
        assert f"CREATE {'MATERIALIZED VIEW' if table.endswith('_mv') else 'TABLE'} IF NOT EXISTS default.{table} " in schema_sql
    assert "ADD COLUMN IF NOT EXISTS span_id" in schema_sql


@pytest.mark.parametrize("doc, where, owner, sql", QUERIES)
@pytest.mark.parametrize("selected", [{}, ONE_EACH], ids=["All", "one value each"])
def test_every_query_runs(engine, doc, where, owner, sql, selected):
    meta, rows = engine.query(_expand(doc, sql, selected))
    if not selected:
        assert rows, "the test rows leave this query empty: extend them"
    if owner.get("format") == 0:
        # What the plugin makes series of: `time`, then the columns naming a series, then numbers.
        assert meta[0]["name"] == "time" and meta[0]["type"].startswith("DateTime"), meta
        types = [c["type"] for c in meta[1:]]
        names = len(list(itertools.takewhile(lambda t: "String" in t, types)))
        assert names < len(types) and not any("String" in t or "DateTime" in t for t in types[names:]), meta


def test_a_query_on_a_missing_column_fails(engine):
    """Only the engine knows the columns: the checker passes this query, the engine refuses it."""
    doc = copy.deepcopy(TRAFFIC)
    target = _target(doc, "Calls")
    target["rawSql"] = target["rawSql"].replace("sum(requests)", "sum(request_count)")
    assert cd.check_dashboard(doc) == []
    with pytest.raises(RuntimeError, match="request_count"):
        engine.query(_expand(doc, target["rawSql"], {}))


# ---------------------------------------------------------------------------------------------
# Traffic and cost: exact values


def test_overview(engine):
    assert run_panel(engine, TRAFFIC, "Calls") == [(8,)]
    assert run_panel(engine, TRAFFIC, "Error rate") == [(0.25,)]
    assert run_panel(engine, TRAFFIC, "Cost") == [(4.75,)]
    assert run_panel(engine, TRAFFIC, "Tokens") == [(1611, 626)]
    # Nearest rank: the 8th of 8 durations, and the 2nd of anthropic's 1000 and 2000.
    assert run_panel(engine, TRAFFIC, "Latency p95") == [(30000,)]
    assert run_panel(engine, TRAFFIC, "Latency p95", route=["anthropic"]) == [(2000,)]


def test_variables_filter_and_all_selects_everything(engine):
    def calls(**sel: list[str]) -> int:
        return run_panel(engine, TRAFFIC, "Calls", **sel)[0][0]

    assert calls(app=["a"]) == 5
    assert calls(app=["b"]) == 2
    assert calls(app=["it's"]) == 1
    assert calls(app=["a", "b"]) == 7
    assert calls(app=["a", "b", "it's"]) == calls() == 8
    assert calls(route=["anthropic"]) == 2
    assert calls(model=["gpt-4o"]) == 5, "the model is the response's, else the request's (the 429 has none)"
    assert calls(app=["b"], model=["gpt-4o"]) == 0
    sql = _target(TRAFFIC, "Calls")["rawSql"]
    assert "app IN ('a')" in _expand(TRAFFIC, sql, {"app": ["a"]})
    assert " IN " not in _expand(TRAFFIC, sql, {})


def test_traffic_variables(engine):
    assert run_variable(engine, TRAFFIC, "app") == ["a", "b", "it's"], "not the calls outside the range"
    assert run_variable(engine, TRAFFIC, "route") == ["anthropic", "openai"]
    assert run_variable(engine, TRAFFIC, "route", app=["a"]) == ["openai"]
    assert run_variable(engine, TRAFFIC, "model", app=["a"]) == ["gpt-4o", "gpt-4o-mini"]
    assert run_variable(engine, TRAFFIC, "model", route=["anthropic"]) == ["claude-sonnet-4"]


def test_calls_per_second(engine):
    assert run_panel(engine, TRAFFIC, "Calls per second by app") == [
        (_t("12:00"), "a", 3 / 60), (_t("12:00"), "b", 1 / 60), (_t("12:01"), "a", 2 / 60),
        (_t("12:30"), "b", 1 / 60), (_t("12:45"), "it's", 1 / 60),
    ]


def test_error_rate_by_kind(engine):
    assert run_panel(engine, TRAFFIC, "Error rate by kind") == [
        (_t("12:01"), "http_error", 0.5), (_t("12:01"), "upstream_timeout", 0.5),
    ]
    assert run_panel(engine, TRAFFIC, "Error rate by kind", model=["gpt-4o"]) == [(_t("12:01"), "http_error", 1.0)]
    assert run_panel(engine, TRAFFIC, "Error rate by kind", app=["b"]) == []


def test_latency_and_ttft(engine):
    # 100, 200 and 300 ms in the first minute; the 429 alone in the second.
    assert run_panel(engine, TRAFFIC, "Latency p50 / p95 / p99", app=["a"], model=["gpt-4o"]) == [
        (_t("12:00"), 200, 300, 300), (_t("12:01"), 40, 40, 40),
    ]
    # TTFT 50, 60 and 70 ms; a failed call has none, so its minute has no quantiles.
    ttft = run_panel(engine, TRAFFIC, "Time to first token p50 / p95", app=["a"], model=["gpt-4o"])
    assert ttft[0] == (_t("12:00"), 60, 70)
    assert ttft[1][0] == _t("12:01") and all(v is None or math.isnan(v) for v in ttft[1][1:]), ttft


def test_tokens_and_cost(engine):
    assert run_panel(engine, TRAFFIC, "Tokens by type") == [
        (_t("12:00"), 1600, 620, 30, 100, 50), (_t("12:01"), 0, 0, 0, 0, 0),
        (_t("12:30"), 10, 5, 0, 0, 0), (_t("12:45"), 1, 1, 0, 0, 0),
    ]
    assert run_panel(engine, TRAFFIC, "Cost by model") == [
        (_t("12:00"), "claude-sonnet-4", 2.0), (_t("12:00"), "gpt-4o", 1.5), (_t("12:01"), "gpt-4o", 0.0),
        (_t("12:01"), "gpt-4o-mini", 0.0), (_t("12:30"), "claude-sonnet-4", 1.0), (_t("12:45"), "gpt-4o", 0.25),
    ]
    assert run_panel(engine, TRAFFIC, "Cost by app") == [
        ("b", 2, 1010, 505, 3.0, 1.5), ("a", 5, 600, 120, 1.5, 0.3), ("it's", 1, 1, 1, 0.25, 0.25),
    ]


def test_top_routes_and_models(engine):
    # gpt-4o: 40, 100, 200, 300 and 500 ms.
    assert run_panel(engine, TRAFFIC, "Top routes and models") == [
        ("openai", "openai", "gpt-4o", 5, 0.2, 200, 500, 601, 121, 1.75),
        ("anthropic", "anthropic", "claude-sonnet-4", 2, 0.0, 1000, 2000, 1010, 505, 3.0),
        ("openai", "openai", "gpt-4o-mini", 1, 1.0, 30000, 30000, 0, 0, 0.0),
    ]


def test_tool_calls(engine):
    assert run_panel(engine, TRAFFIC, "Tool calls") == [("search", 3, 2), ("answer", 1, 1), ("lookup", 1, 1)]
    assert run_panel(engine, TRAFFIC, "Tool calls", app=["b"]) == [("lookup", 1, 1)]


def test_recent_errors(engine):
    assert run_panel(engine, TRAFFIC, "Recent errors") == [
        (_ts("12:01:10.000"), "a", "openai", "openai", "gpt-4o-mini", 504, "upstream_timeout", 30000, _id(5)),
        (_ts("12:01:05.000"), "a", "openai", "openai", "gpt-4o", 429, "http_error", 40, _id(4)),
    ]
    assert [r[-1] for r in run_panel(engine, TRAFFIC, "Recent errors", model=["gpt-4o"])] == [_id(4)]


# ---------------------------------------------------------------------------------------------
# Quality and drift: exact values


def test_verdict_stats_count_a_rerun_once(engine):
    assert engine.rows("SELECT count() FROM llm_scores") == [(6,)], "both cites_plan verdicts on call 1 are stored"
    stats = ["Verdicts", "Pass rate", "Needs review", "Judge errors", "Judge cost"]
    assert [run_panel(engine, QUALITY, s)[0][0] for s in stats] == [4, 0.5, 2, 1, 0.25]
    verdicts, pass_rate, _, errors, _ = [run_panel(engine, QUALITY, s, app=["b"])[0][0] for s in stats]
    assert (verdicts, errors) == (0, 1)
    assert pass_rate is None or math.isnan(pass_rate)


def test_judges(engine):
    assert run_panel(engine, QUALITY, "Judges") == [
        ("cites_plan", "1", "rule", 2, 0.5, 0.5, 0, 0, 0.0, 2.0),
        ("helpfulness", "1", "llm", 2, 0.5, 3.75, 2, 1, 0.25, 32000 / 3),
    ]
    assert run_panel(engine, QUALITY, "Pass rate by judge") == [
        (_t("12:00"), "cites_plan", 0.5), (_t("12:00"), "helpfulness", 0.5),
    ]
    assert run_panel(engine, QUALITY, "Mean score by judge", judge=["helpfulness"]) == [(_t("12:00"), "helpfulness", 3.75)]


def test_awaiting_review_leaves_out_answered_calls(engine):
    rows = run_panel(engine, QUALITY, "Awaiting review")
    assert [(r[1], r[-2]) for r in rows] == [("helpfulness", _id(3))], "call 2 has feedback"


def test_feedback(engine):
    assert run_panel(engine, QUALITY, "Feedback summary") == [
        ("rating", "", 1, 4.0), ("thumbs", "down", 1, 0.0), ("thumbs", "up", 1, 1.0),
    ]
    assert run_panel(engine, QUALITY, "Feedback summary", app=["a"]) == [("rating", "", 1, 4.0), ("thumbs", "up", 1, 1.0)]
    assert run_panel(engine, QUALITY, "Feedback summary", app=["b"]) == [("thumbs", "down", 1, 0.0)]
    assert run_panel(engine, QUALITY, "Feedback by name") == [
        (_t("12:05"), "thumbs", 1), (_t("12:06"), "thumbs", 1), (_t("12:07"), "rating", 1),
    ]
    assert [r[1] for r in run_panel(engine, QUALITY, "Recent feedback")] == ["rating", "thumbs", "thumbs"]


def test_drift(engine):
    def firing(**sel: list[str]) -> list[tuple]:
        """(since, signal, app, route, model, judge, control_surface) of each firing key."""
        return [r[:6] + (r[7],) for r in run_panel(engine, QUALITY, "Drift firing", **sel)]

    b = (_ts("12:25:00.000"), "error_rate", "b", "anthropic", "claude-sonnet-4", "", "model")
    cost = (_ts("12:15:00.000"), "cost_per_call", "a", "*", "*", "", "model")
    ttft = (_ts("11:00:00.000"), "ttft_ms", "a", "openai", "gpt-4o", "", "model")
    assert firing() == [b, cost, ttft], "the pass-rate episode resolved; the TTFT one fires since before the range"
    assert firing(app=["a"], route=["openai"]) == [cost, ttft], "app-wide signals show under any route"
    assert firing(route=["anthropic"]) == [b, cost]
    assert firing(app=["b"]) == [b]

    def events(**sel: list[str]) -> list[tuple]:
        """(state, app) of each event in the range, newest first."""
        return [(r[1], r[4]) for r in run_panel(engine, QUALITY, "Drift events", **sel)]

    assert events() == [("firing", "b"), ("resolved", "a"), ("firing", "a"), ("firing", "a")]
    assert events(judge=["helpfulness"]) == [("firing", "b"), ("firing", "a")], "signals without a judge show under any"
    assert run_panel(engine, QUALITY, "Drift firing events by control surface") == [
        (_t("12:10"), "prompt", 1), (_t("12:15"), "model", 1), (_t("12:25"), "model", 1),
    ]


def test_quality_variables(engine):
    assert run_variable(engine, QUALITY, "app") == ["a", "b"]
    assert run_variable(engine, QUALITY, "model") == ["claude-sonnet-4", "gpt-4o"]
    assert run_variable(engine, QUALITY, "judge", app=["b"]) == ["helpfulness"]

