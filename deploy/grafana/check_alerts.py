#!/usr/bin/env python3
"""Checks Grafana alert-rule provisioning files (deploy/grafana/alerting/*.yaml).

Structure, following Grafana's file-provisioning format (apiVersion 1, `groups` of `rules`):
every group has orgId, name, folder and a valid interval; every rule has a unique uid, a
title unique in its folder, a condition naming one of its queries' refIds, queries with
refId, relativeTimeRange, datasourceUid and model, known noDataState / execErrState values,
a valid `for`, and string labels and annotations. Labels must hold no `$` (Grafana expands
environment variables there) and annotations no `${` (newer Grafana expands those).

PromQL: every Prometheus query's `expr` goes into a temporary rule file checked by
`promtool check rules`, which parses PromQL exactly as Prometheus does.

Equivalence: a rule whose title is also an alert in deploy/prometheus/llmtap-rules.yml must
run the same PromQL (whitespace aside), so the promtool unit tests cover it too.

Usage: check_alerts.py [FILE ...]   (default: deploy/grafana/alerting/*.yaml)
Exit status 0 when every file passes; the problems are printed otherwise.
Needs PyYAML and promtool on PATH.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql  # noqa: E402  (deploy/grafana/promql.py, beside this file)

ROOT = Path(__file__).resolve().parents[2]
ALERTING_DIR = ROOT / "deploy" / "grafana" / "alerting"
PROM_RULES = ROOT / "deploy" / "prometheus" / "llmtap-rules.yml"

EXPR_DATASOURCE = "__expr__"
NO_DATA_STATES = {"Alerting", "NoData", "OK", "KeepLast"}
EXEC_ERR_STATES = {"Alerting", "Error", "OK", "KeepLast"}
EXPR_TYPES = {"math", "reduce", "resample", "classic_conditions", "threshold", "sql"}
# Expression types whose `expression` names another query's refId.
EXPR_REF_TYPES = {"reduce", "resample", "threshold"}
EVALUATOR_TYPES = {"gt", "lt", "within_range", "outside_range", "within_range_included", "outside_range_included"}
UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
# Prometheus' duration syntax (prometheus/common model.ParseDuration), which Grafana uses.
DURATION_RE = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")


def _duration_ok(value: object) -> bool:
    return isinstance(value, str) and value != "" and DURATION_RE.match(value) is not None


def _str_map(where: str, name: str, value: object, errors: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{where}: {name} must be a map")
        return {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            errors.append(f"{where}: {name}.{k} must be a string (got {type(v).__name__})")
    return value


def check_query(where: str, q: object, errors: list[str]) -> None:
    if not isinstance(q, dict):
        errors.append(f"{where}: a data entry must be a map")
        return
    ref = q.get("refId")
    if not isinstance(ref, str) or not ref:
        errors.append(f"{where}: refId missing")
    where = f"{where} query {ref}"
    rtr = q.get("relativeTimeRange")
    if not isinstance(rtr, dict) or not all(isinstance(rtr.get(k), int) for k in ("from", "to")):
        errors.append(f"{where}: relativeTimeRange needs integer from and to (seconds)")
    elif rtr["from"] < rtr["to"] or rtr["to"] < 0:
        errors.append(f"{where}: relativeTimeRange must have from >= to >= 0")
    ds = q.get("datasourceUid")
    if not isinstance(ds, str) or not ds:
        errors.append(f"{where}: datasourceUid missing")
    model = q.get("model")
    if not isinstance(model, dict):
        errors.append(f"{where}: model must be a map")
        return
    if model.get("refId", ref) != ref:
        errors.append(f"{where}: model.refId {model.get('refId')!r} differs from refId {ref!r}")
    if ds == EXPR_DATASOURCE:
        kind = model.get("type")
        if kind not in EXPR_TYPES:
            errors.append(f"{where}: expression type {kind!r} is not one of {sorted(EXPR_TYPES)}")
        if kind == "threshold":
            conds = model.get("conditions")
            if not isinstance(conds, list) or not conds:
                errors.append(f"{where}: a threshold needs conditions")
            else:
                for c in conds:
                    ev = c.get("evaluator") if isinstance(c, dict) else None
                    if not isinstance(ev, dict) or ev.get("type") not in EVALUATOR_TYPES:
                        errors.append(f"{where}: threshold evaluator type must be one of {sorted(EVALUATOR_TYPES)}")
                    elif not isinstance(ev.get("params"), list) or not ev["params"]:
                        errors.append(f"{where}: threshold evaluator needs params")
    elif not isinstance(model.get("expr"), str) or not model["expr"].strip():
        errors.append(f"{where}: a Prometheus query needs model.expr")


def check_rule(where: str, rule: object, errors: list[str]) -> None:
    if not isinstance(rule, dict):
        errors.append(f"{where}: a rule must be a map")
        return
    for key in ("uid", "title", "condition"):
        if not isinstance(rule.get(key), str) or not rule[key]:
            errors.append(f"{where}: {key} missing")
    uid = rule.get("uid")
    if isinstance(uid, str) and not UID_RE.match(uid):
        errors.append(f"{where}: uid {uid!r} must be 1-40 of [A-Za-z0-9_-]")
    data = rule.get("data")
    if not isinstance(data, list) or not data:
        errors.append(f"{where}: data must list at least one query")
        data = []
    refs: list[str] = []
    for q in data:
        check_query(where, q, errors)
        if isinstance(q, dict) and isinstance(q.get("refId"), str):
            refs.append(q["refId"])
    dup = sorted({r for r in refs if refs.count(r) > 1})
    if dup:
        errors.append(f"{where}: duplicate refIds {dup}")
    if rule.get("condition") not in refs:
        errors.append(f"{where}: condition {rule.get('condition')!r} is none of the refIds {refs}")
    for q in data:
        if not isinstance(q, dict) or q.get("datasourceUid") != EXPR_DATASOURCE:
            continue
        model = q.get("model") or {}
        if model.get("type") in EXPR_REF_TYPES and model.get("expression") not in refs:
            errors.append(f"{where} query {q.get('refId')}: expression {model.get('expression')!r} is none of {refs}")
        if model.get("type") == "math":
            for ref in re.findall(r"\$\{?([A-Za-z0-9_]+)\}?", str(model.get("expression", ""))):
                if ref not in refs:
                    errors.append(f"{where} query {q.get('refId')}: math refers to unknown ${ref}")
    if rule.get("noDataState") not in NO_DATA_STATES:
        errors.append(f"{where}: noDataState must be one of {sorted(NO_DATA_STATES)}")
    if rule.get("execErrState") not in EXEC_ERR_STATES:
        errors.append(f"{where}: execErrState must be one of {sorted(EXEC_ERR_STATES)}")
    if "for" in rule and not _duration_ok(rule["for"]):
        errors.append(f"{where}: for {rule['for']!r} is not a duration")
    if "isPaused" in rule and not isinstance(rule["isPaused"], bool):
        errors.append(f"{where}: isPaused must be true or false")
    for k, v in _str_map(where, "labels", rule.get("labels"), errors).items():
        if isinstance(v, str) and "$" in v:
            errors.append(f"{where}: label {k} holds '$', which Grafana takes for an environment variable")
    for k, v in _str_map(where, "annotations", rule.get("annotations"), errors).items():
        if isinstance(v, str) and "${" in v:
            errors.append(f"{where}: annotation {k} holds '${{', which Grafana may take for an environment variable")


def check_structure(doc: object, name: str = "file") -> list[str]:
    """Every structural problem of one provisioning document."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        return [f"{name}: not a map"]
    if doc.get("apiVersion") != 1:
        errors.append(f"{name}: apiVersion must be 1")
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups:
        return errors + [f"{name}: groups must list at least one group"]
    uids: dict[str, str] = {}
    titles: dict[tuple, str] = {}
    for gi, group in enumerate(groups):
        gwhere = f"{name} group {gi}"
        if not isinstance(group, dict):
            errors.append(f"{gwhere}: a group must be a map")
            continue
        gwhere = f"{name} group {group.get('name', gi)!r}"
        if not isinstance(group.get("orgId"), int) or group["orgId"] < 1:
            errors.append(f"{gwhere}: orgId must be a positive integer")
        for key in ("name", "folder"):
            if not isinstance(group.get(key), str) or not group[key].strip():
                errors.append(f"{gwhere}: {key} missing")
        if not _duration_ok(group.get("interval")):
            errors.append(f"{gwhere}: interval {group.get('interval')!r} is not a duration")
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            errors.append(f"{gwhere}: rules must list at least one rule")
            continue
        for ri, rule in enumerate(rules):
            rwhere = f"{gwhere} rule {rule.get('uid', ri) if isinstance(rule, dict) else ri!r}"
            check_rule(rwhere, rule, errors)
            if not isinstance(rule, dict):
                continue
            uid, title = rule.get("uid"), rule.get("title")
            if isinstance(uid, str):
                if uid in uids:
                    errors.append(f"{rwhere}: uid {uid!r} also used by {uids[uid]}")
                uids[uid] = rwhere
            key = (group.get("orgId"), group.get("folder"), title)
            if isinstance(title, str):
                if key in titles:
                    errors.append(f"{rwhere}: title {title!r} also used in the same folder by {titles[key]}")
                titles[key] = rwhere
    return errors


