"""A deterministic in-memory network for the sans-I/O membership core.

Every node is a :class:`Membership` at its own address; datagrams are queued
with a delivery time and may be dropped, delayed, duplicated or reordered, all
from one seeded RNG. Time only moves when :meth:`SimNet.run` advances it.

Rules: nodes are driven the way ``agent.runtime.agent`` drives its core, so
that what passes here says something about the daemon: after each delivered
datagram ``receive`` then ``push``; ``tick`` every interval with the daemon's
+-10% jitter. Node ``i`` lives at the i-th address of 10.0.0.0/8, so any
swarm size up to 2**24 - 2 has distinct, valid addresses.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import uuid
from dataclasses import dataclass, field

from agent.core.addr import Addr
from agent.core.membership import Event, Membership, Params, SelfInfo

#: 10.0.0.0, the first address of the simulated network
BASE = int(ipaddress.IPv4Address("10.0.0.0"))
#: node indexes run from 1 to SIZE_LIMIT - 1 (10.255.255.255 is broadcast)
SIZE_LIMIT = 2**24 - 1


@dataclass
class SimNet:
    seed: int = 0
    loss: float = 0.0
    dup: float = 0.0
    max_delay: float = 0.0
    params: Params = field(default_factory=lambda: Params(interval=1.0, suspect_after=5.0,
                                                          ttl=30.0))
    now: float = 0.0
    #: call Membership.push after every delivered datagram, as the agent does;
    #: False only to measure what push rounds are worth
    push: bool = True
    nodes: dict[Addr, Membership] = field(default_factory=dict)
    down: set[Addr] = field(default_factory=set)
    blocked: set[tuple[Addr, Addr]] = field(default_factory=set)
    events: dict[Addr, list[Event]] = field(default_factory=dict)
    _queue: list[tuple[float, int, bytes, Addr, Addr]] = field(default_factory=list)
    _seq: int = 0
    _next_tick: dict[Addr, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def add(self, i: int, seeds: list[Addr] | None = None, *, incarnation: int = 1,
            node_id: bytes | None = None) -> Membership:
        addr = self.addr_of(i)
        nid = node_id or uuid.UUID(int=self.rng.getrandbits(128), version=4).bytes
        me = SelfInfo(nid, incarnation, f"n{i}", 7946, 50050, addr[0])
        m = Membership(me, self.params, random.Random(self.rng.getrandbits(64)), self.now)
        m.set_seeds(seeds or [])
        self.nodes[addr] = m
        self.down.discard(addr)
        self.events[addr] = []
        # Stagger first ticks like real agents starting at different moments.
        self._next_tick[addr] = self.now + self.rng.uniform(0, self.params.interval)
        return m

    def addr_of(self, i: int) -> Addr:
        """10.0.0.i for i < 255, then on through 10.0.1.0 and up: never the
        network (10.0.0.0) or broadcast (10.255.255.255) address."""
        if not 1 <= i < SIZE_LIMIT:
            raise ValueError(f"node index {i} outside 1..{SIZE_LIMIT - 1}")
        return (str(ipaddress.IPv4Address(BASE + i)), 7946)

    def kill(self, i: int) -> None:
        """Crash: the node stops sending and receiving, without a word."""
        self.down.add(self.addr_of(i))

    def stop(self, i: int) -> None:
        """Graceful shutdown: leave, flush, then silence."""
        addr = self.addr_of(i)
        self.nodes[addr].leave(self.now)
        self._drain(addr)
        self.down.add(addr)

    def partition(self, a: list[int], b: list[int]) -> None:
        for x in a:
            for y in b:
                self.blocked.add((self.addr_of(x), self.addr_of(y)))
                self.blocked.add((self.addr_of(y), self.addr_of(x)))

    def heal(self) -> None:
        self.blocked.clear()

    def _drain(self, src: Addr) -> None:
        node = self.nodes[src]
        for data, dst in node.take_outgoing():
            if self.rng.random() < self.loss:
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                at = self.now + self.rng.uniform(0, self.max_delay)
                self._seq += 1
                heapq.heappush(self._queue, (at, self._seq, data, src, dst))
        self.events[src].extend(node.take_events())

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, data, src, dst = heapq.heappop(self._queue)
                if dst in self.down or (src, dst) in self.blocked:
                    continue
                node = self.nodes.get(dst)
                if node is None:
                    continue
                node.receive(data, src, self.now)
                if self.push:
                    node.push(self.now)
                self._drain(dst)
            for addr, node in self.nodes.items():
                if addr in self.down or self._next_tick[addr] > self.now:
                    continue
                node.tick(self.now)
                # The daemon sleeps interval x uniform(0.9, 1.1) between ticks.
                self._next_tick[addr] = self.now + self.params.interval * self.rng.uniform(0.9, 1.1)
                self._drain(addr)

    def run_until(self, cond: object, timeout: float, step: float = 0.05) -> float:
        """Advance until ``cond()`` is true; returns the simulated time it took."""
        start = self.now
        assert callable(cond)
        while not cond():
            if self.now - start > timeout:
                raise AssertionError(f"condition not met within {timeout} simulated seconds")
            self.run(step, step)
        return self.now - start

    def view(self, i: int) -> dict[bytes, bool]:
        """node_id -> healthy, as node i sees the swarm."""
        return {nid: m.healthy for nid, m in self.nodes[self.addr_of(i)].members.items()}

    def ids(self, idx: list[int]) -> set[bytes]:
        return {self.nodes[self.addr_of(i)].me.node_id for i in idx}

    def converged(self, idx: list[int]) -> bool:
        want = self.ids(idx)
        for i in idx:
            me = self.nodes[self.addr_of(i)].me.node_id
            v = self.view(i)
            if set(v) != want - {me} or not all(v.values()):
                return False
        return True
