"""Seeds found by discovery and saved peers stay bounded, whatever arrives on
the discovery port; and a discovery socket that breaks stops instead of spinning."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest

from agent.config import HostPort
from agent.core.addr import Addr
from agent.core.membership import Membership, Params, SelfInfo
from agent.net import discovery
from agent.runtime.seeds import MAX_EXTRA, Seeds

SOURCES = 10_000


def _core() -> Membership:
    return Membership(SelfInfo(node_id=b"m" * 16, incarnation=1, name="m", port=7000,
                               http_port=0), Params(), random.Random(1), now=0.0)


def _source(i: int) -> Addr:
    return (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000 + i % 1000)


def core_seeds(core: Membership) -> list[Addr]:
    return list(core._seeds)


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


def test_seeds_from_many_beacons_stay_bounded() -> None:
    """10,000 agents announcing from distinct addresses: the seed list keeps
    the configured seeds and the most recent MAX_EXTRA others."""
    core = _core()
    seeds = Seeds(core, (HostPort("127.0.0.5", 7001),))
    anyio.run(seeds.refresh, True)
    beacons = [(discovery.encode(7000, i.to_bytes(16, "big")), _source(i))
               for i in range(SOURCES)]
    found: list[Addr] = []

    def on_found(addr: Addr) -> None:
        found.append(addr)
        seeds.add([addr])

    async def main() -> None:
        sock = discovery.DiscoverySocket(FakeUDP(beacons), "239.1.2.3", 7947)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(discovery.serve, sock, 7946, b"m" * 16, on_found)
            with anyio.fail_after(30):
                while len(found) < SOURCES:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert len(seeds.extra) == MAX_EXTRA
    newest = [(_source(i)[0], 7000) for i in range(SOURCES - MAX_EXTRA, SOURCES)]
    assert seeds.extra == newest
    assert core_seeds(core) == [("127.0.0.5", 7001), *newest]
    # a re-resolution keeps the same bounded list
    anyio.run(seeds.refresh, True)
    assert core_seeds(core) == [("127.0.0.5", 7001), *newest]


def test_a_seed_heard_again_is_kept_over_newer_strangers() -> None:
    core = _core()
    seeds = Seeds(core, (), max_extra=3)
    seeds.add([("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)])
    seeds.add([("10.0.0.1", 1)])  # heard again: now the most recent
    seeds.add([("10.0.0.4", 1)])
    assert seeds.extra == [("10.0.0.3", 1), ("10.0.0.1", 1), ("10.0.0.4", 1)]
    assert core_seeds(core) == seeds.extra


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
