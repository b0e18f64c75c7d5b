"""PromQL checks shared by check_alerts.py and check_dashboards.py."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool not found on PATH (Debian: apt-get install prometheus)")
    return path


def check_exprs(exprs: list[tuple[str, str]], what: str) -> list[str]:
    """Parses every (where, expression) with `promtool check rules`, each one a recording
    rule named by its index; a failure lists which index is which `where`."""
    if not exprs:
        return []
    rules = [{"record": f"grafana:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    with tempfile.TemporaryDirectory(prefix="llmtap-promql-") as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}, sort_keys=False))
        res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or "SUCCESS" not in res.stdout:
        index = "\n".join(f"  grafana:query_{i} = {where}" for i, (where, _) in enumerate(exprs))
        return [f"promtool check rules on {what} failed:\n{res.stdout}{res.stderr}{index}"]
    return []
