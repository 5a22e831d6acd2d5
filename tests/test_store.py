"""The SQLite store: last writer wins, tombstones, the incremental tree, group
commit, and reconciliation between two stores."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.store import Store, StoreError
from agent.store.changes import Change
from agent.store.nodes import JOURNAL_ROWS
from agent.store.writer import Writer
from merkle.loopback import run_pair
from merkle.tree import Item, MemoryTree
from tests import storehelp

A, B = b"a" * 16, b"b" * 16


def run(fn):  # type: ignore[no-untyped-def]
    return anyio.run(fn, backend="trio")


def test_put_get_delete_and_counts(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        it = await s.put("vision", "cam-7", {"x": 1})
        got = await s.get("vision", "cam-7")
        assert got is not None and got.hlc == it.hlc and not got.deleted
        assert [(c.name, c.count) for c in s.digests()] == [("vision", 1)]
        assert await s.delete("vision", "cam-7") is not None
        assert await s.delete("vision", "cam-7") is None  # already gone
        got = await s.get("vision", "cam-7")
        assert got is not None and got.deleted
        assert s.digests()[0].count == 0 and s.digests()[0].total == 1
        await s.close()

    run(main)


@pytest.mark.parametrize("name,key,value", [
    ("bad name", "k", 1), ("", "k", 1), ("x" * 129, "k", 1), ("ok", "", 1),
    ("ok", "k" * 1025, 1), ("ok", "k", "v" * 2000),
])
def test_invalid_writes_are_refused_and_change_nothing(tmp_path: Path, name: str, key: str,
                                                        value: object) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A, max_value=1024)
        await s.put("ok", "keep", 1)
        before = s.digests()
        with pytest.raises(StoreError):
            await s.put(name, key, value)
        assert s.digests() == before
        # The store thread recovered from the failed transaction.
        await s.put("ok", "after", 2)
        assert (await s.get("ok", "after")) is not None
        await s.close()

    run(main)


def test_state_survives_restart_and_verifies(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        for i in range(200):
            await s.put("c", f"k{i}", i)
        await s.delete("c", "k3")
        digest = s.digests()
        await s.close()
        s = await Store.open(tmp_path, A)
        assert s.digests() == digest
        report = await s.verify("c")
        assert report["ok"] and report["items"] == 200 and report["live"] == 199
        newest = max(i.hlc for i in await s.list_items("c", limit=1000))
        item = await s.put("c", "after-restart", 1)
        assert item.hlc > newest
        await s.close()

    run(main)


def test_verify_detects_and_repairs_a_damaged_index(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        await s.put_many("c", {f"k{i}": i for i in range(50)})  # into the groups
        for i in range(3):
            await s.put("c", f"j{i}", i)  # into the journal
        await s.close()
        # level 3's sums (in the groups under level 2) all zero, and one
        # journal row gone
        storehelp.damage(tmp_path, "UPDATE node_groups SET sums=zeroblob(640) WHERE level=2; "
                                   "DELETE FROM node_log WHERE id=(SELECT min(id) FROM node_log)")
        s = await Store.open(tmp_path, A)
        await s.put("c", "k0", "while damaged")
        assert not (await s.verify("c"))["ok"]
        assert (await s.verify("c", repair=True))["repaired"]
        assert (await s.verify("c"))["ok"]
        # Writes after the repair keep the stored index right (none of the
        # rows written before it is written again as it was).
        await s.put("c", "k0", 0)
        await s.put_many("c", {f"k{i}": -i for i in range(50)})
        await s.close()
        s = await Store.open(tmp_path, A)
        assert (await s.verify("c"))["ok"]
        await s.close()

    run(main)


def test_small_writes_go_to_the_journal_which_a_restart_replays_and_a_bulk_write_folds(
        tmp_path: Path) -> None:
    """A write that changes few leaves appends one journal row and rewrites
    no group; reopened, the tree is the groups with the journal replayed
    over them; a write that changes many leaves folds the journal into the
    groups. The tree matches the items at every step."""
    def rows(table: str) -> int:
        [(n,)] = storehelp.query(tmp_path, f"SELECT count(*) FROM {table}")
        return int(n)

    async def main() -> None:
        s = await Store.open(tmp_path, A)
        await s.put_many("c", {f"k{i}": i for i in range(200)})
        groups = storehelp.query(tmp_path, "SELECT level, idx, sums FROM node_groups")
        assert rows("node_log") == 0 and len(groups) > 17
        for i in range(10):
            await s.put("c", f"k{i}", -i)
        await s.delete("c", "k100")
        assert rows("node_log") == 11
        assert storehelp.query(tmp_path, "SELECT level, idx, sums FROM node_groups") == groups
        state = s.digests()[0]
        await s.close()
        s = await Store.open(tmp_path, A)
        assert s.digests()[0] == state and (await s.verify("c"))["ok"]
        await s.put_many("c", {f"n{i}": i for i in range(100)})
        assert rows("node_log") == 0
        assert (await s.verify("c"))["ok"]
        await s.close()

    run(main)


def test_the_journal_is_folded_once_it_is_full(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)

        def journal() -> int:
            [(n,)] = storehelp.query(tmp_path, "SELECT count(*) FROM node_log")
            return int(n)

        for i in range(JOURNAL_ROWS):
            await s.put("c", f"k{i % 7}", i)
        assert journal() == JOURNAL_ROWS
        await s.put("c", "k0", "folds")
        assert journal() == 0
        await s.put("c", "k1", "again")
        assert journal() == 1 and (await s.verify("c"))["ok"]
        await s.close()

    run(main)


def test_repair_rewrites_rows_stored_under_a_wrong_digest_or_position(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        for i in range(50):
            await s.put("c", f"k{i}", i)
        good = s.digests()[0].state_hash
        await s.close()
        right = storehelp.query(tmp_path, "SELECT key, digest, pos FROM items ORDER BY key")
        storehelp.damage(tmp_path, """
            UPDATE items SET digest = zeroblob(32) WHERE key = 'k7';
            UPDATE items SET pos = pos + 1 WHERE key = 'k9';
        """)
        s = await Store.open(tmp_path, A)
        report = await s.verify("c")
        assert not report["ok"] and report["bad_digests"] == 2
        assert (await s.verify("c", repair=True))["repaired"]
        report = await s.verify("c")
        assert report["ok"] and report["bad_digests"] == 0
        assert s.digests()[0].state_hash == good
        await s.close()
        assert storehelp.query(tmp_path, "SELECT key, digest, pos FROM items ORDER BY key") == right

    run(main)


def test_remote_items_are_validated(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A, max_skew=300)
        far = (s.hlc.now() >> 16) + 3_600_000
        items = [
            Item("ok", 1 << 16, B, False, b"\x01"),
            Item("future", far << 16, B, False, b"\x01"),
            Item("badorigin", 1 << 16, b"x", False, b"\x01"),
            Item("notmsgpack", 1 << 16, B, False, b"\xc1"),
            Item("tomb-with-value", 1 << 16, B, True, b"\x01"),
        ]
        changed, rejected = await s.apply_remote("c", items)
        assert (changed, rejected) == (1, 4)
        assert s.hlc.last < far << 16  # the future clock was not adopted
        await s.close()

    run(main)


def test_many_concurrent_writes_are_grouped(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(s.put, "c", f"k{i}", i)
        assert s.digests()[0].count == 500
        assert s.batches < 500  # several writes shared a transaction
        assert (await s.verify("c"))["ok"]
        await s.close()

    run(main)


ops = st.lists(st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 3), st.booleans()),
               min_size=1, max_size=80)


@settings(max_examples=25, deadline=None)
@given(ops)
def test_incremental_tree_equals_rebuilt_and_memory_model(
        tmp_path_factory: pytest.TempPathFactory, writes: list[tuple[str, int, bool]]) -> None:
    path = tmp_path_factory.mktemp("store")

    async def main() -> None:
        s = await Store.open(path, A)
        model = MemoryTree()
        batch: list[Item] = []
        for hlc, (key, origin, delete) in enumerate(writes, 1):
            it = Item(key, hlc << 16, bytes([origin]) * 16, delete, None if delete else b"\x01")
            batch.append(it)
            model.apply(it)
            if len(batch) >= 7:
                await s.apply_remote("c", batch)
                batch = []
        if batch:
            await s.apply_remote("c", list(reversed(batch)))  # order must not matter
        assert (await s.verify("c"))["ok"]
        root = await s.with_tree("c", lambda t: t.node(0, 0))
        assert root == model.root()
        await s.close()

    run(main)


def test_two_stores_reconcile_to_the_same_root(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()

    async def fill() -> None:
        a = await Store.open(a_dir, A)
        b = await Store.open(b_dir, B)
        rng = random.Random(3)
        for i in range(2000):
            v = rng.randint(0, 9)
            await a.apply_remote("c", [Item(f"k{i}", (i + 1) << 16, A, False, bytes([v]))])
            await b.apply_remote("c", [Item(f"k{i}", (i + 1) << 16, A, False, bytes([v]))])
        for i in rng.sample(range(2000), 20):
            await a.put("c", f"k{i}", "a-side")
        for i in range(5):
            await b.put("c", f"b{i}", "b-side")
        await b.delete("c", "k0")
        assert a.digests() != b.digests()
        await a.close()
        await b.close()

    run(fill)

    # Reconcile in this thread, each batch of received items applied in its own
    # committed transaction, as the store thread would (the stores are closed).
    with storehelp.direct_writer(a_dir, A) as wa, storehelp.direct_writer(b_dir, B) as wb:
        def applier(w: Writer) -> Callable[[list[Item]], None]:
            def apply(items: list[Item]) -> None:
                with storehelp.transaction(w):
                    w.apply_remote("c", items)
            return apply

        stats = run_pair(wa.tree("c"), applier(wa), wb.tree("c"), applier(wb))
        assert stats.items_a_to_b and stats.items_b_to_a

    async def check() -> None:
        a = await Store.open(a_dir, A)
        b = await Store.open(b_dir, B)
        assert a.digests() == b.digests()
        assert (await a.verify("c"))["ok"] and (await b.verify("c"))["ok"]
        got = await a.get("c", "k0")
        assert got is not None and got.deleted
        await a.close()
        await b.close()

    run(check)


def pairs(changes: list[Change]) -> list[tuple[str, Item | None, Item | None]]:
    """(key, old, new) of each change, checking that the record is consistent."""
    for ch in changes:
        assert ch.old is None or ch.old.key == ch.key
        assert ch.new is None or ch.new.key == ch.key
    return [(ch.key, ch.old, ch.new) for ch in changes]


def test_every_kind_of_change_reports_old_and_new_and_keeps_the_tree_true(
        tmp_path: Path) -> None:
    def ok(w: Writer) -> None:
        report, repaired = w.verify("c")
        assert report["ok"] and repaired == []

    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            x1 = w.put("c", "x", 1)
        assert pairs([x1]) == [("x", None, x1.new)] and x1.new is not None
        ok(w)
        with storehelp.transaction(w):
            x2 = w.put("c", "x", 2)
        assert pairs([x2]) == [("x", x1.new, x2.new)]
        ok(w)
        with storehelp.transaction(w):
            many = w.put_many("c", {"y": 1, "z": 1})
        y1, z1 = (ch.new for ch in many)
        assert y1 is not None and z1 is not None
        assert pairs(many) == [("y", None, y1), ("z", None, z1)]
        ok(w)
        with storehelp.transaction(w):
            gone = w.delete("c", "x")
            again = w.delete("c", "x")
        assert gone is not None and again is None
        xt = gone.new
        assert xt is not None and xt.deleted and pairs([gone]) == [("x", x2.new, xt)]
        ok(w)

        # Remote: a newer y wins, an older z does not; a bad item is only counted.
        y_new = Item("y", y1.hlc + 1, B, False, b"\x05")
        z_old = Item("z", z1.hlc - 1, B, False, b"\x05")
        with storehelp.transaction(w):
            remote, rejected = w.apply_remote("c", [y_new, z_old, Item("w", 1, b"?", False, b"")])
        assert pairs(remote) == [("y", y1, y_new)] and rejected == 1
        ok(w)

        # Stale drop: z is removed; the y asked for was replaced meanwhile and stays.
        with storehelp.transaction(w):
            dropped = w.drop_stale("c", [z1, y1])
        assert pairs(dropped) == [("z", z1, None)]
        assert w.get("c", "y") == y_new and w.get("c", "z") is None
        ok(w)

        # Purge: tombstones older than the horizon go, live items stay.
        with storehelp.transaction(w):
            refused = w.purge_tombstones("c", xt.hlc + 1, expected=b"\0" * 16)
            purged = w.purge_tombstones("c", xt.hlc + 1)
        assert refused is None and purged is not None
        assert pairs(purged) == [("x", xt, None)] and w.get("c", "x") is None
        assert [(i.name, i.count, i.total) for i in w.infos()] == [("c", 1, 1)]
        ok(w)
        good = w.infos()

    # Repair: a row under a wrong digest is rewritten with the right one.
    storehelp.damage(tmp_path, "UPDATE items SET digest = zeroblob(32) WHERE key = 'y'")
    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            report, repaired = w.verify("c", repair=True)
        assert report["repaired"] and report["bad_digests"] == 1
        [(key, old, new)] = pairs(repaired)
        assert key == "y" and old == new == y_new  # same version...
        assert old is not None and new is not None
        assert old.digest == bytes(32) and new.digest == y_new.digest  # ...right digest now
        ok(w)
        assert w.infos() == good


def test_a_failed_reload_leaves_the_collections_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reloading reads aside first: a read that fails keeps the old mirror,
    so the next write does not try to create a collection that exists."""
    from agent.store import writer as writer_module

    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            w.put("c", "k1", 1)
        kept = w.colls["c"]

        def unreadable(conn: sqlite3.Connection) -> object:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(writer_module, "load_collections", unreadable)
        with pytest.raises(sqlite3.OperationalError):
            w.reload()
        monkeypatch.undo()
        assert w.colls == {"c": kept}
        with storehelp.transaction(w):
            w.put("c", "k2", 2)
        assert [(i.name, i.count) for i in w.infos()] == [("c", 2)]


