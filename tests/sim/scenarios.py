"""The five scenarios of issue 9, each a function of :class:`Options` -> result dict.

Rules:
* Every scenario starts with the same join: the 3 seeds (nodes 1-3, each seeded with the
  other two) start at t=0; the other N-3 start one by one at uniformly random times in
  [1 s, 1 s + join_spread] (default 5 s), each seeded with the 3 seeds. Convergence of
  the join is measured in probe periods from the LAST start (``join_periods``).
* ``periods_to_converge`` / ``sim_seconds_to_converge`` measure the scenario's own
  recovery: from the last join (join, loss), the crash (crash), the heal (partition), the
  last restart (restart). Convergence is :class:`invariants.Convergence`, checked four
  times per probe period.
* ``bytes_per_agent_s`` is UDP payload bytes sent per live agent per second over an idle
  window (``window``, default 30 s) after the scenario converged and the post-join
  gossip died down (see :meth:`Run.measure_bytes`; ``settle_seconds`` says how long
  that took); ``push_pull_bytes_per_agent_s`` is the TCP side over the same window.
* Floors (issue 9): the join converges within 15 periods at 0 % loss, 25 at any loss;
  no false failed verdict, no false drop, no revival. A floor or invariant that does not
  hold is a violation: the CLI exits non-zero and prints the replay command.
* Params are ``Params.lan()`` unchanged: the simulator measures the defaults the agent
  ships with.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core.swim import Params

from .invariants import Checker, Convergence, max_table, present
from .network import Link, Network
from .world import Node, World, addr_of

SEEDS = 3
#: join convergence floors from issue 9, in probe periods after the last join
FLOOR_PERIODS = 15
FLOOR_PERIODS_LOSSY = 25


@dataclass
class Options:
    agents: int = 1000
    seed: int = 7
    scenario: str = "join"
    loss: float | None = None       # loss on every link; the loss scenario defaults to 0.2
    duration: float | None = None   # partition length / loss phase (defaults per scenario)
    join_spread: float = 5.0
    skew: float = 1e-3              # clock rates within 1 +- skew
    delay: float = 0.001
    jitter: float = 0.002
    dup: float = 0.0
    settle: float = 10.0
    max_settle: float = 120.0
    window: float = 30.0
    restart_spread: float | None = None  # rolling restart spread (default max(10, 0.03 N))
    downtime: float = 2.0           # seconds a restarted agent stays down
    budget_periods: float = 60.0    # how long to wait for a join to converge

    def replay(self) -> str:
        args = [f"--agents {self.agents}", f"--seed {self.seed}", f"--scenario {self.scenario}"]
        if self.loss is not None:
            args.append(f"--loss {self.loss}")
        if self.duration is not None:
            args.append(f"--duration {self.duration}")
        return "python -m tests.sim " + " ".join(args)


class Run:
    def __init__(self, opts: Options, params: Params | None = None) -> None:
        if opts.agents < SEEDS + 1:
            raise ValueError(f"need at least {SEEDS + 1} agents")
        self.opts = opts
        self.params = params or Params.lan()
        self.rng = random.Random(opts.seed)
        loss = opts.loss if opts.loss is not None else 0.0
        net = Network(random.Random(self.rng.getrandbits(64)),
                      Link(loss, opts.delay, opts.jitter, opts.dup))
        self.world = World(opts.seed, self.params, net, skew=opts.skew)
        self.checker = Checker(self.world)
        self.conv = Convergence(self.world)
        self.max_table = 0
        self.violations: list[str] = []
        self.result: dict[str, Any] = {
            "agents": opts.agents, "scenario": opts.scenario, "seed": opts.seed,
            "loss": loss,
        }

    @property
    def interval(self) -> float:
        return self.params.probe_interval

    def fail(self, what: str) -> None:
        self.violations.append(what)

    # -- steps ---------------------------------------------------------------------------

    def join_all(self) -> float:
        """Create every node and schedule its start; returns the last start time."""
        w, n = self.world, self.opts.agents
        seeds = [addr_of(i) for i in range(1, SEEDS + 1)]
        for i in range(1, n + 1):
            w.add(i, [s for s in seeds if s != addr_of(i)])
        last = 0.0
        for i in range(1, n + 1):
            t = 0.0 if i <= SEEDS else 1.0 + self.rng.uniform(0.0, self.opts.join_spread)
            last = max(last, t)
            w.at(t, self._starter(w.nodes[i]))
        return last

    def _starter(self, node: Node) -> Callable[[], None]:
        return lambda: self.world.start(node)

    def wait_for(self, pred: Callable[[], bool], budget: float,
                 step: float | None = None) -> float | None:
        """Run until ``pred()`` holds (checked every ``step``, default a quarter period)
        or ``budget`` seconds pass; returns the world time it held, or None."""
        w = self.world
        step = step or self.interval / 4
        end = w.now + budget
        hit: list[float] = []

        def tick() -> None:
            self.max_table = max(self.max_table, max_table(w))
            if pred():
                hit.append(w.now)
            elif w.now + step <= end:
                w.at(w.now + step, tick)

        w.at(w.now, tick)
        w.run_until(end, stop=lambda: bool(hit))
        return hit[0] if hit else None

    def converge(self, since: float, budget: float, label: str) -> float | None:
        """Wait for convergence; returns periods since ``since`` (None: not within budget)."""
        self.world.run_until(since)
        t = self.wait_for(self.conv.check, budget)
        if t is None:
            self.fail(f"{label}: not converged within {budget:.0f} s: {self.conv.last_reason}")
            return None
        return (t - since) / self.interval

    def join(self) -> float | None:
        last = self.join_all()
        periods = self.converge(last, self.opts.budget_periods * self.interval, "join")
        self.result["join_periods"] = None if periods is None else round(periods, 2)
        floor = FLOOR_PERIODS_LOSSY if self.world.net.default.loss > 0 else FLOOR_PERIODS
        if periods is not None and periods > floor:
            self.fail(f"join: converged after {periods:.2f} periods, floor {floor}")
        self._last_join = last
        return periods

    def _rate(self, seconds: float) -> float:
        """UDP bytes per live agent per second over the next ``seconds``."""
        w = self.world
        c = w.net.counters
        b0, live = c.bytes, max(len(w.live()), 1)
        w.run_until(w.now + seconds)
        return (c.bytes - b0) / (seconds * live)

    def measure_bytes(self, settle: bool = True) -> None:
        """Settle, then measure. A mass join or restart leaves every broadcast queue
        full for a while (each update is sent retransmit_mult * ceil(log10(N+1))
        times): the window starts only once a 5 s slice is no longer dropping (at
        least ``settle`` s, at most ``max_settle`` s), so it measures the idle swarm."""
        w = self.world
        t0 = w.now
        if settle:
            w.run_until(w.now + self.opts.settle)
            prev = self._rate(5.0)
            while w.now - t0 < self.opts.max_settle:
                rate = self._rate(5.0)
                if rate >= 0.9 * prev:
                    break
                prev = rate
        self.result["settle_seconds"] = round(w.now - t0, 1)
        c = w.net.counters
        b0, p0 = c.bytes, c.push_pull_bytes
        live = len(w.live())
        w.run_until(w.now + self.opts.window)
        span = self.opts.window * max(live, 1)
        self.result["bytes_per_agent_s"] = round((c.bytes - b0) / span, 1)
        self.result["push_pull_bytes_per_agent_s"] = round((c.push_pull_bytes - p0) / span, 1)

    def recovered(self, periods: float | None) -> None:
        self.result["converged"] = periods is not None
        self.result["periods_to_converge"] = None if periods is None else round(periods, 2)
        self.result["sim_seconds_to_converge"] = (
            None if periods is None else round(periods * self.interval, 2))

    def finish(self, started: float) -> dict[str, Any]:
        ch, w = self.checker, self.world
        ch.scan_revivals(w.live())
        self.max_table = max(self.max_table, max_table(w))
        if ch.false_failed:
            self.fail(f"{ch.false_failed} false failed verdicts")
        if ch.false_drops:
            self.fail(f"{ch.false_drops} false drops")
        if ch.revived:
            self.fail(f"{ch.revived} revived dead members")
        c = w.net.counters
        self.result.update(
            false_suspicions=ch.false_suspicions,
            falsely_suspected=len(ch.falsely_suspected), false_failed=ch.false_failed,
            false_drops=ch.false_drops, revived=ch.revived, refutations=ch.refutations,
            suspicions=ch.suspicions, failed_verdicts=ch.failed, max_table=self.max_table,
            datagrams=c.datagrams, lost=c.lost, push_pulls=c.push_pulls,
            sim_seconds=round(w.now, 1), events=w.events_run,
            wall_seconds=round(time.monotonic() - started, 1),
            ok=not self.violations, violations=self.violations + ch.violations[:5],
        )
        return self.result


# -- the scenarios -----------------------------------------------------------------------


def scenario_join(run: Run) -> None:
    run.recovered(run.join())
    run.measure_bytes()


def scenario_loss(run: Run) -> None:
    """Join and run under loss (default 20 % on every link) for ``duration`` (600 s)
    from the first start; no false failed/drop; everyone still holds everyone; after
    the loss ends the swarm converges again."""
    w = run.world
    if run.opts.loss is None:
        w.net.set_loss(0.2)
        run.result["loss"] = 0.2
    duration = run.opts.duration or 600.0
    run.recovered(run.join())
    # the byte window is the last stretch of the lossy phase (no settling: the lossy
    # steady state is what is measured)
    w.run_until(max(w.now, duration - run.opts.window))
    run.measure_bytes(settle=False)
    w.run_until(duration)
    ok, why = present(w)
    if not ok:
        run.fail(f"loss: at the end of the lossy phase {why}")
    w.net.set_loss(0.0)
    t0 = w.now
    after = run.wait_for(run.conv.check, 60 * run.interval)
    run.result["periods_to_converge_after_loss"] = (
        None if after is None else round((after - t0) / run.interval, 2))
    if after is None:
        run.fail(f"loss: not converged within 60 periods after the loss ended:"
                 f" {run.conv.last_reason}")


def scenario_crash(run: Run) -> None:
    """10 % die at once; every survivor marks each failed, then expires it."""
    w, ch = run.world, run.checker
    if run.join() is None:
        run.recovered(None)
        return
    w.run_until(w.now + run.opts.settle)
    nodes = list(w.nodes.values())
    victims = run.rng.sample(nodes, max(1, len(nodes) // 10))
    ch.watch = {v.index for v in victims}
    for v in victims:
        w.crash(v)
    t0 = w.now
    pairs = len(w.live()) * len(victims)
    detected: list[float] = []

    def all_failed() -> bool:
        if not detected and len(ch.failed_pairs) >= pairs:
            detected.append(w.now)
        return bool(detected) and run.conv.check()

    budget = 4 * run.params.ttl + 120
    t = run.wait_for(all_failed, budget)
    run.recovered(None if t is None else (t - t0) / run.interval)
    run.result["crashed"] = len(victims)
    run.result["sim_seconds_to_all_failed"] = (
        round(detected[0] - t0, 2) if detected else None)
    if len(ch.failed_pairs) < pairs:
        run.fail(f"crash: {pairs - len(ch.failed_pairs)} (survivor, victim) pairs never"
                 f" saw MemberFailed")
    if len(ch.expired_pairs) < pairs:
        run.fail(f"crash: {pairs - len(ch.expired_pairs)} (survivor, victim) pairs never"
                 f" saw MemberExpired")
    if t is None:
        run.fail(f"crash: not converged within {budget:.0f} s: {run.conv.last_reason}")
    run.measure_bytes()


def scenario_partition(run: Run) -> None:
    """50/50 split for ``duration`` (300 s), then heal: each side converges to itself,
    then everyone to the full membership."""
    w = run.world
    if run.join() is None:
        run.recovered(None)
        return
    duration = run.opts.duration or 300.0
    idx = list(w.nodes)
    run.rng.shuffle(idx)
    half = len(idx) // 2
    w.net.partition([sorted(idx[:half]), sorted(idx[half:])])
    w.run_until(w.now + duration)
    sides = run.conv.check()
    run.result["sides_converged"] = sides
    if not sides:
        run.fail(f"partition: sides not converged after {duration:.0f} s:"
                 f" {run.conv.last_reason}")
    w.net.heal()
    t0 = w.now
    t = run.wait_for(run.conv.check, max(300.0, 4 * run.params.ttl))
    run.recovered(None if t is None else (t - t0) / run.interval)
    if t is None:
        run.fail(f"partition: not converged after heal: {run.conv.last_reason}")
    run.measure_bytes()


def scenario_restart(run: Run) -> None:
    """Rolling restart of every agent (down ``downtime`` s each, over ``restart_spread``):
    every table ends with every node ALIVE at its new incarnation, nothing stale."""
    w = run.world
    if run.join() is None:
        run.recovered(None)
        return
    w.run_until(w.now + run.opts.settle)
    spread = run.opts.restart_spread or max(10.0, 0.03 * run.opts.agents)
    t0 = w.now
    last = t0
    for node in list(w.nodes.values()):
        t = t0 + run.rng.uniform(0.0, spread)
        w.at(t, _crasher(w, node))
        w.at(t + run.opts.downtime, _restarter(w, node))
        last = max(last, t + run.opts.downtime)
    periods = run.converge(last, 180.0, "restart")
    run.recovered(periods)
    stale = [n.index for n in w.nodes.values() if n.lives < 2]
    if stale:
        run.fail(f"restart: nodes never restarted: {stale[:5]}")
    run.measure_bytes()


def _crasher(w: World, node: Node) -> Callable[[], None]:
    return lambda: w.crash(node)


def _restarter(w: World, node: Node) -> Callable[[], None]:
    return lambda: w.restart(node)


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "join": scenario_join,
    "crash": scenario_crash,
    "partition": scenario_partition,
    "restart": scenario_restart,
    "loss": scenario_loss,
}


def run_scenario(opts: Options, params: Params | None = None) -> dict[str, Any]:
    started = time.monotonic()
    # Python's cyclic garbage collector walks every tracked object on each full
    # collection: N cores hold O(N^2) of them (tables, queue entries, heap
    # tuples) and a gossip storm allocates them by the million, so at 1,000
    # agents more than half of the run went into gc_collect (seen with py-spy
    # in a partition and a restart). The simulator and the cores make no
    # reference cycles worth collecting: reference counting frees everything,
    # so the collector is off for the run (and back as it was after it).
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        run = Run(opts, params)
        SCENARIOS[opts.scenario](run)
    finally:
        if was_enabled:
            gc.enable()
    if "bytes_per_agent_s" not in run.result:
        run.result["bytes_per_agent_s"] = None
    run.result.setdefault("converged", False)
    return run.finish(started)


def with_params(**changes: Any) -> Params:
    """Params.lan() with some fields changed (tests use shorter timings)."""
    return dataclasses.replace(Params.lan(), **changes)
