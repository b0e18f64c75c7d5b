#!/usr/bin/env python3
"""Checks the Grafana dashboards (deploy/grafana/dashboards/*.json) and expands their queries.

Static checks: valid JSON; a stable dashboard uid, unique across the files; panel ids unique
in a dashboard; every panel and query on a data source this repo provisions (ClickHouse uid
`clickhouse`, Prometheus uid `prometheus`, deploy/grafana/provisioning/datasources/); every
ClickHouse query in raw SQL with the plugin's numeric `format` (0 time series, 1 table); only
the macros below; every template variable it names defined (a variable's own query may name
only the variables above it), multi-valued with an All option, and used as
`$__conditionalAll(<condition using ${var:singlequote}>, $var)`, so that All means no filter
at all rather than a list of every value; panels on the per-minute rollup bucketing no finer
than a minute; Prometheus expressions free of `$` and naming only metrics llmtap registers,
and parsed by `promtool check rules` on a generated recording-rule file.

Expansion (`expand`) turns a query into what the grafana-clickhouse-datasource plugin (v4)
sends to ClickHouse, in the plugin's order:

1. `$__conditionalAll(condition, $var)` (frontend, src/data/CHDatasource.ts): the condition,
   or `1=1` when the variable is All (`$__all`) or empty; innermost-last, arguments split at
   top-level commas.
2. Grafana's template variables: `${var:singlequote}` is each value in single quotes (a quote
   inside escaped as `\\'`), joined by commas. Only that format is supported here.
3. The backend macros (pkg/macros/macros.go), for a time range in whole seconds:
   `$__timeFilter(col)`  -> `col >= toDateTime(FROM) AND col <= toDateTime(TO)`;
   `$__timeInterval(col)` -> `toStartOfInterval(toDateTime(col), INTERVAL N second)`;
   `$__interval_s` -> `N`; `$__fromTime` / `$__toTime` -> `toDateTime(FROM)` / `toDateTime(TO)`;
   N is the panel interval in seconds, at least 1.

Usage: check_dashboards.py [FILE ...]   (default: deploy/grafana/dashboards/*.json)
Exit status 0 when every file passes; the problems are printed otherwise.
Needs PyYAML and promtool on PATH.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql  # noqa: E402  (deploy/grafana/promql.py, beside this file)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
# Where llmtap registers its Prometheus metrics.
METRIC_SOURCES = [ROOT / "ingest" / "src" / "export" / "prometheus.rs", ROOT / "proxy" / "src" / "judging.rs"]

CLICKHOUSE = "grafana-clickhouse-datasource"
# Data source uid -> plugin type, as provisioned by provisioning/datasources/llmtap.yaml.
DATASOURCES = {"clickhouse": CLICKHOUSE, "prometheus": "prometheus"}
PANEL_TYPES = {"row", "stat", "table", "timeseries"}
# The plugin's `format` (sqlutil.FormatQueryOption) and the editor's queryType for it.
FORMATS = {0: "timeseries", 1: "table"}
MACROS = {"conditionalAll", "timeFilter", "timeInterval", "interval_s", "fromTime", "toTime"}
ROLLUP = "llm_traces_minute"
ALL = "$__all"
UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
MACRO_RE = re.compile(r"\$__(\w+)")
# Grafana's variable syntax: $var, ${var}, ${var:format}, [[var]] (`$__name` are macros).
VAR_RE = re.compile(r"\$(?!__)(\w+)|\$\{(?!__)(\w+)(?::(\w+))?\}|\[\[(\w+)\]\]")
DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ExpansionError(ValueError):
    """A query the plugin would not expand into the SQL it means (unknown macro or variable,
    an unsupported format, a variable set to All outside `$__conditionalAll`)."""


@dataclass(frozen=True)
class TimeRange:
    """The dashboard time range (Unix seconds) and the panel interval (seconds)."""

    start: int
    end: int
    interval_s: int


def macro_args(text: str, open_paren: int) -> tuple[list[str], int]:
    """The arguments of the call whose `(` is at `open_paren`, split at top-level commas as the
    plugin does, and the index just past its `)`."""
    depth, args, start = 0, [], open_paren + 1
    for i in range(open_paren, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(text[start:i])
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    raise ExpansionError(f"unbalanced parentheses after {text[max(0, open_paren - 20):open_paren + 1]!r}")


def _var_name(ref: str) -> str | None:
    m = re.fullmatch(r"\$(\w+)|\$\{(\w+)\}", ref.strip())
    return (m.group(1) or m.group(2)) if m else None


def apply_conditional_all(sql: str, variables: dict[str, list[str]]) -> str:
    """Step 1: `$__conditionalAll(condition, $var)` -> condition, or `1=1` for All."""
    macro = "$__conditionalAll("
    while (at := sql.rfind(macro)) != -1:
        args, end = macro_args(sql, at + len(macro) - 1)
        if len(args) != 2:
            raise ExpansionError(f"$__conditionalAll takes 2 arguments, got {len(args)}: {sql[at:end]!r}")
        name = _var_name(args[1])
        if name is None:
            raise ExpansionError(f"$__conditionalAll's second argument must be $var or ${{var}}, got {args[1].strip()!r}")
        if name not in variables:
            raise ExpansionError(f"undefined variable ${name}")
        if not re.search(r"\$\{" + re.escape(name) + r":singlequote\}", args[0]):
            raise ExpansionError(f"$__conditionalAll(..., ${name}): the condition must use ${{{name}:singlequote}}")
        values = variables[name]
        sql = sql[:at] + ("1=1" if values in ([], [""], [ALL]) else args[0]) + sql[end:]
    return sql


def apply_variables(sql: str, variables: dict[str, list[str]]) -> str:
    """Step 2: `${var:singlequote}` -> 'v1','v2' (Grafana's singlequote format)."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3)
        if name not in variables:
            raise ExpansionError(f"undefined variable ${name}")
        if fmt != "singlequote":
            raise ExpansionError(f"{m.group(0)}: use ${{{name}:singlequote}} inside $__conditionalAll(..., ${name})")
        if ALL in variables[name]:
            raise ExpansionError(f"{m.group(0)} is All outside $__conditionalAll(..., ${name})")
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in variables[name])

    return VAR_RE.sub(sub, sql)


