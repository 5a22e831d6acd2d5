"""Writes on a follower: the forwarding codec and dedupe table, the leader's
answers (dedupe by (origin, id), epoch fencing, not-leader) against a real
store, and real agent processes: a follower's write committed by the leader
and read back at once on the follower; followers whose leader is killed turn
Edge, keep accepting writes, converge among themselves, and once the leader
is back every acknowledged write is everywhere."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from anyio.abc import SocketAttribute

from agent.config import HostPort
from agent.core.changelog import GENESIS, Position
from agent.core.forwarding import (
    BATCH,
    DELETE,
    ENTRY_OVERHEAD,
    FIRST_BYTE,
    ID_CONFLICT,
    NOT_LEADER,
    OK,
    PUT,
    WRONG_EPOCH,
    Answer,
    Dedupe,
    DedupeConflict,
    ProtocolError,
    Request,
    WrittenItem,
    decode,
    encode,
    request_digest,
)
from agent.net.stream import listen
from agent.runtime import forwarding as fw_rt
from agent.runtime.forwarding import IDLE_LOOK, Forwarding, ForwardServer
from agent.runtime.sync_service import SyncService
from agent.runtime.timers import Rounds
from agent.store import Store
from tests.agents import AgentProc, Swarm, wait_for

COLL = "notes"
ORIGIN = bytes(range(16))


def _v(x: Any) -> bytes:
    return msgpack.packb(x, use_bin_type=True)  # type: ignore[no-any-return]


# --- codec and dedupe ------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    Request(3, ORIGIN, 7, PUT, COLL, ("k", _v({"a": 1}))),
    Request(3, ORIGIN, 8, DELETE, COLL, ("k",)),
    Request(3, ORIGIN, 9, BATCH, COLL, (("a", _v(1)), ("b", _v([2])))),
    Answer(3, 7, OK, "", Position(3, 10, b"h" * 32),
           WrittenItem("k", 1 << 40, ORIGIN, False, _v(1))),
    Answer(3, 8, 404, "no item", Position(1, 0, GENESIS)),
    Answer(0, 9, NOT_LEADER, "not the leader", None, None, 0),
    Answer(3, 9, OK, "", Position(3, 12, b"h" * 32), None, 2),
])
def test_frames_round_trip(frame: Request | Answer) -> None:
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize("data", [
    b"", b"\xc1", _v([]), _v([1, 3, ORIGIN, 7, 9, COLL, []]),  # unknown op
    _v([1, 3, b"short", 7, PUT, COLL, ["k", b"v"]]),            # origin length
    _v([1, -1, ORIGIN, 7, PUT, COLL, ["k", b"v"]]),             # negative epoch
    _v([1, 3, ORIGIN, 7, PUT, COLL, ["k"]]),                    # PUT without value
    _v([1, 3, ORIGIN, 7, BATCH, COLL, [[]]]),                   # empty batch
    _v([2, 3, 7, 200, "", [3, 1, b"short"], None, 0]),          # hash length
    _v([2, 3, 7, 200, "", None, ["k", 1, ORIGIN, "no", None], 0]),  # deleted not bool
    _v({"a": 1}),
])
def test_bad_frames_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_dedupe_window_by_count_age_and_bytes() -> None:
    d = Dedupe(max_entries=2, max_age=10.0)
    a = Answer(1, 1, OK, "", None)
    h = b"h" * 32
    d.put(ORIGIN, 1, h, a, now=0.0)
    d.put(ORIGIN, 2, h, a, now=1.0)
    assert d.get(ORIGIN, 1, h, now=2.0) == a
    assert d.get(bytes(16), 1, h, now=2.0) is None  # another origin, same id
    d.put(ORIGIN, 3, h, a, now=3.0)  # over the count: the oldest goes
    assert d.get(ORIGIN, 1, h, now=3.0) is None and d.get(ORIGIN, 2, h, now=3.0) == a
    assert d.get(ORIGIN, 2, h, now=11.5) is None  # over the age
    assert d.get(ORIGIN, 3, h, now=11.5) == a
    # Bounded by bytes: entries with long messages push the oldest out.
    small = Dedupe(max_bytes=3 * ENTRY_OVERHEAD + 300)
    for i in range(5):
        small.put(ORIGIN, i, h, Answer(1, i, OK, "m" * 100, None), now=0.0)
    assert len(small) == 3 and small.bytes <= small.max_bytes
    assert small.get(ORIGIN, 1, h, now=0.0) is None


def test_dedupe_keeps_no_values_and_tells_another_write_apart() -> None:
    d = Dedupe()
    put = Request(1, ORIGIN, 7, PUT, COLL, ("k", b"\x01" * 1000))
    item = WrittenItem("k", 5, ORIGIN, False, b"\x01" * 1000)
    d.put(ORIGIN, 7, request_digest(put), Answer(1, 7, OK, "", None, item), now=0.0)
    kept = d.get(ORIGIN, 7, request_digest(put), now=0.0)
    assert kept is not None and kept.item is not None and kept.item.value is None
    assert d.bytes < 1000
    for other in (Request(1, ORIGIN, 7, PUT, COLL, ("k", b"\x02")),
                  Request(1, ORIGIN, 7, PUT, "other", ("k", b"\x01" * 1000)),
                  Request(1, ORIGIN, 7, DELETE, COLL, ("k",))):
        with pytest.raises(DedupeConflict):
            d.get(ORIGIN, 7, request_digest(other), now=0.0)
    # The epoch is not part of the request's identity.
    resent = Request(2, ORIGIN, 7, PUT, COLL, ("k", b"\x01" * 1000))
    assert d.get(ORIGIN, 7, request_digest(resent), now=0.0) == kept


# --- the leader's answers, against a real store -----------------------------------


def test_leader_dedupes_fences_epochs_and_refuses_when_not_leader(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path, bytes(16))
        epoch: list[int | None] = [5]
        server = ForwardServer(store, lambda: epoch[0], 1 << 20)
        try:
            req = Request(5, ORIGIN, 1, PUT, COLL, ("k", _v({"n": 1})))
            first = await server.handle(req)
            assert first.status == OK and first.epoch == 5
            assert first.item is not None and first.item.key == "k"
            assert first.position == store.log_head and store.log_head.seq == 1
            # The same (origin, id) again: the same answer, nothing written.
            again = await server.handle(req)
            assert again.item is not None and again.item.value is None  # kept without it
            assert again == replace(first, item=replace(first.item, value=None))
            assert store.log_head.seq == 1
            # The same (origin, id) for another write (a forged or reused id):
            # refused, not answered from the table, nothing written.
            forged = await server.handle(Request(5, ORIGIN, 1, PUT, COLL, ("k", _v("x"))))
            assert forged.status == ID_CONFLICT and forged.item is None
            assert store.log_head.seq == 1 and server.stats["forward_refused_id_conflict"] == 1
            # Another origin with the same id is another write.
            other = await server.handle(Request(5, bytes(16), 1, PUT, COLL, ("k", _v(2))))
            assert other.status == OK and store.log_head.seq == 2
            # A request of another epoch is answered with ours and not written.
            for e in (4, 6):
                stale = await server.handle(Request(e, ORIGIN, 10 + e, PUT, COLL,
                                                    ("x", _v(0))))
                assert (stale.status, stale.epoch) == (WRONG_EPOCH, 5)
            assert store.log_head.seq == 2 and await store.get(COLL, "x") is None
            # Not (or no longer) leader: nothing is written.
            epoch[0] = None
            gone = await server.handle(Request(5, ORIGIN, 20, PUT, COLL, ("y", _v(0))))
            assert gone.status == NOT_LEADER and await store.get(COLL, "y") is None
            epoch[0] = 5
            # Batches and deletes; a delete of nothing is a 404, not cached.
            batch = await server.handle(Request(5, ORIGIN, 30, BATCH, COLL,
                                                (("a", _v(1)), ("b", _v(2)))))
            assert (batch.status, batch.written) == (OK, 2)
            deleted = await server.handle(Request(5, ORIGIN, 31, DELETE, COLL, ("a",)))
            assert deleted.status == OK and deleted.item is not None and deleted.item.deleted
            missing = await server.handle(Request(5, ORIGIN, 32, DELETE, COLL, ("zz",)))
            assert missing.status == 404
            # A value that is not msgpack of a JSON value is a 400.
            bad = await server.handle(Request(5, ORIGIN, 33, PUT, COLL, ("k", b"\xc1")))
            assert bad.status == 400
            assert server.stats["forward_deduplicated"] == 1
        finally:
            await store.close()

    anyio.run(main, backend="trio")


class To:
    """An Upstream following the leader at ``addr`` at epoch 1."""

    def __init__(self, addr: HostPort) -> None:
        self.addr = addr

    def leader_epoch(self) -> int | None:
        return None

    def forward_target(self, now: float) -> HostPort | None:
        return self.addr

    def epoch_seen(self) -> int:
        return 1


@asynccontextmanager
async def forwarding_pair(tmp_path: Path) -> AsyncIterator[tuple[Forwarding, ForwardServer]]:
    """A follower's Forwarding and its leader's ForwardServer behind a real
    sync listener on loopback."""
    (tmp_path / "l").mkdir()
    (tmp_path / "f").mkdir()
    leader = await Store.open(tmp_path / "l", bytes(16))
    follower = await Store.open(tmp_path / "f", ORIGIN)
    sync = SyncService(leader, "127.0.0.1", 0, 0.2, 2, 1 << 20, rng=random.Random(1))
    server = ForwardServer(leader, lambda: 1, 1 << 20)
    sync.streams[FIRST_BYTE] = server.serve
    listener = await listen("127.0.0.1", 0, sync.max_frame)
    addr = HostPort("127.0.0.1", listener.listener.extra(SocketAttribute.local_port))
    fwd = Forwarding(follower, To(addr), ORIGIN, 1 << 16, lambda: None, random.Random(1), 1.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, sync._serve_one)
            yield fwd, server
            tg.cancel_scope.cancel()
    finally:
        await fwd.close()
        await follower.close()
        await leader.close()


def test_stale_pooled_connections_cost_no_attempt_and_oversize_stays_local(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with forwarding_pair(tmp_path) as (fwd, server):
            assert (await fwd.put(COLL, "a", 1)).position is not None
            assert len(fwd._idle) == 1
            # Idle longer than half the leader's idle timeout: not reused.
            at, conn, since = fwd._idle[0]
            fwd._idle[0] = (at, conn, since - fw_rt.POOL_IDLE - 1)
            assert (await fwd.put(COLL, "b", 2)).position is not None
            assert "forward_pooled_failed" not in fwd.stats
            # The leader closed a pooled connection: not an attempt, the
            # write goes on a fresh one.
            monkeypatch.setattr(fw_rt, "IDLE_TIMEOUT", 0.1)
            await fwd.put(COLL, "c", 3)  # its connection now times out on the leader
            with anyio.fail_after(5):
                while server.connections:
                    await anyio.sleep(0.02)
            assert (await fwd.put(COLL, "d", 4)).position is not None
            assert fwd.stats["forward_pooled_failed"] == 1
            assert "forward_failures" not in fwd.stats
            assert fwd.stats["writes_forwarded"] == 4
            # A batch over the frame limit is kept locally at once.
            big = {f"k{i}": "x" * 1000 for i in range(100)}
            kept = await fwd.put_many(COLL, big)
            assert kept.position is None and kept.written == 100
            assert fwd.stats["forward_too_large"] == 1
            assert "forward_failures" not in fwd.stats
            assert await server.store.get(COLL, "k0") is None

    anyio.run(main, backend="trio")


def test_a_write_timed_out_but_committed_is_not_written_again_locally(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader commits after the follower gave up waiting: asked again
    with the same id, its dedupe table answers, and the follower does not
    write the value locally with a newer HLC."""
    monkeypatch.setattr(fw_rt, "FORWARD_TIMEOUT", 0.3)

    async def main() -> None:
        async with forwarding_pair(tmp_path) as (fwd, server):
            put = server.store.put

            async def slow_put(name: str, key: str, value: Any) -> Any:
                await anyio.sleep(0.6)
                return await put(name, key, value)

            server.store.put = slow_put  # type: ignore[method-assign]
            written = await fwd.put(COLL, "k", {"n": 1})
            assert written.status == OK and written.position is not None
            assert fwd.stats["forward_resolved"] == 1
            assert "writes_kept_locally" not in fwd.stats
            assert await fwd.store.get(COLL, "k") is None  # only the stream brings it
            assert server.store.log_head.seq == 1  # written once

    anyio.run(main, backend="trio")


