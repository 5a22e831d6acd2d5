"""A minimal in-memory network for SWIM cores (the full simulator is tests/sim).

N cores at 10.0.0.0/8 addresses, one event heap (timers and datagram
deliveries, in deadline order), a fixed link latency, an optional drop rule,
and push-pull exchanges completed in place. It records every datagram sent,
every event, and lets a test crash, restart or partition members.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.core.addr import Addr
from agent.core.swim import Event, Params, PushPull, SelfInfo, Swim, Timer

PORT = 7946


def addr_of(i: int) -> Addr:
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", PORT)


def node_id_of(i: int, generation: int = 0) -> bytes:
    return i.to_bytes(8, "big") + generation.to_bytes(8, "big")


@dataclass
class Sent:
    at: float
    src: Addr
    dst: Addr
    data: bytes


@dataclass
class Net:
    seed: int = 1
    params: Params = field(default_factory=Params)
    latency: float = 0.005
    now: float = 0.0
    cores: dict[Addr, Swim] = field(default_factory=dict)
    down: set[Addr] = field(default_factory=set)
    events: dict[Addr, list[Event]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    #: (src, dst, data) -> True to lose the datagram
    drop: Callable[[Addr, Addr, bytes], bool] | None = None
    #: (src, dst) -> True to fail the push-pull exchange
    block_push_pull: Callable[[Addr, Addr], bool] | None = None
    #: every push-pull asked for: (who asked, what)
    push_pulls: list[tuple[Addr, PushPull]] = field(default_factory=list)
    #: drop timers the core says no longer matter (Swim.timer_pending), as
    #: the agent's timer heap does; counted in ``moot``
    drop_moot: bool = False
    moot: int = 0
    fired: int = 0
    _heap: list[tuple[float, int, Addr, object]] = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def add(self, i: int, seeds: list[int] = (), incarnation: int = 0,  # type: ignore[assignment]
            generation: int = 0, sync_port: int = 0) -> Swim:
        a = addr_of(i)
        me = SelfInfo(node_id_of(i, generation), incarnation, f"n{i}", PORT, 8000 + i,
                      host=a[0], sync_port=sync_port)
        core = Swim(me, self.params, random.Random(self.rng.random()), self.now)
        self.cores[a] = core
        self.down.discard(a)
        self.events.setdefault(a, [])
        core.start(self.now, [addr_of(s) for s in seeds])
        self._drain(a)
        return core

    def core(self, i: int) -> Swim:
        return self.cores[addr_of(i)]

    def kill(self, i: int) -> None:
        self.down.add(addr_of(i))

    def _push(self, at: float, a: Addr, what: object) -> None:
        self._n += 1
        heapq.heappush(self._heap, (at, self._n, a, what))

    def _drain(self, a: Addr) -> None:
        """Take everything core ``a`` wants done (a push-pull reply may add more)."""
        core = self.cores[a]
        while self._drain_once(a, core):
            pass

    def _drain_once(self, a: Addr, core: Swim) -> bool:
        busy = False
        for st in core.take_timers():
            self._push(st.deadline, a, (core, st.timer))
        for s in core.take_outgoing():
            busy = True
            self.sent.append(Sent(self.now, a, s.addr, s.data))
            if self.drop is None or not self.drop(a, s.addr, s.data):
                self._push(self.now + self.latency, s.addr, (a, s.data))
        for pp in core.take_push_pulls():
            busy = True
            self.push_pulls.append((a, pp))
            other = self.cores.get(pp.addr)
            blocked = self.block_push_pull is not None and self.block_push_pull(a, pp.addr)
            reply = None
            if other is not None and pp.addr not in self.down and not blocked:
                reply = other.handle_push_pull(pp.data, a, self.now)
                self._drain(pp.addr)
            if reply is None:
                core.push_pull_failed(pp.addr, self.now)
            else:
                core.receive_push_pull_reply(reply, pp.addr, self.now)
        self.events[a].extend(core.take_events())
        return busy

    def step(self) -> bool:
        if not self._heap:
            return False
        at, _, a, what = heapq.heappop(self._heap)
        self.now = max(self.now, at)
        core = self.cores.get(a)
        if core is None or a in self.down:
            return True
        if isinstance(what[0], Swim):  # type: ignore[index]
            owner, timer = what  # type: ignore[misc]
            if owner is not core:
                return True  # a timer of a core that was replaced (restart)
            assert isinstance(timer, Timer)
            if self.drop_moot and not core.timer_pending(timer):
                self.moot += 1
                return True
            self.fired += 1
            core.handle_timer(timer, self.now)
        else:
            src, data = what  # type: ignore[misc]
            core.receive(data, src, self.now, sender=None)
        self._drain(a)
        return True

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            self.step()
        self.now = end

    def run_until(self, cond: Callable[[], bool], timeout: float) -> float:
        start = self.now
        while not cond():
            if not self._heap or self._heap[0][0] > start + timeout:
                raise AssertionError(f"condition not met within {timeout}s")
            self.step()
        return self.now - start

    def status(self, i: int, j: int) -> int | None:
        """Status of member j in core i's table (None: not there)."""
        m = self.core(i).members.get(self.core(j).me.node_id)
        return None if m is None else m.status

    def converged(self, ids: list[int]) -> bool:
        for i in ids:
            ms = self.core(i).members
            for j in ids:
                if j != i:
                    m = ms.get(self.core(j).me.node_id)
                    if m is None or m.status != 0:
                        return False
        return True

    def bytes_by_type(self, since: float = 0.0) -> Counter[int]:
        c: Counter[int] = Counter()
        for s in self.sent:
            if s.at >= since:
                c[s.data[1]] += len(s.data)
        return c

    def count_by_type(self, since: float = 0.0) -> Counter[int]:
        return Counter(s.data[1] for s in self.sent if s.at >= since)


def joined(n: int = 8, seed: int = 1, **params: object) -> Net:
    """``n`` cores joined through core 1 and converged."""
    net = Net(seed=seed, params=dataclasses.replace(Params.lan(), **params))  # type: ignore[arg-type]
    net.add(1)
    for i in range(2, n + 1):
        net.add(i, seeds=[1])
    net.run_until(lambda: net.converged(list(range(1, n + 1))), timeout=60)
    return net
