"""Change-log streaming, without processes: the frame codec, the leader's
answer to a HELLO, the flow-control window, the follower's store side
(applying verified batches in one transaction with its position), the
leader/follower pair over a real TCP listener in one process, and the
settings."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from anyio.abc import SocketAttribute

from agent.config import ConfigError, HostPort, load
from agent.core import changelog
from agent.core.changelog import GENESIS, ChainBroken, Position, Retention
from agent.core.replication import (
    TAG,
    Ack,
    Answer,
    Chunk,
    ChunkAck,
    Diverged,
    Entries,
    Hello,
    ProtocolError,
    SnapshotNeeded,
    Stream,
    Verdict,
    Window,
    answer_hello,
    decode,
    encode,
    epoch_ok,
    is_replication,
)
from agent.net.stream import connect, listen
from agent.runtime import replication as replication_rt
from agent.runtime.replication import Follower, Leader
from agent.runtime.sync_service import SyncService
from agent.store import Store, stream
from agent.store.log import RecentLog

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16
#: what a client sees of a connection the leader closed
CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError)
H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


# --- codec -------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    Hello(3, A, Position(2, 17, H1)),
    Hello(0, B, Position(0, 0, GENESIS)),
    Stream(3, A, Position(3, 90, H2)),
    Diverged(3, A, Position(3, 90, H2), "unknown hash at seq 5", ("vision", "sensors")),
    SnapshotNeeded(3, A, Position(3, 40, H1), Position(3, 90, H2), ("vision",)),
    Entries(3, (b"x" * 10, b"y" * 2000), H3),
    Entries(3, ()),
    Ack(3, Position(3, 42, H3)),
])
def test_frames_round_trip(frame: Any) -> None:
    data = encode(frame)
    assert data[0] == TAG and is_replication(data)
    assert decode(data) == frame


def _raw(*fields: Any) -> bytes:
    return bytes([TAG]) + msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("data", [
    b"",
    b"\x92\x01\x02",  # a msgpack array: a sync frame, not ours
    bytes([TAG]),
    bytes([TAG]) + b"\xc1",  # never-used msgpack byte
    _raw(99, 1),  # unknown kind
    _raw(1, 1, A),  # HELLO too short
    _raw(1, -1, A, 0, 0, H1),  # negative epoch
    _raw(1, 1, b"short", 0, 0, H1),  # node id of the wrong size
    _raw(1, 1, A, 0, 0, b"x" * 31),  # hash of the wrong size
    _raw(6, 1, 1, 2, "not bytes"),
    _raw(5, 1, ["str is not an entry"], H1),
    _raw(5, 1, [b"e"], b"short"),
    _raw(3, 1, A, 1, 1, H1, "r" * 201, []),  # reason too long
    _raw(3, 1, A, 1, 1, H1, "r", [""]),  # empty collection name
    bytes([TAG]) + msgpack.packb([5, 1, {"a": 1}, H1]),  # a map
])
def test_malformed_frames_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_decoding_is_bounded_by_a_budget() -> None:
    # An empty array is one byte on the wire and ~56 decoded: a frame of
    # them decodes to more than its budget and is refused while decoding.
    bomb = _raw(5, 1, [[[]] * 1000] * 40, H1)
    assert len(bomb) < 50_000
    with pytest.raises(ProtocolError, match="decodes to more than"):
        decode(bomb)
    # an honest frame of many small entries fits
    assert len(decode(_raw(5, 1, [b"x" * 40] * 10_000, H1)).entries) == 10_000  # type: ignore[union-attr]


def test_epochs_below_the_highest_seen_are_refused() -> None:
    assert epoch_ok(3, 3) and epoch_ok(4, 3) and not epoch_ok(2, 3)


# --- the answer to a HELLO -------------------------------------------------------------


FLOOR = Position(1, 10, H1)
HEAD = Position(1, 20, H3)
KNOWN = {15: H2}


@pytest.mark.parametrize("follower, verdict", [
    (Position(1, 20, H3), Verdict.STREAM),  # up to date
    (Position(1, 15, H2), Verdict.STREAM),  # behind, known hash
    (Position(1, 10, H1), Verdict.STREAM),  # exactly at the floor
    (Position(1, 21, H1), Verdict.DIVERGED),  # ahead
    (Position(1, 20, H2), Verdict.DIVERGED),  # the head's seq, another hash
    (Position(1, 15, H3), Verdict.DIVERGED),  # unknown hash
    (Position(1, 10, H2), Verdict.DIVERGED),  # the floor's seq, another hash
    (Position(1, 9, H1), Verdict.SNAPSHOT_NEEDED),  # compacted away
    (Position(0, 0, GENESIS), Verdict.SNAPSHOT_NEEDED),  # empty, log compacted
])
def test_answer_hello(follower: Position, verdict: Verdict) -> None:
    answer = answer_hello(FLOOR, HEAD, follower, KNOWN.get)
    assert isinstance(answer, Answer) and answer.verdict is verdict, answer


def test_answer_hello_for_an_empty_follower_of_an_uncompacted_log() -> None:
    floor = Position(1, 0, GENESIS)
    assert answer_hello(floor, HEAD, Position(0, 0, GENESIS), KNOWN.get).verdict is Verdict.STREAM
    assert answer_hello(floor, floor, Position(0, 0, GENESIS),
                        KNOWN.get).verdict is Verdict.STREAM


# --- the window ---------------------------------------------------------------------------


def test_window_stops_sending_until_acknowledged() -> None:
    w = Window(acked_seq=100, max_entries=10, max_bytes=1000)
    assert w.room() == (10, 1000)
    w.sent(106, 300)
    assert w.room() == (4, 700)
    w.sent(110, 300)
    assert w.room() == (0, 0)  # full by entries
    w.acked(106)
    assert w.room() == (6, 700) and w.in_flight_entries == 4
    w.sent(111, 700)
    assert w.room() == (0, 0)  # full by bytes
    w.acked(111)
    assert w.room() == (10, 1000)


@pytest.mark.parametrize("ack", [99, 107])
def test_window_refuses_acks_outside_what_was_sent(ack: int) -> None:
    w = Window(100, 10, 1000)
    w.sent(106, 10)
    with pytest.raises(ProtocolError):
        w.acked(ack)


def test_a_partial_ack_keeps_the_batch_bytes() -> None:
    w = Window(0, 100, 100)
    w.sent(10, 100)
    w.acked(5)
    assert w.room() == (0, 0)  # the batch's bytes count until its last entry is acked
    w.acked(10)
    assert w.room() == (100, 100)


# --- the store side -------------------------------------------------------------------------


async def _open(path: Path, origin: bytes) -> Store:
    path.mkdir(exist_ok=True)
    return await Store.open(path, origin)


async def _filled_leader(path: Path) -> Store:
    s = await _open(path, A)
    await s.put_many("vision", {f"k{i}": {"i": i} for i in range(300)})
    await s.delete("vision", "k7")
    await s.put("other", "x", 1)
    await s.put("vision", "k8", "again")
    return s


async def _items(s: Store, name: str) -> list[tuple[str, int, bytes, bool, bytes | None]]:
    return [(i.key, i.hlc, i.origin, i.deleted, i.value)
            for i in await s.list_items(name, limit=10_000)]


async def _same_then_close(follower: Store, leader: Store) -> None:
    """The follower holds the leader's items exactly; both stores closed."""
    assert await _items(follower, "vision") == await _items(leader, "vision")
    await follower.close()
    await leader.close()


