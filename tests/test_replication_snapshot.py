"""Snapshots, promotion and fencing of change-log streaming, in one process:
the new frames and their codec, the decisions (snapshot or stream, resume,
promotion refused, which leader to follow), the store's snapshot reader and
resumable install, and a snapshot interrupted over TCP then resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from agent.core.changelog import GENESIS, Position, Retention
from agent.core.replication import (
    TAG,
    Chunk,
    ChunkAck,
    Hello,
    Info,
    Probe,
    ProtocolError,
    Resume,
    Root,
    RootSums,
    Snapshot,
    Verdict,
    chunk_hash,
    decide,
    decode,
    encode,
    pick_leader,
    promotion_refusal,
)
from agent.runtime import replication as rr
from agent.store.stream import SnapshotReader
from merkle.tree import Item
from tests.test_replication import (
    H1,
    H2,
    H3,
    A,
    B,
    _filled_leader,
    _items,
    _open,
    follower_of,
    serving,
    until,
)

C = b"c" * 16
ITEM = ("k1", 5, A, False, b"\x01")


# --- codec -------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    Hello(3, A, Position(2, 17, H1), True, None, "10.0.0.2:7946"),
    Hello(3, A, Position(2, 17, H1), False, Resume(Position(2, 9, H2), "vision", "k5"), ""),
    Snapshot(3, A, Position(3, 90, H2), (Root("a", 5, 1), Root("b", (1 << 256) - 1, 9))),
    Snapshot(3, A, Position(3, 90, H2), (), ("vision", "k5")),
    Chunk(3, 0, "vision", (ITEM, ("k2", 6, B, True, None)), H3),
    ChunkAck(3, 7),
    Probe(2, B),
    Info(2, A, "Follower", "10.0.0.2:7946", C, Position(2, 5, H1)),
    Info(0, A, "", "", b"", Position(0, 0, GENESIS)),
])
def test_new_frames_round_trip(frame: Any) -> None:
    data = encode(frame)
    assert data[0] == TAG and decode(data) == frame


def test_the_first_slices_hello_still_decodes() -> None:
    old = bytes([TAG]) + msgpack.packb([1, 3, A, 2, 17, H1], use_bin_type=True)
    assert decode(old) == Hello(3, A, Position(2, 17, H1))


def _raw(*fields: Any) -> bytes:
    return bytes([TAG]) + msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("data", [
    _raw(1, 1, A, 0, 0, H1, "yes", None, ""),  # want_snapshot not a bool
    _raw(1, 1, A, 0, 0, H1, False, [1, 2, H1, "", "k"], ""),  # resume without a collection
    _raw(1, 1, A, 0, 0, H1, False, None, "x" * 301),  # leader address too long
    _raw(7, 1, A, 1, 1, H1, [["b", bytes(32), 0], ["a", bytes(32), 0]], None),  # roots unsorted
    _raw(7, 1, A, 1, 1, H1, [["a", bytes(31), 0]], None),  # root sum of the wrong size
    _raw(8, 1, 0, "v", [["k", -1, A, False, None]], H1),  # negative hlc
    _raw(8, 1, 0, "v", [["k", 1, A, 0, None]], H1),  # deleted not a bool
    _raw(8, 1, 0, "", [], H1),  # no collection
    _raw(11, 1, A, "King", "", A, 1, 1, H1),  # unknown role
    _raw(11, 1, A, "Leader", "", b"short", 1, 1, H1),  # log id of the wrong size
])
def test_malformed_new_frames_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


# --- decisions ------------------------------------------------------------------------


FLOOR = Position(1, 10, H1)
HEAD = Position(1, 20, H3)
KNOWN = {15: H2}


@pytest.mark.parametrize("hello, verdict", [
    (Hello(1, B, Position(1, 15, H2)), Verdict.STREAM),
    (Hello(1, B, Position(1, 9, H1)), Verdict.SNAPSHOT),  # compacted away
    (Hello(1, B, Position(0, 0, GENESIS)), Verdict.SNAPSHOT),
    (Hello(1, B, Position(1, 15, H3)), Verdict.DIVERGED),  # merges, never truncated
    (Hello(1, B, Position(1, 15, H2), want_snapshot=True), Verdict.SNAPSHOT),  # refused a batch
    (Hello(1, B, Position(0, 0, GENESIS), resume=Resume(Position(1, 15, H2), "v", "k")),
     Verdict.RESUME),
    (Hello(1, B, Position(0, 0, GENESIS), resume=Resume(Position(1, 5, H2), "v", "k")),
     Verdict.SNAPSHOT),  # the resumed snapshot's position is gone: start again
    (Hello(1, B, Position(0, 0, GENESIS), resume=Resume(Position(1, 15, H1), "v", "k")),
     Verdict.SNAPSHOT),  # not this log
])
def test_decide(hello: Hello, verdict: Verdict) -> None:
    assert decide(FLOOR, HEAD, hello, KNOWN.get).verdict is verdict


def test_chunks_are_chained() -> None:
    h0 = chunk_hash(GENESIS, 0, "v", (ITEM,))
    h1 = chunk_hash(h0, 1, "v", (ITEM,))
    assert h1 != chunk_hash(GENESIS, 1, "v", (ITEM,))  # missing chunk 0
    assert h0 != chunk_hash(GENESIS, 0, "v", (("k1", 5, A, False, b"\x02"),))  # altered
    assert h0 != chunk_hash(GENESIS, 0, "w", (ITEM,))


def test_root_sums_match_only_the_announced_roots() -> None:
    items = [Item(f"k{i}", i + 1, A, False, b"\x01") for i in range(5)]
    total = sum(int.from_bytes(i.digest, "big") for i in items) % (1 << 256)
    sums = RootSums()
    for it in items:
        sums.add("v", it.digest)
    assert sums.mismatch((Root("v", total, 5), Root("empty", 0, 0))) is None
    assert sums.mismatch((Root("v", total, 4),)) is not None  # count
    assert sums.mismatch((Root("v", total + 1, 5),)) is not None  # a changed item
    assert sums.mismatch(()) is not None  # received what was not announced
    assert RootSums().mismatch((Root("v", total, 5),)) is not None  # missing items


def _info(epoch: int, role: str, log_id: bytes, seq: int, leader: str = "") -> Info:
    return Info(epoch, C, role, leader, log_id, Position(epoch, seq, H1))


def test_promotion_needs_the_most_advanced_position_reachable() -> None:
    me = Position(1, 50, H2)
    assert promotion_refusal(1, A, me, []) is None
    assert promotion_refusal(1, A, me, [("c", _info(1, "Follower", A, 50))]) is None
    assert promotion_refusal(1, A, me, [("a", _info(1, "Leader", A, 50))]) is None
    # another log's seq says nothing
    assert promotion_refusal(1, A, me, [("c", _info(1, "Follower", B, 90))]) is None
    why = promotion_refusal(1, A, me, [("c", _info(1, "Follower", A, 51))])
    assert why is not None and "c is further" in why
    why = promotion_refusal(1, A, me, [("d", _info(2, "Follower", B, 1))])
    assert why is not None and "epoch 2" in why


def test_pick_leader_takes_the_highest_epoch() -> None:
    infos = [("b", _info(2, "Follower", A, 5, leader="x:1")),
             ("c", _info(3, "Leader", C, 9)),
             ("d", _info(3, "Follower", C, 9, leader="y:1"))]
    assert pick_leader(1, infos) == ("c", 3)  # the leader itself over hearsay
    assert pick_leader(1, infos[:1]) == ("x:1", 2)
    assert pick_leader(4, infos) is None  # nothing at least as new as seen
    assert pick_leader(0, [("e", _info(0, "Edge", b"", 0))]) is None


# --- the store side -------------------------------------------------------------------


def test_snapshot_reader_roots_are_the_collections_roots(tmp_path: Path) -> None:
    async def main() -> None:
        s = await _filled_leader(tmp_path / "l")
        r = await anyio.to_thread.run_sync(SnapshotReader, s.path)
        await s.put("vision", "later", 1)  # the writer is not blocked by the read
        got: dict[str, list[Item]] = {}
        for name, items in r.chunks(50, 1 << 20):
            assert len(items) <= 50
            got.setdefault(name, []).extend(items)
        r.close()
        assert r.at.seq == (await s.log_position()).seq - 1
        sums = RootSums()
        for name, items in got.items():
            for it in items:
                sums.add(name, it.digest)
        assert sums.mismatch(r.roots) is None
        assert {x.name: x.count for x in r.roots} == {"other": 1, "vision": 300}
        assert "later" not in {i.key for i in got["vision"]}
        await s.close()

    anyio.run(main, backend="trio")


def test_an_interrupted_install_resumes_from_its_progress(tmp_path: Path) -> None:
    async def main() -> None:
        s = await _open(tmp_path / "f", B)
        at = Position(1, 40, H1)
        roots = (Root("v", 0, 0),)
        p = await s.begin_snapshot(at, A, roots, None)
        items = [Item(f"k{i}", i + 1, A, False, msgpack.packb(i)) for i in range(3)]
        p, _ = await s.apply_chunk(p, "v", items, H2)
        await s.close()
        s = await _open(tmp_path / "f", B)  # a restart
        kept = await s.snapshot_progress()
        assert kept is not None and kept.at == at and kept.last == ("v", "k2")
        assert kept.next_index == 1 and kept.chunk_hash == H2 and kept.items == 3
        assert len(await s.list_items("v")) == 3  # in the same transaction as the progress
        p = await s.begin_snapshot(at, A, roots, kept)
        assert p.last == ("v", "k2") and p.next_index == 0 and p.chunk_hash == GENESIS
        await s.finish_snapshot(p, "10.0.0.2:7946")
        assert await s.snapshot_progress() is None
        u = await s.upstream()
        assert u.applied == at and u.leader == "10.0.0.2:7946" and u.log_id == A
        await s.close()

    anyio.run(main, backend="trio")


def test_promote_raises_the_epoch_above_every_epoch_seen(tmp_path: Path) -> None:
    async def main() -> None:
        s = await _open(tmp_path / "f", B)
        await s.put("v", "a", 1)
        assert await s.see_epoch(4, "10.0.0.2:7946", A)
        assert not await s.see_epoch(3, "10.0.0.9:7946")  # lower: ignored
        assert await s.promote("") == 5
        await s.put("v", "b", 2)
        assert (await s.log_position()).epoch == 5  # new entries carry it
        await s.close()
        s = await _open(tmp_path / "f", B)
        assert await s.log_epoch() == 5 and (await s.upstream()).epoch_seen == 5
        await s.close()

    anyio.run(main, backend="trio")


# --- over TCP -------------------------------------------------------------------------


def test_a_snapshot_cut_off_midway_resumes_and_verifies(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower is stopped after some chunks; the next connection sends
    only the rest (and the log from the first run's position), and the result
    is the leader's data with the roots verified."""
    monkeypatch.setattr(rr, "SNAPSHOT_ITEMS", 20)

    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        await leader_store.compact_log(Retention(10, None))
        follower_store = await _open(tmp_path / "f", B)
        apply_chunk = follower_store.apply_chunk

        async def three_chunks(*args: Any) -> Any:
            # The first run stops after three chunks, however fast the rest would come.
            if follower.stats.get("snapshot_chunks", 0) >= 3:
                await anyio.sleep_forever()
            return await apply_chunk(*args)

        follower_store.apply_chunk = three_chunks  # type: ignore[method-assign]
        async with serving(leader_store) as (leader, addr):
            follower = follower_of(follower_store, addr)
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.run)
                await until(lambda: follower.stats.get("snapshot_chunks", 0) >= 3)
                tg.cancel_scope.cancel()
            follower_store.apply_chunk = apply_chunk  # type: ignore[method-assign]
            first = follower.stats["snapshot_items"]
            assert first < 301 and await follower_store.snapshot_progress() is not None
            # meanwhile the leader changes an item the first run already sent
            await leader_store.put("other", "x", "changed")
            await leader_store.put("vision", "k0", "changed")
            follower = follower_of(follower_store, addr)
            async with anyio.create_task_group() as tg:
                tg.start_soon(follower.run)
                await until(lambda: follower.applied == leader_store.log_head)
                tg.cancel_scope.cancel()
            assert follower.stats["snapshots_resumed"] == 1
            assert leader.stats["snapshots_resumed_sent"] == 1
            assert follower.stats["snapshot_items"] + first <= 302
        assert await follower_store.snapshot_progress() is None
        for name in ("vision", "other"):
            assert await _items(follower_store, name) == await _items(leader_store, name)
        assert {c.name: c.state_hash for c in follower_store.digests()} == \
            {c.name: c.state_hash for c in leader_store.digests()}
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