def prometheus_queries(doc: dict) -> list[tuple[str, str, str]]:
    """(rule title, refId, expr) of every Prometheus query in the document."""
    out = []
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            for q in rule.get("data") or []:
                if q.get("datasourceUid") != EXPR_DATASOURCE and isinstance((q.get("model") or {}).get("expr"), str):
                    out.append((rule.get("title", "?"), q.get("refId", "?"), q["model"]["expr"]))
    return out


def check_promql(queries: list[tuple[str, str, str]]) -> list[str]:
    """Parses every expr with `promtool check rules`."""
    return promql.check_exprs([(f"{title} query {ref}", expr) for title, ref, expr in queries], "the Grafana queries")


def _norm(expr: str) -> str:
    return " ".join(expr.split())


def check_equivalence(doc: dict, prom_rules_path: Path = PROM_RULES) -> list[str]:
    """Rules titled like a Prometheus alert must run the same PromQL."""
    prom = yaml.safe_load(prom_rules_path.read_text())
    alerts = {r["alert"]: r["expr"] for g in prom["groups"] for r in g["rules"] if "alert" in r}
    errors = []
    for title, ref, expr in prometheus_queries(doc):
        if title in alerts and _norm(alerts[title]) != _norm(expr):
            errors.append(f"{title} query {ref}: PromQL differs from {prom_rules_path.name}'s alert {title}")
    return errors


def check_file(path: Path) -> list[str]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return [f"{path}: not YAML: {e}"]
    errors = check_structure(doc, str(path))
    if errors:
        return errors
    return check_promql(prometheus_queries(doc)) + check_equivalence(doc)


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(ALERTING_DIR.glob("*.y*ml"))
    if not files:
        print(f"no alert files in {ALERTING_DIR}", file=sys.stderr)
        return 1
    failed = False
    for f in files:
        errors = check_file(f)
        for e in errors:
            print(e, file=sys.stderr)
        failed |= bool(errors)
        doc = yaml.safe_load(f.read_text()) if not errors else {}
        n = sum(len(g.get("rules") or []) for g in (doc or {}).get("groups") or [])
        print(f"{f}: {'FAILED' if errors else f'SUCCESS: {n} rules'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
