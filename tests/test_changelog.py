"""The change log: one entry per change in the change's own transaction, the
hash chain and its verification, compaction by HS_GOSSIP_LOG_RETAIN, the
schema upgrade, and the compaction loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import msgpack
import pytest

from agent.config import ConfigError, load
from agent.core.changelog import (
    GENESIS,
    ChainBroken,
    EntryInvalid,
    LogEntry,
    Op,
    Position,
    Retention,
    decode,
    encode,
    entry_hash,
    parse_retention,
    verify_chain,
)
from agent.core.clock import HLC
from agent.runtime import maintenance
from agent.store import DB_FILE, Store, encode_value
from agent.store.log import hold_bound
from agent.store.store import wall_ms
from agent.store.writer import Writer
from merkle.tree import Item
from tests import storehelp

A, B = b"a" * 16, b"b" * 16
T0 = 1_800_000_000_000


def entries(w: Writer, after: int = 0) -> list[LogEntry]:
    return w.read_log(after, 10_000)


def summary(es: list[LogEntry]) -> list[tuple[int, Op, str, str, bytes, bytes | None]]:
    return [(e.seq, e.op, e.collection, e.key, e.origin, e.value) for e in es]


def chain_ok(w: Writer) -> list[LogEntry]:
    """The whole log, checked to be an unbroken chain from the floor to the head."""
    es = entries(w)
    floor = w.log_floor()
    assert verify_chain(es, floor.hash, floor.seq) == w.log_position().hash
    assert (es[-1].position if es else floor) == w.log_position()
    return es


def test_every_kind_of_change_appends_exactly_its_entries(tmp_path: Path) -> None:
    clock = [T0]
    with storehelp.direct_writer(tmp_path, A, clock=lambda: clock[0]) as w:
        assert w.log_position() == Position(1, 0, GENESIS)
        with storehelp.transaction(w):
            x = w.put("c", "x", {"v": 1}).new
            many = w.put_many("c", {"y": 2, "z": 3})
        assert x is not None
        assert summary(chain_ok(w)) == [
            (1, Op.PUT, "c", "x", A, encode_value({"v": 1})),
            (2, Op.PUT, "c", "y", A, encode_value(2)),
            (3, Op.PUT, "c", "z", A, encode_value(3))]
        assert [e.hlc for e in entries(w)] == [x.hlc] + [c.new.hlc for c in many if c.new]

        with storehelp.transaction(w):
            gone = w.delete("c", "y")
            assert w.delete("c", "nothing") is None  # no change, no entry
        assert gone is not None and gone.new is not None
        [tomb] = entries(w, 3)
        assert (tomb.seq, tomb.op, tomb.key, tomb.hlc, tomb.value) == \
            (4, Op.TOMBSTONE, "y", gone.new.hlc, None)

        # From a peer: the winner is logged with the peer's version; a loser is not.
        remote = Item("r", (T0 + 5) << 16, B, False, encode_value("from b"))
        stale = Item("r", 1 << 16, B, False, encode_value("old"))
        with storehelp.transaction(w):
            changed, rejected = w.apply_remote("d", [remote, stale])
        assert len(changed) == 1 and rejected == 0
        [e] = entries(w, 4)
        assert (e.seq, e.op, e.collection, e.key, e.origin, e.hlc, e.value) == \
            (5, Op.PUT, "d", "r", B, remote.hlc, remote.value)

        # Removals name the removed version: its hlc, origin and digest.
        with storehelp.transaction(w):
            dropped = w.drop_stale("d", [remote])
        assert len(dropped) == 1
        [e] = entries(w, 5)
        assert (e.seq, e.op, e.key, e.origin, e.hlc, e.value) == \
            (6, Op.REMOVE, "r", B, remote.hlc, remote.digest)
        clock[0] += 10_000
        with storehelp.transaction(w):
            purged = w.purge_tombstones("c", w.hlc.now())
        assert purged is not None and len(purged) == 1
        [e] = entries(w, 6)
        assert (e.seq, e.op, e.key, e.hlc, e.value) == \
            (7, Op.REMOVE, "y", gone.new.hlc, gone.new.digest)
        assert len(chain_ok(w)) == 7

    # A repair rewrites a digest, not a version: nothing to log.
    storehelp.damage(tmp_path, "UPDATE items SET digest = zeroblob(32) WHERE key = 'z'")
    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            report, repaired = w.verify("c", repair=True)
        assert report["repaired"] and len(repaired) == 1
        assert w.log_position().seq == 7 and len(chain_ok(w)) == 7


def test_a_rolled_back_change_leaves_no_entry_and_the_chain_goes_on(tmp_path: Path) -> None:
    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            w.put("c", "kept", 1)
        before = w.log_position()
        with pytest.raises(RuntimeError), storehelp.transaction(w):
            w.put_many("c", {"a": 1, "b": 2})
            assert w.log_position().seq == 3
            raise RuntimeError("the batch fails after its changes")
        assert w.log_position() == before and len(entries(w)) == 1
        with storehelp.transaction(w):
            w.put("c", "next", 2)
        # The next entry follows the last committed one, not the undone ones.
        assert summary(chain_ok(w))[-1][:4] == (2, Op.PUT, "c", "next")
    # An open transaction when the process dies is as if it never happened.
    w2 = Writer(tmp_path / DB_FILE, HLC(wall_ms), A, 1 << 20, 300)
    w2.conn.execute("BEGIN IMMEDIATE")
    w2.put("c", "lost", 3)
    w2.conn.close()  # no commit
    with storehelp.direct_writer(tmp_path, A) as w:
        assert w.get("c", "lost") is None
        assert [e.key for e in chain_ok(w)] == ["kept", "next"]


def test_a_failing_operation_in_a_group_commit_leaves_no_entry(tmp_path: Path) -> None:
    """An operation that fails after its changes is rolled back to its
    savepoint: its entries go, the others' stay, and the chain goes on."""
    def put_then_fail(w: Writer) -> None:
        w.put("c", "undone", 0)
        raise RuntimeError("fails after its change")

    async def main() -> None:
        s = await Store.open(tmp_path, A)
        failed: list[BaseException] = []

        async def fail() -> None:
            try:
                await s._call(put_then_fail)
            except RuntimeError as e:
                failed.append(e)

        async with anyio.create_task_group() as tg:  # queued together: grouped
            for i in range(20):
                tg.start_soon(fail) if i % 5 == 0 else tg.start_soon(s.put, "c", f"k{i}", i)
        assert len(failed) == 4
        await s.put("c", "last", 1)
        es = await s.read_log(0, 100)
        assert verify_chain(es, GENESIS, 0) == (await s.log_position()).hash
        assert sorted(e.key for e in es) == sorted([f"k{i}" for i in range(20) if i % 5]
                                                   + ["last"])
        await s.close()

    anyio.run(main, backend="trio")