def test_apply_stream_copies_the_leader_and_records_the_position(tmp_path: Path) -> None:
    async def main() -> None:
        leader = await _filled_leader(tmp_path / "l")
        follower = await _open(tmp_path / "f", B)
        assert await follower.stream_position() == (Position(0, 0, GENESIS), 0)
        entries = await leader.read_log(0, 10_000)
        # in two batches, as two frames would bring them
        pos, refused = await follower.apply_stream(entries[:100], entries[99].hash)
        assert pos == entries[99].position and refused == 0
        pos, _ = await follower.apply_stream(entries[100:], entries[-1].hash)
        assert pos == await leader.log_position()
        for name in ("vision", "other"):
            assert await _items(follower, name) == await _items(leader, name)
        assert {c.name: c.state_hash for c in follower.digests()} == \
            {c.name: c.state_hash for c in leader.digests()}
        # the follower's own log has its own chain of the same changes
        own = await follower.read_log(0, 10_000)
        assert len(own) == len(entries)
        assert changelog.verify_chain(own, GENESIS, 0) == (await follower.log_position()).hash
        await follower.close()
        # a restart resumes from the position kept with the data
        follower = await _open(tmp_path / "f", B)
        assert (await follower.stream_position())[0] == await leader.log_position()
        await follower.close()
        await leader.close()

    anyio.run(main, backend="trio")