def test_a_tampered_chunk_is_refused_and_a_new_snapshot_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rr, "SNAPSHOT_ITEMS", 50)
    real = SnapshotReader.chunks
    tampered = 0

    def chunks(self: SnapshotReader, n: int, size: int) -> Any:
        nonlocal tampered
        for i, (name, items) in enumerate(real(self, n, size)):
            if i == 2 and not tampered:
                tampered += 1
                it = items[0]
                items[0] = Item(it.key, it.hlc, it.origin, it.deleted, msgpack.packb("forged"))
            yield name, items

    monkeypatch.setattr(SnapshotReader, "chunks", chunks)

    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        await leader_store.compact_log(Retention(10, None))
        follower_store = await _open(tmp_path / "f", B)
        async with serving(leader_store) as (_, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head)
            tg.cancel_scope.cancel()
        # the forged item's chunk verified (its hash was computed over it), the
        # roots did not: refused, and a new snapshot repaired the item
        assert follower.stats["snapshots_refused"] == 1
        assert follower.stats["snapshots_installed"] == 1
        assert await _items(follower_store, "vision") == await _items(leader_store, "vision")
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


def test_a_follower_refuses_a_lower_epoch_and_a_leader_steps_down(tmp_path: Path) -> None:
    """Fencing on the wire: a follower that has seen epoch 5 refuses the
    epoch-1 leader's answer (counted), and that leader hears epoch 5 in the
    HELLO and is told to step down for the leader the HELLO names."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        await follower_store.see_epoch(5, "10.9.9.9:7946", C)
        heard: list[tuple[int, str]] = []
        async with serving(leader_store) as (leader, addr), anyio.create_task_group() as tg:
            leader.on_higher_epoch = lambda e, a: heard.append((e, a))
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.stats.get("epoch_refused", 0) >= 1 and bool(heard))
            tg.cancel_scope.cancel()
        assert heard[0] == (5, "10.9.9.9:7946")
        assert follower.applied.seq == 0 and not await follower_store.list_items("vision")
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")
