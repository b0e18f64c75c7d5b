"""Checks of the alerting rules in deploy/: the Prometheus rules (promtool check + unit tests)
and the Grafana provisioning file (deploy/grafana/check_alerts.py).

Run with: make deploy-rules   (or .venv/bin/pytest -q tests/deploy). Needs promtool on PATH
(`make deps` installs it); without it these tests fail rather than skip.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "llmtap-rules.yml"
RULE_TESTS = PROM_DIR / "llmtap-rules.test.yml"
GRAFANA_ALERTS = ROOT / "deploy" / "grafana" / "alerting" / "llmtap-alerts.yaml"
CHECKER = ROOT / "deploy" / "grafana" / "check_alerts.py"
# Where llmtap registers its metrics.
METRIC_SOURCES = [ROOT / "ingest" / "src" / "export" / "prometheus.rs", ROOT / "proxy" / "src" / "judging.rs"]
DRIFT_ALERTS = {"LlmtapDriftModel": "model", "LlmtapDriftPrompt": "prompt", "LlmtapDriftIntentJudge": "intent_judge"}


# The checkers are scripts in deploy/grafana, importable from there.
sys.path.insert(0, str(CHECKER.parent))
import check_alerts  # noqa: E402


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, "promtool is not on PATH: install it (make deps, or apt-get install prometheus)"
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def _prom_alerts() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


# ---------------------------------------------------------------------------------------------
# Prometheus rules


def test_promtool_check_rules(promtool):
    res = _run([promtool, "check", "rules", RULES.name], PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_promtool_unit_tests(promtool):
    res = _run([promtool, "test", "rules", RULE_TESTS.name], PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout, res.stdout + res.stderr
    assert "FAILED" not in res.stdout + res.stderr


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    """A wrong expectation makes `promtool test rules` fail: the suite is not vacuous."""
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULE_TESTS.read_text()
    wrong = text.replace("revisit the prompt or workflow", "revisit the model", 1)
    assert wrong != text
    (tmp_path / RULE_TESTS.name).write_text(wrong)
    res = _run([promtool, "test", "rules", RULE_TESTS.name], tmp_path)
    assert res.returncode != 0
    assert "FAILED" in res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = set(_prom_alerts())
    assert alerts - firing == set(), "alerts without a test where they fire"
    assert alerts - quiet == set(), "alerts without a test where they stay quiet"


def test_drift_alerts_one_per_control_surface():
    alerts = _prom_alerts()
    for name, surface in DRIFT_ALERTS.items():
        expr = alerts[name]["expr"]
        assert f'control_surface="{surface}"' in expr
        assert "max by (signal, app, route, model, judge, control_surface, severity)" in expr
        assert "severity" not in alerts[name].get("labels", {}), "severity must come from the series"
        for other in set(DRIFT_ALERTS.values()) - {surface}:
            assert f'control_surface="{other}"' not in expr


def _metric_names(expr: str) -> set[str]:
    # Exported names only: not recording-rule names such as route_provider:llmtap_requests:rate5m.
    return set(re.findall(r"(?<![:\w])llmtap_[a-z0-9_]+", expr))


def test_rules_use_only_metrics_llmtap_exports():
    exported = "\n".join(p.read_text() for p in METRIC_SOURCES)
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [e for _, _, e in check_alerts.prometheus_queries(yaml.safe_load(GRAFANA_ALERTS.read_text()))]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used, "no llmtap metric found in the rules"
    unknown = {m for m in used if f'"{m}"' not in exported}
    assert unknown == set(), f"metrics not registered in {[str(p.relative_to(ROOT)) for p in METRIC_SOURCES]}"


# ---------------------------------------------------------------------------------------------
# Grafana provisioning file


def test_grafana_alerts_pass_the_checker(promtool):
    errors = check_alerts.check_file(GRAFANA_ALERTS)
    assert errors == []
    res = _run([sys.executable, str(CHECKER)], ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_grafana_rules_mirror_the_prometheus_ones():
    doc = yaml.safe_load(GRAFANA_ALERTS.read_text())
    titles = {r["title"] for g in doc["groups"] for r in g["rules"]}
    assert set(DRIFT_ALERTS) | {"LlmtapRecordsDropped"} <= titles
    assert check_alerts.check_equivalence(doc) == []
    for g in doc["groups"]:
        for r in g["rules"]:
            if r["title"] in DRIFT_ALERTS:
                assert r["noDataState"] == "OK", "no drift series is no drift"
                assert "severity" not in r.get("labels", {}), "severity must come from the series"


def _rule(doc: dict, uid: str) -> dict:
    return next(r for g in doc["groups"] for r in g["rules"] if r["uid"] == uid)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _rule(d, "llmtap-drift-prompt").__setitem__("uid", "llmtap-drift-model"), "also used by"),
        (lambda d: _rule(d, "llmtap-drift-model").__setitem__("condition", "B"), "condition 'B'"),
        (lambda d: _rule(d, "llmtap-drift-model")["data"][1]["model"].__setitem__("expression", "Z"), "expression 'Z'"),
        (lambda d: _rule(d, "llmtap-drift-model")["data"][0].pop("relativeTimeRange"), "relativeTimeRange"),
        (lambda d: _rule(d, "llmtap-drift-model")["data"][0].__setitem__("datasourceUid", ""), "datasourceUid"),
        (lambda d: _rule(d, "llmtap-drift-model").__setitem__("noDataState", "Nothing"), "noDataState"),
        (lambda d: _rule(d, "llmtap-drift-model").__setitem__("for", "5 minutes"), "not a duration"),
        (lambda d: _rule(d, "llmtap-drift-model")["labels"].__setitem__("sev", "{{ $labels.severity }}"), "'$'"),
        (lambda d: d["groups"][0].__setitem__("interval", "often"), "interval"),
        (lambda d: d.__setitem__("apiVersion", 2), "apiVersion"),
    ],
)
def test_grafana_checker_catches_structure_mistakes(mutate, message):
    doc = copy.deepcopy(yaml.safe_load(GRAFANA_ALERTS.read_text()))
    mutate(doc)
    errors = check_alerts.check_structure(doc)
    assert any(message in e for e in errors), errors


def test_grafana_checker_catches_bad_promql(promtool):
    doc = copy.deepcopy(yaml.safe_load(GRAFANA_ALERTS.read_text()))
    _rule(doc, "llmtap-records-dropped")["data"][0]["model"]["expr"] = "increase(llmtap_scorer_dropped_total[10m] > 0"
    errors = check_alerts.check_promql(check_alerts.prometheus_queries(doc))
    assert errors and "promtool check rules" in errors[0], errors


def test_grafana_checker_catches_drift_from_prometheus_rules():
    doc = copy.deepcopy(yaml.safe_load(GRAFANA_ALERTS.read_text()))
    q = _rule(doc, "llmtap-drift-prompt")["data"][0]["model"]
    q["expr"] = q["expr"].replace('severity="critical"', 'severity="warning"')
    assert check_alerts.check_equivalence(doc) == [
        "LlmtapDriftPrompt query A: PromQL differs from llmtap-rules.yml's alert LlmtapDriftPrompt"
    ]


DROP_TEST = """
rule_files: [grafana-drops.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'llmtap_trace_log_records_dropped_total{job="llmtap",instance="a"}'
        values: '0 0 4x10'
      - series: 'llmtap_trace_log_write_errors_total{job="llmtap",instance="a"}'
        values: '0x12'
      - series: 'llmtap_clickhouse_rows_dropped_total{job="llmtap",instance="a"}'
        values: '0 0 2x10'
      - series: 'llmtap_scorer_dropped_total{job="llmtap",instance="a"}'
        values: '9 9 0x10'
      - series: 'llmtap_otlp_spans_dropped_total{job="llmtap",instance="a"}'
        values: '0x12'
      - series: 'llmtap_scorer_dropped_total{job="llmtap",instance="b"}'
        values: '0 0 1x10'
    alert_rule_test:
      - eval_time: 1m
        alertname: LlmtapRecordsDropped
        exp_alerts: []
      - eval_time: 5m
        alertname: LlmtapRecordsDropped
        exp_alerts:
          - exp_labels: {job: llmtap, instance: a, component: trace_log_queue, severity: warning}
          - exp_labels: {job: llmtap, instance: a, component: clickhouse_disk_cap, severity: critical}
          - exp_labels: {job: llmtap, instance: b, component: scorer_queue, severity: warning}
"""


def test_grafana_drop_query_behaves(promtool, tmp_path):
    """The records-dropped query, with Grafana's threshold (A > 0) as a Prometheus alert, run
    by promtool: one instance per losing component, severity by component, resets ignored."""
    doc = yaml.safe_load(GRAFANA_ALERTS.read_text())
    rule = _rule(doc, "llmtap-records-dropped")
    assert rule["condition"] == "C"
    threshold = next(q for q in rule["data"] if q["refId"] == "C")["model"]
    assert threshold["expression"] == "A"
    assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
    expr = next(q for q in rule["data"] if q["refId"] == "A")["model"]["expr"]
    rules = {"groups": [{"name": "g", "rules": [{"alert": "LlmtapRecordsDropped", "expr": f"({expr}) > 0"}]}]}
    (tmp_path / "grafana-drops.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "grafana-drops.test.yml").write_text(DROP_TEST)
    res = _run([promtool, "test", "rules", "grafana-drops.test.yml"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