def test_a_tampered_reordered_or_missing_entry_is_refused_whole(tmp_path: Path) -> None:
    async def main() -> None:
        leader = await _filled_leader(tmp_path / "l")
        follower = await _open(tmp_path / "f", B)
        entries = await leader.read_log(0, 10_000)
        await follower.apply_stream(entries[:10])
        before = await _items(follower, "vision")
        e = entries[12]
        # the value changed in transit: decoded, its hash is that of the new bytes
        forged = changelog.decode(changelog.encode(
            e.epoch, e.seq, e.prev_hash, e.origin, e.hlc, e.collection, e.key, e.op,
            msgpack.packb("forged")))
        bad_batches = [
            [*entries[10:12], forged, *entries[13:20]],  # tampered
            [entries[11], entries[10], *entries[12:20]],  # reordered
            entries[10:12] + entries[13:20],  # missing
            entries[11:20],  # does not start at the position
        ]
        for batch in bad_batches:
            with pytest.raises(ChainBroken):
                await follower.apply_stream(batch)
        # the last entry of a batch is checked against the hash the leader sent
        with pytest.raises(ChainBroken):
            await follower.apply_stream([*entries[10:12], forged], entries[12].hash)
        assert (await follower.stream_position())[0] == entries[9].position
        assert await _items(follower, "vision") == before
        await follower.apply_stream(entries[10:])  # the true entries still apply
        assert await _items(follower, "vision") == await _items(leader, "vision")
        await follower.close()
        await leader.close()

    anyio.run(main, backend="trio")


def test_the_recent_log_answers_what_it_holds_within_its_bounds() -> None:
    rows = [(seq, bytes([seq]) * 10) for seq in range(1, 11)]
    idle = RecentLog()  # holds nothing until told to (only a leader reads it)
    idle.add(rows)
    assert idle.read(0, 100, 1 << 20) is None
    recent = RecentLog(max_entries=6, max_bytes=1000)
    recent.add(rows[:4])
    recent.add(rows[4:])
    assert recent.read(4, 100, 1 << 20) == rows[4:]  # the 6 newest are held
    assert recent.read(3, 100, 1 << 20) is None  # entry 4 is gone: read the table
    assert recent.read(10, 100, 1 << 20) is None  # nothing after the newest
    assert recent.read(5, 2, 1 << 20) == rows[5:7]
    assert recent.read(5, 100, 25) == rows[5:7]  # bytes bound; the first always comes
    assert recent.read(5, 100, 1) == rows[5:6]
    small = RecentLog(max_entries=100, max_bytes=35)
    small.add(rows)
    assert small.read(7, 100, 1 << 20) == rows[7:]  # 3 x 10 bytes held
    assert small.read(6, 100, 1 << 20) is None
    small.add([(20, b"x")])  # not the next entry (a gap): what was held goes
    assert small.read(9, 10, 100) is None and small.read(19, 10, 100) == [(20, b"x")]


def test_entries_a_rollback_undid_never_reach_the_recent_log(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path, A)
        store.recent_log.keep()
        await store.put("vision", "a", 1)

        def half_done(w: Any) -> None:
            w.put("vision", "b", 2)  # appended to the log, then the operation fails
            raise ValueError("fails after writing")

        with pytest.raises(ValueError):
            await store._call(half_done)
        await store.put("vision", "c", 3)
        held = store.recent_log.read(0, 100, 1 << 20)
        assert held == await store.read_log_raw(0, 100, 1 << 20)
        assert [changelog.decode(b).key for _, b in held or []] == ["a", "c"]
        await store.close()

    anyio.run(main, backend="trio")


