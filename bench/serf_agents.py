"""The agents bench/bench_vs_serf.py compares, behind one face: start one
(hs-gossip through ``hs-gossip run`` and HS_GOSSIP_* variables, Serf through
``serf agent``), ask whether it answers, and read its view of the others as
:class:`Verdict` values keyed by how the others name a member (hs-gossip:
node_id; Serf: node name).

Rules: every query runs through the agent's ``submit`` (a shared thread pool
on loopback; a thread inside the agent's network namespace otherwise), and
every process starts through the :class:`~serf_netns.Registry`, which kills it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from serf_netns import Registry, SerfRPC, free_port

T = TypeVar("T")
HSG, SERF = "hs-gossip", "serf"
Submit = Callable[[Callable[[], Any]], "Future[Any]"]


@dataclass(frozen=True)
class Verdict:
    """One observer's view of one other member."""

    alive: bool
    unhealthy: bool
    failed: bool


GONE = Verdict(alive=False, unhealthy=True, failed=True)  # absent from the list


def hsg_cli() -> list[str]:
    exe = Path(sys.executable).parent / "hs-gossip"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("hs-gossip")
    return [found] if found else [sys.executable, "-m", "agent"]


class Agent:
    kind = ""

    def __init__(self, name: str, log: Path, submit: Submit) -> None:
        self.name = name
        self.log = log
        self.submit = submit
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.key = name  # how the others' views name this agent
        self.source = ""  # where verdicts come from (hs-gossip: members or peers)

    def up(self) -> bool:
        raise NotImplementedError

    def view(self) -> dict[str, Verdict]:
        raise NotImplementedError


class HsgAgent(Agent):
    kind = HSG

    def __init__(self, reg: Registry, name: str, host: str, port: int, seed: str | None,
                 base: Path, submit: Submit, ns: str | None, interval: float | None) -> None:
        super().__init__(name, base / f"{name}.log", submit)
        self.api = f"127.0.0.1:{50050 if ns else free_port()}"
        self.members_api: bool | None = None  # unknown until first asked
        env = {k: v for k, v in os.environ.items() if not k.startswith("HS_GOSSIP_")}
        env.update({"HS_GOSSIP_BIND": host, "HS_GOSSIP_PORT": str(port),
                    "HS_GOSSIP_API": self.api, "HS_GOSSIP_DATA_DIR": str(base / name),
                    "HS_GOSSIP_NODE_NAME": name, "HS_GOSSIP_LOG_LEVEL": "info"})
        if seed:
            env["HS_GOSSIP_PEERS"] = seed
        if interval:
            env["HS_GOSSIP_INTERVAL"] = str(interval)
        pre = ["ip", "netns", "exec", ns] if ns else []
        self.proc = reg.spawn([*pre, *hsg_cli(), "run"], env, self.log)
        self.pid = self.proc.pid

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.api}{path}", timeout=3) as r:
            return json.loads(r.read())

    def up(self) -> bool:
        # views are keyed by node_id: a member's name may be unknown ("")
        self.key = str(self.get("/api/cluster/status")["node_id"])
        return True

    def view(self) -> dict[str, Verdict]:
        if self.members_api is not False:
            try:
                body = self.get("/api/swarm/members")
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
                self.members_api = False
            else:
                self.members_api, self.source = True, "members"
                rows = body.get("members", []) if isinstance(body, dict) else body
                out = {}
                for m in rows:
                    if m.get("self") or m["node_id"] == self.key:
                        continue
                    st = m.get("status", "alive")
                    bad = st != "alive" or m.get("healthy") is False
                    out[m["node_id"]] = Verdict(alive=not bad, unhealthy=bad,
                                        failed=st in ("dead", "left"))
                return out
        self.source = "peers"
        return {p["node_id"]: Verdict(p["healthy"], not p["healthy"], not p["healthy"])
                for p in self.get("/api/swarm/peers")["peers"]}


