#!/usr/bin/env python3
"""Instructions per call, nginx and llmtap side by side: a count the noisy machine cannot move.

    python3 bench/instructions.py            # streams (20 chunks, one every ms), 200 calls
    python3 bench/instructions.py --json     # non-streaming calls

Runs each proxy under valgrind's callgrind (installed from Debian if missing) in front of
the mock, sends a few calls to warm it up, zeroes the counters, sends `--calls` calls one
after another on one keep-alive connection, and dumps the counts. Prints user-space
instructions per call: nginx's one process, llmtap's total and each of its threads
(the worker that serves the connection, the recorder, the drift thread, the rest).

Callgrind counts what the process executes, not the kernel's work for it (the socket
reads and writes, which cost both proxies about the same), nor time: it says where the CPU
per request that `run.py` measures goes, not how long a client waits. Builds the release
binaries first, as run.py does (`--no-build` skips it). `--keep DIR` keeps the per-thread
dumps, for `callgrind_annotate --inclusive=yes DIR/llmtap.cg.1-02`.
"""

import argparse
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import run as B

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
STREAM_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}'

# A thread's role, from a function only that thread runs.
ROLES = [
    ("worker", "llmtap::workers::run_worker"),
    ("recorder", "llmtap_ingest::recorder::"),
    ("drift", "llmtap_scorer::drift::runner"),
]


def ensure_valgrind():
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "valgrind"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def calls(port, n, stream, chunks):
    """`n` calls in a row on one connection; returns the bytes of the last response."""
    body = STREAM_BODY if stream else BODY
    head = "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
    if stream:
        head += f"x-mock-chunks: {chunks}\r\nx-mock-chunk-delay-ms: 1\r\n"
    req = (head + f"content-length: {len(body)}\r\n\r\n").encode() + body
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    last = b""
    for _ in range(n):
        s.sendall(req)
        buf = b""
        while not done(buf):
            d = s.recv(65536)
            if not d:
                raise RuntimeError(f"connection closed after {len(buf)} bytes: {buf[:200]!r}")
            buf += d
        if not buf.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {buf[:200]!r}")
        last = buf
    s.close()
    return last


def done(buf):
    """Whether `buf` holds one whole response (chunked, or with a content-length)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = buf[:head_end].lower()
    if b"transfer-encoding: chunked" in head:
        return buf.endswith(b"\r\n0\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(buf) - head_end - 4 >= int(line.split(b":")[1])
    return False


def counts(dump_prefix):
    """Instructions per thread role in one dump: `dump_prefix`-01, -02, … (one per thread)."""
    out = {}
    for path in sorted(glob.glob(dump_prefix + "-*")):
        total, role = 0, "other"
        with open(path, errors="replace") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
                break
        for name, marker in ROLES:
            if marker in text:
                role = name
                break
        out[role] = out.get(role, 0) + total
    return out


def measure(name, args, port, work, env, n, stream, chunks):
    out_file = os.path.join(work, f"{name}.cg")
    vg = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out_file}"]
    p = B.Proc(name, vg + args, env=env, port=port)
    try:
        B.wait_port(port, timeout=120)
        calls(port, 20, stream, chunks)
        time.sleep(0.5)  # let the background threads finish the warm-up calls
        subprocess.run(["callgrind_control", "-z", str(p.p.pid)], check=True, capture_output=True)
        calls(port, n, stream, chunks)
        time.sleep(1.5)  # the recorder and drift threads gather calls for up to 100 ms
        subprocess.run(["callgrind_control", "-d", str(p.p.pid)], check=True, capture_output=True)
        time.sleep(0.5)
        found = counts(out_file + ".1")  # the first (and only) requested dump
        if not found:
            raise RuntimeError(f"callgrind wrote no dump for {name} at {out_file}.1-*")
        return found
    finally:
        p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="non-streaming calls instead of streams")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind dumps here (for callgrind_annotate)")
    a = ap.parse_args()
    ensure_valgrind()
    B.ensure_nginx()
    if not a.no_build:
        B.build()
    stream = not a.json
    work = tempfile.mkdtemp(prefix="llmtap-instr-")
    mock = B.start_mock()
    try:
        port = B.free_port()
        # run.py's nginx, in one process: valgrind follows no fork.
        conf = B.nginx_conf(work, mock.port, port, 1, single_process=True)
        nginx = measure("nginx", ["nginx", "-c", conf, "-p", work], port, work, {}, a.calls, stream, a.chunks)
        port, admin = B.free_port(), B.free_port()
        env = {"LLMTAP_UPSTREAM_OPENAI": f"http://127.0.0.1:{mock.port}", "LLMTAP_LOG_LEVEL": "warn"}
        args = [os.path.join(B.REL, "llmtap"), "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen",
                f"127.0.0.1:{admin}", "--data-dir", os.path.join(work, "llmtap")]
        llmtap = measure("llmtap", args, port, work, env, a.calls, stream, a.chunks)
    finally:
        mock.stop()
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for f in glob.glob(os.path.join(work, "*.cg*")):
                shutil.copy(f, a.keep)
        shutil.rmtree(work, ignore_errors=True)

    kind = f"streams of {a.chunks} chunks" if stream else "non-streaming calls"
    n = a.calls
    ng = sum(nginx.values()) / n
    rows = [("nginx", ng)] + [("llmtap", sum(llmtap.values()) / n)]
    rows += [(f"  llmtap {role}", llmtap[role] / n) for role in ["worker", "recorder", "drift", "other"] if role in llmtap]
    print(f"Instructions per call, {n} {kind} in a row on one connection (callgrind):\n")
    print("| target | instructions per call | × nginx |")
    print("|---|---:|---:|")
    for name, v in rows:
        print(f"| {name} | {v:,.0f} | {v / ng:.2f} |")


if __name__ == "__main__":
    main()
