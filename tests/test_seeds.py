"""Seeds found by discovery and saved peers stay bounded, whatever arrives on
the discovery port; and a discovery socket that breaks stops instead of spinning."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest

from agent.config import HostPort
from agent.core.addr import Addr
from agent.core.swim import Params, SelfInfo, Swim, TimerKind
from agent.net import discovery
from agent.runtime.seeds import MAX_EXTRA, Seeds

SOURCES = 10_000


class Joins:
    """Stands for the core's ``join``: records every address it is asked to contact."""

    def __init__(self) -> None:
        self.calls: list[list[Addr]] = []

    def __call__(self, addrs: list[Addr]) -> None:
        self.calls.append(list(addrs))

    @property
    def addrs(self) -> list[Addr]:
        return [a for call in self.calls for a in call]


def _source(i: int) -> Addr:
    return (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000 + i % 1000)


class FakeUDP:
    """Stands for the anyio UDP socket: hands out ``datagrams``, then waits."""

    def __init__(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        self.datagrams = datagrams
        self.sent = 0

    async def sendto(self, data: bytes, host: str, port: int) -> None:
        self.sent += 1

    async def receive(self) -> tuple[bytes, Addr]:
        if not self.datagrams:
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return self.datagrams.pop(0)

    async def aclose(self) -> None:
        pass


def _beacons(n: int) -> list[tuple[bytes, Addr]]:
    return [(discovery.encode(7000, i.to_bytes(16, "big")), _source(i)) for i in range(n)]


def _discover(seeds: Seeds, beacons: list[tuple[bytes, Addr]]) -> None:
    """Run discovery over ``beacons``; every agent found is added as a seed."""
    found: list[Addr] = []
    n = len(beacons)  # the fake socket pops them

    def on_found(addr: Addr) -> None:
        found.append(addr)
        seeds.add([addr])

    async def main() -> None:
        sock = discovery.DiscoverySocket(FakeUDP(beacons), "239.1.2.3", 7947)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(discovery.serve, sock, 7946, b"m" * 16, on_found)
            with anyio.fail_after(30):
                while len(found) < n:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_seeds_from_many_beacons_stay_bounded() -> None:
    """10,000 agents announcing from distinct addresses: the seed list keeps
    the configured seeds and the most recent MAX_EXTRA others, and the core
    is asked to contact each new agent once, and the configured seeds again
    on each re-resolution."""
    joins = Joins()
    seeds = Seeds(joins, (HostPort("127.0.0.5", 7001),))
    anyio.run(seeds.refresh, True)
    assert joins.calls == [[("127.0.0.5", 7001)]]
    _discover(seeds, _beacons(SOURCES))
    assert len(seeds.extra) == MAX_EXTRA
    newest = [(_source(i)[0], 7000) for i in range(SOURCES - MAX_EXTRA, SOURCES)]
    assert seeds.extra == newest
    assert joins.addrs[1:] == [(_source(i)[0], 7000) for i in range(SOURCES)]
    # a re-resolution asks for the configured seeds again, and keeps the list
    anyio.run(seeds.refresh, True)
    assert joins.calls[-1] == [("127.0.0.5", 7001)]
    assert seeds.extra == newest


def test_a_core_fed_by_many_beacons_keeps_its_seeds_bounded() -> None:
    """Seeds forgets all but MAX_EXTRA discovered agents; the core it feeds
    must not remember (and retry) every one of them instead."""
    core = Swim(SelfInfo(b"m" * 16, 1, "m", 7000, 0), Params(), random.Random(1), 0.0)
    seeds = Seeds(lambda addrs: core.join(addrs, 0.0), (HostPort("127.0.0.5", 7001),))
    anyio.run(seeds.refresh, True)
    _discover(seeds, _beacons(2_000))
    core.take_push_pulls()
    assert len(core.seeds_tried) <= 1 + MAX_EXTRA
    join = next(t.timer for t in core.take_timers() if t.timer.kind == TimerKind.JOIN)
    core.handle_timer(join, 1e6)  # nobody answered: every seed is tried again
    assert len(core.take_push_pulls()) <= 1 + MAX_EXTRA


def test_a_seed_heard_again_is_kept_over_newer_strangers() -> None:
    joins = Joins()
    seeds = Seeds(joins, (), max_extra=3)
    seeds.add([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    seeds.add([("10.0.0.1", 1)])  # heard again: now the most recent
    seeds.add([("10.0.0.4", 1)])
    assert seeds.extra == [("10.0.0.3", 1), ("10.0.0.1", 1), ("10.0.0.4", 1)]
    # the core is told of each address once, when it is new
    assert joins.calls == [[("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)],
                           [("10.0.0.4", 1)]]


def test_the_agents_heard_are_bounded() -> None:
    heard = discovery.Heard()
    assert all(heard.first(_source(i)) for i in range(SOURCES))
    assert len(heard) == discovery.HEARD_MAX
    assert not heard.first(_source(SOURCES - 1))  # a recent one is still known
    assert heard.first(_source(0))  # the oldest were forgotten


class BrokenUDP(FakeUDP):
    """A socket that fails for a reason other than the network."""

    async def sendto(self, data: bytes, host: str, port: int) -> None:
        raise anyio.BrokenResourceError

    async def receive(self) -> tuple[bytes, Addr]:
        raise anyio.BrokenResourceError


@pytest.mark.parametrize("call", ["send", "receive"])
def test_a_broken_discovery_socket_raises_instead_of_spinning(call: str) -> None:
    async def main() -> Any:
        sock = discovery.DiscoverySocket(BrokenUDP([]), "239.1.2.3", 7947)  # type: ignore[arg-type]
        with anyio.fail_after(2):
            if call == "send":
                return await sock.send(b"x")
            return await sock.receive()

    with pytest.raises(anyio.BrokenResourceError):
        anyio.run(main)
