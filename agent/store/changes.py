"""The one change path, and the Merkle index it keeps true.

Rules:

* Every change to an item row goes through :func:`change`: local writes and
  deletes, remote items, stale drops, tombstone purges and repairs. It takes a
  collection and a list of proposals and returns what changed, one
  :class:`Change` (key, old version, new version) per proposal that took
  effect, in order. From that same list, in the caller's transaction, it writes
  the item rows, the node sums of every stored level and the live count, so a
  kill -9 at any moment leaves a database whose tree matches its items.
  Anything else that must see every change in the same transaction is
  written there, from that list: the change log (:mod:`agent.store.log`),
  one entry per change. Repairs (``CORRECT``) are not logged: they rewrite a
  row's digest or position, not its version (key, hlc, origin, value), and
  every receiver computes digests and positions itself.
* What each proposed item does is decided against the stored row only, by
  the batch's :class:`Kind`: ``WRITE`` wins by last-writer-wins on (hlc,
  origin, digest), the same answer on every replica; ``REMOVE`` takes out
  exactly the version it names (a row replaced meanwhile stays); ``CORRECT``
  rewrites a row that holds the right version under a wrong digest or
  position (repair). A batch has one kind: no change mixes them.
* The node sums of levels 0-3 (at most 4,369 nodes) are kept in the database
  (16 siblings to a row, and a journal that small writes append to:
  :mod:`agent.store.nodes`) and mirrored in memory per collection
  (:class:`Collection`); deeper levels are computed from the
  items on demand through the (collection, position) index (~244 items per
  level-3 node at 1M items). Keeping level 4 too would add 4,096 rows that a
  bulk write rewrites for little gain in sync speed.
* :func:`recount` rebuilds the index from the items alone; :func:`rebuild`
  replaces the stored index by it. Both run on the store thread.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.store import nodes as stored
from agent.store.log import ChangeLog
from agent.store.nodes import (
    CHILD_BYTES,
    JOURNAL_LEAVES,
    JOURNAL_ROWS,
    NodeSums,
    child_bytes,
    pack_group,
)
from agent.store.schema import ITEM_COLUMNS, SHIFT, row_item
from merkle.tree import FANOUT, FANOUT_BITS, MOD, STORED_LEVELS, Item, node_index

#: shift from a position to its node at the deepest stored level
LEAF_SHIFT = 64 - 4 * STORED_LEVELS
#: keys per SELECT ... IN (...) (SQLite's default limit is 999 variables)
KEY_CHUNK = 500


class Collection:
    """Store-thread state of one collection: its id, live count, horizon, the
    mirror of its stored node sums, the group rows as they are in memory
    (:attr:`groups`, by parent node: a write encodes again only the children
    it changed), and what its journal holds (agent.store.nodes)."""

    def __init__(self, cid: int, name: str, live: int, tree: stored.Stored | None = None,
                 horizon: int = 0) -> None:
        self.id = cid
        self.name = name
        self.live = live
        self.horizon = horizon
        self.nodes: NodeSums = {} if tree is None else tree.nodes
        self.groups: dict[tuple[int, int], bytearray] = {}
        #: journal rows stored, and the group rows they make out of date
        self.journal_rows = 0 if tree is None else tree.journal_rows
        self.stale: set[tuple[int, int]] = set() if tree is None else tree.stale

    def root(self) -> tuple[int, int]:
        s, c = self.nodes.get((0, 0), (0, 0))
        return s, c


def load_collections(conn: sqlite3.Connection) -> dict[str, Collection]:
    return {
        name: Collection(cid, name, live, stored.load(conn, cid), horizon)
        for cid, name, live, horizon in conn.execute(
            "SELECT id, name, live, horizon FROM collections")
    }


# --- proposals and what they changed ------------------------------------------


class Kind(enum.Enum):
    """What a batch of proposed items does to the stored rows."""

    #: store each item if its version beats the stored one (last writer wins)
    WRITE = "write"
    #: remove the row of each item's key if it holds exactly this version
    #: (same digest); a newer version stored meanwhile stays
    REMOVE = "remove"
    #: the row holds this version (same hlc, origin, flag and value) under a
    #: wrong digest or position: store it with the right ones (repair)
    CORRECT = "correct"


# A named tuple rather than a frozen dataclass: as immutable, and built several
# times faster (a bulk write makes one per item).
class Change(NamedTuple):
    """One change to one item row. ``old`` is None for an insert, ``new`` is
    None when the row was removed; a tombstone is a ``new`` with deleted set."""

    key: str
    old: Item | None
    new: Item | None


_new_tuple = tuple.__new__


def change(conn: sqlite3.Connection, coll: Collection, kind: Kind,
           items: list[Item], log: ChangeLog) -> list[Change]:
    """Carry out ``proposals`` in the current transaction and return what
    changed. The rows, the node sums, the live count and the log entries are
    all derived from the returned list, so they cannot disagree with it."""
    if not items:
        return []
    changes = _decide(_stored(conn, coll, {it.key for it in items}), kind, items)
    if changes:
        _write(conn, coll, changes)
        # Whatever else must record every change in this transaction goes here.
        if kind is not Kind.CORRECT:
            log.append(conn, coll.name, changes)
    return changes


def _stored(conn: sqlite3.Connection, coll: Collection,
            keys: set[str]) -> dict[str, Item | None]:
    """The stored rows of ``keys``, as stored (digest and position included)."""
    found: dict[str, Item | None] = {}
    todo = list(keys)
    for start in range(0, len(todo), KEY_CHUNK):
        chunk = todo[start:start + KEY_CHUNK]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=? AND key IN ({marks})",
                (coll.id, *chunk)):
            found[row[0]] = row_item(*row)
    return found


def _decide(stored: dict[str, Item | None], kind: Kind, items: list[Item]) -> list[Change]:
    """Which proposed items take effect, each judged against the row as the
    earlier ones in the list left it. Pure: no SQL. ``stored`` is consumed."""
    current = stored
    out: list[Change] = []
    if kind is Kind.WRITE:
        # The common kind (every write, every remote item), in a loop of its
        # own; Change made by tuple.__new__, the same tuple without the
        # Python-level __new__ of a named tuple.
        get, add = current.get, out.append
        for it in items:
            key = it.key
            old = get(key)
            if old is not None and old.version >= it.version:
                continue
            current[key] = it
            add(_new_tuple(Change, (key, old, it)))
        return out
    for it in items:
        old = current.get(it.key)
        new: Item | None
        if kind is Kind.REMOVE:
            if old is None or old.digest != it.digest:
                continue
            new = None
        else:
            if old is None or old != it or (old.digest == it.digest and old.pos == it.pos):
                continue
            new = it
        current[it.key] = new
        out.append(Change(it.key, old, new))
    return out


def _write(conn: sqlite3.Connection, coll: Collection, changes: list[Change]) -> None:
    """Write the rows of ``changes`` and fold them into the node sums and the
    live count: each old version out, each new one in. One pass, written out
    by hand: it runs once per changed item on bulk writes."""
    final: dict[str, Item | None] = {}
    # Per leaf node: the change of its sum and of its count, in two dicts of
    # ints rather than one of [sum, count] lists: no container per node for
    # the cyclic garbage collector to count and walk.
    leaf_sum: dict[int, int] = {}
    leaf_count: dict[int, int] = {}
    live = 0
    as_int = int.from_bytes
    for key, old, new in changes:
        final[key] = new
        if new is not None:
            k = new.pos >> LEAF_SHIFT
            leaf_sum[k] = leaf_sum.get(k, 0) + as_int(new.digest, "big")
            leaf_count[k] = leaf_count.get(k, 0) + 1
            if not new.deleted:
                live += 1
        if old is not None:
            k = old.pos >> LEAF_SHIFT
            leaf_sum[k] = leaf_sum.get(k, 0) - as_int(old.digest, "big")
            leaf_count[k] = leaf_count.get(k, 0) - 1
            if not old.deleted:
                live -= 1
    cid = coll.id
    kept = [it for it in final.values() if it is not None]
    gone = [(cid, key) for key, it in final.items() if it is None]
    if kept:
        # The column order of ``items``; ``deleted`` as the int it is stored
        # as (sqlite3 binds a bool through its adapter lookup, ~0.6 us a row
        # slower). Rows from a generator: each tuple is freed once bound, so
        # a bulk write does not pile up one more container per item for the
        # cyclic garbage collector to count and walk.
        conn.executemany("INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,?,?)", (
            (cid, it.key, it.pos - SHIFT, it.hlc, it.origin, 1 if it.deleted else 0, it.value,
             it.digest) for it in kept))
    if gone:
        conn.executemany("DELETE FROM items WHERE coll=? AND key=?", gone)
    _fold(conn, coll, leaf_sum, leaf_count)
    if live:
        coll.live += live
        conn.execute("UPDATE collections SET live=? WHERE id=?", (coll.live, coll.id))


def _fold(conn: sqlite3.Connection, coll: Collection, leaf_sum: dict[int, int],
          leaf_count: dict[int, int]) -> None:
    """Add per-leaf sum and count deltas (same keys) to the stored levels,
    one level at a time: each node is touched once per batch however many
    items changed. Then store them (agent.store.nodes): a write that changed
    few leaves appends their sums to the journal; a larger one writes the
    group rows it changed and those the journal made out of date, and
    empties the journal."""
    nodes, groups = coll.nodes, coll.groups
    #: the group rows changed, by parent node
    rows: dict[tuple[int, int], bytearray] = {}
    #: (idx, sum, count) of each leaf changed, for the journal
    leaves: list[tuple[int, int, int]] = []
    sums, counts = leaf_sum, leaf_count
    mod, bits, last = MOD, FANOUT_BITS, FANOUT - 1
    for level in range(STORED_LEVELS, -1, -1):
        up_sum: dict[int, int] = {}
        up_count: dict[int, int] = {}
        for idx, dsum in sums.items():
            dcount = counts[idx]
            node = nodes.get((level, idx))
            if node is None:
                node = nodes[(level, idx)] = [0, 0]
            total = node[0] = (node[0] + dsum) % mod
            count = node[1] = node[1] + dcount
            up = idx >> bits
            up_sum[up] = up_sum.get(up, 0) + dsum
            up_count[up] = up_count.get(up, 0) + dcount
            if level:
                # Only this child's 40 bytes of its group's row are encoded again.
                parent = (level - 1, up)
                g = groups.get(parent)
                if g is None:
                    g = groups[parent] = bytearray(pack_group(nodes, level - 1, up))
                at = (idx & last) * CHILD_BYTES
                g[at:at + CHILD_BYTES] = child_bytes(total, count)
                rows[parent] = g
                if level == STORED_LEVELS:
                    leaves.append((idx, total, count))
        sums, counts = up_sum, up_count
    cid = coll.id
    if len(leaves) <= JOURNAL_LEAVES and coll.journal_rows < JOURNAL_ROWS:
        stored.append_journal(conn, cid, leaves)
        coll.journal_rows += 1
        coll.stale.update(rows)
        return
    # Fold: the rows this write changed, and those the journal holds newer
    # sums for, then the journal goes.
    for parent in coll.stale:
        if parent not in rows:
            g = groups.get(parent)
            rows[parent] = g if g is not None else bytearray(pack_group(nodes, *parent))
    stored.write_groups(conn, cid, rows.items())
    if coll.journal_rows:
        stored.clear_journal(conn, cid)
    coll.journal_rows = 0
    coll.stale = set()


# --- verification and repair ----------------------------------------------------


@dataclass
class Recount:
    """The index of a collection as its items say it should be."""

    nodes: NodeSums = field(default_factory=dict)
    live: int = 0
    #: rows stored under a wrong digest or position, with the right ones
    corrections: list[Item] = field(default_factory=list)


def recount(conn: sqlite3.Connection, coll: Collection) -> Recount:
    """Recompute every digest, position and stored node sum from the items."""
    out = Recount()
    fresh = out.nodes
    for key, hlc, origin, deleted, value, digest, pos in conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=?", (coll.id,)):
        item = Item(key, hlc, origin, bool(deleted), value)
        if item.digest != digest or item.pos != pos + SHIFT:
            out.corrections.append(item)
        out.live += 0 if deleted else 1
        d = int.from_bytes(item.digest, "big")
        for level in range(STORED_LEVELS + 1):
            n = fresh.setdefault((level, node_index(item.pos, level)), [0, 0])
            n[0] = (n[0] + d) % MOD
            n[1] += 1
    return out


def differing(have: NodeSums, fresh: NodeSums) -> list[tuple[int, int]]:
    """The nodes where ``have`` differs from ``fresh`` (empty nodes are absent
    ones: both count nothing)."""
    kept = {k: v for k, v in have.items() if v[1] or v[0]}
    return sorted(set(kept) ^ set(fresh) |
                  {k for k in kept.keys() & fresh.keys() if kept[k] != fresh[k]})


def mismatched_nodes(conn: sqlite3.Connection, coll: Collection,
                     fresh: NodeSums) -> list[tuple[int, int]]:
    """The nodes that differ from ``fresh``, in the database or in the
    in-memory mirror (which digests and sync answer from): either can be
    wrong without the other."""
    return sorted(set(differing(stored.load_nodes(conn, coll.id), fresh))
                  | set(differing(coll.nodes, fresh)))


def rebuild(conn: sqlite3.Connection, coll: Collection, counted: Recount) -> None:
    """Replace the stored node sums and live count by ``counted``. The rows of
    ``counted.corrections`` must have gone through :func:`change` first, so
    that the items agree with it."""
    stored.replace(conn, coll.id, counted.nodes)
    conn.execute("UPDATE collections SET live=? WHERE id=?", (counted.live, coll.id))
    coll.nodes, coll.live = counted.nodes, counted.live
    coll.groups, coll.journal_rows, coll.stale = {}, 0, set()