def test_a_deposed_leader_gives_back_its_copy_of_the_newest_entries(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _open(tmp_path, A)
        leader = Leader(store, A, 1.0)
        await store.put("vision", "a", 1)
        assert store.recent_log.read(0, 100, 1 << 20) is not None  # streamed from memory
        leader.depose()
        await store.put("vision", "b", 2)
        assert store.recent_log.read(0, 100, 1 << 20) is None  # nothing held any more
        assert store.recent_log.read(1, 100, 1 << 20) is None
        await store.close()

    anyio.run(main, backend="trio")


def test_a_rolled_back_apply_leaves_the_applied_position_where_it_was(tmp_path: Path) -> None:
    """The applied position is mirrored in memory: an apply that a failure
    rolls back leaves it at what was kept, and the same entries apply again."""
    async def main() -> None:
        leader = await _filled_leader(tmp_path / "l")
        follower = await _open(tmp_path / "f", B)
        entries = await leader.read_log(0, 10_000)
        await follower.apply_stream(entries[:10], entries[9].hash)

        def half_done(w: Any) -> None:
            stream.apply(w, entries[10:20], entries[19].hash)
            raise ValueError("fails after applying")

        with pytest.raises(ValueError):
            await follower._call(half_done)
        assert (await follower.stream_position())[0] == entries[9].position
        pos, _ = await follower.apply_stream(entries[10:], entries[-1].hash)
        assert pos == await leader.log_position()
        await _same_then_close(follower, leader)

    anyio.run(main, backend="trio")


def test_decode_refuses_an_op_or_format_that_only_equals_the_canonical_one() -> None:
    e = (1, 5, H1, A, 7, "vision", "k")
    ok = msgpack.packb([changelog.FORMAT, *e, 0, b"\x01"], use_bin_type=True)
    assert changelog.decode(ok).op is changelog.Op.PUT
    for fields in ([changelog.FORMAT, *e, True, None],  # True == 1 (TOMBSTONE)
                   [1.0, *e, 0, b"\x01"]):  # 1.0 == FORMAT
        with pytest.raises(changelog.EntryInvalid):
            changelog.decode(msgpack.packb(fields, use_bin_type=True))


def test_adopt_and_epochs_only_move_forward(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, B)
        await s.see_epoch(4)
        await s.see_epoch(2)
        await s.adopt_stream_position(Position(3, 50, H1))
        assert await s.stream_position() == (Position(3, 50, H1), 4)
        await s.close()

    anyio.run(main, backend="trio")


# --- leader and follower over TCP, in one process ----------------------------------------


@asynccontextmanager
async def serving(store: Store, sync: SyncService | None = None,
                  **leader_args: Any) -> AsyncIterator[tuple[Leader, HostPort]]:
    """A Leader behind a real sync listener on loopback (Merkle sync too)."""
    if sync is None:
        sync = SyncService(store, "127.0.0.1", 0, 0.2, 2, 1 << 20, rng=random.Random(1))
    leader = Leader(store, A, 0.2, **leader_args)
    sync.streams[TAG] = leader.serve
    listener = await listen("127.0.0.1", 0, sync.max_frame)
    port = listener.listener.extra(SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, sync._serve_one)
        yield leader, HostPort("127.0.0.1", port)
        tg.cancel_scope.cancel()


def follower_of(store: Store, addr: HostPort) -> Follower:
    return Follower(store, addr, B, 0.2, 3 << 20, lambda: None, random.Random(2))


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.02)


