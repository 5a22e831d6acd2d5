"""Replicated collections in SQLite: one connection, one thread, group commit.

Rules:

* One thread owns the only writing connection (WAL, synchronous=NORMAL).
  Async callers queue operations; the thread drains whatever is queued into
  one transaction (group commit), each operation in its own SAVEPOINT so that
  one failing operation does not undo the others. Waiters are woken once per
  batch. A second connection on its own thread only checkpoints the WAL.
* Every change, local or remote, goes through :meth:`_Writer.apply_items`: the
  item rows, the Merkle node sums of every level and the live counts are
  written in the same transaction. A kill -9 at any moment leaves a database
  whose tree matches its items. This is also the one place where a change log
  for leader/follower streaming will be appended.
* Last writer wins on (hlc, origin, digest): the same answer on every replica.
  Deletes are tombstones, ordered like writes.
* The node sums of levels 0-3 (at most 4,369 nodes) are kept in the database
  and mirrored in memory per collection; deeper levels are computed from the
  items on demand through the (collection, position) index (~244 items per
  level-3 node at 1M items). Keeping level 4 too would double the rows written
  per item for little gain in sync speed.
* Positions are unsigned 64-bit; SQLite stores them shifted by 2**63 to fit
  its signed integers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgpack
import sniffio

from agent.core.clock import HLC, MAX_HLC
from merkle.loopback import item_batches
from merkle.reconcile import SendRequest
from merkle.tree import (
    FANOUT,
    FANOUT_BITS,
    MOD,
    ORIGIN_LEN,
    STORED_LEVELS,
    Item,
    key_position,
    node_index,
    node_range,
    state_hash,
)

log = logging.getLogger("hs_gossip.store")

T = TypeVar("T")
SHIFT = 1 << 63
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_KEY_BYTES = 1024
DB_FILE = "store.sqlite3"
GROUP_MAX = 512
#: shift from a position to its node at the deepest stored level
LEAF_SHIFT = 64 - 4 * STORED_LEVELS

MIGRATIONS: list[str] = [
    # 1: collections, items, tree nodes
    """
    CREATE TABLE collections (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        live INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE items (
        coll INTEGER NOT NULL,
        key TEXT NOT NULL,
        pos INTEGER NOT NULL,
        hlc INTEGER NOT NULL,
        origin BLOB NOT NULL,
        deleted INTEGER NOT NULL,
        value BLOB,
        digest BLOB NOT NULL,
        PRIMARY KEY (coll, key)
    ) WITHOUT ROWID;
    CREATE INDEX items_by_pos ON items (coll, pos);
    CREATE TABLE nodes (
        coll INTEGER NOT NULL,
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        total BLOB NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (coll, level, idx)
    ) WITHOUT ROWID;
    """,
    # 2: tombstone horizon per collection; tombstones findable by age
    """
    ALTER TABLE collections ADD COLUMN horizon INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX items_tombstones ON items (coll, hlc) WHERE deleted = 1;
    """,
]


def wall_ms() -> int:
    """The real wall clock in Unix milliseconds, for the HLC of item versions."""
    return time.time_ns() // 1_000_000


class StoreError(Exception):
    """A request the store refuses (bad name, key, size). Safe to show users."""


class ItemRejected(StoreError):
    pass


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    state_hash: bytes
    count: int  # live items
    total: int  # items including tombstones
    horizon: int = 0  # HLC below which tombstones are purged and remote items refused


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise StoreError("collection name must be 1-128 characters of A-Z a-z 0-9 . _ -")


def check_key(key: str) -> None:
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError("key must be valid UTF-8") from None
    if not 1 <= n <= MAX_KEY_BYTES:
        raise StoreError(f"key must be 1-{MAX_KEY_BYTES} bytes of UTF-8")


def encode_value(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode_value(data: bytes | None) -> Any:
    return None if data is None else msgpack.unpackb(data, raw=False)


def _row_item(key: str, hlc: int, origin: bytes, deleted: int, value: bytes | None,
              digest: bytes, pos: int | None = None) -> Item:
    return Item(key, hlc, origin, bool(deleted), value, digest,
                -1 if pos is None else pos + SHIFT)


class _Collection:
    """Writer-thread state of one collection: id and node-sum mirror."""

    def __init__(self, cid: int, name: str, live: int, nodes: dict[tuple[int, int], list[int]],
                 horizon: int = 0):
        self.id = cid
        self.name = name
        self.live = live
        self.nodes = nodes  # (level, idx) -> [sum, count]
        self.horizon = horizon

    def root(self) -> tuple[int, int]:
        s, c = self.nodes.get((0, 0), (0, 0))
        return s, c


class _Writer:
    """Everything that runs on the store thread."""

    def __init__(self, path: Path, hlc: HLC, max_value: int, max_skew: float) -> None:
        self.path = path
        self.hlc = hlc
        self.max_value = max_value
        self.max_skew = max_skew
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self.conn.execute("PRAGMA busy_timeout=5000")
        # Index pages for random positions: a bigger cache keeps bulk writes fast.
        self.conn.execute("PRAGMA cache_size=-32768")
        self._migrate()
        self.colls: dict[str, _Collection] = {}
        self._load_collections()
        self.origin = b"\0" * ORIGIN_LEN  # this node's id, set by the Store

    # --- schema ------------------------------------------------------------

    def _migrate(self) -> None:
        c = self.conn
        c.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v)")
        row = c.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this "
                f"agent understands ({len(MIGRATIONS)}); upgrade the agent")
        for n in range(version, len(MIGRATIONS)):
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[n].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (n + 1,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        row = c.execute("SELECT v FROM meta WHERE k='hlc'").fetchone()
        if row:
            self.hlc.observe(int(row[0]))

    def _load_collections(self) -> None:
        for cid, name, live, horizon in self.conn.execute(
                "SELECT id, name, live, horizon FROM collections"):
            self.colls[name] = _Collection(cid, name, live, self._load_nodes(cid), horizon)

    def _load_nodes(self, cid: int) -> dict[tuple[int, int], list[int]]:
        return {
            (level, idx): [int.from_bytes(total, "big"), count]
            for level, idx, total, count in self.conn.execute(
                "SELECT level, idx, total, count FROM nodes WHERE coll=?", (cid,))
        }

    def collection(self, name: str, create: bool) -> _Collection | None:
        coll = self.colls.get(name)
        if coll is None and create:
            check_name(name)
            cur = self.conn.execute("INSERT INTO collections (name) VALUES (?)", (name,))
            assert cur.lastrowid is not None
            coll = _Collection(cur.lastrowid, name, 0, {})
            self.colls[name] = coll
        return coll

    # --- the one write path --------------------------------------------------

    def apply_items(self, name: str, items: list[Item]) -> int:
        """Apply items by last-writer-wins in the current transaction. Returns
        how many changed the replica."""
        coll = self.collection(name, create=True)
        assert coll is not None
        existing: dict[str, Item] = {}
        keys = list({i.key for i in items})
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT key, hlc, origin, deleted, value, digest, pos FROM items "
                f"WHERE coll=? AND key IN ({marks})", (coll.id, *chunk)):
                existing[row[0]] = _row_item(*row)
        leaf_delta: dict[int, list[int]] = {}
        rows = []
        live = 0
        cid = coll.id
        for it in items:
            old = existing.get(it.key)
            if old is not None and old.version >= it.version:
                continue
            existing[it.key] = it
            pos = it.pos
            d = leaf_delta.get(pos >> LEAF_SHIFT)
            if d is None:
                d = leaf_delta[pos >> LEAF_SHIFT] = [0, 0]
            d[0] += int.from_bytes(it.digest, "big")
            if old is None:
                d[1] += 1
            else:
                d[0] -= int.from_bytes(old.digest, "big")
            live += (0 if it.deleted else 1) - (0 if old is None or old.deleted else 1)
            rows.append((cid, it.key, pos - SHIFT, it.hlc, it.origin, it.deleted, it.value,
                         it.digest))
        changed = len(rows)
        if not rows:
            return 0
        self.conn.executemany("INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,?,?)", rows)
        self._fold(coll, leaf_delta)
        if live:
            coll.live += live
            self.conn.execute("UPDATE collections SET live=? WHERE id=?", (coll.live, coll.id))
        return changed

    def _fold(self, coll: _Collection, leaf_delta: dict[int, list[int]]) -> None:
        """Add per-leaf (sum, count) deltas to the stored levels, one level at a
        time: each node is touched once per batch however many items changed."""
        dirty: dict[tuple[int, int], list[int]] = {}
        nodes = coll.nodes
        level_delta = leaf_delta
        for level in range(STORED_LEVELS, -1, -1):
            parent_delta: dict[int, list[int]] = {}
            for idx, (dsum, dcount) in level_delta.items():
                node = nodes.get((level, idx))
                if node is None:
                    node = nodes[(level, idx)] = [0, 0]
                node[0] = (node[0] + dsum) % MOD
                node[1] += dcount
                dirty[(level, idx)] = node
                p = parent_delta.get(idx >> FANOUT_BITS)
                if p is None:
                    parent_delta[idx >> FANOUT_BITS] = [dsum, dcount]
                else:
                    p[0] += dsum
                    p[1] += dcount
            level_delta = parent_delta
        self.conn.executemany(
            "INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?)",
            [(coll.id, lv, ix, n[0].to_bytes(32, "big"), n[1]) for (lv, ix), n in dirty.items()])

    def _subtract(self, coll: _Collection, removed: Iterable[tuple[int, bytes]]) -> None:
        """Take deleted rows, as (position, digest), out of the stored levels."""
        leaf_delta: dict[int, list[int]] = {}
        for pos, digest in removed:
            d = leaf_delta.setdefault(pos >> LEAF_SHIFT, [0, 0])
            d[0] -= int.from_bytes(digest, "big")
            d[1] -= 1
        self._fold(coll, leaf_delta)

    def drop_stale(self, name: str, items: list[Item]) -> int:
        """Remove these exact versions (live or not): a peer past its tombstone
        horizon lacks them and would refuse them, so the swarm has moved on
        without them. Returns how many were removed."""
        coll = self.colls.get(name)
        if coll is None or not items:
            return 0
        gone = [it for it in items if self.conn.execute(
            "DELETE FROM items WHERE coll=? AND key=? AND digest=?",
            (coll.id, it.key, it.digest)).rowcount == 1]  # else replaced meanwhile: keep it
        self._subtract(coll, ((it.pos, it.digest) for it in gone))
        live = sum(1 for it in gone if not it.deleted)
        if live:
            coll.live -= live
            self.conn.execute("UPDATE collections SET live=? WHERE id=?", (coll.live, coll.id))
        return len(gone)

    def purge_tombstones(self, name: str, horizon: int,
                         expected: bytes | None = None) -> int | None:
        """Drop the tombstones older than ``horizon`` (an HLC) and raise the
        collection's horizon to it; from then on remote items older than the
        horizon are refused, so what was purged cannot come back. Returns how
        many tombstones went. The rule for choosing a horizon is the agent's.

        With ``expected`` (a peer's state_hash, when adopting its horizon) the
        purge happens only if it leaves this replica with exactly that hash,
        proof that both held the same items; else nothing changes and the
        answer is None."""
        coll = self.colls.get(name)
        if coll is None or horizon <= coll.horizon:
            return None if expected is not None else 0
        rows = [(key, pos + SHIFT, digest) for key, pos, digest in self.conn.execute(
            "SELECT key, pos, digest FROM items WHERE coll=? AND deleted=1 AND hlc<?",
            (coll.id, horizon))]
        if expected is not None:
            total, count = coll.root()
            after = (total - sum(int.from_bytes(d, "big") for _, _, d in rows)) % MOD
            if state_hash(after, count - len(rows)) != expected:
                return None
        self.conn.executemany("DELETE FROM items WHERE coll=? AND key=?",
                              [(coll.id, key) for key, _, _ in rows])
        self._subtract(coll, ((pos, digest) for _, pos, digest in rows))
        coll.horizon = horizon
        self.conn.execute("UPDATE collections SET horizon=? WHERE id=?", (horizon, coll.id))
        return len(rows)

    # --- local operations ------------------------------------------------------

    def put(self, name: str, key: str, value: Any) -> Item:
        check_name(name)
        check_key(key)
        data = encode_value(value)
        if len(data) > self.max_value:
            raise StoreError(f"value is {len(data)} bytes encoded; the limit is "
                             f"{self.max_value} (HS_GOSSIP_MAX_VALUE)")
        item = Item(key, self.hlc.now(), self.origin, False, data)
        self.apply_items(name, [item])
        return item

    def put_many(self, name: str, values: dict[str, Any]) -> int:
        """Write many items in one transaction; all or nothing."""
        check_name(name)
        items = []
        for key, value in values.items():
            check_key(key)
            data = encode_value(value)
            if len(data) > self.max_value:
                raise StoreError(f"value of {key!r} is {len(data)} bytes encoded; the limit "
                                 f"is {self.max_value} (HS_GOSSIP_MAX_VALUE)")
            items.append(Item(key, self.hlc.now(), self.origin, False, data))
        return self.apply_items(name, items)

    def delete(self, name: str, key: str) -> Item | None:
        check_name(name)
        check_key(key)
        old = self.get(name, key)
        if old is None or old.deleted:
            return None
        item = Item(key, self.hlc.now(), self.origin, True, None)
        self.apply_items(name, [item])
        return item

    def get(self, name: str, key: str) -> Item | None:
        coll = self.colls.get(name)
        if coll is None:
            return None
        row = self.conn.execute(
            "SELECT key, hlc, origin, deleted, value, digest FROM items WHERE coll=? AND key=?",
            (coll.id, key)).fetchone()
        return _row_item(*row) if row else None

    def list_items(self, name: str, prefix: str, after: str, limit: int) -> list[Item]:
        coll = self.colls.get(name)
        if coll is None:
            return []
        sql = ("SELECT key, hlc, origin, deleted, value, digest FROM items "
               "WHERE coll=? AND deleted=0 AND key >= ?")
        args: list[Any] = [coll.id, prefix]
        if after:
            sql += " AND key > ?"
            args.append(after)
        if prefix:
            sql += " AND substr(key, 1, ?) = ?"
            args += [len(prefix), prefix]
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        return [_row_item(*r) for r in self.conn.execute(sql, args)]

    def validate_remote(self, item: Item) -> None:
        if type(item.key) is not str or type(item.hlc) is not int:
            raise ItemRejected("malformed item")
        check_key(item.key)
        if not 0 < item.hlc <= MAX_HLC:
            raise ItemRejected("hlc out of range")
        if type(item.origin) is not bytes or len(item.origin) != ORIGIN_LEN:
            raise ItemRejected("origin must be 16 bytes")
        if type(item.deleted) is not bool or item.deleted != (item.value is None):
            raise ItemRejected("tombstones carry no value, live items carry one")
        if item.value is not None:
            if type(item.value) is not bytes or len(item.value) > self.max_value:
                raise ItemRejected("value too large")
            try:
                msgpack.unpackb(item.value, raw=False)
            except Exception:
                raise ItemRejected("value is not msgpack") from None
        if self.hlc.too_far_ahead(item.hlc, self.max_skew):
            raise ItemRejected("hlc too far in the future (HS_GOSSIP_MAX_SKEW)")

    def apply_remote(self, name: str, items: list[Item]) -> tuple[int, int]:
        """Validate and apply items received from a peer. Returns (changed, rejected)."""
        check_name(name)
        good: list[Item] = []
        rejected = behind = 0
        coll = self.colls.get(name)
        horizon = coll.horizon if coll is not None else 0
        for it in items:
            try:
                self.validate_remote(it)
            except (ItemRejected, StoreError) as e:
                rejected += 1
                log.warning("rejected item %r in %s: %s", getattr(it, "key", "?")[:80], name, e)
                continue
            if it.hlc < horizon:
                # Older than purged tombstones: it may be one of the items they
                # deleted, so it must not come back.
                behind += 1
                continue
            good.append(it)
        if behind:
            log.warning("refused %d item(s) in %s older than its tombstone horizon "
                        "(changes that reached no other agent within HS_GOSSIP_TOMBSTONE_GRACE)",
                        behind, name)
            rejected += behind
        changed = self.apply_items(name, good) if good else 0
        for it in good:
            self.hlc.observe(it.hlc)
        return changed, rejected

    def save_clock(self) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)", (self.hlc.last,))

    def infos(self) -> list[CollectionInfo]:
        out = []
        for coll in sorted(self.colls.values(), key=lambda c: c.name):
            total, count = coll.root()
            out.append(CollectionInfo(coll.name, state_hash(total, count), coll.live, count,
                                      coll.horizon))
        return out

    # --- verification --------------------------------------------------------

    def verify(self, name: str, repair: bool = False) -> dict[str, Any]:
        """Recompute the tree from the items and compare with the stored one."""
        coll = self.colls.get(name)
        if coll is None:
            raise StoreError(f"no collection {name!r}")
        fresh: dict[tuple[int, int], list[int]] = {}
        live = 0
        bad_digests = 0
        for key, pos, hlc, origin, deleted, value, digest in self.conn.execute(
                "SELECT key, pos, hlc, origin, deleted, value, digest FROM items WHERE coll=?",
                (coll.id,)):
            item = Item(key, hlc, origin, bool(deleted), value)
            if item.digest != digest or pos + SHIFT != key_position(key):
                bad_digests += 1
            live += 0 if deleted else 1
            p = pos + SHIFT
            for level in range(STORED_LEVELS + 1):
                n = fresh.setdefault((level, node_index(p, level)), [0, 0])
                n[0] = (n[0] + int.from_bytes(item.digest, "big")) % MOD
                n[1] += 1
        stored = {k: v for k, v in self._load_nodes(coll.id).items() if v[1] or v[0]}
        mismatched = sorted(set(stored) ^ set(fresh) |
                            {k for k in stored.keys() & fresh.keys() if stored[k] != fresh[k]})
        ok = not mismatched and live == coll.live and not bad_digests
        if repair and not ok:
            self.conn.execute("DELETE FROM nodes WHERE coll=?", (coll.id,))
            self.conn.executemany("INSERT INTO nodes VALUES (?,?,?,?,?)", [
                (coll.id, lv, ix, n[0].to_bytes(32, "big"), n[1]) for (lv, ix), n in fresh.items()])
            self.conn.execute("UPDATE collections SET live=? WHERE id=?", (live, coll.id))
            coll.nodes, coll.live = fresh, live
        total, count = fresh.get((0, 0), [0, 0])
        return {"collection": name, "ok": ok, "items": count, "live": live,
                "mismatched_nodes": len(mismatched), "bad_digests": bad_digests,
                "repaired": repair and not ok,
                "state_hash": state_hash(total, count).hex()}


class SqliteTree:
    """TreeReader over one collection, for use on the store thread only."""

    def __init__(self, w: _Writer, name: str) -> None:
        self.w = w
        self.name = name

    def _coll(self) -> _Collection | None:
        return self.w.colls.get(self.name)

    def _range(self, level: int, idx: int) -> Iterable[tuple[int, bytes]]:
        coll = self._coll()
        if coll is None:
            return []
        lo, hi = node_range(level, idx)
        return ((p + SHIFT, d) for p, d in self.w.conn.execute(
            "SELECT pos, digest FROM items WHERE coll=? AND pos BETWEEN ? AND ?",
            (coll.id, lo - SHIFT, hi - SHIFT)))

    def node(self, level: int, idx: int) -> tuple[int, int]:
        coll = self._coll()
        if coll is None:
            return 0, 0
        if level <= STORED_LEVELS:
            n = coll.nodes.get((level, idx))
            return (n[0], n[1]) if n else (0, 0)
        total = count = 0
        for _, d in self._range(level, idx):
            total += int.from_bytes(d, "big")
            count += 1
        return total % MOD, count

    def children(self, level: int, idx: int) -> list[tuple[int, int]]:
        coll = self._coll()
        if coll is None:
            return [(0, 0)] * FANOUT
        if level + 1 <= STORED_LEVELS:
            base = idx * FANOUT
            out = []
            for c in range(FANOUT):
                n = coll.nodes.get((level + 1, base + c))
                out.append((n[0], n[1]) if n else (0, 0))
            return out
        sums = [0] * FANOUT
        counts = [0] * FANOUT
        for p, d in self._range(level, idx):
            c = node_index(p, level + 1) & (FANOUT - 1)
            sums[c] += int.from_bytes(d, "big")
            counts[c] += 1
        return [(s % MOD, n) for s, n in zip(sums, counts, strict=True)]

    def digests_under(self, level: int, idx: int) -> list[bytes]:
        return [d for _, d in self._range(level, idx)]

    def items_under(self, level: int, idx: int, digests: set[bytes] | None,
                    after_pos: int, limit: int) -> list[Item]:
        coll = self._coll()
        if coll is None:
            return []
        lo, hi = node_range(level, idx)
        lo = max(lo, after_pos + 1)
        rows = self.w.conn.execute(
            "SELECT key, hlc, origin, deleted, value, digest, pos FROM items "
            "WHERE coll=? AND pos BETWEEN ? AND ? ORDER BY pos" +
            ("" if digests is not None else " LIMIT ?"),
            (coll.id, lo - SHIFT, hi - SHIFT) + (() if digests is not None else (limit,)))
        out = []
        for row in rows:
            item = _row_item(*row)
            if digests is None or item.digest in digests:
                out.append(item)
        return out[:limit]


# --- the async face -----------------------------------------------------------


class _Op:
    __slots__ = ("error", "event", "fn", "result")

    def __init__(self, fn: Callable[[_Writer], Any], event: anyio.Event | None) -> None:
        self.fn = fn
        self.event = event
        self.result: Any = None
        self.error: BaseException | None = None


def _waker() -> Callable[[Callable[[], None]], None]:
    """A non-blocking way for the store thread to run a callback in the event loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return token.run_sync_soon
    import asyncio

    loop = asyncio.get_running_loop()
    return loop.call_soon_threadsafe  # type: ignore[return-value]


class _Checkpointer:
    """Copies WAL pages back into the database file on a second connection and
    thread, so that the writer never stalls in SQLite's automatic checkpoint
    (about a fifth of a bulk write's time). It writes no data: the store thread
    stays the only writer. PASSIVE checkpoints never block the writer, and
    SQLite starts the WAL over from its beginning once every frame has been
    copied, which keeps the file bounded. Should this thread fall behind or
    fail, the writer's own automatic checkpoint (at WAL_SAFETY_PAGES) takes
    over."""

    PERIOD = 0.5  # seconds between checkpoints while writes keep coming

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.dirty = threading.Event()
        self._stopping = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="hs-gossip-checkpoint",
                                       daemon=True)

    def _run(self) -> None:
        while True:
            self.dirty.wait()
            if self._stopping.is_set():
                return
            self.dirty.clear()
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("WAL checkpoint failed (%d times): %s", self.failures, e)
            if self._stopping.wait(self.PERIOD):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self.thread.join()
        self.conn.close()


#: WAL size (pages) at which the writer checkpoints by itself after all
WAL_SAFETY_PAGES = 16384


class Store:
    """The async face of the store. Create inside the event loop with
    :meth:`open`; every method is a checkpoint; a cancelled call may still be
    carried out (it was queued) but nothing is left half-done."""

    def __init__(self, data_dir: Path, origin: bytes, max_value: int = 1 << 20,
                 max_skew: float = 300.0, clock: Callable[[], int] | None = None) -> None:
        self.path = data_dir / DB_FILE
        self.hlc = HLC(clock or wall_ms)
        self._writer = _Writer(self.path, self.hlc, max_value, max_skew)
        self._writer.origin = origin
        self._writer.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        self._checkpointer = _Checkpointer(self.path)
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._digests: list[CollectionInfo] = self._writer.infos()
        self._wake: Callable[[Callable[[], None]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="hs-gossip-store", daemon=True)
        self.write_seconds = 0.0
        self.batches = 0
        self.ops = 0
        self.on_change: Callable[[], None] | None = None

    @classmethod
    async def open(cls, data_dir: Path, origin: bytes, max_value: int = 1 << 20,
                   max_skew: float = 300.0, clock: Callable[[], int] | None = None) -> Store:
        store = await anyio.to_thread.run_sync(
            lambda: cls(data_dir, origin, max_value, max_skew, clock))
        store._wake = _waker()
        store._checkpointer.thread.start()
        store._thread.start()
        return store

    # --- thread ---------------------------------------------------------------

    def _run(self) -> None:
        w = self._writer
        conn = w.conn
        while True:
            op = self._queue.get()
            if op is None:
                break
            batch = [op]
            while len(batch) < GROUP_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                if len(batch) == 1:
                    # Alone, an op needs no savepoint (whose statement journal
                    # costs ~20% on big batches): on error the whole
                    # transaction is its rollback.
                    self._run_alone(batch[0])
                else:
                    for i, o in enumerate(batch):
                        conn.execute(f"SAVEPOINT op{i}")
                        try:
                            o.result = o.fn(w)
                        except BaseException as e:  # handed to the waiting caller
                            o.error = e
                            conn.execute(f"ROLLBACK TO op{i}")
                            # The node mirror may hold changes of the undone op.
                            self._reload_mirrors()
                        conn.execute(f"RELEASE op{i}")
                w.save_clock()
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                # Disk full, I/O error: nothing of this batch was kept.
                log.error("store write failed, batch rolled back: %s", e)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._reload_mirrors()
                for o in batch:
                    if o.error is None:
                        o.error = StoreError(f"database write failed: {e}")
            self.write_seconds += time.perf_counter() - t0
            self._checkpointer.dirty.set()
            self.batches += 1
            self.ops += len(batch)
            self._digests = w.infos()
            self._notify(batch)
        self._checkpointer.stop()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def _run_alone(self, o: _Op) -> None:
        try:
            o.result = o.fn(self._writer)
        except BaseException as e:  # handed to the waiting caller
            o.error = e
            self._writer.conn.execute("ROLLBACK")
            self._reload_mirrors()
            self._writer.conn.execute("BEGIN IMMEDIATE")

    def _reload_mirrors(self) -> None:
        w = self._writer
        w.colls.clear()
        w._load_collections()

    def _notify(self, batch: list[_Op]) -> None:
        events = [o.event for o in batch if o.event is not None]
        callback = self.on_change
        if self._wake is None:
            return

        def wake() -> None:
            for ev in events:
                ev.set()
            if callback is not None:
                callback()

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._wake(wake)

    # --- calls ------------------------------------------------------------------

    async def call(self, fn: Callable[[_Writer], T]) -> T:
        """Run ``fn`` on the store thread inside a (grouped) transaction."""
        op = _Op(fn, anyio.Event())
        self._queue.put(op)
        assert op.event is not None
        with anyio.CancelScope(shield=True):
            await op.event.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[no-any-return]

    async def put(self, name: str, key: str, value: Any) -> Item:
        return await self.call(lambda w: w.put(name, key, value))

    async def put_many(self, name: str, values: dict[str, Any]) -> int:
        return await self.call(lambda w: w.put_many(name, values))

    async def delete(self, name: str, key: str) -> Item | None:
        return await self.call(lambda w: w.delete(name, key))

    async def get(self, name: str, key: str) -> Item | None:
        return await self.call(lambda w: w.get(name, key))

    async def list_items(self, name: str, prefix: str = "", after: str = "",
                         limit: int = 100) -> list[Item]:
        return await self.call(lambda w: w.list_items(name, prefix, after, limit))

    async def apply_remote(self, name: str, items: list[Item]) -> tuple[int, int]:
        return await self.call(lambda w: w.apply_remote(name, items))

    async def purge_tombstones(self, name: str, horizon: int,
                               expected: bytes | None = None) -> int | None:
        return await self.call(lambda w: w.purge_tombstones(name, horizon, expected))

    async def drop_stale(self, name: str, items: list[Item]) -> int:
        return await self.call(lambda w: w.drop_stale(name, items))


    async def verify(self, name: str, repair: bool = False) -> dict[str, Any]:
        return await self.call(lambda w: w.verify(name, repair))

    async def with_tree(self, name: str, fn: Callable[[SqliteTree], T]) -> T:
        """Run ``fn`` with a read-only view of the collection's tree, on the
        store thread (the reconciliation session reads the tree)."""
        return await self.call(lambda w: fn(SqliteTree(w, name)))

    async def item_batches(self, name: str,
                           requests: list[SendRequest]) -> AsyncIterator[list[Item]]:
        """The items a reconciliation session asked to ship, one bounded batch
        per store call: a large transfer never sits in memory whole, and local
        writes interleave with it."""
        gen = await self.with_tree(name, partial(item_batches, requests=requests))
        while (batch := await self.call(lambda _w: next(gen, None))) is not None:
            yield batch

    def digests(self) -> list[CollectionInfo]:
        """Collections as of the last commit: no query, safe from the event loop."""
        return self._digests

    async def close(self) -> None:
        """Finish queued work, checkpoint the WAL and close."""
        self._queue.put(None)
        await anyio.to_thread.run_sync(self._thread.join)
