"""What must hold in every run, checked from the cores' events and their tables.

Rules:
* Truth is the world (who is up, in which partition group, which incarnation each life
  started with); a verdict is judged against it at the moment the core announces it.
  Events only say *when* to look: the entry itself is read from the observer's table.
* A false suspicion / false failed verdict / false drop is one about a node that is up,
  reachable from the observer (same partition group, loss < 1) and in the life the
  entry's incarnation belongs to (incarnation >= the incarnation that life started with).
  Verdicts about a previous life of a restarted node are correct, not false. Each is
  counted once per observer that announces it; ``falsely_suspected`` also counts the
  distinct (node, incarnation) pairs suspected.
* Revival: the observer once declared X dead at incarnation d, and later holds X ALIVE
  at an incarnation <= d while X is down, or while X lives a newer life than that entry
  describes. A crashed node can only come back by restarting with a higher incarnation.
* Convergence: every live node's table holds exactly the live nodes of its partition
  group (minus itself), each ALIVE at an incarnation >= the one its current life started
  with. Checked with a remembered witness (the last pair found wrong) first, so a check
  that fails costs O(1) and a full O(N^2) scan runs only when the witness is resolved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.core.swim import (
    ALIVE,
    SUSPECT,
    Event,
    MemberExpired,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberRestarted,
    MemberSuspected,
)
from agent.core.swim import IncarnationRaised as _Raised

from .world import Node, World

#: descriptions of violations kept for the report (the counts are complete)
KEEP = 10


@dataclass
class Checker:
    world: World
    false_suspicions: int = 0
    false_failed: int = 0
    false_drops: int = 0
    revived: int = 0
    refutations: int = 0
    suspicions: int = 0
    failed: int = 0
    expired: int = 0
    recovered: int = 0
    violations: list[str] = field(default_factory=list)
    #: distinct (subject index, incarnation) falsely suspected by at least one observer
    falsely_suspected: set[tuple[int, int | None]] = field(default_factory=set)
    #: (observer index, subject index) -> incarnation of the observer's last DEAD verdict
    dead_inc: dict[tuple[int, int], int] = field(default_factory=dict)
    #: (observer index, subject index) pairs that announced MemberFailed / MemberExpired
    #: for subjects listed in ``watch`` (crash detection)
    watch: set[int] = field(default_factory=set)
    failed_pairs: set[tuple[int, int]] = field(default_factory=set)
    expired_pairs: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.world.observer = self.on_events

    def _note(self, what: str) -> None:
        if len(self.violations) < KEEP:
            self.violations.append(f"t={self.world.now:.2f} {what}")

    def _live_here(self, obs: Node, x: Node, inc: int | None) -> bool:
        """Is a verdict about x (entry incarnation inc) a verdict about a live, reachable
        node in the life that entry describes?"""
        return (x.up and self.world.net.reachable(obs.index, x.index)
                and self.world.net.reachable(x.index, obs.index)
                and (inc is None or inc >= x.start_inc))

    def on_events(self, obs: Node, events: list[Event]) -> None:
        by_id = self.world.by_id
        members = obs.swim.members
        for ev in events:
            if isinstance(ev, _Raised):
                self.refutations += 1
                continue
            nid = getattr(ev, "node_id", None)
            x = by_id.get(nid) if nid is not None else None
            if x is None:
                continue
            m = members.get(x.node_id)
            inc = m.incarnation if m is not None else None
            key = (obs.index, x.index)
            if isinstance(ev, MemberSuspected):
                self.suspicions += 1
                if self._live_here(obs, x, inc):
                    self.false_suspicions += 1
                    self.falsely_suspected.add((x.index, inc))
            elif isinstance(ev, MemberFailed):
                self.failed += 1
                if inc is not None:
                    self.dead_inc[key] = max(inc, self.dead_inc.get(key, 0))
                if x.index in self.watch:
                    self.failed_pairs.add(key)
                if self._live_here(obs, x, inc):
                    self.false_failed += 1
                    self._note(f"n{obs.index} declared live n{x.index} dead at inc {inc}"
                               f" (its inc {x.incarnation})")
            elif isinstance(ev, MemberExpired | MemberLeft):
                if isinstance(ev, MemberExpired):
                    self.expired += 1
                    if x.index in self.watch:
                        self.expired_pairs.add(key)
                d = self.dead_inc.get(key)
                if self._live_here(obs, x, d if d is not None else inc):
                    self.false_drops += 1
                    self._note(f"n{obs.index} dropped live n{x.index} ({type(ev).__name__},"
                               f" dead at inc {d}, its inc {x.incarnation})")
            elif isinstance(ev, MemberJoined | MemberRecovered | MemberRestarted):
                if isinstance(ev, MemberRecovered):
                    self.recovered += 1
                if m is not None and m.status == ALIVE:
                    self._check_revival(obs, x, m.incarnation)

    def _check_revival(self, obs: Node, x: Node, inc: int) -> None:
        d = self.dead_inc.get((obs.index, x.index))
        if d is None or inc > d:
            return
        if not x.up or inc < x.start_inc:
            self.revived += 1
            self._note(f"n{obs.index} revived n{x.index} at inc {inc} (declared dead at {d},"
                       f" up={x.up}, life started at inc {x.start_inc})")

    def scan_revivals(self, nodes: Iterable[Node]) -> None:
        """Look in the tables, not just the events, for revived members (end of a run)."""
        by_index = self.world.nodes
        for (o, xi), d in self.dead_inc.items():
            obs, x = by_index[o], by_index[xi]
            if not obs.up:
                continue
            m = obs.swim.members.get(x.node_id)
            if m is not None and m.status == ALIVE and m.incarnation <= d and (
                    not x.up or m.incarnation < x.start_inc):
                self.revived += 1
                self._note(f"table scan: n{o} holds n{xi} ALIVE at inc {m.incarnation},"
                           f" declared dead at {d}")
        del nodes


class Convergence:
    """Exact convergence test, cheap while it keeps failing (see the module rules)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._witness: tuple[Node, Node | None] | None = None
        self.last_reason = ""

    def _groups(self, live: list[Node]) -> dict[int, list[Node]]:
        group = self.world.net.group
        out: dict[int, list[Node]] = {}
        for n in live:
            out.setdefault(group.get(n.index, 0), []).append(n)
        return out

    def check(self) -> bool:
        w = self._witness
        if w is not None:
            obs, x = w
            if obs.up and (x is None or x.up) and not self._pair_ok(obs, x):
                return False
        live = self.world.live()
        groups = self._groups(live)
        group = self.world.net.group
        for n in live:
            if len(n.swim.members) != len(groups[group.get(n.index, 0)]) - 1:
                self._witness = (n, None)
                self.last_reason = f"n{n.index} holds {len(n.swim.members)} entries"
                return False
        # full scan, starting where the last witness was found
        start = 0
        if w is not None and w[0] in live:
            start = live.index(w[0])
        for obs in live[start:] + live[:start]:
            members = obs.swim.members
            for x in groups[group.get(obs.index, 0)]:
                if x is obs:
                    continue
                m = members.get(x.node_id)
                if m is None or m.status != ALIVE or m.incarnation < x.start_inc:
                    self._witness = (obs, x)
                    self.last_reason = (
                        f"n{obs.index} holds n{x.index} as "
                        f"{'missing' if m is None else (m.status, m.incarnation)}"
                        f" (its life started at inc {x.start_inc})")
                    return False
        self._witness = None
        self.last_reason = ""
        return True

    def _pair_ok(self, obs: Node, x: Node | None) -> bool:
        if x is None:
            live = self.world.live()
            group = self.world.net.group
            g = group.get(obs.index, 0)
            return len(obs.swim.members) == sum(1 for n in live if group.get(n.index, 0) == g) - 1
        m = obs.swim.members.get(x.node_id)
        return m is not None and m.status == ALIVE and m.incarnation >= x.start_inc


def present(world: World) -> tuple[bool, str]:
    """Weaker than convergence, for lossy steady states: every live node holds every
    other reachable live node, ALIVE or SUSPECT (a suspicion may be pending)."""
    live = world.live()
    group = world.net.group
    for obs in live:
        members = obs.swim.members
        g = group.get(obs.index, 0)
        for x in live:
            if x is obs or group.get(x.index, 0) != g:
                continue
            m = members.get(x.node_id)
            if m is None or m.status > SUSPECT:
                return False, (f"n{obs.index} holds n{x.index} as "
                               f"{'missing' if m is None else m.status}")
    return True, ""


def max_table(world: World) -> int:
    return max((len(n.swim.members) for n in world.live()), default=0)