class SerfAgent(Agent):
    kind = SERF

    def __init__(self, reg: Registry, name: str, host: str, port: int, seed: str | None,
                 base: Path, submit: Submit, ns: str | None, rpc: str) -> None:
        super().__init__(name, base / f"{name}.log", submit)
        self.rpc_addr = rpc
        self.rpc: SerfRPC | None = None
        self.source = "members"
        cmd = ["serf", "agent", "-node", name, "-bind", f"{host}:{port}", "-rpc-addr", rpc,
               "-log-level", "info"]
        if seed:
            cmd += ["-join", seed]
        pre = ["ip", "netns", "exec", ns] if ns else []
        self.proc = reg.spawn([*pre, *cmd], dict(os.environ), self.log)
        self.pid = self.proc.pid

    def members(self) -> list[dict[str, Any]]:
        try:
            if self.rpc is None:
                self.rpc = SerfRPC(self.rpc_addr)
            return self.rpc.members()
        except (OSError, RuntimeError, ValueError):
            if self.rpc is not None:
                self.rpc.close()
            self.rpc = None
            raise

    def up(self) -> bool:
        self.members()
        return True

    def view(self) -> dict[str, Verdict]:
        out = {}
        for m in self.members():
            if m["Name"] == self.name:
                continue
            st = m["Status"]
            out[m["Name"]] = Verdict(st == "alive", st != "alive", st in ("failed", "left"))
        return out

    def close(self) -> None:
        if self.rpc is not None:
            self.rpc.close()
            self.rpc = None


def ask(agents: list[Agent], what: Callable[[Agent], T]) -> list[tuple[float, T | None]]:
    """Ask every agent at once; (time answered, answer or None on error)."""
    def one(a: Agent) -> tuple[float, T | None]:
        try:
            r: T | None = what(a)
        except (OSError, RuntimeError, ValueError, KeyError):
            r = None
        return time.monotonic(), r
    futs = [a.submit(lambda a=a: one(a)) for a in agents]  # type: ignore[misc]
    return [f.result() for f in futs]


def watch(agents: list[Agent], conds: dict[str, Callable[[Agent, dict[str, Verdict]], bool]],
          timeout: float, step: float = 0.1,
          seen_by: dict[str, int] | None = None) -> dict[str, float | None]:
    """Seconds until each condition has held at least once on every agent
    (None: not on all of them before ``timeout``; ``seen_by`` gets how many)."""
    t0 = time.monotonic()
    first: dict[str, dict[str, float]] = {c: {} for c in conds}
    while time.monotonic() - t0 < timeout:
        for a, (t, view) in zip(agents, ask(agents, lambda a: a.view()), strict=True):
            if view is None:
                continue
            for c, pred in conds.items():
                if a.name not in first[c] and pred(a, view):
                    first[c][a.name] = t - t0
        if all(len(f) == len(agents) for f in first.values()):
            break
        time.sleep(step)
    if seen_by is not None:
        seen_by.update({c: len(f) for c, f in first.items()})
    return {c: (max(f.values()) if len(f) == len(agents) else None) for c, f in first.items()}


def wait_up(agents: list[Agent], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(agents)
    while pending:
        for a in pending:
            if a.proc is not None and a.proc.poll() is not None:
                tail = a.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{a.kind} {a.name} exited with {a.proc.returncode}; "
                                   f"{a.log}:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{[a.name for a in pending]} never answered; logs: "
                               + ", ".join(str(a.log) for a in pending[:3]))
        ok = ask(pending, lambda a: a.up())
        pending = [a for a, (_, r) in zip(pending, ok, strict=True) if not r]
        if pending:
            time.sleep(0.1)


def start(kind: str, reg: Registry, n: int, hosts: list[str], base: Path,
          submit: Callable[[int], Submit], ns: list[str | None], interval: float | None,
          ) -> list[Agent]:
    """Agent 0 first; once it answers, the rest, each joining through it."""
    port = 7950 if ns[0] else free_port(hosts[0])
    rpc_port = 7373 if ns[0] else free_port(hosts[0])
    agents: list[Agent] = []
    for i in range(n):
        seed = f"{hosts[0]}:{port}" if i else None
        name = f"{'h' if kind == HSG else 's'}{i}"
        if kind == HSG:
            agents.append(HsgAgent(reg, name, hosts[i], port, seed, base, submit(i), ns[i],
                                   interval))
        else:
            rpc = f"{'127.0.0.1' if ns[i] else hosts[i]}:{rpc_port}"
            agents.append(SerfAgent(reg, name, hosts[i], port, seed, base, submit(i), ns[i],
                                    rpc))
        if i == 0:
            wait_up(agents, 30)
    return agents


def drop_logs(base: Path) -> None:
    """Remove a run's data and logs, unless it is failing (its error names them)."""
    if sys.exc_info()[0] in (None, KeyboardInterrupt):
        shutil.rmtree(base, ignore_errors=True)


def full(n: int) -> Callable[[Agent, dict[str, Verdict]], bool]:
    return lambda a, v: sum(1 for x in v.values() if x.alive) == n - 1


def stop(agents: list[Agent], reg: Registry) -> None:
    for a in agents:
        if isinstance(a, SerfAgent):
            a.close()
    reg.kill_all()