# --- real agents -------------------------------------------------------------------



def status(a: AgentProc) -> dict[str, Any]:
    return a.get("/api/cluster/status")  # type: ignore[no-any-return]


def items(a: AgentProc) -> dict[str, Any]:
    page = a.get(f"/api/collections/{COLL}/items?limit=1000")
    return {i["key"]: i["value"] for i in page["items"]}


@pytest.mark.integration
def test_a_follower_write_goes_through_the_leader_and_reads_back_at_once(
        swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader")
    # No gossip peers: only the leader can carry the follower's writes anywhere.
    f1 = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    f2 = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    wait_for(lambda: all(status(f)["role"] == "Follower" for f in (f1, f2)), timeout=20,
             what="two followers streaming")
    for i in range(60):
        code, body = f1.request("PUT", f"/api/collections/{COLL}/items/k{i}", {"value": i})
        assert code == 200, body
        pos = body["leader_position"]
        assert pos is not None and pos["seq"] >= i + 1
        # Committed by the leader before the answer; written there, by it.
        assert leader.get(f"/api/collections/{COLL}/items/k{i}")["value"] == i
        assert body["origin"] == leader.node_id
        # Read-your-writes on the device: no polling needed.
        assert f1.get(f"/api/collections/{COLL}/items/k{i}")["value"] == i
    code, body = f1.request("POST", f"/api/collections/{COLL}/items",
                            {"items": {"b1": 1, "b2": 2}})
    assert code == 200 and body["written"] == 2 and body["leader_position"] is not None
    assert f1.get(f"/api/collections/{COLL}/items/b2")["value"] == 2
    code, body = f1.request("DELETE", f"/api/collections/{COLL}/items/k0")
    assert code == 200 and body["deleted"] and body["leader_position"] is not None
    assert f1.request("GET", f"/api/collections/{COLL}/items/k0")[0] == 404
    assert leader.request("GET", f"/api/collections/{COLL}/items/k0")[0] == 404
    assert f1.request("DELETE", f"/api/collections/{COLL}/items/nope")[0] == 404
    # The other follower gets them by the stream.
    want = {f"k{i}": i for i in range(1, 60)} | {"b1": 1, "b2": 2}
    wait_for(lambda: items(f2) == want, timeout=10, what="the other follower streaming them")
    assert items(leader) == want
    # The leader wrote each once: 60 puts + 2 + 1 delete entries in its log.
    assert status(leader)["applied_seq"] == 63


@pytest.mark.integration
def test_followers_edge_without_leader_then_every_acknowledged_write_converges(
        tmp_path: Path) -> None:
    swarm = Swarm(tmp_path)
    try:
        leader = swarm.add(HS_GOSSIP_ROLE="leader")
        f1 = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
        # The followers are swarm peers of each other, not of the leader.
        f2 = swarm.add([f1], HS_GOSSIP_COORDINATOR=leader.gossip_addr)
        wait_for(lambda: all(status(f)["role"] == "Follower" for f in (f1, f2)), timeout=20,
                 what="two followers streaming")
        acked: dict[str, int] = {}
        for i in range(10):
            for a in (leader, f1, f2):
                key = f"{a.name}-before-{i}"
                assert a.request("PUT", f"/api/collections/{COLL}/items/{key}",
                                 {"value": i})[0] == 200
                acked[key] = i
        # (A write the leader acknowledged and had not streamed yet would be
        # on the leader alone until it is back: wait for the stream first.)
        head = status(leader)["applied_seq"]
        wait_for(lambda: all(status(f)["applied_seq"] == head for f in (f1, f2)), timeout=20,
                 what="followers at the leader's head")
        leader.kill()
        wait_for(lambda: all(status(f)["role"] == "Edge" for f in (f1, f2)), timeout=20,
                 what="followers Edge")
        for i in range(10):
            for a in (f1, f2):
                key = f"{a.name}-away-{i}"
                code, body = a.request("PUT", f"/api/collections/{COLL}/items/{key}",
                                       {"value": i})
                assert code == 200 and body["leader_position"] is None, body
                acked[key] = i
        # Among themselves, by gossip and Merkle sync.
        wait_for(lambda: items(f1) == items(f2) == acked, timeout=30,
                 what="followers converged while the leader is away")
        leader.start()
        wait_for(lambda: all(status(f)["role"] == "Follower" for f in (f1, f2)), timeout=40,
                 what="followers streaming again")
        # What they wrote while away reached the leader (it is no swarm peer
        # of theirs: only the push before HELLO carries it).
        wait_for(lambda: items(leader) == acked, timeout=20,
                 what="the leader holding every acknowledged write")
        for i in range(5):
            key = f"after-{i}"
            code, body = f2.request("PUT", f"/api/collections/{COLL}/items/{key}",
                                    {"value": i})
            assert code == 200 and body["leader_position"] is not None
            acked[key] = i
        wait_for(lambda: items(leader) == items(f1) == items(f2) == acked, timeout=30,
                 what="all three converged")
    finally:
        swarm.stop_all()


def test_a_follower_fills_in_the_value_a_deduplicated_answer_lacks(tmp_path: Path) -> None:
    class Nowhere:
        def leader_epoch(self) -> int | None:
            return None

        def forward_target(self, now: float) -> None:
            return None

        def epoch_seen(self) -> int:
            return 0

    async def main() -> None:
        store = await Store.open(tmp_path, bytes(16))
        try:
            fwd = Forwarding(store, Nowhere(), ORIGIN, 1 << 20, lambda: None,
                             random.Random(1), 1.0)
            lean = Answer(1, 7, OK, "", Position(1, 3, GENESIS),
                          WrittenItem("k", 5, ORIGIN, False, None))
            written = fwd._answered(COLL, "k", lean, _v({"n": 1}))
            assert written.item is not None and written.item.value == _v({"n": 1})
        finally:
            await store.close()

    anyio.run(main, backend="trio")


def test_the_idle_look_for_unsent_writes_waits_for_a_round(tmp_path: Path) -> None:
    """Not following, the loop looks for unsent writes on the agent's rounds,
    never on a timer of its own (each costs an idle agent a wakeup)."""
    class Nowhere:
        looks = 0

        def leader_epoch(self) -> int | None:
            return None

        def forward_target(self, now: float) -> None:
            Nowhere.looks += 1
            return None

        def epoch_seen(self) -> int:
            return 0

    interval = 0.2

    async def main() -> None:
        store = await Store.open(tmp_path, bytes(16))
        rounds = Rounds(slack=interval / 2)
        try:
            fwd = Forwarding(store, Nowhere(), ORIGIN, 1 << 20, lambda: None,
                             random.Random(1), interval, sleep=rounds.sleep)
            async with anyio.create_task_group() as tg:
                tg.start_soon(fwd.run)
                with anyio.fail_after(5):
                    while len(rounds) == 0:
                        await anyio.sleep(0.005)
                # Past the idle look's time but before its fallback: no look ...
                await anyio.sleep(IDLE_LOOK * interval + interval / 2)
                assert Nowhere.looks == 0
                # ... until a round comes.
                rounds.tick(anyio.current_time())
                with anyio.fail_after(5):
                    while Nowhere.looks == 0:
                        await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
        finally:
            await store.close()

    anyio.run(main, backend="trio")