def test_leader_streams_backlog_then_live_entries(tmp_path: Path) -> None:
    """The backlog, then live writes woken by commits; each follower's
    acknowledged position tracked."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        async with serving(leader_store, window_entries=64) as (leader, addr), \
                anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            head = await leader_store.log_position()
            await until(lambda: follower.applied == head)
            assert follower.role(anyio.current_time()) == "Follower"
            await leader_store.put_many("vision", {f"live{i}": i for i in range(500)})
            head = await leader_store.log_position()
            await until(lambda: follower.applied == head and leader.downstream()[0].acked == head)
            [down] = leader.downstream()
            assert down.lag == 0 and down.node_id == str(uuid.UUID(bytes=B))
            assert leader.stats["entries_streamed"] == head.seq
            assert leader.min_needed_seq() == head.seq + 1
            tg.cancel_scope.cancel()
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


def test_live_entries_are_streamed_from_memory_without_reading_the_log(
        tmp_path: Path) -> None:
    """Once a follower has the backlog, entries committed afterwards reach it
    from the store's in-memory copy of its newest commits: no read of the
    log table on the store thread per commit."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        reads = 0
        real = leader_store.read_log_raw

        async def counted(after: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
            nonlocal reads
            reads += 1
            return await real(after, limit, max_bytes)

        leader_store.read_log_raw = counted  # type: ignore[method-assign]
        async with serving(leader_store) as (_, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head)
            assert reads >= 1
            backlog_reads = reads
            for i in range(20):
                await leader_store.put("vision", f"live{i}", i)
                await until(lambda: follower.applied == leader_store.log_head)
            assert reads == backlog_reads
            tg.cancel_scope.cancel()
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


def test_commits_in_quick_succession_share_a_frame(tmp_path: Path) -> None:
    """Single-item commits one after another go to a follower in a few
    frames, not one frame each (a frame costs the follower a receive and a
    transaction of its own), and every one of them arrives."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        async with serving(leader_store) as (leader, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head)
            frames = leader.stats.get("entry_frames_streamed", 0)
            commits = 100
            for i in range(commits):
                await leader_store.put("vision", f"live{i}", i)
            await until(lambda: follower.applied == leader_store.log_head)
            sent = leader.stats["entry_frames_streamed"] - frames
            assert sent * 2 <= commits, f"{sent} frames for {commits} commits"
            tg.cancel_scope.cancel()
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


def test_followers_in_step_are_sent_one_encoding_of_each_frame(tmp_path: Path) -> None:
    """Two followers in step (both hold the head when a commit comes) are
    sent the same frame, encoded once for both; both end up with every entry."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        stores = [await _open(tmp_path / n, o) for n, o in (("f1", B), ("f2", C))]
        async with serving(leader_store) as (leader, addr), anyio.create_task_group() as tg:
            followers = [Follower(s, addr, o, 0.2, 3 << 20, lambda: None, random.Random(i))
                         for i, (s, o) in enumerate(zip(stores, (B, C), strict=True))]
            for f in followers:
                tg.start_soon(f.run)
            await until(lambda: all(f.applied == leader_store.log_head for f in followers))
            sent = leader.stats["entry_frames_streamed"]
            encoded = leader.stats["entry_frames_encoded"]
            rounds = 5
            for r in range(rounds):
                await leader_store.put_many("vision", {f"r{r}-{i}": i for i in range(500)})
                await until(lambda: all(f.applied == leader_store.log_head for f in followers))
            sent = leader.stats["entry_frames_streamed"] - sent
            encoded = leader.stats["entry_frames_encoded"] - encoded
            assert (sent, encoded) == (2 * rounds, rounds)
            tg.cancel_scope.cancel()
        assert await _items(stores[0], "vision") == await _items(leader_store, "vision")
        await stores[0].close()
        await _same_then_close(stores[1], leader_store)

    anyio.run(main, backend="trio")


def _slow_second_apply(store: Store) -> tuple[list[int], anyio.Event]:
    """Make the store's second stream apply wait for the returned event; the
    list gets the size of every batch applied."""
    calls: list[int] = []
    hold = anyio.Event()
    real = store.apply_stream

    async def slow(entries: Any, last_hash: Any = None, hashed: bool = False) -> Any:
        calls.append(len(entries))
        if len(calls) == 2:
            await hold.wait()  # the second batch takes a while to apply
        return await real(entries, last_hash, hashed)

    store.apply_stream = slow  # type: ignore[method-assign]
    return calls, hold


def test_frames_that_arrive_while_a_batch_is_applied_are_applied_together(
        tmp_path: Path) -> None:
    """A follower busy applying keeps receiving: what arrived meanwhile goes
    in one transaction (one apply, one ACK) rather than one per frame."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        calls, hold = _slow_second_apply(follower_store)
        # One frame per commit (no gap): the batching is the follower's.
        async with serving(leader_store, send_gap=0) as (_, addr), \
                anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head)
            await leader_store.put("vision", "first", 0)
            await until(lambda: len(calls) == 2)
            for i in range(30):  # one commit, one frame each, while the store is busy
                await leader_store.put("vision", f"k{i}", i)
            await until(lambda: follower.stats.get("entries_received", 0)
                        == leader_store.log_head.seq)
            hold.set()
            await until(lambda: follower.applied == leader_store.log_head)
            assert calls[2:] == [30]
            tg.cancel_scope.cancel()
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


def test_frames_received_before_the_leader_went_away_are_still_applied(
        tmp_path: Path) -> None:
    """Frames queued behind a slow apply when the stream ends (a leader that
    closed, crashed or stepped down) are applied, as they were when a
    follower read one frame at a time, not dropped with the connection."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        calls, hold = _slow_second_apply(follower_store)
        async with anyio.create_task_group() as tg:
            async with serving(leader_store, send_gap=0) as (_, addr):
                follower = follower_of(follower_store, addr)
                receive = follower._receive
                received_all = anyio.Event()

                async def receive_until_the_end(*args: Any) -> None:
                    try:
                        await receive(*args)
                    finally:
                        received_all.set()

                follower._receive = receive_until_the_end  # type: ignore[method-assign]
                tg.start_soon(follower.run)
                await until(lambda: follower.applied == leader_store.log_head)
                await leader_store.put("vision", "first", 0)
                await until(lambda: len(calls) == 2)
                for i in range(30):
                    await leader_store.put("vision", f"k{i}", i)
                await until(lambda: follower.stats.get("entries_received", 0)
                            == leader_store.log_head.seq)
            # The leader's listener and connections are gone: nothing more comes.
            with anyio.fail_after(5):
                await received_all.wait()
            hold.set()
            await until(lambda: follower.applied == leader_store.log_head, timeout=5)
            assert calls[2:] == [30]
            tg.cancel_scope.cancel()
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


@pytest.mark.parametrize("bound", ["WINDOW_ENTRIES", "WINDOW_BYTES"])
def test_a_follower_refuses_a_leader_that_sends_beyond_the_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """What a follower holds received and not yet applied is bounded by the
    window, not by what a leader chooses to send: a leader that overruns it
    (here one whose window is larger than the follower's) ends the stream
    before the follower queues it."""
    monkeypatch.setattr(replication_rt, bound, 50 if bound == "WINDOW_ENTRIES" else 2000)

    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        async with serving(leader_store, window_entries=100_000,
                           window_bytes=64 << 20) as (_, addr), \
                anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.stats.get("connect_failures", 0) >= 1)
            assert follower.stats.get("entries_received", 0) == 0
            assert follower.applied.seq == 0
            tg.cancel_scope.cancel()
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


