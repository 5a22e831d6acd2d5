"""The SQLite store: last writer wins, tombstones, the incremental tree, group
commit, and reconciliation between two stores."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.store import Store, StoreError
from merkle.loopback import run_pair
from merkle.tree import Item, MemoryTree

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
        for i in range(50):
            await s.put("c", f"k{i}", i)
        good = s.digests()[0].state_hash
        await s.call(lambda w: w.conn.execute("UPDATE nodes SET count=count+1 WHERE level=3"))
        await s.close()
        s = await Store.open(tmp_path, A)
        assert not (await s.verify("c"))["ok"]
        assert (await s.verify("c", repair=True))["repaired"]
        assert (await s.verify("c"))["ok"] and s.digests()[0].state_hash == good
        await s.close()

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
    async def main() -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = await Store.open(tmp_path / "a", A)
        b = await Store.open(tmp_path / "b", B)
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

        # Run the reconciliation on the store threads, as the TCP driver does.
        def session() -> None:
            wa, wb = a._writer, b._writer
            from agent.store import SqliteTree

            run_pair(SqliteTree(wa, "c"), lambda items: wa.apply_remote("c", items),
                     SqliteTree(wb, "c"), lambda items: wb.apply_remote("c", items))

        # Both writers are idle, so driving them from this thread is safe here.
        session()
        for st_ in (a, b):
            await st_.call(lambda w: None)  # commit what the session applied
        assert a.digests() == b.digests()
        assert (await a.verify("c"))["ok"] and (await b.verify("c"))["ok"]
        got = await a.get("c", "k0")
        assert got is not None and got.deleted
        await a.close()
        await b.close()

    run(main)
