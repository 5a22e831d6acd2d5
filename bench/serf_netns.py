"""Plumbing for bench/bench_vs_serf.py: process bookkeeping, a Serf RPC client,
per-address nftables byte counters and a private bridge of network namespaces.

Rules: everything this module creates (processes, nftables tables, namespaces)
is recorded in a :class:`Registry` the moment it exists, and ``Registry.close``
removes all of it, so a failure or Ctrl-C anywhere leaves nothing behind. It
never touches a process, table or namespace it did not create.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000
IP_UDP_HEADERS = 28  # IPv4 (20) + UDP (8): nftables counts whole IP packets


_given: set[int] = set()


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free for TCP and UDP, below the kernel's ephemeral range and
    never handed out before in this run: a port the kernel picks is in that
    range, where an agent's outgoing connection (push-pull, sync) can take it
    before the agent it was meant for binds it, and a second agent answering
    on "its" API port fools every poll."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    low = max(1024, high - 12000)
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _given:
            continue
        try:
            for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, k) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _given.add(port)
        return port
    with socket.socket(socket.AF_INET, kind) as s:  # crowded: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run(*cmd: str, stdin: str | None = None) -> str:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


class Registry:
    """What this run created, removed in reverse on ``close``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tables: list[tuple[str | None, str]] = []  # (netns or None, "family name")
        self.netns: list[str] = []
        self.executors: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()

    def spawn(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out, self._lock:
            # own session: a Ctrl-C on the terminal reaches this script only,
            # which then kills its agents in order
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.procs.clear()

    def close(self) -> None:
        self.kill_all()
        for ex in self.executors:
            ex.shutdown(wait=False, cancel_futures=True)
        for ns, table in reversed(self.tables):
            pre = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run([*pre, "nft", "delete", "table", *table.split()],
                           capture_output=True, timeout=10)
        self.tables.clear()
        for ns in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.netns.clear()


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class SerfRPC:
    """The msgpack RPC that ``serf members`` itself speaks (handshake, then
    ``members``), kept open per agent: polling 100 agents through 100 ``serf``
    processes a round would cost more CPU than the agents being measured."""

    def __init__(self, addr: str, timeout: float = 3.0) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace")
        self.seq = 0
        self._call("handshake", {"Version": 1}, has_body=False)

    def _read(self) -> Any:
        while True:
            for obj in self.unpacker:
                return obj
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("serf closed the RPC connection")
            self.unpacker.feed(chunk)

    def _call(self, command: str, body: Any | None, has_body: bool) -> Any:
        self.seq += 1
        data = msgpack.packb({"Command": command, "Seq": self.seq})
        if body is not None:
            data += msgpack.packb(body)
        self.sock.sendall(data)
        header = self._read()
        if header.get("Error"):
            raise RuntimeError(f"serf rpc {command}: {header['Error']}")
        return self._read() if has_body else None

    def members(self) -> list[dict[str, Any]]:
        return list(self._call("members", None, has_body=True)["Members"])

    def close(self) -> None:
        self.sock.close()


class LoopbackCounters:
    """Bytes each source address sends on loopback, counted by nftables in the
    output hook (every datagram is counted once, by its sender, whichever
    program sent it: the same meter for both systems)."""

    def __init__(self, reg: Registry, addrs: list[str], exclude_tcp_port: int = 0) -> None:
        self.name = f"hsgbench{os.getpid()}"
        lines = [f"table ip {self.name} {{", "  chain out {",
                 "    type filter hook output priority 0; policy accept;"]
        for a in addrs:
            lines.append(f'    oifname "lo" ip saddr {a} meta l4proto udp counter '
                         f'comment "udp {a}"')
            skip = (f"tcp sport != {exclude_tcp_port} tcp dport != {exclude_tcp_port} "
                    if exclude_tcp_port else "meta l4proto tcp ")
            lines.append(f'    oifname "lo" ip saddr {a} {skip}counter comment "tcp {a}"')
        lines += ["  }", "}"]
        reg.tables.append((None, f"ip {self.name}"))
        run("nft", "-f", "-", stdin="\n".join(lines) + "\n")

    def read(self) -> dict[str, tuple[int, int]]:
        """"udp ADDR" / "tcp ADDR" -> (packets, bytes) so far."""
        out: dict[str, tuple[int, int]] = {}
        doc = json.loads(run("nft", "-j", "list", "table", "ip", self.name))
        for item in doc["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for e in rule["expr"]:
                if "counter" in e:
                    out[rule["comment"]] = (e["counter"]["packets"], e["counter"]["bytes"])
        return out


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only) into ``ns``: setns(2) is per thread, so
    every socket this thread opens afterwards lives in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


class Lan:
    """``hosts`` namespaces, each with one veth into a bridge that lives in a
    namespace of its own: no interface, address or route is added to the
    machine's own namespace, so the traffic never leaves the lab."""

    SUBNET = "10.213.77"

    def __init__(self, reg: Registry, hosts: int) -> None:
        self.reg = reg
        tag = f"hsb{os.getpid() % 100000}"
        self.switch = f"{tag}sw"
        self.hosts = [f"{tag}h{i}" for i in range(hosts)]
        self.addrs = [f"{self.SUBNET}.{i + 1}" for i in range(hosts)]
        self.executors: dict[str, ThreadPoolExecutor] = {}
        for ns in [self.switch, *self.hosts]:
            run("ip", "netns", "add", ns)
            reg.netns.append(ns)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addrs, strict=True)):
            run("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"p{i}", "netns", self.switch)
            run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            ex = ThreadPoolExecutor(1, thread_name_prefix=ns, initializer=_enter_netns,
                                    initargs=(ns,))
            reg.executors.append(ex)
            self.executors[ns] = ex

    def submit(self, ns: str, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a thread inside ``ns`` (its sockets open there)."""
        return self.executors[ns].submit(fn)

    def set_loss(self, percent: int) -> None:
        """Drop ``percent`` % of what reaches each host from the bridge (loopback,
        where the bench reads the APIs, is spared); 0 removes the rule."""
        for ns in self.hosts:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet",
                            "hsgloss"], capture_output=True, timeout=10)
            if percent <= 0:
                continue
            if (ns, "inet hsgloss") not in self.reg.tables:
                self.reg.tables.append((ns, "inet hsgloss"))
            run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=(
                "table inet hsgloss {\n chain input {\n"
                "  type filter hook input priority 0; policy accept;\n"
                '  iifname != "lo" counter comment "all"\n'
                f'  iifname != "lo" numgen random mod 100 < {percent} counter drop '
                'comment "dropped"\n }\n}\n'))

    def loss_counts(self) -> tuple[int, int]:
        """(packets arrived, packets dropped) over every host since set_loss."""
        total = dropped = 0
        for ns in self.hosts:
            try:
                doc = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list",
                                     "table", "inet", "hsgloss"))
            except RuntimeError:
                continue
            for item in doc["nftables"]:
                rule = item.get("rule")
                if not rule:
                    continue
                for e in rule["expr"]:
                    if "counter" in e:
                        if rule.get("comment") == "all":
                            total += e["counter"]["packets"]
                        else:
                            dropped += e["counter"]["packets"]
        return total, dropped
