"""Epochs and the claims that carry them, without processes: every number a
peer sends that reaches SQLite is bounded by the decoders, a failing role
change is logged and counted instead of ending the agent, and a higher epoch
is believed only once the agent it names confirms it."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from anyio.abc import SocketAttribute

from agent.config import load, parse_host_port
from agent.core import changelog, forwarding
from agent.core.changelog import GENESIS, Position
from agent.core.replication import (
    TAG,
    Hello,
    Info,
    ProtocolError,
    decode,
    encode,
)
from agent.core.wire import JS_SAFE
from agent.net.stream import listen
from agent.runtime.leadership import Replication
from agent.runtime.sync_service import SyncService
from agent.store import Store

A, B = b"a" * 16, b"b" * 16
H = b"\x01" * 32


def _raw(*fields: Any) -> bytes:
    return bytes([TAG]) + msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("big", [JS_SAFE + 1, 1 << 63, (1 << 64) - 1])
def test_numbers_past_the_js_safe_bound_are_refused(big: int) -> None:
    assert decode(encode(Hello(JS_SAFE, A, Position(JS_SAFE, JS_SAFE, H)))).epoch == JS_SAFE
    for data in (_raw(1, big, A, 0, 0, GENESIS),  # HELLO epoch
                 _raw(1, 1, A, big, 0, GENESIS),  # HELLO position epoch
                 _raw(1, 1, A, 0, big, GENESIS),  # HELLO position seq
                 _raw(6, big, 1, 1, H),  # ACK epoch
                 _raw(6, 1, 1, big, H),  # ACK seq
                 _raw(11, big, A, "Leader", "", A, 0, 0, GENESIS)):  # INFO epoch
        with pytest.raises(ProtocolError):
            decode(data)
    fwd = msgpack.packb([forwarding.ANSWER, big, 1, 200, "", None, None, 0])
    with pytest.raises(forwarding.ProtocolError):
        forwarding.decode(fwd)
    req = msgpack.packb([forwarding.REQUEST, big, A, 1, forwarding.DELETE, "c", ["k"]])
    with pytest.raises(forwarding.ProtocolError):
        forwarding.decode(req)
    entry = changelog.encode(big, 1, GENESIS, A, 1, "c", "k", 1, b"\x01")
    with pytest.raises(changelog.EntryInvalid):
        changelog.decode(entry)


@asynccontextmanager
async def replication(tmp_path: Path, env: dict[str, str],
                      peers: Callable[[], list[Any]] | None = None,
                      ) -> AsyncIterator[tuple[Replication, Store]]:
    cfg, _ = load(environ=env)
    store = await Store.open(tmp_path, A)
    sync = SyncService(store, "127.0.0.1", 0, 0.2, 2, 1 << 20, rng=random.Random(1))
    rep = Replication(cfg, store, sync, A, lambda: None, random.Random(2), peers)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            while rep._tg is None:
                await anyio.sleep(0.01)
            yield rep, store
            tg.cancel_scope.cancel()
    finally:
        await store.close()


def test_a_failing_step_down_is_logged_and_counted_not_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        async with replication(tmp_path, {"HS_GOSSIP_ROLE": "leader"}) as (rep, store):
            async def broken(*_: Any) -> None:
                raise OverflowError("Python int too large to convert to SQLite INTEGER")

            store.see_epoch = broken  # type: ignore[method-assign]
            async with leader_at(2) as addr:
                rep._on_higher_epoch(2, addr)
                with anyio.fail_after(5):
                    while not rep.stats.get("task_failures"):
                        await anyio.sleep(0.01)
            await anyio.sleep(0.05)  # the agent's task group is still running

    anyio.run(main, backend="trio")


class FakeConn:
    """What Replication.route needs of a connection: the frames it sends."""

    peer = "127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


def closed_port() -> str:
    """An address where nothing listens (connections are refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@asynccontextmanager
async def leader_at(epoch: int) -> AsyncIterator[str]:
    """An agent that answers every PROBE: Leader at ``epoch``."""
    listener = await listen("127.0.0.1", 0, 1 << 20)
    port = listener.listener.extra(SocketAttribute.local_port)

    async def answer(conn: Any) -> None:
        await conn.receive()
        await conn.send(encode(Info(epoch, B, "Leader", "", B, Position(epoch, 0, GENESIS))))

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        yield f"127.0.0.1:{port}"
        tg.cancel_scope.cancel()


async def settle(rep: Replication, key: str, n: int = 1) -> None:
    with anyio.fail_after(10):
        while rep.stats.get(key, 0) < n:
            await anyio.sleep(0.01)
    while rep._switching or rep._confirming:
        await anyio.sleep(0.01)


def test_a_leader_steps_down_only_for_a_leader_that_confirms_the_epoch(tmp_path: Path) -> None:
    async def main() -> None:
        async with replication(tmp_path, {"HS_GOSSIP_ROLE": "leader"}) as (rep, store):
            assert rep.leader is not None
            # A HELLO claiming epoch+1 with a leader nobody answers for; an ACK
            # claiming one without naming a leader: ignored, nothing saved.
            own = rep.leader.epoch
            await rep.route(FakeConn(), encode(Hello(own + 1, B, Position(0, 0, GENESIS),
                                                     leader=closed_port())))
            await settle(rep, "epoch_claims_unconfirmed")
            rep.leader._higher(own + 1, "")
            await settle(rep, "epoch_claims_unconfirmed", 2)
            assert rep.leader is not None and rep.leader.epoch == own
            assert (await store.upstream()).epoch_seen == 0
            # The same claim naming an agent that is Leader at that epoch: believed.
            async with leader_at(own + 1) as addr:
                await rep.route(FakeConn(), encode(Hello(own + 1, B, Position(0, 0, GENESIS),
                                                         leader=addr)))
                await settle(rep, "stepped_down")
                assert rep.leader is None and rep.follower is not None
                assert str(rep.follower.coordinator) == addr
                assert (await store.upstream()).epoch_seen == own + 1

    anyio.run(main, backend="trio")


def test_a_follower_is_not_retargeted_by_a_claim_alone(tmp_path: Path) -> None:
    coordinator = closed_port()
    async def main() -> None:
        env = {"HS_GOSSIP_COORDINATOR": coordinator}
        async with replication(tmp_path, env) as (rep, _):
            f = rep.follower
            assert f is not None
            forged = closed_port()
            await rep.route(FakeConn(), encode(Hello(7, B, Position(0, 0, GENESIS),
                                                     leader=forged)))
            await settle(rep, "epoch_claims_unconfirmed")
            assert str(f.coordinator) == coordinator
            # An unsolicited INFO naming itself Leader: a search (rate-limited),
            # nobody confirms, nothing changes.
            await rep.route(FakeConn(), encode(Info(9, B, "Leader", "", B,
                                                    Position(9, 0, GENESIS))))
            await settle(rep, "announcements_heard")
            while rep._searching:
                await anyio.sleep(0.01)
            assert str(f.coordinator) == coordinator
            async with leader_at(7) as addr:
                await rep.route(FakeConn(), encode(Hello(7, B, Position(0, 0, GENESIS),
                                                         leader=addr)))
                with anyio.fail_after(10):
                    while str(f.coordinator) != addr:
                        await anyio.sleep(0.01)

    anyio.run(main, backend="trio")


def test_asking_around_is_one_round_at_a_time_and_not_too_often(tmp_path: Path) -> None:
    async def main() -> None:
        peers = [parse_host_port(closed_port())]
        async with replication(tmp_path, {}, lambda: peers) as (rep, _):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(rep.ask_around)
            await rep.ask_around()
            assert rep.stats["probes"] == 1 and rep.stats["ask_around_reused"] == 5

    anyio.run(main, backend="trio")
