#!/usr/bin/env python3
"""Where a proxy's added latency goes, leg by leg, from packet times on loopback.

    python3 bench/legs.py              # streams (20 chunks), 40 calls at 20/s per proxy
    python3 bench/legs.py --json       # non-streaming calls

For nginx and llmtap in turn (each on its own core, as in run.py), captures the loopback
traffic with tcpdump and prints, per proxy, the median of three legs:

    request   the client's request in -> the proxy's request out to the mock
    mock      the mock's time: request in -> its first byte back
    response  the mock's first byte in -> the proxy's first byte out to the client

Packet times come from the kernel, so the legs do not depend on what the load generator
or the proxy report about themselves. Needs tcpdump (installed from Debian if missing) and
root. Builds the release binaries first, as run.py does (`--no-build` skips it).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import run as B


def ensure_tcpdump():
    if shutil.which("tcpdump"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "tcpdump"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def legs(pcap, proxy_port, mock_port):
    """(request, mock, response) in µs for each call in the capture."""
    out = subprocess.run(["tcpdump", "-n", "-tt", "-r", pcap], capture_output=True, text=True).stdout
    packets = []
    for line in out.splitlines():
        f = line.split()
        if "length 0" in line or len(f) < 5:
            continue
        packets.append((float(f[0]), f[2].rsplit(".", 1)[1], f[4].rstrip(":").rsplit(".", 1)[1]))
    proxy, mock = str(proxy_port), str(mock_port)
    found, i = [], 0
    while i < len(packets):
        t0, _, dst = packets[i]
        i += 1
        if dst != proxy:
            continue
        t1 = t2 = t3 = None
        while i < len(packets) and t3 is None:
            t, src, dst = packets[i]
            if dst == mock and t1 is None:
                t1 = t
            elif src == mock and t1 is not None and t2 is None:
                t2 = t
            elif src == proxy and t2 is not None:
                t3 = t
            i += 1
        if t3 is not None:
            found.append(((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6))
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="non-streaming calls")
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    ensure_tcpdump()
    if not args.no_build:
        B.build()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        B.LOAD_CPUS, B.PROXY_CPUS = {cpus[0]}, set(cpus[1:])
    sc = {"mode": "open", "rate": args.rate, "duration": args.calls / args.rate}
    if not args.json:
        sc.update({"stream": True, "headers": ["x-mock-chunks: 20"]})
    work = tempfile.mkdtemp(prefix="llmtap-legs-")
    mock = B.start_mock()
    targets = [("nginx", B.start_nginx(mock.port, work)), ("llmtap", B.start_llmtap(mock.port, work, "llmtap"))]
    try:
        time.sleep(1)
        print(f"{'proxy':<8} {'calls':>5}  median µs: {'request':>8} {'mock':>8} {'response':>9}")
        for name, proc in targets:
            B.load(proc.port, dict(sc, duration=1))  # warm the connection pools
            pcap = os.path.join(work, f"{name}.pcap")
            dump = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-s", "128", "-w", pcap,
                                     f"tcp port {proc.port} or tcp port {mock.port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            B.load(proc.port, sc)
            time.sleep(0.5)
            dump.terminate()
            dump.wait()
            found = legs(pcap, proc.port, mock.port)
            med = [statistics.median(x[k] for x in found) for k in range(3)] if found else [float("nan")] * 3
            print(f"{name:<8} {len(found):>5}  {'':>11}{med[0]:>8.0f} {med[1]:>8.0f} {med[2]:>9.0f}")
    finally:
        for _, proc in targets:
            proc.stop()
        mock.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