async def _held_batch(s: Store, calls: list[Callable[[Writer], object]]) -> list[object]:
    """Run ``calls`` as one group-commit batch, in order: the store thread is
    held by a read until all of them are queued. Each answer is its result
    or the exception it raised."""
    held, release = threading.Event(), threading.Event()
    answers: list[object] = [None] * len(calls)

    def hold(w: Writer) -> None:
        held.set()  # its batch is formed: what comes now waits for the next
        release.wait(10)

    async def one(i: int, fn: Callable[[Writer], object]) -> None:
        try:
            answers[i] = await s._call(fn)
        except Exception as e:  # the answer under test
            answers[i] = e

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(s._call, hold, read=True))
        with anyio.fail_after(5):
            while not held.is_set():
                await anyio.sleep(0.001)
        for i, fn in enumerate(calls):
            tg.start_soon(one, i, fn)
            await anyio.sleep(0)  # queued in this order
        with anyio.fail_after(5):
            while s._queue.qsize() < len(calls):
                await anyio.sleep(0.001)
        release.set()
    return answers


def _put(key: str) -> Callable[[Writer], object]:
    return lambda w: w.put("c", key, key)


def _put_then_break(w: Writer) -> object:
    w.put("c", "broken", 0)
    raise ZeroDivisionError("a bug after a write")