def test_only_a_connection_that_becomes_a_stream_gives_back_its_sync_slot(
        tmp_path: Path) -> None:
    """A route of the shared listener holds its sync slot (and the session
    deadline) until it says it is a stream: a PROBE or a refused HELLO never
    does; a follower's accepted HELLO does."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        sync = SyncService(leader_store, "127.0.0.1", 0, 0.2, 2, 1 << 20, rng=random.Random(1))
        inside: list[dict[str, int]] = []
        done = anyio.Event()

        async def short_route(conn: Any, first: bytes) -> None:
            inside.append(dict(sync.serving))
            await done.wait()

        sync.streams[0x58] = short_route
        async with serving(leader_store, sync) as (leader, addr), \
                anyio.create_task_group() as tg:
            async with await connect(addr.host, addr.port, 1 << 20) as conn:
                await conn.send(b"X")
                await until(lambda: bool(inside))
                assert inside == [{"127.0.0.1": 1}] and sync.serving == {"127.0.0.1": 1}
                done.set()
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            head = await leader_store.log_position()
            await until(lambda: follower.applied == head and bool(leader.followers))
            assert sync.serving == {}  # the stream holds no slot
            tg.cancel_scope.cancel()
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


def test_a_stalled_follower_is_cut_off_and_holds_compaction_no_more(tmp_path: Path) -> None:
    """A follower that keeps acknowledging an old position while entries
    are outstanding holds compaction back for STALL_LIMIT at most."""
    async def main() -> None:
        store = await _filled_leader(tmp_path / "l")
        async with serving(store, stall_limit=0.5) as (leader, addr):
            epoch = leader.epoch
            start = Position(0, 0, GENESIS)
            async with await connect(addr.host, addr.port, 1 << 22) as conn:
                await conn.send(encode(Hello(epoch, B, start)))
                assert isinstance(decode(await conn.receive()), Stream)
                assert leader.min_needed_seq() == 1
                with anyio.fail_after(10), pytest.raises(CLOSED):
                    while True:
                        decode(await conn.receive())
                        await conn.send(encode(Ack(epoch, start)))  # never further
            assert leader.stats["followers_stalled"] == 1
            assert leader.min_needed_seq() is None
        await store.close()

    anyio.run(main, backend="trio")


def test_a_snapshot_slower_than_the_minimum_rate_is_cut_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower acknowledging each chunk just in time would hold the
    snapshot's read transaction (and the WAL) for ever: cut off."""
    monkeypatch.setattr(replication_rt, "SNAPSHOT_ITEMS", 10)

    async def main() -> None:
        store = await _filled_leader(tmp_path / "l")
        async with serving(store, snapshot_grace=0.5) as (leader, addr):
            epoch = leader.epoch
            async with await connect(addr.host, addr.port, 1 << 22) as conn:
                await conn.send(encode(Hello(epoch, B, Position(0, 0, GENESIS), True)))
                with anyio.fail_after(10), pytest.raises(CLOSED):
                    while True:
                        f = decode(await conn.receive())
                        if isinstance(f, Chunk):
                            await anyio.sleep(0.1)
                            await conn.send(encode(ChunkAck(epoch, f.index)))
            assert leader.stats["snapshots_too_slow"] == 1
        await store.close()

    anyio.run(main, backend="trio")


