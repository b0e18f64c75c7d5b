"""End-to-end harness for the SDK tests.

Starts the mock upstream (`llmtap-mock`) and the sidecar (`llmtap serve`) once per session,
pointing both the openai and anthropic routes at the mock, and gives the tests:

- `llmtap`: addresses, data directory and helpers of the running pair,
- `records(trace_id)`: the `llm_traces` row written for one call (polls the local log),
- `load_case(name)`: a provider fixture case (`ingest/tests/fixtures/<provider>/<case>.case.json`),
- `openai_client` / `anthropic_client`: real SDK clients whose base URL is llmtap.

Binaries come from LLMTAP_BIN and LLMTAP_MOCK_BIN, defaulting to <repo>/target/debug/...;
the fixtures folder from LLMTAP_FIXTURES_DIR, defaulting to <repo>/ingest/tests/fixtures.
Run with: /tmp/sdkvenv/bin/pytest -q tests/sdk
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from helpers import FIXTURES, REPO, TRACE_ID_RE, Case, load_case_file

LLMTAP_BIN = Path(os.environ.get("LLMTAP_BIN") or REPO / "target" / "debug" / "llmtap")
MOCK_BIN = Path(os.environ.get("LLMTAP_MOCK_BIN") or REPO / "target" / "debug" / "llmtap-mock")

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
RECORD_TIMEOUT_S = 5.0

# The SDKs and httpx honour HTTP(S)_PROXY; loopback traffic must never go through a proxy.
for _var in ("NO_PROXY", "no_proxy"):
    _cur = os.environ.get(_var, "")
    os.environ[_var] = ",".join(x for x in ("127.0.0.1", "localhost", _cur) if x)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return text[-limit:]


def _child_env(**extra: str) -> dict[str, str]:
    # Inherited LLMTAP_* settings (a config file, a ClickHouse URL, other upstreams) would make
    # the run depend on the caller's shell; start from a clean slate.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env.update(extra)
    return env


def _require_binary(path: Path) -> None:
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"binary {path} not found or not executable; build it with `cargo build --workspace` "
            f"or point LLMTAP_BIN / LLMTAP_MOCK_BIN at it",
            pytrace=False,
        )


# --------------------------------------------------------------------------------------------
# the mock upstream


@dataclass
class Mock:
    addr: str  # 127.0.0.1:PORT
    proc: subprocess.Popen
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def last_request(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/__mock/last-request", timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        return r.json()

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/__mock/stats", timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="session")
def mock(tmp_path_factory: pytest.TempPathFactory):
    _require_binary(MOCK_BIN)
    logdir = tmp_path_factory.mktemp("mock")
    stderr_path = logdir / "stderr.log"
    stdout_path = logdir / "stdout.log"
    with open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen(
            [str(MOCK_BIN), "--listen", "127.0.0.1:0", "--fixtures", str(FIXTURES)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            env=_child_env(),
            cwd=logdir,
        )

    # The first stdout line is the bound address; keep draining stdout afterwards so that a
    # chatty mock can never block on a full pipe.
    first_line: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with open(stdout_path, "wb") as out:
            first = True
            for line in proc.stdout:
                if first:
                    first_line.put(line)
                    first = False
                out.write(line)
                out.flush()
        if first:
            first_line.put(b"")

    threading.Thread(target=pump, name="llmtap-mock-stdout", daemon=True).start()

    try:
        line = first_line.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        proc.wait()
        pytest.fail(
            f"llmtap-mock printed no address within {START_TIMEOUT_S}s\nstderr:\n{_tail(stderr_path)}",
            pytrace=False,
        )
    addr = line.decode(errors="replace").strip()
    if not re.fullmatch(r"127\.0\.0\.1:\d+", addr):
        proc.kill()
        proc.wait()
        pytest.fail(
            f"llmtap-mock's first stdout line is {addr!r}, expected 127.0.0.1:PORT "
            f"(exit code {proc.poll()})\nstderr:\n{_tail(stderr_path)}",
            pytrace=False,
        )

    m = Mock(addr=addr, proc=proc, stderr_path=stderr_path)
    yield m

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# llmtap


class Record(dict):
    """One `llm_traces` row as written to the local log; `.raw` is the NDJSON line itself."""

    raw: str = ""


@dataclass
class Llmtap:
    port: int
    admin_port: int
    data_dir: Path
    proc: subprocess.Popen
    stderr_path: Path
    mock: Mock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _complete_lines(self) -> list[str]:
        lines: list[str] = []
        for seg in sorted((self.data_dir / "traces").glob("*.ndjson")):
            try:
                data = seg.read_bytes()
            except OSError:
                continue
            # A line being appended right now has no newline yet; leave it for the next poll.
            end = data.rfind(b"\n")
            if end < 0:
                continue
            lines.extend(data[:end].decode("utf-8").split("\n"))
        return lines

    def record(self, trace_id: str, timeout: float = RECORD_TIMEOUT_S) -> Record:
        assert TRACE_ID_RE.match(trace_id), f"bad trace id {trace_id!r}"
        deadline = time.monotonic() + timeout
        while True:
            found: list[Record] = []
            for line in self._complete_lines():
                if trace_id not in line:
                    continue
                obj = json.loads(line)
                if obj.get("trace_id") == trace_id:
                    rec = Record(obj)
                    rec.raw = line
                    found.append(rec)
            if found:
                assert len(found) == 1, f"{len(found)} trace records for {trace_id}: {found}"
                return found[0]
            if self.proc.poll() is not None:
                pytest.fail(
                    f"llmtap exited ({self.proc.returncode}) while waiting for trace {trace_id}\n"
                    f"stderr:\n{_tail(self.stderr_path)}",
                    pytrace=False,
                )
            if time.monotonic() >= deadline:
                segs = sorted(p.name for p in (self.data_dir / "traces").glob("*.ndjson"))
                pytest.fail(
                    f"no record with trace_id {trace_id} in {self.data_dir}/traces after {timeout}s "
                    f"(segments: {segs}, lines: {len(self._complete_lines())})",
                    pytrace=False,
                )
            time.sleep(0.05)


@pytest.fixture(scope="session")
def llmtap(mock: Mock, tmp_path_factory: pytest.TempPathFactory):
    _require_binary(LLMTAP_BIN)
    workdir = tmp_path_factory.mktemp("llmtap")
    data_dir = workdir / "data"
    stderr_path = workdir / "stderr.log"
    stdout_path = workdir / "stdout.log"
    port, admin_port = _free_port(), _free_port()
    while admin_port == port:
        admin_port = _free_port()

    env = _child_env(
        LLMTAP_UPSTREAM_OPENAI=mock.url,
        LLMTAP_UPSTREAM_ANTHROPIC=mock.url,
    )
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [
                str(LLMTAP_BIN),
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin_port}",
                "--data-dir",
                str(data_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=workdir,  # no stray ./llmtap.toml or ./llmtap-data from the caller's directory
        )

    tap = Llmtap(
        port=port,
        admin_port=admin_port,
        data_dir=data_dir,
        proc=proc,
        stderr_path=stderr_path,
        mock=mock,
    )

    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = ""
    with httpx.Client(timeout=2, trust_env=False) as http:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"llmtap serve exited with {proc.returncode} during start-up\n"
                    f"stderr:\n{_tail(stderr_path)}",
                    pytrace=False,
                )
            try:
                r = http.get(f"{tap.admin_url}/healthz")
                if r.status_code == 200:
                    break
                last_error = f"status {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last_error = repr(e)
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"llmtap admin /healthz not 200 within {START_TIMEOUT_S}s (last: {last_error})\n"
                    f"stderr:\n{_tail(stderr_path)}",
                    pytrace=False,
                )
            time.sleep(0.05)

    yield tap

    # Graceful stop: SIGTERM drains in-flight calls and records, then exits 0.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"llmtap did not exit within {STOP_TIMEOUT_S}s of SIGTERM\nstderr:\n{_tail(stderr_path)}",
                pytrace=False,
            )
    assert proc.returncode == 0, (
        f"llmtap exited with {proc.returncode} after SIGTERM, expected 0\nstderr:\n{_tail(stderr_path)}"
    )


@pytest.fixture
def records(llmtap: Llmtap) -> Callable[[str], Record]:
    """`records(trace_id)` → the single trace record of that call (polls up to 5 s)."""
    return llmtap.record


@pytest.fixture
def last_upstream_request(mock: Mock) -> Callable[[], dict[str, Any]]:
    return mock.last_request


# --------------------------------------------------------------------------------------------
# SDK clients


@pytest.fixture
def openai_client(llmtap: Llmtap):
    import openai

    client = openai.OpenAI(
        base_url=f"{llmtap.url}/v1",
        api_key="sk-test-secret",
        max_retries=0,  # a retry would make a second record
        timeout=30,
    )
    yield client
    client.close()


@pytest.fixture
def anthropic_client(llmtap: Llmtap):
    import anthropic

    client = anthropic.Anthropic(
        base_url=f"{llmtap.url}/anthropic",
        api_key="sk-ant-test-secret",
        max_retries=0,
        timeout=30,
    )
    yield client
    client.close()


@pytest.fixture
def load_case() -> Callable[[str], Case]:
    """`load_case("anthropic/messages_json")` → the case file (fails if it does not exist)."""
    return load_case_file
