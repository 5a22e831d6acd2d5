"""Real agent processes for integration tests: started through the installed
``hs-gossip`` command with HS_GOSSIP_* variables, each on its own loopback
address, and read through the real HTTP API."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def cli_command() -> list[str]:
    """The installed console script when there is one, else ``python -m agent``."""
    exe = Path(sys.executable).parent / "hs-gossip"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("hs-gossip")
    return [found] if found else [sys.executable, "-m", "agent"]


def clean_environ() -> dict[str, str]:
    """The test runner's environment without anything that would change an
    agent's behaviour (our variables, or systemd's if pytest runs in a unit)."""
    systemd = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY")
    return {k: v for k, v in os.environ.items()
            if not k.startswith("HS_GOSSIP_") and k not in systemd}


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_port_rng = random.Random()


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on every address, below the kernel's
    ephemeral range: agents use one number for UDP gossip and TCP sync, and
    their outgoing connections (push-pull, sync) take ephemeral ports, which
    could otherwise land on a port a test is about to give an agent."""
    high = min(_ephemeral_low(), 65536)
    low = max(1024, high - 12000)
    for _ in range(1000):
        port = _port_rng.randrange(low, high)
        try:
            for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, k) as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return port
    with socket.socket(socket.AF_INET, kind) as s:  # crowded: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], T], timeout: float = 15.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except (OSError, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class AgentProc:
    def __init__(self, name: str, host: str, gossip_port: int, data_dir: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        self.host = host
        self.gossip_port = gossip_port
        self.api_port = free_port()
        self.data_dir = data_dir
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"
        self._node_id: str | None = None  # kept across restarts, like the agent's

    @property
    def gossip_addr(self) -> str:
        return f"{self.host}:{self.gossip_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> AgentProc:
        env = clean_environ()
        env.update({
            "HS_GOSSIP_BIND": self.host,
            "HS_GOSSIP_PORT": str(self.gossip_port),
            "HS_GOSSIP_API": f"127.0.0.1:{self.api_port}",
            "HS_GOSSIP_DATA_DIR": str(self.data_dir),
            "HS_GOSSIP_NODE_NAME": self.name,
            "HS_GOSSIP_LOG_LEVEL": "debug",
        })
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*cli_command(), "run"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.is_up, timeout=20, what=f"{self.name} API")
        return self

    def is_up(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited early:\n{self.log()}")
        try:
            self.get("/healthz")
        except OSError:
            return False
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def peers(self) -> dict[str, dict[str, Any]]:
        """node_id -> peer record from /api/swarm/peers."""
        return {p["node_id"]: p for p in self.get("/api/swarm/peers")["peers"]}

    @property
    def node_id(self) -> str:
        if self._node_id is None:
            self._node_id = str(self.get("/api/cluster/status")["node_id"])
        return self._node_id

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Swarm:
    """Agents on 127.0.0.<base+i>, one shared UDP port number, each its own data dir."""

    _next_base = 10

    def __init__(self, tmp: Path, interval: float = 0.2, **env: str) -> None:
        Swarm._next_base = Swarm._next_base + 8 if Swarm._next_base < 240 else 10
        self.base = Swarm._next_base
        self.tmp = tmp
        self.port = free_port(kind=socket.SOCK_DGRAM)
        self.env = {"HS_GOSSIP_INTERVAL": str(interval), **env}
        self.agents: list[AgentProc] = []

    def host(self, i: int) -> str:
        return f"127.0.0.{self.base + i}"

    def add(self, seeds: list[AgentProc] | None = None, **env: str) -> AgentProc:
        i = len(self.agents)
        name = f"agent{i}"
        merged = dict(self.env)
        if seeds:
            merged["HS_GOSSIP_PEERS"] = ",".join(s.gossip_addr for s in seeds)
        merged.update(env)
        a = AgentProc(name, self.host(i), self.port, self.tmp / name, merged)
        self.agents.append(a)
        return a.start()

    def stop_all(self) -> None:
        for a in self.agents:
            a.stop()


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    full_env = clean_environ()
    full_env.update(env or {})
    return subprocess.run([*cli_command(), *args], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
