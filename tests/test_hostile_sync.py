"""Hostile sync clients against a real agent: many connections that send a
valid HELLO and then park an almost complete frame of the largest size. The
agent's memory stays bounded (sessions are capped, in all and per source
address; the excess is closed at once) and a real peer still syncs."""

from __future__ import annotations

import contextlib
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any, cast

import anyio
import msgpack
import pytest

from agent.net.stream import Framed
from agent.runtime import sync_service
from agent.runtime.sync_service import HELLO_MAX_FRAME, SESSIONS_PER_HOST
from merkle import frames
from merkle.reconcile import Session
from merkle.tree import Item, MemoryTree
from tests.agents import AgentProc, Swarm, wait_for

#: the agent's default frame limit: 2 x HS_GOSSIP_MAX_VALUE (1 MiB) + 1 MiB
MAX_FRAME = 3 * 1024 * 1024
#: sessions served at once with the default HS_GOSSIP_SYNC_CONCURRENCY (2)
MAX_SESSIONS = 2 * 2 + 4


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def hello(collection: str) -> bytes:
    """A valid HELLO from a replica that differs from the agent's everywhere,
    so that the agent answers with a STEP and waits for the next frame."""
    tree = MemoryTree()
    for i in range(200):
        tree.apply(Item(f"x{i}", i + 1, bytes(16), False, b"\x01"))
    body = frames.encode(Session(b"attacker").hello(tree, collection, horizon_ms=0))
    return len(body).to_bytes(4, "big") + body


def park(host: str, port: int, source: str, collection: str,
         size: int = MAX_FRAME - 64) -> tuple[socket.socket | None, float]:
    """Open a sync connection from ``source``, send a valid HELLO, then all but
    16 bytes of a ``size``-byte frame of empty maps. Returns the open socket
    (None if the agent closed it) and the seconds it took."""
    t0 = time.monotonic()
    s = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    try:
        s.sendall(hello(collection))
        s.sendall(size.to_bytes(4, "big") + b"\x80" * (size - 16))
        # A refused connection is closed before the agent reads a byte; the
        # sends may still fit the socket buffers, so look for the close too.
        s.settimeout(0.5)
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            return s, time.monotonic() - t0  # still open: parked
        s.close()
        return None, time.monotonic() - t0
    except OSError:  # reset by the agent
        s.close()
        return None, time.monotonic() - t0


def attack(a: AgentProc, clients: int, collection: str = "safe",
           first: int = 1) -> tuple[list[socket.socket], list[float]]:
    """``clients`` parking connections, each from its own loopback address
    (127.0.1.x), so that the cap on all sessions is what stops them."""
    held: list[socket.socket] = []
    refused: list[float] = []
    for i in range(first, first + clients):
        s, took = park(a.host, a.gossip_port, f"127.0.{1 + i // 250}.{1 + i % 250}",
                       collection)
        if s is None:
            refused.append(took)
        else:
            held.append(s)
    return held, refused


def test_parked_frames_are_capped_and_a_peer_still_syncs(swarm: Swarm) -> None:
    a = swarm.add()
    assert a.proc is not None
    batch = {"items": {f"k{i}": i for i in range(50)}}
    assert a.request("POST", "/api/collections/safe/items", batch)[0] == 200
    before = rss_mib(a.proc.pid)
    held, refused = attack(a, 30)
    try:
        assert len(held) <= MAX_SESSIONS, (len(held), len(refused))
        assert len(held) >= MAX_SESSIONS - 2  # the cap, not something else, refused them
        assert len(refused) == 30 - len(held)
        # refused at once: well before any read timeout
        assert max(refused) < 2.0, refused
        peak = rss_mib(a.proc.pid)
        assert peak < 80, f"RSS {before:.1f} MiB before, {peak:.1f} MiB with 30 parked frames"
        # A real peer, from another address, still gets the data while the
        # parked connections hold every slot they can.
        b = swarm.add(seeds=[a])
        wait_for(lambda: b.request("GET", "/api/collections/safe/items/k7")[0] == 200,
                 timeout=20, what="b to sync from a while a's slots are held")
        assert rss_mib(a.proc.pid) < 80
    finally:
        for s in held:
            s.close()


def test_one_address_holds_at_most_its_share(swarm: Swarm, tmp_path: Path) -> None:
    a = swarm.add()
    assert a.request("POST", "/api/collections/safe/items", {"items": {"k": 1}})[0] == 200
    held: list[socket.socket] = []
    try:
        results = [park(a.host, a.gossip_port, "127.0.3.1", "safe") for _ in range(5)]
        held = [s for s, _ in results if s is not None]
        assert len(held) == SESSIONS_PER_HOST
    finally:
        for s in held:
            s.close()


