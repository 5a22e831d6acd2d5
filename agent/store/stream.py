"""A follower's side of change-log streaming in SQLite: its applied position
in the leader's log, and applying the leader's entries; and the leader's
read of its own log as stored bytes. Runs on the store thread, inside the
transaction the store opened (see :mod:`agent.store.store`).

Rules:

* The applied position is the leader's ``(epoch, seq, hash)`` of the last
  entry applied here, kept in the one row of ``upstream`` (schema 4) with the
  highest leader epoch seen. No row: nothing applied yet, ``(0, 0,
  GENESIS)``.
* :func:`apply` verifies a batch against the applied position first
  (:func:`agent.core.changelog.verify_chain`, and the hash the leader says
  the batch ends with): a batch that does not continue the chain is refused
  whole (:class:`~agent.core.changelog.ChainBroken`) and nothing changes.
* A verified batch is applied through the one change path, as remote items
  are (:meth:`agent.store.writer.Writer.apply_remote`: validated, last writer
  wins, refused below the tombstone horizon) and REMOVE entries as stale
  drops of exactly that version; the new applied position is written in the
  same transaction, so a restart resumes from what was kept. Applying also
  appends to this agent's own log (its own chain, its own seq): the applied
  position is a separate record, in the leader's coordinates.
* An entry the store refuses (too large, too far in the future, below the
  horizon) is counted, logged by ``apply_remote``, and passed: the position
  still moves past it, as Merkle sync passes a refused item.
"""

from __future__ import annotations

import sqlite3
from itertools import groupby

from agent.core.changelog import GENESIS, ChainBroken, LogEntry, Op, Position, verify_chain
from agent.store.writer import Writer
from merkle.tree import Item

NOTHING = Position(0, 0, GENESIS)


def position(conn: sqlite3.Connection) -> tuple[Position, int]:
    """(the applied position, the highest leader epoch seen)."""
    row = conn.execute("SELECT epoch, seq, hash, epoch_seen FROM upstream WHERE id=0").fetchone()
    if row is None:
        return NOTHING, 0
    return Position(row[0], row[1], bytes(row[2])), row[3]


def _save(conn: sqlite3.Connection, pos: Position, epoch_seen: int) -> None:
    conn.execute("INSERT OR REPLACE INTO upstream VALUES (0, ?, ?, ?, ?)",
                 (pos.epoch, pos.seq, pos.hash, epoch_seen))


def adopt(w: Writer, pos: Position) -> None:
    """Take ``pos`` as the applied position without applying entries (after
    this agent caught up with the leader some other way: Merkle sync)."""
    _, seen = position(w.conn)
    _save(w.conn, pos, max(seen, pos.epoch))


def see_epoch(w: Writer, epoch: int) -> None:
    """Remember a leader epoch (only ever raises it)."""
    pos, seen = position(w.conn)
    if epoch > seen:
        _save(w.conn, pos, epoch)


def apply(w: Writer, entries: list[LogEntry],
          last_hash: bytes | None = None) -> tuple[Position, int]:
    """Verify and apply a batch of the leader's entries; returns (the new
    applied position, how many entries the store refused). Raises
    ChainBroken (nothing applied) if they do not continue the chain."""
    pos, seen = position(w.conn)
    if not entries:
        return pos, 0
    end = verify_chain(entries, pos.hash, pos.seq)
    if last_hash is not None and end != last_hash:
        raise ChainBroken(entries[-1].seq, "the batch does not end at the hash the leader sent")
    refused = 0
    # Consecutive entries of one collection and one kind go in one change;
    # order is kept, so a later entry for a key sees the earlier one.
    for (name, removing), run in groupby(entries, key=lambda e: (e.collection, e.op is Op.REMOVE)):
        group = list(run)
        if removing:
            w.drop_stale(name, [Item(e.key, e.hlc, e.origin, True, None, e.value or b"")
                                for e in group])
        else:
            items = [Item(e.key, e.hlc, e.origin, e.op is Op.TOMBSTONE, e.value) for e in group]
            _, rejected = w.apply_remote(name, items)
            refused += rejected
    new = entries[-1].position
    _save(w.conn, new, max(seen, new.epoch))
    return new, refused


def read_raw(conn: sqlite3.Connection, after_seq: int, limit: int,
             max_bytes: int) -> list[tuple[int, bytes]]:
    """The leader's entries after ``after_seq`` as stored, (seq, canonical
    bytes), at most ``limit`` of them and, beyond the first, at most
    ``max_bytes`` in all."""
    out: list[tuple[int, bytes]] = []
    size = 0
    for seq, data in conn.execute(
            "SELECT seq, entry FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, max(0, limit))):
        size += len(data)
        if out and size > max_bytes:
            break
        out.append((seq, bytes(data)))
    return out


def hash_at(w: Writer, seq: int) -> bytes | None:
    """The hash of this agent's own log entry ``seq`` (None if it holds none)."""
    if seq == w.log.floor.seq:
        return w.log.floor.hash
    got = w.log.read(w.conn, seq - 1, 1)
    return got[0].hash if got and got[0].seq == seq else None
