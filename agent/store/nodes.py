"""The stored node sums of each collection's Merkle tree: rows of 16
siblings, and a journal of leaf sums that small writes append to instead.

Rules:

* Levels 1 to ``STORED_LEVELS`` are kept in ``node_groups`` (schema 6), 16
  siblings to a row: the row of parent node (level, idx) holds its 16
  children, each as its sum (32 bytes) and count (8 bytes, signed),
  big-endian; a child that holds nothing is all zeros. The root is the sum
  of level 1. A bulk write rewrites at most 273 rows this way.
* A write that changes few leaves (nodes of the deepest stored level: at
  most ``JOURNAL_LEAVES``) leaves the groups as they are and appends one row
  to ``node_log`` instead: the new sum and count of each leaf it changed, 42
  bytes a leaf. Its transaction writes the journal's last page rather than
  one page per group it touched (a follower's frame of four entries touched
  ~8 of them). The stored tree is the groups with the journal replayed over
  them in order: each leaf set, its ancestors summed again from their
  children.
* The journal is folded into the groups (every group it touched written,
  its rows deleted) by the next write that changes more leaves, or once it
  holds ``JOURNAL_ROWS`` rows. Groups and journal are written in the
  transaction of the items they describe, so together they match the items
  whatever moment a crash comes at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from merkle.tree import FANOUT, FANOUT_BITS, MOD, STORED_LEVELS

#: (level, idx) -> [sum, count] of the nodes of one collection
NodeSums = dict[tuple[int, int], list[int]]
#: bytes of one child in a group row: its sum and its count
CHILD_BYTES = 40
GROUP_BYTES = FANOUT * CHILD_BYTES
#: bytes of one leaf in a journal row: its index, sum and count
LEAF_BYTES = 42
#: a write changing more leaves than this writes the groups (and folds)
JOURNAL_LEAVES = 32
#: journal rows of one collection at which the next write folds it
JOURNAL_ROWS = 512

_U64 = (1 << 64) - 1
_EMPTY_CHILD = bytes(CHILD_BYTES)

CREATE = ["""
    CREATE TABLE node_groups (
        coll INTEGER NOT NULL,
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        sums BLOB NOT NULL,
        PRIMARY KEY (coll, level, idx)
    ) WITHOUT ROWID""", """
    CREATE TABLE node_log (
        id INTEGER PRIMARY KEY,
        coll INTEGER NOT NULL,
        leaves BLOB NOT NULL
    )"""]


def child_bytes(total: int, count: int) -> bytes:
    """One child's 40 bytes of a group row (the count in two's complement)."""
    return (total << 64 | count & _U64).to_bytes(CHILD_BYTES, "big")


def pack_group(nodes: NodeSums, level: int, idx: int) -> bytes:
    """The row of node (level, idx)'s children, from ``nodes``."""
    child = level + 1
    base = idx << FANOUT_BITS
    get = nodes.get
    return b"".join(_EMPTY_CHILD if (n := get((child, c))) is None else child_bytes(n[0], n[1])
                    for c in range(base, base + FANOUT))


def _unpack_group(nodes: NodeSums, level: int, idx: int, data: bytes) -> None:
    """Add the children a group row holds (those holding something) to
    ``nodes``; a row of another size (a damaged file) adds nothing, and
    verification finds the difference."""
    if len(data) != GROUP_BYTES:
        return
    child = level + 1
    base = idx << FANOUT_BITS
    as_int = int.from_bytes
    for c in range(FANOUT):
        at = c * CHILD_BYTES
        total = as_int(data[at:at + 32], "big")
        count = as_int(data[at + 32:at + CHILD_BYTES], "big", signed=True)
        if total or count:
            nodes[(child, base + c)] = [total, count]


class Stored(NamedTuple):
    """A collection's stored tree, as :func:`load` read it."""

    nodes: NodeSums
    #: rows in its journal
    journal_rows: int
    #: the group rows that the journal makes out of date (by parent node)
    stale: set[tuple[int, int]]