@pytest.mark.parametrize("where", ["before-commit", "mid-batch"])
def test_a_batch_broken_outside_its_ops_acknowledges_no_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A failure the per-op handling does not catch (a bug in the store's own
    code) rolls the whole batch back and fails every op of it: no write is
    acknowledged that was not kept, and the digests match a reopen."""
    calls = [_put("k1"), _put("k2"), _put_then_break, _put("k3")] if where == "mid-batch" \
        else [_put("k1"), _put("k2"), _put("k3")]
    real_save, real_reload = Writer.save_clock, Writer.reload
    broken: dict[str, bool] = {}

    def save_clock(w: Writer) -> None:
        if broken.pop("save_clock", False):
            raise RuntimeError("a bug before the commit")
        real_save(w)

    def reload(w: Writer) -> None:
        if broken.pop("reload", False):
            raise RuntimeError("a bug in the rollback of one op")
        real_reload(w)

    monkeypatch.setattr(Writer, "save_clock", save_clock)
    monkeypatch.setattr(Writer, "reload", reload)

    async def main() -> None:
        s = await Store.open(tmp_path, A)
        await s.put("c", "k0", 0)
        before = s.digests()
        broken["save_clock" if where == "before-commit" else "reload"] = True
        answers = await _held_batch(s, calls)
        assert not broken  # the failure was injected
        assert all(isinstance(a, StoreError) for a in answers), answers
        assert s.digests() == before
        assert [i.key for i in await s.list_items("c")] == ["k0"]
        # The store goes on: the next write is kept.
        await s.put("c", "after", 1)
        after = s.digests()
        await s.close()
        s = await Store.open(tmp_path, A)
        assert s.digests() == after
        assert [i.key for i in await s.list_items("c")] == ["after", "k0"]
        assert (await s.verify("c"))["ok"]
        await s.close()

    run(main)


def test_verify_compares_the_in_memory_mirror_too(tmp_path: Path) -> None:
    """Digests and sync answer from the mirror of the node sums: a mirror
    that drifted from the items is reported, and repair resets it."""
    with storehelp.direct_writer(tmp_path, A) as w:
        with storehelp.transaction(w):
            for i in range(40):
                w.put("c", f"k{i}", i)
        good = w.infos()
        w.colls["c"].nodes[(2, 5)] = [12345, 1]  # a node no item is under
        w.colls["c"].nodes[(0, 0)][1] += 1
        report, _ = w.verify("c")
        assert not report["ok"] and report["mismatched_nodes"] == 2, report
        with storehelp.transaction(w):
            report, _ = w.verify("c", repair=True)
        assert report["repaired"]
        assert w.verify("c")[0]["ok"] and w.infos() == good


def test_reads_return_stored_positions(tmp_path: Path) -> None:
    """get and list_items hand back the position stored with the row."""
    with storehelp.direct_writer(tmp_path, A) as w, storehelp.transaction(w):
        w.put("c", "k", 1)
    storehelp.damage(tmp_path, "UPDATE items SET pos = pos + 1 WHERE key = 'k'")
    with storehelp.direct_writer(tmp_path, A) as w:
        stored = Item("k", 1, A, False, b"\x01").pos + 1
        got = w.get("c", "k")
        assert got is not None and got.pos == stored
        assert [i.pos for i in w.list_items("c", "", "", 10)] == [stored]


def test_an_op_refused_before_any_sql_costs_no_mirror_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals (bad name, key, size) write nothing, so their rollback rereads
    nothing; an op that wrote before failing still has its mirrors reread."""
    reloads: list[int] = []
    real_reload = Writer.reload

    def reload(w: Writer) -> None:
        reloads.append(1)
        real_reload(w)

    monkeypatch.setattr(Writer, "reload", reload)

    async def main() -> None:
        s = await Store.open(tmp_path, A, max_value=64)
        await s.put("c", "k0", 0)
        with pytest.raises(StoreError):
            await s.put("c", "", 1)  # alone in its transaction
        answers = await _held_batch(s, [_put("k1"), lambda w: w.put("c", "big", "v" * 100),
                                        _put("k2")])
        assert isinstance(answers[1], StoreError) and not isinstance(answers[0], Exception)
        assert reloads == []
        answers = await _held_batch(s, [_put("k3"), _put_then_break, _put("k4")])
        assert isinstance(answers[1], ZeroDivisionError)
        assert reloads == [1]
        digests = s.digests()
        assert [i.key for i in await s.list_items("c")] == ["k0", "k1", "k2", "k3", "k4"]
        await s.close()
        s = await Store.open(tmp_path, A)
        assert s.digests() == digests
        await s.close()

    run(main)


