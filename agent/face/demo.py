"""``hs-gossip demo``: N agents on loopback, each its own address, data dir and
API port, and a live peers table until Ctrl-C (or ``--duration``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _fetch(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            body: dict[str, object] = json.loads(r.read())
            return body
    except (OSError, ValueError):
        return None


def run_demo(n: int, interval: float, duration: float | None) -> int:
    if not 1 <= n <= 64:
        print("hs-gossip: demo -n must be between 1 and 64", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="hs-gossip-demo-"))
    gossip_port = free_port(socket.SOCK_DGRAM)
    seed = f"127.0.0.1:{gossip_port}"
    procs: list[tuple[subprocess.Popen[bytes], int, str]] = []
    try:
        for i in range(n):
            host = f"127.0.0.{i + 1}"
            api_port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("HS_GOSSIP_")}
            env.update({
                "HS_GOSSIP_BIND": host,
                "HS_GOSSIP_PORT": str(gossip_port),
                "HS_GOSSIP_PEERS": seed,
                "HS_GOSSIP_API": f"127.0.0.1:{api_port}",
                "HS_GOSSIP_DATA_DIR": str(tmp / f"agent{i + 1}"),
                "HS_GOSSIP_NODE_NAME": f"demo-{i + 1}",
                "HS_GOSSIP_INTERVAL": str(interval),
                "HS_GOSSIP_LOG_LEVEL": "warning",
            })
            log = open(tmp / f"agent{i + 1}.log", "wb")  # noqa: SIM115
            p = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
            procs.append((p, api_port, f"demo-{i + 1}"))
        print(f"started {n} agents on 127.0.0.1-{n} udp/{gossip_port}; logs in {tmp}")
        print("press Ctrl-C to stop them all\n")
        deadline = None if duration is None else time.monotonic() + duration
        tty = sys.stdout.isatty()
        while deadline is None or time.monotonic() < deadline:
            lines = [f"{'AGENT':8} {'API':22} {'PEERS':>5} {'HEALTHY':>7}  KNOWS"]
            for p, api_port, name in procs:
                body = _fetch(f"http://127.0.0.1:{api_port}/api/swarm/peers")
                if p.poll() is not None:
                    lines.append(f"{name:8} exited with code {p.returncode}")
                    continue
                if body is None:
                    lines.append(f"{name:8} 127.0.0.1:{api_port:<12} starting...")
                    continue
                peers = body["peers"]
                assert isinstance(peers, list)
                healthy = sum(1 for x in peers if x["healthy"])
                names = ",".join(sorted(str(x.get("name") or "?") for x in peers))
                lines.append(f"{name:8} 127.0.0.1:{api_port:<12} {len(peers):>5} "
                             f"{healthy:>7}  {names}")
            out = "\n".join(lines)
            print(("\x1b[H\x1b[J" + out) if tty else out + "\n", flush=True)
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _, _ in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        print("all demo agents stopped")
    return 0
