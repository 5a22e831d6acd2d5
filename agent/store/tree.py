"""The Merkle tree of one collection as reconciliation reads it
(:class:`merkle.tree.TreeReader`), over the store's SQLite connection.

Rules: read-only, and on the store thread only (it uses the writing
connection and the in-memory node mirror). Levels 0-3 come from the mirror;
deeper nodes are summed from the items through the (collection, position)
index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

from agent.store.changes import Collection
from agent.store.schema import ITEM_COLUMNS, SHIFT, row_item
from merkle.tree import FANOUT, MOD, STORED_LEVELS, Item, node_index, node_range


class SqliteTree:
    """TreeReader over one collection. The collection is looked up on each
    read: it may be created, or its mirror reloaded, while the view lives."""

    def __init__(self, conn: sqlite3.Connection, colls: Mapping[str, Collection],
                 name: str) -> None:
        self.conn = conn
        self.colls = colls
        self.name = name

    def _coll(self) -> Collection | None:
        return self.colls.get(self.name)

    def _range(self, level: int, idx: int) -> Iterable[tuple[int, bytes]]:
        coll = self._coll()
        if coll is None:
            return []
        lo, hi = node_range(level, idx)
        return ((p + SHIFT, d) for p, d in self.conn.execute(
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
        rows = self.conn.execute(
            f"SELECT {ITEM_COLUMNS} FROM items "
            "WHERE coll=? AND pos BETWEEN ? AND ? ORDER BY pos" +
            ("" if digests is not None else " LIMIT ?"),
            (coll.id, lo - SHIFT, hi - SHIFT) + (() if digests is not None else (limit,)))
        out = []
        for row in rows:
            item = row_item(*row)
            if digests is None or item.digest in digests:
                out.append(item)
        return out[:limit]
