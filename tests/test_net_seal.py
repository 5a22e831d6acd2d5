"""The seal/open point: every datagram of both UDP sockets (gossip and
discovery) crosses it, in both directions, and a refused one is counted and
dropped. Real sockets on loopback; the seal is a recording stand-in."""

from __future__ import annotations

import anyio
import pytest

from agent.core.addr import Addr
from agent.net import discovery
from agent.net.seal import CLEARTEXT, Kind
from agent.net.udp import GossipSocket


class Recording:
    """Marks sealed bytes so that the receiving side can prove it opened them;
    refuses to open anything starting with b"x"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Kind, bytes]] = []

    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        self.calls.append(("seal", kind, plaintext))
        return b"S" + plaintext

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        self.calls.append(("open", kind, datagram))
        if not datagram.startswith(b"S"):
            return None
        return datagram[1:]

    def sender(self, plaintext: bytes) -> bytes | None:
        return None  # authenticates nobody, like a keyless seal


def run(fn: object) -> None:
    anyio.run(fn, backend="trio")  # type: ignore[arg-type]


def test_cleartext_is_the_identity() -> None:
    for kind in Kind:
        assert CLEARTEXT.seal(b"\x01\x01abc", kind) == b"\x01\x01abc"
        assert CLEARTEXT.open(b"\x01\x01abc", kind) == b"\x01\x01abc"


def test_gossip_socket_seals_what_it_sends_and_opens_what_it_receives() -> None:
    seal = Recording()

    async def main() -> None:
        a = await GossipSocket.bind("127.0.0.1", 0, seal)
        b = await GossipSocket.bind("127.0.0.1", 0, seal)
        raw = await anyio.create_udp_socket(local_host="127.0.0.1")
        try:
            await a.send(b"hello", ("127.0.0.1", b.local_port))
            with anyio.fail_after(5):
                data, src = await b.receive()
            assert (data, src) == (b"hello", ("127.0.0.1", a.local_port))
            # Not sealed: refused, counted, and receive() waits for the next one.
            await raw.sendto(b"x-forged", "127.0.0.1", b.local_port)
            await a.send(b"again", ("127.0.0.1", b.local_port))
            with anyio.fail_after(5):
                data, _ = await b.receive()
            assert data == b"again"
            assert b.stats["drop_unopened"] == 1
        finally:
            for s in (a, b, raw):
                await s.aclose()

    run(main)
    assert [c for c in seal.calls if c[2] != b"x-forged"] == [
        ("seal", Kind.GOSSIP, b"hello"), ("open", Kind.GOSSIP, b"Shello"),
        ("seal", Kind.GOSSIP, b"again"), ("open", Kind.GOSSIP, b"Sagain"),
    ]
    assert ("open", Kind.GOSSIP, b"x-forged") in seal.calls


@pytest.mark.parametrize("refused", [False, True])
def test_discovery_socket_goes_through_the_same_seal(refused: bool) -> None:
    """The whole discovery loop on a loopback socket (no multicast needed):
    its own announce is sealed and opened, a peer's beacon is opened and
    reported, unless the seal refuses it."""
    seal = Recording()
    me, other = b"m" * 16, b"o" * 16
    found: list[Addr] = []

    async def main() -> None:
        udp = await anyio.create_udp_socket(local_host="127.0.0.1")
        port = udp.extra(anyio.abc.SocketAttribute.local_port)
        sock = discovery.DiscoverySocket(udp, "127.0.0.1", port, seal)
        peer = await anyio.create_udp_socket(local_host="127.0.0.1")
        beacon = discovery.encode(7000, other)
        async with anyio.create_task_group() as tg:
            tg.start_soon(discovery.serve, sock, 7946, me, found.append)
            await peer.sendto((b"x" if refused else b"S") + beacon, "127.0.0.1", port)
            own = ("open", Kind.DISCOVERY, b"S" + discovery.encode(7946, me))
            with anyio.fail_after(5):
                while not ((found or sock.stats["drop_unopened"]) and own in seal.calls):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        await peer.aclose()

    run(main)
    announce = discovery.encode(7946, me)
    assert ("seal", Kind.DISCOVERY, announce) in seal.calls
    assert ("open", Kind.DISCOVERY, b"S" + announce) in seal.calls
    assert all(kind == Kind.DISCOVERY for _, kind, _ in seal.calls)
    assert found == ([] if refused else [("127.0.0.1", 7000)])


def test_gossip_socket_sends_without_yielding_and_yields_for_a_queued_datagram() -> None:
    """An idle agent's CPU is mostly the cost of its event loop passes: a send
    takes none, a datagram that was already queued takes exactly one (so a
    flood cannot starve the other tasks)."""
    from trio.testing import assert_checkpoints, assert_no_checkpoints

    async def main() -> None:
        a = await GossipSocket.bind("127.0.0.1", 0)
        b = await GossipSocket.bind("127.0.0.1", 0)
        try:
            with assert_no_checkpoints():
                await a.send(b"one", ("127.0.0.1", b.local_port))
                await a.send(b"two", ("127.0.0.1", b.local_port))
            with anyio.fail_after(5):
                assert (await b.receive())[0] == b"one"
            with assert_checkpoints():
                assert (await b.receive())[0] == b"two"
        finally:
            await a.aclose()
            await b.aclose()

    anyio.run(main, backend="trio")
