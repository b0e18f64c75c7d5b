"""deploy/compose.yaml: the wiring of the local stack, checked against the repository (no
container runtime where the tests run): every bind mount's source exists, Prometheus's
config passes `promtool check config` with the files the mounts put in place, Grafana gets
every variable its data-source file reads and the dashboards where the provider looks, and
llmtap's command line and LLMTAP_* variables are ones the binary accepts.

Run with: make deploy-rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
LLMTAP_BIN = Path(os.environ.get("LLMTAP_BIN") or ROOT / "target" / "debug" / "llmtap")


def expand(value: str) -> str:
    """Compose's ${VAR:-default}, with no VAR set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def mounts(service: dict) -> dict[str, Path]:
    """Container path → repository path, for the service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            out[dst] = (DEPLOY / src).resolve()
    return out


def test_every_bind_mount_exists(services):
    for name, svc in services.items():
        for dst, src in mounts(svc).items():
            assert src.exists(), f"{name}: {src} (mounted at {dst}) is not in the repository"


def test_the_image_builds_from_the_dockerfile(services):
    build = services["llmtap"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_prometheus_config_and_rules_load(services, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: make deps installs it"
    m = mounts(services["prometheus"])
    config = yaml.safe_load(m["/etc/prometheus/prometheus.yml"].read_text())
    # The rule files as the container sees them, resolved through the mounts.
    config["rule_files"] = [str(m[path]) for path in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    res = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
    # It scrapes llmtap's admin port.
    admin_flag = next(a for a in services["llmtap"]["command"] if a.startswith("--admin-listen="))
    port = admin_flag.rsplit(":", 1)[1]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"llmtap:{port}"]


def test_grafana_gets_its_variables_and_files(services):
    grafana = services["grafana"]
    m = mounts(grafana)
    env = grafana["environment"]
    datasources = m["/etc/grafana/provisioning/datasources"] / "llmtap.yaml"
    body = "\n".join(line for line in datasources.read_text().splitlines() if not line.lstrip().startswith("#"))
    wanted = set(re.findall(r"\$\{([A-Z_]+)\}", body))
    assert wanted and wanted <= set(env), f"not set for Grafana: {sorted(wanted - set(env))}"
    assert env["CLICKHOUSE_HOST"] == "clickhouse" and env["PROMETHEUS_URL"] == "http://prometheus:9090"
    assert expand(env["CLICKHOUSE_PASSWORD"]) == expand(services["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"])
    assert env["CLICKHOUSE_USER"] == services["clickhouse"]["environment"]["CLICKHOUSE_USER"]
    provider = yaml.safe_load((m["/etc/grafana/provisioning/dashboards"] / "llmtap.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert m[path] == DEPLOY / "grafana" / "dashboards"
    assert sorted(p.name for p in m[path].glob("*.json")) == [
        "llmtap-quality.json",
        "llmtap-sidecar.json",
        "llmtap-traffic.json",
    ]
    assert "grafana-clickhouse-datasource" in env["GF_INSTALL_PLUGINS"]


def test_llmtap_accepts_the_command_and_variables(services, tmp_path):
    assert LLMTAP_BIN.exists(), f"{LLMTAP_BIN} is missing: run `cargo build -p llmtap` (make deploy-rules does)"
    svc = services["llmtap"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env.update({k: expand(v) for k, v in svc["environment"].items()})
    assert set(svc["environment"]) <= {"LLMTAP_CLICKHOUSE_URL", "LLMTAP_CLICKHOUSE_USER", "LLMTAP_CLICKHOUSE_PASSWORD"}
    res = subprocess.run([str(LLMTAP_BIN), "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert res.returncode == 0, res.stderr
    assert 'url = "http://clickhouse:8123"' in res.stdout
    assert 'user = "llmtap"' in res.stdout
    assert "llmtap-local" not in res.stdout, "check must not print the password"
    # The command line parses (clap reads all of it before --help).
    res = subprocess.run([str(LLMTAP_BIN), *svc["command"], "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    # The data flag names the volume's mount point; stop grace covers shutdown_grace_secs (30).
    data = next(a for a in svc["command"] if a.startswith("--data-dir=")).split("=", 1)[1]
    assert any(v.endswith(f":{data}") for v in svc["volumes"])
    assert int(svc["stop_grace_period"].rstrip("s")) >= 40
    assert svc["depends_on"]["clickhouse"]["condition"] == "service_healthy"
