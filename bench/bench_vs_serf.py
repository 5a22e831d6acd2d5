"""hs-gossip side by side with HashiCorp Serf, same N, same machine, same run.

For each N (``--sizes``, default 10 20 50 100), alternating which system goes
first, start N agents on loopback, one 127.x address each (hs-gossip on
127.0.2.x through ``hs-gossip run`` and HS_GOSSIP_* variables; Serf on
127.0.3.x through ``serf agent -node -bind -rpc-addr -join``), every agent
joining through agent 0, and measure

* full membership: seconds from the moment every agent answers (HTTP API;
  Serf RPC) until every agent lists N-1 others alive (hs-gossip:
  ``healthy``; Serf: status ``alive``), and the same from the first spawn;
* detection: SIGKILL one agent (``--kills``, default 3, one after another;
  the median is reported), seconds until every survivor sees it
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

Helpers: serf_agents.py (the two kinds of agent), serf_netns.py (processes,
Serf RPC, nftables counters, the namespace LAN), serf_report.py (table, plot).
Needs root (nftables, namespaces) and Serf (``apt-get install serf``);
``pip install -e .[bench]`` for the plot.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serf_agents import (
    GONE,
    HSG,
    SERF,
    Agent,
    SerfAgent,
    Verdict,
    ask,
    drop_logs,
    full,
    start,
    stop,
    wait_up,
    watch,
)
from serf_netns import (
    CLK_TCK,
    IP_UDP_HEADERS,
    Lan,
    LoopbackCounters,
    Registry,
    cpu_ticks,
    rss_mib,
    run,
)
from serf_report import LOOP_COLS, LOSS_COLS, plot, table


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
        conv = watch(agents, {"full": full(n)}, timeout=60 + n, step=args.poll)["full"]
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
        # --kills agents, one after another, each once the previous one is
        # seen failed by all: one kill is one sample of a noisy figure.
        living = list(agents)
        dets: list[dict[str, float | None]] = []
        seen_by: dict[str, int] = {}
        for k in range(min(args.kills, n - 2)):
            victim = living[(n // 2 + k) % len(living)]
            living.remove(victim)
            os.kill(victim.pid, signal.SIGKILL)

            def seen(flag: str, key: str = victim.key) -> Callable[[Agent, dict[str, Verdict]],
                                                                   bool]:
                return lambda a, v: getattr(v.get(key, GONE), flag)

            dets.append(watch(living, {"unhealthy": seen("unhealthy"), "failed": seen("failed")},
                              timeout=args.detect_timeout, step=args.poll,
                              seen_by=seen_by))
            if dets[-1]["failed"] is None:
                break

        def med(key: str) -> float | None:
            xs = [d[key] for d in dets]
            if not xs or any(x is None for x in xs):
                return None
            return statistics.median(x for x in xs if x is not None)

        det = {"unhealthy": med("unhealthy"), "failed": med("failed")}
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
            "failed_each_s": [r(d["failed"]) for d in dets],
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
    ap.add_argument("--poll", type=float, default=0.1,
                    help="seconds between two polls of every agent (the polls cost the "
                         "agents CPU: at N = 100 every 0.1 s they load both cores)")
    ap.add_argument("--kills", type=int, default=3,
                    help="agents SIGKILLed one after another; detection is their median")
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
