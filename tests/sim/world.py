"""N real ``Swim`` cores on one timer heap, driven exactly as the agent drives its core.

Rules (the contract's driving rules, nothing more):
* ``Swim(me, params, rng, now)`` then ``start(now, seeds)``; after EVERY call into a core
  the world drains it in the contract's order: ``take_timers`` onto the heap,
  ``take_outgoing`` onto the network, ``take_push_pulls`` as TCP exchanges,
  ``take_events`` to the observer (the invariant checker).
* One heap of (time, seq, kind, a, b) entries, ``heapq`` only: O(log n) per event and no
  loop over all nodes per step; time jumps from one event to the next. ``seq`` breaks
  ties in insertion order, so a seed replays a run exactly.
* Clock skew: node i's monotonic clock reads ``offset_i + rate_i * t`` at world time t.
  Every ``now`` handed to a core is its own clock; a deadline it asks for is converted
  back to world time. Offsets are arbitrary (monotonic clocks start anywhere); rates are
  within +-``skew`` of 1.
* A crash silences a node at once (its timers become stale by generation, datagrams to it
  vanish, TCP to it is refused). A restart builds a new core with the SAME node_id and an
  incarnation one above the highest it ever used (what identity.json keeps), at the same
  address.
* Push-pull is a reliable TCP exchange: the request reaches the server after one one-way
  delay, the reply comes back after another. It fails (``push_pull_failed``) when the
  server is down (refused after a round trip) or across a partition (after
  ``connect_timeout``). A server that answers None closes the stream: a failure too.
* Datagrams carry the sender's node id as the seal's authenticated ``sender`` (a keyed
  swarm), unless ``sealed`` is False.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core.addr import Addr
from agent.core.swim import Event, IncarnationRaised, Params, SelfInfo, Swim

from .network import Network

#: 10.0.0.0, the first address of the simulated network (as tests/simnet.py)
BASE = int(ipaddress.IPv4Address("10.0.0.0"))
#: node indexes run from 1 to SIZE_LIMIT - 1 (10.255.255.255 is broadcast)
SIZE_LIMIT = 2**24 - 1
GOSSIP_PORT = 7946

# heap entry kinds
_TIMER, _DGRAM, _PP_REQ, _PP_REPLY, _CALL = range(5)


def addr_of(i: int) -> Addr:
    """The i-th address of 10.0.0.0/8: never the network or broadcast address."""
    if not 1 <= i < SIZE_LIMIT:
        raise ValueError(f"node index {i} outside 1..{SIZE_LIMIT - 1}")
    return (str(ipaddress.IPv4Address(BASE + i)), GOSSIP_PORT)


@dataclass(eq=False)
class Node:
    index: int
    addr: Addr
    node_id: bytes
    swim: Swim
    seeds: list[Addr]
    offset: float          # its monotonic clock at world time 0
    rate: float            # its clock's speed relative to world time
    up: bool = True
    gen: int = 0           # bumped by crash/restart: older timers are stale
    start_inc: int = 1     # incarnation this life started with
    max_inc: int = 1       # highest incarnation it ever used (persisted across restarts)
    started_at: float = 0.0
    lives: int = 1

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    @property
    def incarnation(self) -> int:
        return self.swim.me.incarnation


Observer = Callable[[Node, list[Event]], None]


class World:
    def __init__(self, seed: int, params: Params, net: Network | None = None, *,
                 skew: float = 1e-3, sealed: bool = True,
                 connect_timeout: float = 3.0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.params = params
        self.net = net or Network(random.Random(self.rng.getrandbits(64)))
        self.skew = skew
        self.sealed = sealed
        self.connect_timeout = connect_timeout
        self.now = 0.0
        self.nodes: dict[int, Node] = {}
        self.by_addr: dict[Addr, Node] = {}
        self.by_id: dict[bytes, Node] = {}
        self.observer: Observer | None = None
        self.events_run = 0
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = 0
        self._ephemeral = 32768

    # -- scheduling ----------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at world time t (scenario steps)."""
        self._push(max(t, self.now), _CALL, fn, None)

    # -- nodes ---------------------------------------------------------------------------

    def add(self, i: int, seeds: list[Addr]) -> Node:
        """Create node i (not started: see :meth:`start`)."""
        addr = addr_of(i)
        nid = uuid.UUID(int=self.rng.getrandbits(128), version=4).bytes
        offset = self.rng.uniform(0.0, 10_000.0)
        rate = 1.0 + self.rng.uniform(-self.skew, self.skew)
        swim = self._core(i, nid, addr, offset + rate * self.now, 1)
        node = Node(i, addr, nid, swim, seeds, offset, rate, up=False)
        self.nodes[i] = node
        self.by_addr[addr] = node
        self.by_id[nid] = node
        return node

    def _core(self, i: int, nid: bytes, addr: Addr, now: float, incarnation: int) -> Swim:
        me = SelfInfo(nid, incarnation, f"n{i}", GOSSIP_PORT, 8080, addr[0])
        return Swim(me, self.params, random.Random(self.rng.getrandbits(64)), now)

    def start(self, node: Node) -> None:
        node.up = True
        node.started_at = self.now
        node.start_inc = node.max_inc = max(node.max_inc, node.swim.me.incarnation)
        node.swim.start(node.clock(self.now), list(node.seeds))
        self._drain(node)

    def crash(self, node: Node) -> None:
        """Silence without a word (SIGKILL, power loss)."""
        if not node.up:
            return
        node.up = False
        node.gen += 1
        node.max_inc = max(node.max_inc, node.swim.me.incarnation)

    def restart(self, node: Node) -> None:
        """A new process with the same identity and a higher incarnation."""
        self.crash(node)
        node.gen += 1
        node.lives += 1
        node.swim = self._core(node.index, node.node_id, node.addr, node.clock(self.now),
                               node.max_inc + 1)
        self.start(node)

    # -- the driving rule ----------------------------------------------------------------

    def _drain(self, node: Node) -> None:
        sw = node.swim
        timers = sw.take_timers()
        if timers:
            off, rate, gen, now, idx = node.offset, node.rate, node.gen, self.now, node.index
            for st in timers:
                # the first world time at which the node's clock reads >= deadline
                t = (st.deadline - off) / rate + 1e-9
                self._push(t if t > now else now, _TIMER, (idx, gen), st.timer)
        out = sw.take_outgoing()
        if out:
            route = self.net.route
            src = node.index
            by_addr = self.by_addr
            for send in out:
                dst = by_addr.get(send.addr)
                if dst is None:
                    self.net.counters.datagrams += 1
                    self.net.counters.bytes += len(send.data)
                    continue
                for d in route(src, dst.index, len(send.data)):
                    self._push(self.now + d, _DGRAM, dst, (node, send.data))
        pps = sw.take_push_pulls()
        for pp in pps:
            self._open_push_pull(node, pp.addr, pp.data)
        events = sw.take_events()
        if events:
            for ev in events:
                if isinstance(ev, IncarnationRaised):
                    node.max_inc = max(node.max_inc, ev.incarnation)
            if self.observer is not None:
                self.observer(node, events)

    def _open_push_pull(self, client: Node, addr: Addr, data: bytes) -> None:
        c = self.net.counters
        c.push_pulls += 1
        c.push_pull_bytes += len(data)
        server = self.by_addr.get(addr)
        self._ephemeral = 32768 + (self._ephemeral - 32767) % 28000
        src = (client.addr[0], self._ephemeral)
        if server is None or not self.net.connected(client.index, server.index):
            # nobody answers the SYN: the connect times out
            self._push(self.now + self.connect_timeout, _PP_REPLY, client,
                       (client.gen, addr, None))
            return
        self._push(self.now + self.net.one_way(client.index, server.index), _PP_REQ, server,
                   (client, client.gen, data, src))

    # -- running -------------------------------------------------------------------------

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to world time t_end; returns True if ``stop()`` became
        true (checked after each scenario step) before that."""
        heap = self._heap
        pop = heapq.heappop
        nodes = self.nodes
        sealed = self.sealed
        n_events = 0
        try:
            while heap and heap[0][0] <= t_end:
                t, _, kind, a, b = pop(heap)
                self.now = t
                n_events += 1
                if kind == _DGRAM:
                    dst: Node = a
                    if not dst.up:
                        continue
                    sender, data = b
                    dst.swim.receive(data, sender.addr, dst.offset + dst.rate * t,
                                     sender.node_id if sealed else None)
                    self._drain(dst)
                elif kind == _TIMER:
                    idx, gen = a
                    node = nodes[idx]
                    if node.gen != gen or not node.up:
                        continue
                    node.swim.handle_timer(b, node.offset + node.rate * t)
                    self._drain(node)
                elif kind == _PP_REQ:
                    self._serve_push_pull(a, b)
                elif kind == _PP_REPLY:
                    self._finish_push_pull(a, b)
                else:
                    a()
                    if stop is not None and stop():
                        return True
            self.now = max(self.now, t_end)
            return False
        finally:
            self.events_run += n_events

    def _serve_push_pull(self, server: Node, b: tuple[Node, int, bytes, Addr]) -> None:
        client, gen, data, src = b
        if not server.up:
            # the host answers RST: refused after one round trip
            self._push(self.now + self.net.one_way(server.index, client.index), _PP_REPLY,
                       client, (gen, server.addr, None))
            return
        reply = server.swim.handle_push_pull(data, src, server.clock(self.now))
        self._drain(server)
        if reply is not None:
            self.net.counters.push_pull_bytes += len(reply)
        back = self.now + self.net.one_way(server.index, client.index)
        if not self.net.connected(server.index, client.index):
            back = self.now + self.connect_timeout
            reply = None
        self._push(back, _PP_REPLY, client, (gen, server.addr, reply))

    def _finish_push_pull(self, client: Node, b: tuple[int, Addr, bytes | None]) -> None:
        gen, addr, reply = b
        if client.gen != gen or not client.up:
            return
        now = client.clock(self.now)
        if reply is None:
            client.swim.push_pull_failed(addr, now)
        else:
            client.swim.receive_push_pull_reply(reply, addr, now)
        self._drain(client)

    # -- views ---------------------------------------------------------------------------

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.up]