def test_the_leader_sends_no_more_than_the_window_until_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        store = await _filled_leader(tmp_path / "l")  # 303 entries
        async with serving(store, window_entries=100, window_bytes=1 << 20) as (leader, addr), \
                await connect(addr.host, addr.port, 3 << 20) as conn:
            await conn.send(encode(Hello(0, B, Position(0, 0, GENESIS))))
            assert isinstance(decode(await conn.receive()), Stream)
            got: list[bytes] = []
            with anyio.move_on_after(1.0):  # several keepalive intervals
                while True:
                    f = decode(await conn.receive())
                    assert isinstance(f, Entries)
                    got += f.entries
            assert len(got) == 100  # the window, and not one entry more
            last = changelog.decode(got[-1])
            await conn.send(encode(Ack(1, last.position)))
            with anyio.fail_after(5):
                while len(got) < 200:
                    f = decode(await conn.receive())
                    assert isinstance(f, Entries)
                    got += f.entries
            assert len(got) == 200
            assert leader.downstream()[0].acked == last.position
            # an ACK of what was never sent ends the stream
            await conn.send(encode(Ack(1, Position(1, 10_000, H1))))
            await until(lambda: not leader.followers, 5)
            assert leader.stats["follower_streams_failed"] == 1
        await store.close()

    anyio.run(main, backend="trio")


