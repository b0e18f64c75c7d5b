"""deploy/systemd/llmtap.service: systemd accepts it, its sandbox scores well, and its
ExecStart runs the binary as a service would (env from the EnvironmentFile, SIGTERM to stop).

Run with: make deploy-rules (builds target/debug/llmtap first). Needs systemd-analyze
(Debian's systemd package); without it, or without the binary, these tests fail rather than skip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "llmtap.service"
LLMTAP_BIN = Path(os.environ.get("LLMTAP_BIN") or ROOT / "target" / "debug" / "llmtap")
INSTALLED = "/usr/local/bin/llmtap"


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is not on PATH: apt-get install systemd"
    return path


def service_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, v = line.split("=", 1)
        keys.setdefault(f"{section}.{k}", []).append(v)
    return keys


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the built binary (verify checks that it exists)."""
    assert LLMTAP_BIN.exists(), f"{LLMTAP_BIN} is missing: run `cargo build -p llmtap` (make deploy-rules does)"
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    unit = tmp_path / "llmtap.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={LLMTAP_BIN} "))
    return unit


def test_systemd_accepts_the_unit(analyze, tmp_path):
    res = subprocess.run([analyze, "verify", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60)
    # verify warns about unknown keys and bad values on stderr and still exits 0.
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


def test_verify_catches_a_bad_key(analyze, tmp_path):
    unit = local_unit(tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in res.stderr, res.stderr


def test_the_sandbox_scores_ok(analyze, tmp_path):
    res = subprocess.run(
        [analyze, "security", "--offline=yes", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    m = re.search(r"Overall exposure level for llmtap\.service: ([0-9.]+) (\w+)", res.stdout)
    assert m, res.stdout
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", m.group(0)


def test_stop_timeout_covers_the_shutdown_grace():
    keys = service_keys()
    assert keys["Service.KillSignal"] == ["SIGTERM"]
    # shutdown_grace_secs defaults to 30: in-flight calls finish, then queued records are written.
    assert int(keys["Service.TimeoutStopSec"][0]) >= 30 + 10
    assert keys["Service.StateDirectory"] == ["llmtap"]


def test_execstart_runs_and_stops_on_sigterm(tmp_path):
    """ExecStart's own arguments, with the two paths moved into the test folder and the
    listeners set the way an EnvironmentFile sets them: the proxy answers, SIGTERM ends it 0."""
    assert LLMTAP_BIN.exists(), f"{LLMTAP_BIN} is missing: run `cargo build -p llmtap`"
    (exec_start,) = service_keys()["Service.ExecStart"]
    argv = shlex.split(exec_start)
    assert argv == [INSTALLED, "serve", "--config", "/etc/llmtap/llmtap.toml", "--data-dir", "/var/lib/llmtap"]
    (tmp_path / "llmtap.toml").write_text('[capture]\nbodies = "none"\n')
    moved = {"/etc/llmtap/llmtap.toml": str(tmp_path / "llmtap.toml"), "/var/lib/llmtap": str(tmp_path / "data")}
    argv = [str(LLMTAP_BIN)] + [moved.get(a, a) for a in argv[1:]]

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    admin = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env.update(LLMTAP_LISTEN=f"127.0.0.1:{free_port()}", LLMTAP_ADMIN_LISTEN=f"127.0.0.1:{admin}")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llmtap never answered /healthz"
            time.sleep(0.05)
        assert (tmp_path / "data" / "traces").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=int(service_keys()["Service.TimeoutStopSec"][0])) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