def load(conn: sqlite3.Connection, cid: int) -> Stored:
    """The stored tree of collection ``cid``: groups, then the journal."""
    nodes: NodeSums = {}
    for level, idx, data in conn.execute(
            "SELECT level, idx, sums FROM node_groups WHERE coll=?", (cid,)):
        _unpack_group(nodes, level, idx, bytes(data))
    rows = 0
    leaves: set[int] = set()
    as_int = int.from_bytes
    for (data,) in conn.execute("SELECT leaves FROM node_log WHERE coll=? ORDER BY id", (cid,)):
        rows += 1
        data = bytes(data)
        for at in range(0, len(data) - LEAF_BYTES + 1, LEAF_BYTES):
            v = as_int(data[at:at + LEAF_BYTES], "big")
            idx = v >> 320
            count = v & _U64
            nodes[(STORED_LEVELS, idx)] = [v >> 64 & (MOD - 1),
                                           count - (1 << 64) if count >> 63 else count]
            leaves.add(idx)
    stale: set[tuple[int, int]] = set()
    touched = leaves
    for level in range(STORED_LEVELS - 1, 0, -1):
        parents = {i >> FANOUT_BITS for i in touched}
        stale.update((level, p) for p in parents)
        for p in parents:
            kids = [n for c in range(p << FANOUT_BITS, (p + 1) << FANOUT_BITS)
                    if (n := nodes.get((level + 1, c))) is not None]
            nodes[(level, p)] = [sum(n[0] for n in kids) % MOD, sum(n[1] for n in kids)]
        touched = parents
    if leaves:
        stale.add((0, 0))
    top = [n for c in range(FANOUT) if (n := nodes.get((1, c))) is not None]
    if top:
        nodes[(0, 0)] = [sum(n[0] for n in top) % MOD, sum(n[1] for n in top)]
    return Stored(nodes, rows, stale)


def load_nodes(conn: sqlite3.Connection, cid: int) -> NodeSums:
    return load(conn, cid).nodes


def write_groups(conn: sqlite3.Connection, cid: int,
                 rows: Iterable[tuple[tuple[int, int], bytes | bytearray]]) -> None:
    conn.executemany(  # rows from a generator: each freed once bound
        "INSERT OR REPLACE INTO node_groups VALUES (?,?,?,?)",
        ((cid, level, idx, bytes(data)) for (level, idx), data in rows))


def append_journal(conn: sqlite3.Connection, cid: int,
                   leaves: list[tuple[int, int, int]]) -> None:
    """One journal row: the new (idx, sum, count) of each leaf changed."""
    conn.execute("INSERT INTO node_log (coll, leaves) VALUES (?, ?)", (cid, b"".join(
        (idx << 320 | total << 64 | count & _U64).to_bytes(LEAF_BYTES, "big")
        for idx, total, count in leaves)))


def clear_journal(conn: sqlite3.Connection, cid: int) -> None:
    conn.execute("DELETE FROM node_log WHERE coll=?", (cid,))


def group_rows(nodes: NodeSums) -> list[tuple[tuple[int, int], bytes]]:
    """Every group row of ``nodes`` (one per parent of a node it holds)."""
    parents = {(level - 1, idx >> FANOUT_BITS) for level, idx in nodes if level}
    return [(p, pack_group(nodes, *p)) for p in sorted(parents)]


def replace(conn: sqlite3.Connection, cid: int, nodes: NodeSums) -> None:
    """Store ``nodes`` as the whole tree of ``cid`` (no journal)."""
    conn.execute("DELETE FROM node_groups WHERE coll=?", (cid,))
    clear_journal(conn, cid)
    write_groups(conn, cid, group_rows(nodes))


def from_rows(conn: sqlite3.Connection) -> None:
    """Schema 6: the node sums of schemas 1-5 (one row per node, in
    ``nodes``) into groups; the journal starts empty."""
    for sql in CREATE:
        conn.execute(sql)
    for (cid,) in conn.execute("SELECT DISTINCT coll FROM nodes").fetchall():
        write_groups(conn, cid, group_rows({
            (level, idx): [int.from_bytes(total, "big"), count]
            for level, idx, total, count in conn.execute(
                "SELECT level, idx, total, count FROM nodes WHERE coll=?", (cid,))}))
    conn.execute("DROP TABLE nodes")
