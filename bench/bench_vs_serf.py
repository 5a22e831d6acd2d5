"""hs-gossip side by side with HashiCorp Serf, same N, same machine, same run.

For each N (``--sizes``, default 10 20 50 100), alternating which system goes
first, start N agents on loopback, one 127.x address each (hs-gossip on
127.0.2.x through ``hs-gossip run`` and HS_GOSSIP_* variables; Serf on
127.0.3.x through ``serf agent -node -bind -rpc-addr -join``), every agent
joining through agent 0, and measure

* full membership: seconds from the moment every agent answers (HTTP API;
  Serf RPC) until every agent lists N-1 others alive (hs-gossip:
  ``healthy``; Serf: status ``alive``), and the same from the first spawn;
* detection: SIGKILL one agent, seconds until every survivor sees it
  unhealthy and failed. Serf: status ``failed`` (both columns). hs-gossip:
  from ``/api/swarm/members`` when the agent has it (``suspect``/``dead`` is
  unhealthy, ``dead`` is failed), else from ``/api/swarm/peers`` (absent or
  ``healthy: false`` is both unhealthy and failed);
* idle CPU (% of one core, utime+stime from /proc/PID/stat) and RSS
  (/proc/PID/status) per agent over an idle window (``--idle``, 30 s);
* UDP bytes sent per agent per second over that window, counted OUTSIDE the
  agents by nftables: one counter per source address in the output hook on
  ``lo``, so each datagram is counted once by its sender for both systems.
  ``udp_B/s`` is UDP payload (IP packet bytes minus 28 per packet);
  ``ip_B/s`` whole IPv4 packets; ``tcp_B/s`` TCP (Serf's push-pull; any
  hs-gossip sync stream) as IP bytes, Serf's RPC port excluded.

Then, per ``--loss`` percentage (default 20 40): 10 agents per system, each
in its own network namespace on a private bridge (10.213.77.0/24; the bridge
sits in a namespace of its own, nothing touches the host's), converge, then
drop that share of every packet arriving on each host's link (nftables
``numgen random mod 100 < P drop`` in the input hook) for 60 s, polling every
agent twice a second. A false verdict is a transition, seen by one observer
about one (live) member, into unhealthy (suspect/dead/healthy=false/absent)
or failed (Serf ``failed``; hs-gossip ``dead``, or with only the peers API,
absent or healthy=false). Serf's members list never says "suspect" (only
alive/failed/left), so its ``false_unhealthy`` is always 0: compare
suspicions through the log lines counted as ``log_suspect``/``log_failed``
(see LOG_NEEDLES; they also catch verdicts that flip back between polls).

Needs root (nftables, namespaces) and Serf (``apt-get install serf``).
Everything it creates is removed on exit, Ctrl-C included.

    python bench/bench_vs_serf.py                          # 10 20 50 100, loss 20 40
    python bench/bench_vs_serf.py --sizes 10 20 50 --loss 20 40 | tee out.txt
    python bench/bench_vs_serf.py --sizes 20 --idle 10 --loss   # no loss runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serf_netns import (
    CLK_TCK,
    IP_UDP_HEADERS,
    Lan,
    LoopbackCounters,
    Registry,
    SerfRPC,
    cpu_ticks,
    free_port,
    rss_mib,
    run,
)

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
        self.pid = reg.spawn([*pre, *hsg_cli(), "run"], env, self.log).pid

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
        self.pid = reg.spawn([*pre, *cmd], dict(os.environ), self.log).pid

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


def run_loopback(kind: str, n: int, args: argparse.Namespace, reg: Registry,
                 pool: ThreadPoolExecutor) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix=f"bench-vs-serf-{kind}-{n}-"))
    hosts = [f"127.0.{2 if kind == HSG else 3}.{i + 1}" for i in range(n)]
    agents: list[Agent] = []
    counters: LoopbackCounters | None = None
    try:
        t_spawn = time.monotonic()
        agents = start(kind, reg, n, hosts, base, lambda i: pool.submit, [None] * n,
                       args.interval)
        wait_up(agents, 60 + 2 * n)
        t_up = time.monotonic()
        conv = watch(agents, {"full": full(n)}, timeout=60 + n)["full"]
        if conv is None:
            raise TimeoutError(f"{kind} N={n} never reached full membership; logs in {base}")
        from_spawn = t_up - t_spawn + conv
        rpc_port = int(agents[0].rpc_addr.rsplit(":", 1)[1]) if isinstance(
            agents[0], SerfAgent) else 0
        counters = LoopbackCounters(reg, hosts, exclude_tcp_port=rpc_port)
        time.sleep(args.settle)  # let start-up work settle before idling
        ticks0 = {a.name: cpu_ticks(a.pid) for a in agents}
        c0 = counters.read()
        t0 = time.monotonic()
        time.sleep(args.idle)
        window = time.monotonic() - t0
        c1 = counters.read()
        cpu = [(cpu_ticks(a.pid) - ticks0[a.name]) / CLK_TCK / window * 100 for a in agents]
        rss = [rss_mib(a.pid) for a in agents]

        def per_agent(proto: str) -> tuple[float, float]:
            pk = sum(c1[f"{proto} {h}"][0] - c0[f"{proto} {h}"][0] for h in hosts)
            by = sum(c1[f"{proto} {h}"][1] - c0[f"{proto} {h}"][1] for h in hosts)
            return pk / window / n, by / window / n

        udp_pps, udp_ip = per_agent("udp")
        _, tcp_ip = per_agent("tcp")
        victim = agents[n // 2]
        rest = [a for a in agents if a is not victim]
        os.kill(victim.pid, signal.SIGKILL)

        def seen(flag: str) -> Callable[[Agent, dict[str, Verdict]], bool]:
            return lambda a, v: getattr(v.get(victim.key, GONE), flag)

        seen_by: dict[str, int] = {}
        det = watch(rest, {"unhealthy": seen("unhealthy"), "failed": seen("failed")},
                    timeout=args.detect_timeout, seen_by=seen_by)
    finally:
        stop(agents, reg)
        if counters is not None:
            run("nft", "delete", "table", "ip", counters.name)
            reg.tables.remove((None, f"ip {counters.name}"))
        drop_logs(base)

    def r(x: float | None, d: int = 2) -> float | None:
        return None if x is None else round(x, d)

    return {"system": kind, "agents": n, "source": agents[0].source,
            "converge_s": r(conv), "converge_from_spawn_s": r(from_spawn),
            "unhealthy_s": r(det["unhealthy"]), "failed_s": r(det["failed"]),
            # survivors that saw it so within --detect-timeout (of N-1)
            "unhealthy_by": seen_by["unhealthy"], "failed_by": seen_by["failed"],
            "cpu_pct": r(statistics.mean(cpu)), "cpu_pct_max": r(max(cpu)),
            "rss_mib": r(statistics.mean(rss), 1),
            "udp_Bps": round(udp_ip - IP_UDP_HEADERS * udp_pps),
            "udp_ip_Bps": round(udp_ip), "udp_pps": r(udp_pps), "tcp_ip_Bps": round(tcp_ip),
            "idle_s": round(window, 1)}


#: log lines that mark a suspicion and a failed verdict, per system. Serf:
#: memberlist logs only the suspicions its own probes start (not those heard
#: through gossip), serf one EventMemberFailed per observer. hs-gossip: one
#: line per observer for every suspicion and failure, heard or not.
LOG_NEEDLES = {
    SERF: (("has failed, no acks",), ("EventMemberFailed",)),
    HSG: (("suspected (probes unanswered)",), ("failed (suspicion not refuted)",)),
}


def log_count(agents: list[Agent], offsets: dict[str, int], needles: tuple[str, ...]) -> int:
    total = 0
    for a in agents:
        with open(a.log, "rb") as f:
            f.seek(offsets[a.name])
            text = f.read().decode(errors="replace")
        total += sum(text.count(s) for s in needles)
    return total


def run_loss(kind: str, pct: int, lan: Lan, args: argparse.Namespace,
             reg: Registry) -> dict[str, Any]:
    n = len(lan.hosts)
    base = Path(tempfile.mkdtemp(prefix=f"bench-vs-serf-loss-{kind}-{pct}-"))
    agents: list[Agent] = []
    try:
        agents = start(kind, reg, n, lan.addrs, base,
                       lambda i: lambda fn: lan.submit(lan.hosts[i], fn),
                       list(lan.hosts), args.interval)
        wait_up(agents, 60)
        if watch(agents, {"full": full(n)}, timeout=90)["full"] is None:
            raise TimeoutError(f"{kind}: no full membership in the namespaces; logs in {base}")
        time.sleep(args.settle)
        offsets = {a.name: a.log.stat().st_size for a in agents}
        lan.set_loss(pct)
        keys = {a.key: a.name for a in agents}
        state: dict[tuple[str, str], Verdict] = {}
        events = {"unhealthy": 0, "failed": 0}
        pairs: dict[str, set[tuple[str, str]]] = {"unhealthy": set(), "failed": set()}
        polls = missed = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.loss_window:
            for a, (_, view) in zip(agents, ask(agents, lambda a: a.view()), strict=True):
                polls += 1
                if view is None:
                    missed += 1
                    continue
                for other in set(keys) - {a.key}:
                    v = view.get(other, GONE)
                    was = state.get((a.name, other), Verdict(True, False, False))
                    for flag in events:
                        if getattr(v, flag) and not getattr(was, flag):
                            if args.verbose:
                                how = v if other in view else "absent"
                                print(f"#  {time.monotonic() - t0:5.1f}s {a.name} sees "
                                      f"{keys[other]} {flag} ({how})", file=sys.stderr)
                            events[flag] += 1
                            pairs[flag].add((a.name, other))
                    state[(a.name, other)] = v
            time.sleep(args.loss_step)
        arrived, dropped = lan.loss_counts()
        needles = LOG_NEEDLES[kind]
        logs = {"log_suspect": log_count(agents, offsets, needles[0]),
                "log_failed": log_count(agents, offsets, needles[1])}
    finally:
        stop(agents, reg)
        lan.set_loss(0)
        drop_logs(base)
    return {"system": kind, "agents": n, "loss_pct": pct, "source": agents[0].source,
            "window_s": args.loss_window,
            "measured_drop_pct": round(100 * dropped / arrived, 1) if arrived else None,
            "false_unhealthy": events["unhealthy"], "false_failed": events["failed"],
            "pairs_unhealthy": len(pairs["unhealthy"]), "pairs_failed": len(pairs["failed"]),
            **logs, "polls_unanswered": missed, "polls": polls}


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:>{w[c]}}" for c in cols)]
    lines += ["  ".join(f"{r.get(c)!s:>{w[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


LOOP_COLS = ["system", "agents", "converge_s", "converge_from_spawn_s", "unhealthy_s",
             "failed_s", "failed_by", "cpu_pct", "rss_mib", "udp_Bps", "udp_ip_Bps", "udp_pps",
             "tcp_ip_Bps", "source"]
LOSS_COLS = ["system", "loss_pct", "measured_drop_pct", "false_unhealthy", "false_failed",
             "pairs_unhealthy", "pairs_failed", "log_suspect", "log_failed", "source"]


def plot(loop: list[dict[str, Any]], loss: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("udp_Bps", "UDP payload bytes/s sent per agent"),
              ("cpu_pct", "idle CPU per agent (% of a core)"),
              ("rss_mib", "RSS per agent (MiB)"),
              ("converge_s", "full membership (s after all answer)"),
              ("failed_s", "SIGKILLed agent seen failed by all, s (hs-gossip: dead)")]
    style = {HSG: ("tab:blue", "o"), SERF: ("tab:orange", "s")}
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for kind in (HSG, SERF):
            pts = [(r["agents"], r[key]) for r in loop if r["system"] == kind
                   and r[key] is not None]
            if pts:
                color, marker = style[kind]
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=kind)
        if key == "failed_s":
            pts = [(r["agents"], r["unhealthy_s"]) for r in loop if r["system"] == HSG
                   and r["unhealthy_s"] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--",
                        color="tab:blue", label=f"{HSG} unhealthy")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("agents")
        ax.set_xticks(sorted({r["agents"] for r in loop}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes.flat[5]
    if loss:
        levels = sorted({r["loss_pct"] for r in loss})
        # Serf's members list never says "suspect": its suspicions come from
        # the memberlist log lines
        bars = [(HSG, "false_unhealthy", "tab:cyan"), (HSG, "false_failed", "tab:blue"),
                (SERF, "log_suspect", "navajowhite"), (SERF, "false_failed", "tab:orange")]
        width = 0.8 / len(bars)
        top = 0
        for j, (kind, key, color) in enumerate(bars):
            vals = [next((r[key] or 0 for r in loss if r["system"] == kind
                          and r["loss_pct"] == p), 0) for p in levels]
            xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(levels))]
            got = ax.bar(xs, vals, width, color=color, label=f"{kind} {key.replace('_', ' ')}")
            ax.bar_label(got, fontsize=7)
            top = max(top, *vals)
        ax.set_ylim(0, max(1, top) * 1.15)
        ax.set_xticks(range(len(levels)), [f"{p} % loss" for p in levels])
        n = loss[0]["agents"]
        ax.set_title(f"false verdicts, {n} agents in netns, {loss[0]['window_s']:g} s",
                     fontsize=10)
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.suptitle("hs-gossip vs Serf, same machine, same run (loopback; one address per agent)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def order(i: int, systems: list[str]) -> list[str]:
    """Serf first on even rounds, hs-gossip first on odd ones: neither always
    runs on a machine still warm from the other."""
    both = [SERF, HSG] if i % 2 == 0 else [HSG, SERF]
    return [k for k in both if k in systems]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10, 20, 50, 100])
    ap.add_argument("--loss", type=int, nargs="*", default=[20, 40],
                    help="loss percentages for the namespace runs; none to skip")
    ap.add_argument("--idle", type=float, default=30.0, help="idle window (s)")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--detect-timeout", type=float, default=90.0)
    ap.add_argument("--loss-agents", type=int, default=10)
    ap.add_argument("--loss-window", type=float, default=60.0)
    ap.add_argument("--loss-step", type=float, default=0.5)
    ap.add_argument("--interval", type=float, default=None,
                    help="HS_GOSSIP_INTERVAL (default: the agent's own default)")
    ap.add_argument("--plot", type=Path,
                    default=Path(__file__).resolve().parent.parent / "docs/bench_vs_serf.png")
    ap.add_argument("--systems", nargs="+", choices=(HSG, SERF), default=[HSG, SERF],
                    help="run only these (to debug one side; the comparison needs both)")
    ap.add_argument("--verbose", action="store_true",
                    help="print each false verdict of the loss runs as it is seen")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only redraw the plot from a --json file of an earlier run")
    args = ap.parse_args()
    if args.replot:
        doc = json.loads(args.replot.read_text())
        plot(doc["loopback"], doc["loss"], args.plot)
        print(f"plot: {args.plot}")
        return 0
    if shutil.which("serf") is None:
        print("serf is not installed: apt-get install serf", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or shutil.which("nft") is None:
        print("needs root and nftables (apt-get install nftables): UDP bytes are counted "
              "by nftables, loss runs use network namespaces", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # even when started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reg = Registry()
    loop: list[dict[str, Any]] = []
    loss: list[dict[str, Any]] = []
    try:
        with ThreadPoolExecutor(32) as pool:
            for i, n in enumerate(args.sizes):
                for kind in order(i, args.systems):
                    print(f"# {kind} N={n} ...", file=sys.stderr, flush=True)
                    loop.append(run_loopback(kind, n, args, reg, pool))
                    print("# " + json.dumps(loop[-1]), file=sys.stderr, flush=True)
        if args.loss:
            lan = Lan(reg, args.loss_agents)
            for i, pct in enumerate(args.loss):
                for kind in order(i, args.systems):
                    print(f"# {kind} loss {pct} % ...", file=sys.stderr, flush=True)
                    loss.append(run_loss(kind, pct, lan, args, reg))
                    print("# " + json.dumps(loss[-1]), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        reg.close()
    serf_version = run("serf", "version").splitlines()[0]
    print(f"hs-gossip vs {serf_version}; {os.cpu_count()} cores; idle window {args.idle:g} s; "
          f"HS_GOSSIP_INTERVAL {args.interval or 'default'}; Serf profile lan (default)")
    if loop:
        print("\nLoopback, one 127.x address per agent (udp_Bps = UDP payload bytes sent "
              "per agent per second, counted by nftables per source address):")
        print(table(loop, LOOP_COLS))
    if loss:
        print(f"\nLoss, {args.loss_agents} agents in network namespaces, "
              f"{args.loss_window:g} s, polled every {args.loss_step:g} s:")
        print(table(loss, LOSS_COLS))
    print("\nJSON " + json.dumps({"loopback": loop, "loss": loss, "serf": serf_version}))
    if args.json:
        args.json.write_text(json.dumps({"loopback": loop, "loss": loss}, indent=2))
    if loop or loss:
        plot(loop, loss, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
