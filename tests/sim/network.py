"""The simulated links between agents: who can reach whom, how late, how often lost.

Rules:
* Every random draw comes from the one ``random.Random`` given to :class:`Network`, so a
  seed replays a run exactly.
* A link is the ordered pair (sender index, receiver index). Its :class:`Link` (loss,
  base delay, jitter, duplication) is the default unless one was set for the pair or for
  the receiving host (as nftables loss on a host's input).
* Partitions are groups: a datagram (or a TCP connect) crosses only between nodes of the
  same group. Group 0 is everyone; :meth:`Network.partition` splits, :meth:`heal` joins.
* The network counts what it carries (datagrams, bytes, losses) so scenarios can measure
  bytes per agent per second over a window by differencing two readings. Bytes are the
  core's datagram payloads (what ``Swim.take_outgoing`` returns): the seal, UDP and IP
  headers the real socket adds are the same per datagram and are left out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    loss: float = 0.0     # probability a datagram is lost
    delay: float = 0.001  # base one-way delay, seconds
    jitter: float = 0.002  # extra delay, uniform in [0, jitter)
    dup: float = 0.0      # probability a delivered datagram arrives twice


@dataclass
class Counters:
    datagrams: int = 0      # handed to the network by cores
    bytes: int = 0          # payload bytes of those
    lost: int = 0           # dropped by link loss
    cut: int = 0            # dropped by a partition
    duplicated: int = 0     # extra copies delivered
    push_pulls: int = 0     # TCP exchanges opened
    push_pull_bytes: int = 0  # request + reply payload bytes


class Network:
    """Links, partitions and counters. Delivery itself is the world's timer heap:
    :meth:`route` only says when (if ever) each copy of a datagram arrives."""

    def __init__(self, rng: random.Random, default: Link | None = None) -> None:
        self.rng = rng
        self.default = default or Link()
        self.links: dict[tuple[int, int], Link] = {}
        self.hosts: dict[int, Link] = {}   # receiver index -> link spec for its input
        self.group: dict[int, int] = {}    # node index -> partition group (absent: 0)
        self.counters = Counters()

    # -- configuration -------------------------------------------------------------------

    def set_loss(self, loss: float) -> None:
        """Same loss on every link that has no override."""
        d = self.default
        self.default = Link(loss, d.delay, d.jitter, d.dup)

    def set_link(self, src: int, dst: int, link: Link) -> None:
        self.links[(src, dst)] = link

    def set_host(self, dst: int, link: Link) -> None:
        self.hosts[dst] = link

    def partition(self, groups: list[list[int]]) -> None:
        """Split the swarm: nodes in different lists stop hearing each other."""
        self.group = {i: g + 1 for g, members in enumerate(groups) for i in members}

    def heal(self) -> None:
        self.group = {}

    # -- questions -----------------------------------------------------------------------

    def link(self, src: int, dst: int) -> Link:
        if self.links:
            spec = self.links.get((src, dst))
            if spec is not None:
                return spec
        if self.hosts:
            spec = self.hosts.get(dst)
            if spec is not None:
                return spec
        return self.default

    def connected(self, a: int, b: int) -> bool:
        g = self.group
        return not g or g.get(a, 0) == g.get(b, 0)

    def reachable(self, a: int, b: int) -> bool:
        """Could a datagram from a ever reach b (ignoring whether b is up)?"""
        return self.connected(a, b) and self.link(a, b).loss < 1.0

    def one_way(self, src: int, dst: int) -> float:
        spec = self.link(src, dst)
        return spec.delay + self.rng.random() * spec.jitter

    # -- carrying ------------------------------------------------------------------------

    def route(self, src: int, dst: int, size: int) -> list[float]:
        """Count one datagram and return the delays of the copies that arrive
        (empty when lost or cut)."""
        c = self.counters
        c.datagrams += 1
        c.bytes += size
        g = self.group
        if g and g.get(src, 0) != g.get(dst, 0):
            c.cut += 1
            return []
        spec = self.link(src, dst)
        rnd = self.rng.random
        if spec.loss and rnd() < spec.loss:
            c.lost += 1
            return []
        first = spec.delay + rnd() * spec.jitter
        if spec.dup and rnd() < spec.dup:
            c.duplicated += 1
            return [first, spec.delay + rnd() * spec.jitter]
        return [first]