@pytest.mark.parametrize("catch_up", [True, False])
def test_under_steady_writes_the_wal_starts_over_without_the_writers_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, catch_up: bool) -> None:
    """A pass leaves over what committed while it ran, and SQLite starts the
    WAL over only if nothing is left: the catch-up passes copy the rest, so a
    follower applying a stream keeps a WAL of a few MiB, not one that grows
    to the writer's safety checkpoint (64 MiB, a 10-15 ms stall)."""
    from agent.store import checkpoint

    if not catch_up:
        monkeypatch.setattr(checkpoint, "CATCH_UP_PASSES", 0)
    path = tmp_path / "db"
    w = sqlite3.connect(path, isolation_level=None)
    w.execute("PRAGMA journal_mode=WAL")
    w.execute("PRAGMA wal_autocheckpoint=0")  # the writer's own: out of the way
    w.execute("CREATE TABLE t (b BLOB)")

    def write(rows: int) -> None:
        w.execute("BEGIN IMMEDIATE")
        w.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * rows)

    def commit(rows: int) -> None:
        write(rows)
        w.execute("COMMIT")

    class Busy(checkpoint.Checkpointer):
        """A transaction runs (and commits) during each of the first two passes."""
        during = 2

        def _pass(self) -> int:
            if not self.during:
                return super()._pass()
            self.during -= 1
            write(20)
            frames = super()._pass()
            w.execute("COMMIT")
            return frames

    commit(checkpoint.CATCH_UP_PAGES + 500)
    ck = Busy(path)  # its thread is not started: the passes run here
    ck.passes()
    commit(1)  # the next transaction starts the WAL over if nothing is left
    frames = ck._pass()
    ck.conn.close()
    w.close()
    if catch_up:
        assert frames < 10
    else:
        assert frames > checkpoint.CATCH_UP_PAGES


