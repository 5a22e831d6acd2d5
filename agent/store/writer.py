"""Everything that runs on the store thread: the operations the store offers,
each turned into proposals for the one change path (:mod:`agent.store.changes`).

Rules:

* Only the store thread calls a :class:`Writer`, always inside a transaction
  the caller opened; a Writer never begins or commits one itself.
* Local writes get their version from the HLC, whose clock runs ahead of every
  stored version, so a local write always wins.
* Remote items are validated here (shape, size, msgpack value, clock skew)
  and refused below the collection's tombstone horizon, so that a purged
  deletion cannot be undone by an old copy.
* Deletes are tombstones, ordered like writes.
* An operation changes an in-memory mirror (collections, node sums, the
  log's head, the applied position) only after it has written a row: an
  operation that fails before ``conn.total_changes`` moves has left every
  mirror as it was, so its rollback needs no reload (see
  :mod:`agent.store.store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgpack import unpackb

from agent.core.changelog import LogEntry, Position, Retention
from agent.core.clock import HLC, MAX_HLC, physical_ms
from agent.store.changes import (
    Change,
    Collection,
    Kind,
    change,
    load_collections,
    mismatched_nodes,
    rebuild,
    recount,
)
from agent.store.log import COMPACT_BATCH, ChangeLog
from agent.store.schema import ITEM_COLUMNS, open_db, row_item, save_clock, saved_clock
from agent.store.tree import SqliteTree
from agent.store.values import (
    CollectionInfo,
    ItemRejected,
    StoreError,
    check_key,
    check_name,
    encode_value,
)
from merkle.tree import MOD, ORIGIN_LEN, Item, state_hash

log = logging.getLogger("hs_gossip.store")


class Writer:
    """The writing connection, the collections' in-memory state, and the
    operations on them."""

    def __init__(self, path: Path, hlc: HLC, origin: bytes, max_value: int,
                 max_skew: float, wall: Callable[[], int] | None = None) -> None:
        self.path = path
        self.hlc = hlc
        self.origin = origin  # this node's id: the origin of local versions
        self.max_value = max_value
        self.max_skew = max_skew
        self.conn = open_db(path)
        last = saved_clock(self.conn)
        if last is not None:
            self.hlc.observe(last)
        self.colls: dict[str, Collection] = load_collections(self.conn)
        #: the change log; ``wall`` (Unix ms) stamps its entries for the age limit
        self.log = ChangeLog(self.conn, wall or (lambda: time.time_ns() // 1_000_000))
        #: agent.store.stream's mirror of its applied position and highest
        #: epoch seen (the ``upstream`` row); None: to be read from the table
        self.applied: tuple[Position, int] | None = None

    def reload(self) -> None:
        """Reread the collections and the log's head after a rollback (the
        mirrors may hold undone changes). In place: tree views hold this dict.
        Loaded aside first: if reading fails, the old mirror stays whole
        rather than empty (an empty one would make the next write re-create
        collections that exist). The applied position is dropped first, to
        be reread when next needed."""
        self.applied = None
        fresh = load_collections(self.conn)
        self.colls.clear()
        self.colls.update(fresh)
        self.log.reload(self.conn)

    def collection(self, name: str, create: bool) -> Collection | None:
        coll = self.colls.get(name)
        if coll is None and create:
            check_name(name)
            cur = self.conn.execute("INSERT INTO collections (name) VALUES (?)", (name,))
            assert cur.lastrowid is not None
            coll = Collection(cur.lastrowid, name, 0)
            self.colls[name] = coll
        return coll

    def tree(self, name: str) -> SqliteTree:
        return SqliteTree(self.conn, self.colls, name)

    def change(self, name: str, kind: Kind, items: list[Item]) -> list[Change]:
        """The change path for collection ``name``, created if need be."""
        coll = self.collection(name, create=True)
        assert coll is not None
        return change(self.conn, coll, kind, items, self.log)

    # --- local operations ------------------------------------------------------

    def _encode(self, key: str, value: Any, many: bool) -> bytes:
        check_key(key)
        data = encode_value(value)
        if len(data) > self.max_value:
            what = f"value of {key!r}" if many else "value"
            raise StoreError(f"{what} is {len(data)} bytes encoded; the limit is "
                             f"{self.max_value} (HS_GOSSIP_MAX_VALUE)")
        return data

    def put(self, name: str, key: str, value: Any) -> Change:
        check_name(name)
        item = Item(key, self.hlc.now(), self.origin, False, self._encode(key, value, many=False))
        changes = self.change(name, Kind.WRITE, [item])
        assert len(changes) == 1  # the clock is ahead of every stored version
        return changes[0]

    def put_many(self, name: str, values: dict[str, Any]) -> list[Change]:
        """Write many items in one transaction; all or nothing."""
        check_name(name)
        items = [Item(key, self.hlc.now(), self.origin, False,
                      self._encode(key, value, many=True))
                 for key, value in values.items()]
        return self.change(name, Kind.WRITE, items)

    def delete(self, name: str, key: str) -> Change | None:
        """Replace a live item by a tombstone; None if there is none."""
        check_name(name)
        check_key(key)
        old = self.get(name, key)
        if old is None or old.deleted:
            return None
        changes = self.change(
            name, Kind.WRITE, [Item(key, self.hlc.now(), self.origin, True, None)])
        assert len(changes) == 1  # the clock is ahead of every stored version
        return changes[0]

    def get(self, name: str, key: str) -> Item | None:
        coll = self.colls.get(name)
        if coll is None:
            return None
        row = self.conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=? AND key=?",
            (coll.id, key)).fetchone()
        return row_item(*row) if row else None

    def list_items(self, name: str, prefix: str, after: str, limit: int) -> list[Item]:
        coll = self.colls.get(name)
        if coll is None:
            return []
        # Position too: taken as stored, not recomputed (a hash) per item.
        sql = (f"SELECT {ITEM_COLUMNS} FROM items "
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
        return [row_item(*r) for r in self.conn.execute(sql, args)]

    # --- items from peers -------------------------------------------------------

    def validate_remote(self, item: Item, ahead_limit: int) -> None:
        """Refuse an item a peer could not have made. ``ahead_limit``: the
        newest physical time (ms) accepted (HLC.ahead_limit, once per batch)."""
        # Each field read once into a local: this runs per received item.
        key, hlc, value = item.key, item.hlc, item.value
        if type(key) is not str or type(hlc) is not int:
            raise ItemRejected("malformed item")
        check_key(key)
        if not 0 < hlc <= MAX_HLC:
            raise ItemRejected("hlc out of range")
        origin = item.origin
        if type(origin) is not bytes or len(origin) != ORIGIN_LEN:
            raise ItemRejected("origin must be 16 bytes")
        deleted = item.deleted
        if type(deleted) is not bool or deleted != (value is None):
            raise ItemRejected("tombstones carry no value, live items carry one")
        if value is not None:
            if type(value) is not bytes or len(value) > self.max_value:
                raise ItemRejected("value too large")
            try:
                unpackb(value)  # raw=False is its default
            except Exception:
                raise ItemRejected("value is not msgpack") from None
        if physical_ms(hlc) > ahead_limit:
            raise ItemRejected("hlc too far in the future (HS_GOSSIP_MAX_SKEW)")

    def apply_remote(self, name: str, items: list[Item]) -> tuple[list[Change], int]:
        """Validate and apply items received from a peer, last writer winning.
        Returns (what changed, how many were rejected)."""
        check_name(name)
        good: list[Item] = []
        rejected = behind = 0
        coll = self.colls.get(name)
        horizon = coll.horizon if coll is not None else 0
        ahead = self.hlc.ahead_limit(self.max_skew)
        for it in items:
            try:
                self.validate_remote(it, ahead)
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
        changes = self.change(name, Kind.WRITE, good) if good else []
        if good:
            # Observing the newest is observing them all: the clock keeps the max.
            self.hlc.observe(max(it.hlc for it in good))
        return changes, rejected

    def drop_stale(self, name: str, items: list[Item], horizon: int = 0,
                   expected: bytes | None = None) -> list[Change]:
        """Remove these exact versions (live or not): a peer past its tombstone
        horizon lacks them and would refuse them, so the swarm has moved on
        without them. A version replaced meanwhile stays.

        ``horizon`` and ``expected``: that peer's horizon and state_hash. If
        the removal leaves this replica with exactly that hash, the horizon is
        adopted in the same transaction. Without it, a tombstone removed here
        would leave the key open to an older copy (a replica back from away)
        until the next purge pass adopted the horizon."""
        coll = self.colls.get(name)
        if coll is None or not items:
            return []
        changes = change(self.conn, coll, Kind.REMOVE, items, self.log)
        if expected is not None and horizon > coll.horizon \
                and state_hash(*coll.root()) == expected:
            self._raise_horizon(coll, horizon)
        return changes

    def purge_tombstones(self, name: str, horizon: int,
                         expected: bytes | None = None) -> list[Change] | None:
        """Drop the tombstones older than ``horizon`` (an HLC) and raise the
        collection's horizon to it; from then on remote items older than the
        horizon are refused, so what was purged cannot come back. Returns what
        was removed. The rule for choosing a horizon is the agent's.

        With ``expected`` (a peer's state_hash, when adopting its horizon) the
        purge happens only if it leaves this replica with exactly that hash,
        proof that both held the same items; else nothing changes and the
        answer is None."""
        coll = self.colls.get(name)
        if coll is None or horizon <= coll.horizon:
            return None if expected is not None else []
        old = [row_item(*row) for row in self.conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=? AND deleted=1 AND hlc<?",
            (coll.id, horizon))]
        if expected is not None:
            total, count = coll.root()
            after = (total - sum(int.from_bytes(it.digest, "big") for it in old)) % MOD
            if state_hash(after, count - len(old)) != expected:
                return None
        changes = change(self.conn, coll, Kind.REMOVE, old, self.log)
        self._raise_horizon(coll, horizon)
        return changes

    def _raise_horizon(self, coll: Collection, horizon: int) -> None:
        # The row before the mirror: a failed write leaves the mirror as it was.
        self.conn.execute("UPDATE collections SET horizon=? WHERE id=?", (horizon, coll.id))
        coll.horizon = horizon

    # --- verification ---------------------------------------------------------

    def verify(self, name: str, repair: bool = False) -> tuple[dict[str, Any], list[Change]]:
        """Recompute the tree from the items and compare with the stored one.
        With ``repair``, rows under a wrong digest or position are rewritten
        through the change path and the stored index is rebuilt. Returns the
        report and the rows that repair changed."""
        coll = self.colls.get(name)
        if coll is None:
            raise StoreError(f"no collection {name!r}")
        counted = recount(self.conn, coll)
        mismatched = mismatched_nodes(self.conn, coll, counted.nodes)
        ok = not mismatched and counted.live == coll.live and not counted.corrections
        changes: list[Change] = []
        if repair and not ok:
            changes = change(self.conn, coll, Kind.CORRECT, counted.corrections, self.log)
            rebuild(self.conn, coll, counted)
        total, count = counted.nodes.get((0, 0), [0, 0])
        report = {"collection": name, "ok": ok, "items": count, "live": counted.live,
                  "mismatched_nodes": len(mismatched), "bad_digests": len(counted.corrections),
                  "repaired": repair and not ok,
                  "state_hash": state_hash(total, count).hex()}
        return report, changes

    # --- change log -------------------------------------------------------------

    def log_position(self) -> Position:
        return self.log.head

    def log_floor(self) -> Position:
        return self.log.floor

    def read_log(self, after_seq: int, limit: int) -> list[LogEntry]:
        return self.log.read(self.conn, after_seq, limit)

    def compact_log(self, retain: Retention, now_ms: int, min_needed_seq: int | None = None,
                    batch: int = COMPACT_BATCH) -> int:
        return self.log.compact(self.conn, retain, now_ms, min_needed_seq, batch)

    # --- per commit -----------------------------------------------------------

    def save_clock(self) -> None:
        save_clock(self.conn, self.hlc.last)

    def infos(self) -> list[CollectionInfo]:
        out = []
        for coll in sorted(self.colls.values(), key=lambda c: c.name):
            total, count = coll.root()
            out.append(CollectionInfo(coll.name, state_hash(total, count), coll.live, count,
                                      coll.horizon))
        return out