def test_a_tampered_batch_on_the_wire_is_refused_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        follower_store = await _open(tmp_path / "f", B)
        real = leader_store.read_log_raw
        tampered = 0

        async def tamper(after: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
            nonlocal tampered
            rows = await real(after, limit, max_bytes)
            if tampered < 2 and len(rows) > 3:
                tampered += 1
                e = changelog.decode(rows[2][1])
                forged = changelog.encode(e.epoch, e.seq, e.prev_hash, e.origin, e.hlc,
                                          e.collection, e.key, e.op, msgpack.packb("forged"))
                rows[2] = (rows[2][0], forged)
            return rows

        leader_store.read_log_raw = tamper  # type: ignore[method-assign]
        # every entry is read (and tampered with): none is held in memory
        leader_store.recent_log.keep = lambda *_: None  # type: ignore[method-assign]
        async with serving(leader_store) as (_, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            head = await leader_store.log_position()
            await until(lambda: follower.applied == head)
            tg.cancel_scope.cancel()
        # the first refusal turns into a snapshot: no second batch is tampered
        assert follower.stats["chain_refused"] == 1
        assert follower.stats["snapshots"] == 1 and follower.stats["snapshots_installed"] == 1
        await _same_then_close(follower_store, leader_store)

    anyio.run(main, backend="trio")


def test_behind_compaction_the_follower_gets_a_snapshot(tmp_path: Path) -> None:
    """A position compacted away: a snapshot (the follower's own write
    stays), then streaming from the snapshot's position."""
    async def main() -> None:
        leader_store = await _filled_leader(tmp_path / "l")
        await leader_store.compact_log(Retention(10, None))
        assert (await leader_store.log_floor()).seq > 0
        follower_store = await _open(tmp_path / "f", B)
        await follower_store.put("vision", "mine", "kept")
        async with serving(leader_store) as (leader, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head)
            await leader_store.put("vision", "after", 1)
            await until(lambda: follower.applied == leader_store.log_head)
            tg.cancel_scope.cancel()
        assert follower.stats["snapshots_installed"] == 1 and leader.stats["snapshots_sent"] == 1
        assert "resyncs" not in follower.stats
        mine = await follower_store.get("vision", "mine")
        assert mine is not None and not mine.deleted
        theirs = await _items(leader_store, "vision")
        assert [i for i in await _items(follower_store, "vision") if i[0] != "mine"] == theirs
        assert await follower_store.stream_position() == (leader_store.log_head, 1)
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


def test_a_diverged_follower_merges_back_and_resumes(tmp_path: Path) -> None:
    """A follower whose position the leader does not know (here: ahead of a
    leader that lost its data) is answered DIVERGED; it loses nothing."""
    async def main() -> None:
        follower_store = await _open(tmp_path / "f", B)
        await follower_store.adopt_stream_position(Position(1, 5000, H1))
        await follower_store.put("vision", "mine", "kept")
        leader_store = await _filled_leader(tmp_path / "l")
        async with serving(leader_store) as (leader, addr), anyio.create_task_group() as tg:
            follower = follower_of(follower_store, addr)
            tg.start_soon(follower.run)
            await until(lambda: follower.applied == leader_store.log_head
                        and leader_store.log_head.seq > 303)
            tg.cancel_scope.cancel()
        assert leader.stats["answered_diverged"] == 1
        assert await _items(follower_store, "vision") == await _items(leader_store, "vision")
        assert (await leader_store.get("vision", "mine")) is not None
        await follower_store.close()
        await leader_store.close()

    anyio.run(main, backend="trio")


# --- settings ---------------------------------------------------------------------------------


def test_role_and_coordinator_settings() -> None:
    cfg, _ = load(environ={"HS_GOSSIP_ROLE": "Leader"})
    assert cfg.role == "leader" and cfg.coordinator is None
    cfg, _ = load(environ={"HS_GOSSIP_COORDINATOR": "10.0.0.2:7946"})
    assert (cfg.coordinator.host, cfg.coordinator.port) == ("10.0.0.2", 7946)  # type: ignore[union-attr]
    cfg, _ = load(environ={"HS_GOSSIP_ROLE": "", "HS_GOSSIP_COORDINATOR": ""})
    assert cfg.role == "" and cfg.coordinator is None
    with pytest.raises(ConfigError, match="HS_GOSSIP_ROLE"):
        load(environ={"HS_GOSSIP_ROLE": "follower"})
    with pytest.raises(ConfigError, match="HS_GOSSIP_COORDINATOR"):
        load(environ={"HS_GOSSIP_COORDINATOR": "10.0.0.2"})
    with pytest.raises(ConfigError, match="a leader follows nobody"):
        load(environ={"HS_GOSSIP_ROLE": "leader", "HS_GOSSIP_COORDINATOR": "10.0.0.2:7946"})


def test_a_stream_times_out_on_silence_not_on_a_long_stream_of_frames() -> None:
    """The receive limit of a stream is moved at each frame: frames that keep
    coming for longer than the limit are fine, silence past it is a
    TimeoutError (as ``fail_after`` gave), and a cancellation from outside
    stays a cancellation."""
    from agent.runtime.replication import _silence_limit

    async def main() -> None:
        got = 0
        with _silence_limit() as limit:
            for _ in range(6):  # 0.3 s of frames against a 0.1 s limit
                limit.deadline = anyio.current_time() + 0.1
                await anyio.sleep(0.05)
                got += 1
        assert got == 6
        t0 = anyio.current_time()
        with pytest.raises(TimeoutError), _silence_limit() as limit:
            limit.deadline = anyio.current_time() + 0.1
            await anyio.sleep_forever()
        assert anyio.current_time() - t0 < 1
        with anyio.move_on_after(0.05) as outer:
            with _silence_limit() as limit:
                limit.deadline = anyio.current_time() + 10
                await anyio.sleep_forever()
        assert outer.cancelled_caught

    anyio.run(main, backend="trio")