@pytest.mark.skipif(not hasattr(threading, "get_native_id") or not hasattr(os, "getpriority"),
                    reason="per-thread priorities are Linux's")
def test_the_checkpoint_thread_yields_to_the_writer_and_the_event_loop(tmp_path: Path) -> None:
    """A pass copies megabytes at once: it runs niced, so that the store
    thread and the event loop (the agent's latency) go first."""
    if os.getpriority(os.PRIO_PROCESS, 0) > 9:
        pytest.skip("this process is niced already: no room to nice a thread below it")

    async def main() -> tuple[int, int]:
        s = await Store.open(tmp_path, A)
        await s.put("c", "k", 1)
        ck = s._checkpointer.thread
        assert ck.native_id is not None
        with anyio.fail_after(5):
            while os.getpriority(os.PRIO_PROCESS, ck.native_id) == os.getpriority(
                    os.PRIO_PROCESS, 0):
                await anyio.sleep(0.01)
        niced = os.getpriority(os.PRIO_PROCESS, ck.native_id)
        store_thread = s._thread.native_id
        assert store_thread is not None
        writer = os.getpriority(os.PRIO_PROCESS, store_thread)
        await s.close()
        return niced, writer

    niced, writer = anyio.run(main, backend="trio")
    assert niced > writer == os.getpriority(os.PRIO_PROCESS, 0)
