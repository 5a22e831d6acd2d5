"""Tombstone purging: the rule (agent.core.tombstones) and the store's purge,
adoption and horizon refusal."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from agent.core.clock import COUNTER_BITS
from agent.core.tombstones import PeerView, Purge, choose, hlc_of_ms
from agent.core.wire import Digest
from agent.store import Store
from merkle.tree import Item
from tests import storehelp

A, B = b"a" * 16, b"b" * 16
H1, H2 = b"1" * 16, b"2" * 16
NOW = 1_800_000_000_000
GRACE = 60.0


def peer(state: bytes, healthy: bool = True, horizon_ms: int = 0) -> PeerView:
    return PeerView(healthy, (Digest("c", state, 1, horizon_ms),))


def test_settles_only_when_every_known_peer_is_healthy_and_equal() -> None:
    ours = [("c", H1, 0)]
    settled = hlc_of_ms(NOW - 60_000)
    assert choose(ours, [peer(H1), peer(H1)], NOW, GRACE) == {"c": Purge(settled, None)}
    assert choose(ours, [peer(H1), peer(H2)], NOW, GRACE) == {}
    assert choose(ours, [peer(H1), peer(H1, healthy=False)], NOW, GRACE) == {}
    assert choose(ours, [], NOW, GRACE) == {}  # alone: nobody to confirm
    assert choose(ours, [PeerView(True, ())], NOW, GRACE) == {}  # no digest yet
    # Already at that horizon: nothing to do.
    assert choose([("c", H1, settled)], [peer(H1)], NOW, GRACE) == {}


def test_adopts_a_peers_higher_horizon_with_its_hash_as_proof() -> None:
    ours = [("c", H1, 0)]
    got = choose(ours, [peer(H2, horizon_ms=NOW - 90_000), peer(H1, healthy=False)], NOW,
                 GRACE)
    assert got == {"c": Purge(hlc_of_ms(NOW - 90_000), H2)}
    # An unhealthy peer's horizon is not followed.
    assert choose(ours, [peer(H2, healthy=False, horizon_ms=NOW - 90_000)], NOW, GRACE) == {}
    # Nor one later than now - grace: the settle rule cannot produce it.
    assert choose(ours, [peer(H2, horizon_ms=NOW - 1_000)], NOW, GRACE) == {}


def test_purge_adopt_and_refuse_keep_replicas_equal(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = await Store.open(tmp_path / "a", A)
        b = await Store.open(tmp_path / "b", B)
        for k in range(20):
            await a.put("c", f"k{k}", k)
        for k in range(0, 20, 2):
            await a.delete("c", f"k{k}")
        # b receives everything a has, tombstones included.
        items = sorted([i async for batch in a.item_batches("c", [(0, 0, None)])
                        for i in batch], key=lambda i: i.key)
        assert len(items) == 20 and sum(i.deleted for i in items) == 10
        await b.apply_remote("c", items)
        assert a.digests()[0].state_hash == b.digests()[0].state_hash
        stale_live = Item("k0", items[0].hlc - 5, B, False, b"\x01")

        horizon = ((time.time_ns() // 1_000_000) + 1) << COUNTER_BITS
        assert await a.purge_tombstones("c", horizon) == 10
        info = a.digests()[0]
        assert info.total == info.count == 10 and info.horizon == horizon
        assert (await a.verify("c"))["ok"]

        # b adopts only with the right proof.
        assert await b.purge_tombstones("c", horizon, expected=b"\0" * 16) is None
        assert await b.purge_tombstones("c", horizon, expected=info.state_hash) == 10
        assert b.digests()[0].state_hash == info.state_hash

        # An old copy of a deleted item cannot come back.
        changed, rejected = await a.apply_remote("c", [stale_live])
        assert (changed, rejected) == (0, 1)
        assert await a.get("c", "k0") is None

        # Reopening keeps the horizon.
        await a.close()
        a = await Store.open(tmp_path / "a", A)
        assert a.digests()[0].horizon == horizon
        await a.close()
        await b.close()

    anyio.run(main, backend="trio")


def test_drop_stale_removes_only_that_version_and_keeps_the_tree_true(tmp_path: Path) -> None:
    async def main() -> None:
        s = await Store.open(tmp_path, A)
        old = await s.put("c", "x", 1)
        await s.put("c", "y", 2)
        newer = await s.put("c", "y", 3)
        stale_y = Item("y", newer.hlc - 1, A, False, b"\x02")  # not what is stored
        assert await s.drop_stale("c", [old, stale_y]) == 1
        assert await s.get("c", "x") is None
        assert (await s.get("c", "y")) == newer
        info = s.digests()[0]
        assert info.count == info.total == 1
        assert (await s.verify("c"))["ok"]
        await s.close()

    anyio.run(main, backend="trio")


def test_schema_v1_database_upgrades_in_place(tmp_path: Path) -> None:
    import agent.store as store_mod

    async def write() -> None:
        s = await Store.open(tmp_path, A)
        await s.put("c", "kept", {"v": 1})
        await s.put("c", "gone", 2)
        await s.delete("c", "gone")
        await s.close()

    anyio.run(write, backend="trio")
    # Turn it into what a version-1 agent left behind.
    storehelp.ungroup_nodes(tmp_path)
    storehelp.damage(tmp_path, """
        DROP INDEX items_tombstones;
        ALTER TABLE collections DROP COLUMN horizon;
        DROP TABLE log;
        DELETE FROM meta WHERE k = 'log_epoch';
        UPDATE meta SET v = 1 WHERE k = 'schema_version';
    """)

    async def reopen() -> None:
        s = await Store.open(tmp_path, A)
        info = s.digests()[0]
        assert (info.count, info.total, info.horizon) == (1, 2, 0)
        assert await s.get("c", "kept") is not None
        assert (await s.verify("c"))["ok"]
        [(version,)] = storehelp.query(tmp_path, "SELECT v FROM meta WHERE k='schema_version'")
        assert int(version) == len(store_mod.MIGRATIONS)
        await s.close()

    anyio.run(reopen, backend="trio")


def test_a_sync_that_drops_a_stale_tombstone_adopts_the_horizon_at_once(tmp_path: Path) -> None:
    """Agent a still holds k1's tombstone; b has purged it. When a syncs with
    b it drops the tombstone (b refuses it) and must take b's horizon in the
    same step: else an old live copy of k1 (a replica back from away) would
    be accepted by a until its next purge pass, and k1 would come back."""
    import random

    import msgpack

    from agent.runtime.sync_service import SyncService, sync_once
    from merkle.reconcile import SALT_LEN
    from tests.agents import free_port

    now_ms = time.time_ns() // 1_000_000
    live = Item("k1", hlc_of_ms(now_ms - 10_000), B, False, msgpack.packb("v"))
    tomb = Item("k1", hlc_of_ms(now_ms - 9_000), A, True, None)
    other = Item("k2", hlc_of_ms(now_ms - 8_000), A, False, msgpack.packb("w"))
    horizon_ms = now_ms - 5_000

    async def main() -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = await Store.open(tmp_path / "a", A)
        b = await Store.open(tmp_path / "b", B)
        for s in (a, b):
            await s.apply_remote("c", [tomb, other])
        assert await b.purge_tombstones("c", hlc_of_ms(horizon_ms)) == 1
        peer_state = b.digests()[0].state_hash
        async with anyio.create_task_group() as tg:
            port = free_port()
            sync = SyncService(b, "127.0.0.1", port, 1.0, 4, 1 << 20, 1.0, rng=random.Random(1))
            await tg.start(sync.serve)
            r = await sync_once(a, "127.0.0.1", port, "c", sync.max_frame, horizon_ms,
                                1.0, salt=random.Random(2).randbytes(SALT_LEN),
                                peer_state=peer_state)
            tg.cancel_scope.cancel()
        assert r.dropped == 1
        info = a.digests()[0]
        assert info.state_hash == peer_state
        assert info.horizon == hlc_of_ms(horizon_ms)
        # The old copy arrives (from a responder session, say): refused.
        assert await a.apply_remote("c", [live]) == (0, 1)
        assert await a.get("c", "k1") is None
        await a.close()
        await b.close()

    anyio.run(main, backend="trio")


def test_drop_stale_takes_the_horizon_only_if_the_result_is_the_peers(tmp_path: Path) -> None:
    from merkle.tree import state_hash

    async def main() -> None:
        s = await Store.open(tmp_path, A)
        x = await s.put("c", "x", 1)
        y = await s.put("c", "y", 2)
        assert await s.drop_stale("c", [x], 1 << 60, b"\0" * 16) == 1
        assert s.digests()[0].horizon == 0  # not the peer's state: kept
        empty = state_hash(0, 0)  # the peer holds nothing
        assert await s.drop_stale("c", [y], 1 << 60, empty) == 1
        assert s.digests()[0].horizon == 1 << 60
        await s.close()

    anyio.run(main, backend="trio")