KILLED_WRITER = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    from agent.core.clock import HLC
    from agent.store.store import wall_ms
    from agent.store.writer import Writer
    w = Writer(Path(sys.argv[1]), HLC(wall_ms), b"k" * 16, 1 << 20, 300)
    rng = random.Random(7)
    n = 0
    while True:
        w.conn.execute("BEGIN IMMEDIATE")
        w.put_many("c", {f"k{rng.randrange(300)}": n + i for i in range(50)})
        for _ in range(5):
            w.delete("c", f"k{rng.randrange(300)}")
        w.conn.execute("COMMIT")
        n += 1
        if n == 20:
            print("going", flush=True)
""")


def test_after_kill_9_the_log_replays_to_exactly_the_items(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "store.sqlite3")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "going\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with storehelp.direct_writer(tmp_path, A) as w:
        es = chain_ok(w)
        assert len(es) > 500
        state: dict[str, tuple[int, bytes | None]] = {}
        for e in es:
            if e.op is Op.REMOVE:
                del state[e.key]
            else:
                state[e.key] = (e.hlc, e.value)
        stored = {k: (h, v) for k, h, v in storehelp.query(
            tmp_path, "SELECT key, hlc, value FROM items")}
        assert state == stored


def test_tampered_reordered_or_missing_entries_fail_verification(tmp_path: Path) -> None:
    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            w.put_many("c", {f"k{i}": i for i in range(5)})
        es = chain_ok(w)
    assert verify_chain(es, GENESIS, 0) == es[-1].hash
    altered = es[2]._replace(value=encode_value(99))
    bad_hash = es[2]._replace(hash=bytes(32))
    for broken, seq in [
            ([*es[:2], altered, *es[3:]], 3),          # a changed value
            ([*es[:2], bad_hash, *es[3:]], 3),         # a hash that is not its own
            ([es[0], es[2], es[1], *es[3:]], 3),       # reordered
            (es[:2] + es[3:], 4),                      # missing
            (es[1:], 2),                               # missing at the start
    ]:
        with pytest.raises(ChainBroken) as info:
            verify_chain(broken, GENESIS, 0)
        assert info.value.seq == seq
    with pytest.raises(ChainBroken):
        verify_chain(es, bytes([1]) * 32)  # a different history before
    # Missing entries are found by the hashes alone, without seq numbers.
    with pytest.raises(ChainBroken):
        verify_chain(es[:2] + es[3:], GENESIS)
    # A renumbered entry whose hash was recomputed still breaks the next link.
    e = es[2]
    renumbered = e._replace(seq=9, hash=entry_hash(e.epoch, 9, e.prev_hash, e.origin, e.hlc,
                                                   e.collection, e.key, e.op, e.value))
    with pytest.raises(ChainBroken):
        verify_chain([*es[:2], renumbered, *es[3:]], GENESIS)


def test_entries_decode_only_from_their_canonical_bytes() -> None:
    data = encode(1, 1, GENESIS, A, 5 << 16, "c", "k", Op.PUT, encode_value(1))
    e = decode(data)
    assert (e.seq, e.key, e.op, e.hash) == (1, "k", Op.PUT, entry_hash(
        1, 1, GENESIS, A, 5 << 16, "c", "k", Op.PUT, encode_value(1)))
    fields = msgpack.unpackb(data)
    for bad in [
        data[:-1],
        msgpack.packb(fields[:-1]),
        msgpack.packb([2, *fields[1:]]),                              # unknown format
        msgpack.packb([*fields[:8], 7, fields[9]]),                   # unknown op
        msgpack.packb([*fields[:3], b"short", *fields[4:]]),          # prev_hash length
        data.replace(b"\xa1c", b"\xd9\x01c"),                         # str8 for a short str
    ]:
        with pytest.raises(EntryInvalid):
            decode(bad)


def test_decode_refuses_maps_exts_and_long_arrays_before_looking_at_fields() -> None:
    """The unpacker's own limits (no map, no ext, no array beyond 16) stay on:
    such bytes are not msgpack to an entry, whatever fields they hold."""
    fields = msgpack.unpackb(encode(1, 1, GENESIS, A, 5 << 16, "c", "k", Op.PUT, b"\x01"))
    for bad in [
        msgpack.packb([*fields[:9], {"a": 1}]),                        # a map
        msgpack.packb([*fields[:9], msgpack.ExtType(1, b"x")]),        # an ext
        msgpack.packb([*fields, *fields[:7]]),                         # 17 elements
    ]:
        with pytest.raises(EntryInvalid, match=r"^not msgpack"):
            decode(bad)


def test_encoding_is_packb_in_every_thread_and_after_a_failed_pack() -> None:
    """Entries are packed by one Packer per thread: the same bytes as
    msgpack.packb, also right after a pack that failed halfway."""
    args = (3, 9, GENESIS, A, 5 << 16, "c", "k", Op.PUT, b"\x01")
    want = msgpack.packb([1, 3, 9, GENESIS, A, 5 << 16, "c", "k", 0, b"\x01"], use_bin_type=True)
    with pytest.raises(TypeError):
        encode(3, 9, GENESIS, A, 5 << 16, "c", "k", Op.PUT, object())  # type: ignore[arg-type]
    assert encode(*args) == want and decode(want).value == b"\x01"
    got: list[bytes] = []

    def other() -> None:
        for _ in range(200):
            got.append(encode(*args))

    threads = [threading.Thread(target=other) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 800


def test_compaction_keeps_the_policy_and_a_verifiable_chain(tmp_path: Path) -> None:
    clock = [T0]

    async def main() -> None:
        s = await Store.open(tmp_path, A, clock=lambda: clock[0])
        for i in range(25):
            await s.put_many("c", {f"k{i}-{j}": j for j in range(10)})  # 250 entries
        head = await s.log_position()
        # Entries: the newest 100, in transactions of at most 40.
        assert await s.compact_log(Retention(100, None), batch=40) == 150
        floor = await s.log_floor()
        es = await s.read_log(0, 1000)
        assert [e.seq for e in es] == list(range(151, 251)) and floor.seq == 150
        assert verify_chain(es, floor.hash, floor.seq) == head.hash
        assert await s.compact_log(Retention(100, None)) == 0
        # A connected follower that still needs seq 200 holds the entries from 200 on...
        assert await s.compact_log(Retention(50, None), min_needed_seq=200) == 49
        assert (await s.log_floor()).seq == 199
        # ...but only up to the bound: a need that far back is ignored (snapshot).
        for i in range(30):
            await s.put_many("d", {f"k{i}-{j}": j for j in range(10)})  # seq 251-550
        assert hold_bound(Retention(50, None)) == 100
        assert await s.compact_log(Retention(50, None), min_needed_seq=200) == 500 - 199
        # Age: entries older than the limit go, the newest always stays.
        clock[0] += 60_000
        await s.put("d", "young", 1)                                    # seq 551
        assert await s.compact_log(Retention(None, 30.0)) == 50
        assert [e.seq for e in await s.read_log(0, 1000)] == [551]
        clock[0] += 60_000
        assert await s.compact_log(Retention(None, 30.0)) == 0         # the head stays
        floor, head = await s.log_floor(), await s.log_position()
        await s.close()
        # Floor and head are kept across a restart; the chain goes on from them.
        s = await Store.open(tmp_path, A, clock=lambda: clock[0])
        assert (await s.log_floor(), await s.log_position()) == (floor, head)
        await s.put("d", "after", 2)
        es = await s.read_log(0, 1000)
        assert [e.seq for e in es] == [551, 552]
        verify_chain(es, floor.hash, floor.seq)
        await s.close()

    anyio.run(main, backend="trio")


def test_schema_v2_database_upgrades_in_place(tmp_path: Path) -> None:
    import agent.store as store_mod

    async def write() -> None:
        s = await Store.open(tmp_path, A)
        await s.put("c", "kept", {"v": 1})
        await s.close()

    anyio.run(write, backend="trio")
    # Turn it into what a version-2 agent left behind.
    storehelp.ungroup_nodes(tmp_path)
    storehelp.damage(tmp_path, """
        DROP TABLE log;
        DELETE FROM meta WHERE k = 'log_epoch';
        UPDATE meta SET v = 2 WHERE k = 'schema_version';
    """)

    async def reopen() -> None:
        s = await Store.open(tmp_path, A)
        assert await s.get("c", "kept") is not None
        assert await s.log_position() == Position(1, 0, GENESIS)  # the log starts empty
        await s.put("c", "new", 2)
        [e] = await s.read_log(0, 10)
        assert (e.epoch, e.seq, e.prev_hash, e.key) == (1, 1, GENESIS, "new")
        [(version,)] = storehelp.query(tmp_path, "SELECT v FROM meta WHERE k='schema_version'")
        assert int(version) == len(store_mod.MIGRATIONS) >= 3
        await s.close()

    anyio.run(reopen, backend="trio")


def test_log_retain_setting() -> None:
    assert parse_retention("100000") == Retention(100_000, None)
    assert parse_retention("7d") == Retention(None, 7 * 86400.0)
    assert parse_retention(" 5000 , 90m") == Retention(5000, 5400.0)
    assert parse_retention("12h,10") == Retention(10, 43200.0)
    for bad in ["", "0", "abc", "1,2", "7d,1h", "7x", "1,2,3", "-5", "0.5s", "d"]:
        with pytest.raises(ValueError):
            parse_retention(bad)
    cfg, _ = load(environ={"HS_GOSSIP_LOG_RETAIN": "2000,1h"}, cwd=Path("/"))
    assert cfg.log_retain == Retention(2000, 3600.0)
    assert load(environ={}, cwd=Path("/"))[0].log_retain == Retention(100_000, None)
    with pytest.raises(ConfigError, match="HS_GOSSIP_LOG_RETAIN"):
        load(environ={"HS_GOSSIP_LOG_RETAIN": "lots"}, cwd=Path("/"))


def test_the_compaction_loop_compacts_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        await s.put_many("c", {f"k{i}": i for i in range(50)})
        async with anyio.create_task_group() as tg:
            tg.start_soon(maintenance.log_compaction_loop, 0.001, s, Retention(5, None))
            with anyio.fail_after(10):
                while (await s.log_floor()).seq != 45:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert [e.seq for e in await s.read_log(0, 100)] == list(range(46, 51))
        await s.close()

    anyio.run(main, backend="trio")