def test_an_oversized_hello_is_refused_at_its_length(swarm: Swarm) -> None:
    """A first frame announced larger than any HELLO ends the session at
    once, instead of buffering up to the full frame limit."""
    a = swarm.add()
    with socket.create_connection((a.host, a.gossip_port), timeout=5) as s:
        s.sendall((HELLO_MAX_FRAME + 1).to_bytes(4, "big") + b"\x80" * 1000)
        t0 = time.monotonic()
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
        assert time.monotonic() - t0 < 2.0



def test_a_step_naming_the_root_over_and_over_is_refused_at_once(swarm: Swarm) -> None:
    """A STEP of thousands of root-level leaves and wants, none of which the
    agent offered, would have it scan (or queue) the whole collection once per
    entry on its store thread. It ends the session at once, and the agent
    keeps answering."""
    a = swarm.add()
    batch = {"items": {f"k{i}": i for i in range(5000)}}
    assert a.request("POST", "/api/collections/safe/items", batch)[0] == 200
    n = 8000
    step = frames.encode(frames.Step(leaves=(frames.Leaf(0, 0, b""),) * n,
                                     wants=(frames.Want(0, 0, None),) * n))
    with socket.create_connection((a.host, a.gossip_port), timeout=5) as s:
        s.sendall(hello("safe"))
        s.sendall(len(step).to_bytes(4, "big") + step)
        t0 = time.monotonic()
        s.settimeout(0.5)
        closed = False
        while not closed and time.monotonic() - t0 < 5:
            try:
                closed = s.recv(65536) == b""
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
        took = time.monotonic() - t0
    assert closed and took < 2.0, f"session still open after {took:.1f}s"
    t0 = time.monotonic()
    assert a.request("PUT", "/api/collections/safe/items/after", {"value": 1})[0] == 200
    assert time.monotonic() - t0 < 2.0


def test_a_frame_of_empty_arrays_is_refused_within_its_decode_budget() -> None:
    """1 MiB of nested empty arrays used to decode into ~75 MB of lists."""
    chunk = [[]] * 100_000
    data = msgpack.packb([frames.STEP, [chunk] * 10, [], [], False])
    tracemalloc.start()
    try:
        with pytest.raises(frames.ProtocolError, match="decodes to more than"):
            frames.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < frames.decode_budget(len(data)) + (1 << 20), peak


@pytest.mark.parametrize("frame", [
    frames.Step(tuple(frames.Node(4, i, bytes(64), tuple(range(1000, 1016)))
                      for i in range(8192))),
    frames.Items(tuple(Item(f"k{i}", 2**60 + i, bytes(16), False, b"\x01")
                       for i in range(1000))),
], ids=["8192 nodes", "1000 tiny items"])
def test_honest_frames_fit_the_decode_budget(frame: frames.Frame) -> None:
    assert frames.decode(frames.encode(frame)) == frame


def test_frames_hold_no_maps() -> None:
    with pytest.raises(frames.ProtocolError):
        frames.decode(msgpack.packb([frames.ITEMS, [{}] * 10]))


class Trickle:
    """A byte stream that yields one byte every ``gap`` seconds: each read
    is well within the per-read timeout, the whole frame is not."""

    def __init__(self, data: bytes, gap: float) -> None:
        self.data = data
        self.gap = gap

    def extra(self, attribute: object, default: object = None) -> object:
        return default  # no socket under it

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep(self.gap)
        if not self.data:
            raise anyio.EndOfStream
        b, self.data = self.data[:1], self.data[1:]
        return b


def test_a_trickling_frame_is_cut_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    body = frames.encode(frames.Step(final=True))  # a few bytes
    wire = len(body).to_bytes(4, "big") + body
    # Scaled down: 0.2 s + 1000 bytes/s, so a frame of a dozen bytes has ~0.2 s.
    monkeypatch.setattr(sync_service, "IO_TIMEOUT", 0.2)
    monkeypatch.setattr(sync_service, "MIN_RATE", 1000)
    conn = Framed(cast(Any, Trickle(wire, gap=0.1)), max_frame=16)

    async def receive() -> float:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await sync_service._receive(conn)
        return time.monotonic() - t0

    took = anyio.run(receive, backend="trio")
    assert took < 0.5, took  # the whole frame would take 0.1 x len(wire) s
    assert 0.1 * len(wire) >= 1.0