def apply_macros(sql: str, tr: TimeRange) -> str:
    """Step 3: the backend macros, for the time range `tr`."""
    interval = max(tr.interval_s, 1)
    out, pos = [], 0
    for m in MACRO_RE.finditer(sql):
        if m.start() < pos:
            continue
        name = m.group(1)
        out.append(sql[pos:m.start()])
        pos = m.end()
        if name in ("timeFilter", "timeInterval"):
            if pos >= len(sql) or sql[pos] != "(":
                raise ExpansionError(f"$__{name} needs a column: $__{name}(col)")
            args, pos = macro_args(sql, pos)
            if len(args) != 1:
                raise ExpansionError(f"$__{name} takes 1 argument, got {len(args)}")
            col = args[0].strip()
            if name == "timeFilter":
                out.append(f"{col} >= toDateTime({tr.start}) AND {col} <= toDateTime({tr.end})")
            else:
                out.append(f"toStartOfInterval(toDateTime({col}), INTERVAL {interval} second)")
        elif name == "interval_s":
            out.append(str(interval))
        elif name == "fromTime":
            out.append(f"toDateTime({tr.start})")
        elif name == "toTime":
            out.append(f"toDateTime({tr.end})")
        else:
            raise ExpansionError(f"unsupported macro $__{name} (supported: {', '.join(sorted(MACROS))})")
    out.append(sql[pos:])
    return "".join(out)


def expand(sql: str, variables: dict[str, list[str]], tr: TimeRange) -> str:
    """The SQL the plugin sends for `sql`, with each variable's selected values ([ALL] for All)."""
    return apply_macros(apply_variables(apply_conditional_all(sql, variables), variables), tr)


def panels(doc: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for p in doc.get("panels") or []:
        out.append(p)
        if isinstance(p, dict):
            out.extend(q for q in p.get("panels") or [] if isinstance(q, dict))
    return out


def variable_names(doc: dict) -> list[str]:
    return [v.get("name") for v in (doc.get("templating") or {}).get("list") or [] if isinstance(v, dict)]


def clickhouse_queries(doc: dict) -> list[tuple[str, dict, str]]:
    """(where, owner, SQL) of every ClickHouse query: variables' queries, then panel targets.
    The owner is the variable or the target (which carries `format`)."""
    out = []
    for v in (doc.get("templating") or {}).get("list") or []:
        if (v.get("datasource") or {}).get("uid") == "clickhouse":
            out.append((f"variable {v.get('name')}", v, v.get("query")))
    for p in panels(doc):
        for t in p.get("targets") or []:
            if (t.get("datasource") or {}).get("uid") == "clickhouse":
                out.append((f"panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}", t, t.get("rawSql")))
    return out


def prometheus_queries(doc: dict) -> list[tuple[str, str]]:
    """(where, expr) of every Prometheus query."""
    return [
        (f"panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}", t.get("expr"))
        for p in panels(doc)
        for t in p.get("targets") or []
        if (t.get("datasource") or {}).get("uid") == "prometheus"
    ]


def _seconds(duration: object) -> float | None:
    m = DURATION_RE.match(duration) if isinstance(duration, str) else None
    return int(m.group(1)) * DURATION_SECONDS[m.group(2)] if m else None


def _check_datasource(where: str, ds: object, errors: list[str]) -> None:
    if not isinstance(ds, dict) or ds.get("uid") not in DATASOURCES:
        errors.append(f"{where}: datasource {ds!r} is not one of the provisioned uids {sorted(DATASOURCES)}")
    elif ds.get("type") != DATASOURCES[ds["uid"]]:
        errors.append(f"{where}: datasource uid {ds['uid']!r} has type {DATASOURCES[ds['uid']]!r}, not {ds.get('type')!r}")


def _check_sql(where: str, sql: object, defined: list[str], errors: list[str]) -> None:
    """Expands `sql` with each variable All in turn (the others a value): that raises for an
    undefined variable, a bare `$var`, an unsupported macro or format, and a variable used
    outside `$__conditionalAll`."""
    if not isinstance(sql, str) or not sql.strip():
        errors.append(f"{where}: no SQL")
        return
    tr = TimeRange(0, 3600, 60)
    for all_var in [None, *defined]:
        values = {v: [ALL] if v == all_var else ["x"] for v in defined}
        try:
            expand(sql, values, tr)
        except ExpansionError as e:
            errors.append(f"{where}: {e}")
            return


def check_dashboard(doc: object, name: str = "dashboard") -> list[str]:
    """Every structural and query-syntax problem of one dashboard (no promtool, no engine)."""
    if not isinstance(doc, dict):
        return [f"{name}: not a JSON object"]
    errors: list[str] = []
    if not isinstance(doc.get("uid"), str) or not UID_RE.match(doc["uid"]):
        errors.append(f"{name}: uid {doc.get('uid')!r} must be 1-40 of [A-Za-z0-9_-]")
    if not isinstance(doc.get("title"), str) or not doc["title"].strip():
        errors.append(f"{name}: title missing")
    if not isinstance(doc.get("schemaVersion"), int) or doc["schemaVersion"] < 36:
        errors.append(f"{name}: schemaVersion must be an integer >= 36")
    defined: list[str] = []
    for v in (doc.get("templating") or {}).get("list") or []:
        if not isinstance(v, dict):
            errors.append(f"{name}: a variable must be an object")
            continue
        where = f"{name} variable {v.get('name')!r}"
        if not isinstance(v.get("name"), str) or not re.fullmatch(r"[A-Za-z]\w*", v["name"]):
            errors.append(f"{where}: name must be a word")
            continue
        if v["name"] in defined:
            errors.append(f"{where}: defined twice")
        if v.get("type") != "query":
            errors.append(f"{where}: type must be query")
        _check_datasource(where, v.get("datasource"), errors)
        if (v.get("datasource") or {}).get("uid") == "clickhouse":
            _check_sql(where, v.get("query"), defined, errors)
        if v.get("multi") is not True or v.get("includeAll") is not True:
            errors.append(f"{where}: must be multi-valued with an All option (queries use $__conditionalAll)")
        defined.append(v["name"])
    ids: list[object] = []
    all_panels = panels(doc)
    if not any(p.get("type") != "row" for p in all_panels if isinstance(p, dict)):
        errors.append(f"{name}: no panels")
    for p in all_panels:
        if not isinstance(p, dict):
            errors.append(f"{name}: a panel must be an object")
            continue
        where = f"{name} panel {p.get('id')} {p.get('title')!r}"
        if not isinstance(p.get("id"), int):
            errors.append(f"{where}: id must be an integer")
        elif p["id"] in ids:
            errors.append(f"{where}: panel id {p['id']} used twice")
        ids.append(p.get("id"))
        if p.get("type") not in PANEL_TYPES:
            errors.append(f"{where}: type {p.get('type')!r} is not one of {sorted(PANEL_TYPES)}")
        grid = p.get("gridPos")
        if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
            errors.append(f"{where}: gridPos needs integer h, w, x, y")
        elif grid["x"] + grid["w"] > 24:
            errors.append(f"{where}: gridPos is wider than the 24 columns")
        if p.get("type") == "row":
            continue
        _check_datasource(where, p.get("datasource"), errors)
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            errors.append(f"{where}: no targets")
            continue
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(isinstance(r, str) and r for r in refs):
            errors.append(f"{where}: refIds must be unique and non-empty, got {refs}")
        for t in targets:
            twhere = f"{where} query {t.get('refId')}"
            if t.get("datasource") != p.get("datasource"):
                errors.append(f"{twhere}: datasource differs from the panel's")
            uid = (t.get("datasource") or {}).get("uid")
            if uid == "clickhouse":
                if t.get("editorType") != "sql":
                    errors.append(f"{twhere}: editorType must be sql")
                if FORMATS.get(t.get("format")) is None or t.get("queryType") != FORMATS[t["format"]]:
                    errors.append(f"{twhere}: format/queryType must be 0/timeseries or 1/table, got "
                                  f"{t.get('format')!r}/{t.get('queryType')!r}")
                _check_sql(twhere, t.get("rawSql"), defined, errors)
                sql = t.get("rawSql") or ""
                if ROLLUP in sql and "$__timeInterval(" in sql and (_seconds(p.get("interval")) or 0) < 60:
                    errors.append(f"{twhere}: buckets {ROLLUP} by $__timeInterval, so the panel's interval must be >= 1m")
            elif uid == "prometheus":
                expr = t.get("expr")
                if not isinstance(expr, str) or not expr.strip():
                    errors.append(f"{twhere}: expr missing")
                elif "$" in expr:
                    errors.append(f"{twhere}: expr must not use Grafana variables (promtool checks it as written)")
    return errors


def exported_metrics(sources: list[Path] = METRIC_SOURCES) -> tuple[set[str], set[str]]:
    """(every metric name registered in `sources`, the histograms among them)."""
    text = "\n".join(p.read_text() for p in sources)
    names = set(re.findall(r'"(llmtap_[a-z0-9_]+)"', text))
    histograms = set(re.findall(r'HistogramOpts::new\(\s*"(llmtap_[a-z0-9_]+)"', text))
    return names, histograms


def check_metric_names(queries: list[tuple[str, str]], sources: list[Path] = METRIC_SOURCES) -> list[str]:
    """Every llmtap metric a query names is registered (a histogram's _bucket/_sum/_count too)."""
    names, histograms = exported_metrics(sources)
    errors = []
    for where, expr in queries:
        for metric in re.findall(r"(?<![:\w])llmtap_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if metric not in names and base not in histograms:
                errors.append(f"{where}: {metric} is not a metric llmtap registers")
    return errors


def check_promql(queries: list[tuple[str, str]]) -> list[str]:
    """Parses every expression with `promtool check rules`."""
    return promql.check_exprs(queries, "the dashboard queries")


def load(path: Path) -> tuple[object, list[str]]:
    try:
        return json.loads(path.read_text()), []
    except json.JSONDecodeError as e:
        return None, [f"{path}: not JSON: {e}"]


def check_files(paths: list[Path]) -> dict[Path, list[str]]:
    """The problems of each file, uids shared between files included."""
    result: dict[Path, list[str]] = {}
    uids: dict[str, Path] = {}
    for path in paths:
        doc, errors = load(path)
        if not errors:
            errors = check_dashboard(doc, str(path))
        if not errors:
            prom = prometheus_queries(doc)
            errors = check_metric_names(prom) + check_promql(prom)
            if doc["uid"] in uids:
                errors.append(f"{path}: uid {doc['uid']!r} also used by {uids[doc['uid']]}")
            uids[doc["uid"]] = path
        result[path] = errors
    return result


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(DASHBOARD_DIR.glob("*.json"))
    if not files:
        print(f"no dashboards in {DASHBOARD_DIR}", file=sys.stderr)
        return 1
    failed = False
    for path, errors in check_files(files).items():
        for e in errors:
            print(e, file=sys.stderr)
        failed |= bool(errors)
        if errors:
            print(f"{path}: FAILED")
        else:
            doc, _ = load(path)
            n_panels = sum(p.get("type") != "row" for p in panels(doc))
            n_queries = len(clickhouse_queries(doc)) + len(prometheus_queries(doc))
            print(f"{path}: SUCCESS: {n_panels} panels, {n_queries} queries")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
