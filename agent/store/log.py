"""The change log in SQLite: appended by the change path, read by position,
compacted by the retention policy.

Rules:

* :meth:`ChangeLog.append` is called by :func:`agent.store.changes.change`
  only, inside the caller's transaction, one entry per change: the log and
  the items commit or roll back together. Entries are hashed as
  :mod:`agent.core.changelog` says (the same bytes, written out inline here
  because it runs once per item on bulk writes; the tests verify every
  appended chain with the core's :func:`~agent.core.changelog.verify_chain`).
* The head (the position of the last entry) is mirrored in memory; after a
  rollback the writer calls :meth:`ChangeLog.reload`, as it does for the node
  sums.
* The rows in the table are always exactly the entries after the *floor*:
  the position of the newest compacted entry (``(epoch, 0, GENESIS)`` before
  any compaction), kept in ``meta`` as ``log_floor``. Compaction deletes a
  prefix, so the chain stays verifiable from the floor's hash.
* ``log_epoch`` in ``meta`` is the epoch stamped on new entries: 1 until a
  leader change raises it (the raising is not done here).
* A row is ``(seq, entry, at)``: ``entry`` holds the entry's canonical bytes
  (epoch, seq, prev_hash, origin, hlc, collection, key, op, value), so they
  are hashed once, stored once and can be sent as they are; the hash is
  blake3 of them, recomputed when read (never stored, so it cannot disagree).
* Each row records ``at``, the wall time (Unix ms) it was appended, for the
  age limit. It is local bookkeeping: not part of the entry, not hashed.
* What a transaction appended is also kept in memory, (seq, bytes), until
  the store takes it after COMMIT (:meth:`ChangeLog.take_appended`); a
  rollback drops what it undid (:meth:`ChangeLog.reload`). The store hands
  it to the event loop's :class:`RecentLog`, the newest entries within a
  bound, from which a leader streams live entries without a read on the
  store thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgpack
from blake3 import blake3

from agent.core.changelog import (
    FORMAT,
    GENESIS,
    LogEntry,
    Op,
    Position,
    Retention,
    decode,
    packer,
)

if TYPE_CHECKING:
    from merkle.tree import Item

#: (key, old version, new version): what the change path reports per change
#: (agent.store.changes.Change is one; the log does not import it, so the
#: change path can import the log)
ChangeRow = tuple[str, "Item | None", "Item | None"]

#: entries deleted per compaction transaction at most
COMPACT_BATCH = 10_000
#: a connected follower's need (``min_needed_seq``) holds compaction back only
#: while the log stays within this many times the entry limit (HOLD_ENTRIES
#: when there is no entry limit); a follower further behind than that gets a
#: snapshot instead, so one stalled follower cannot fill the disk.
HOLD_FACTOR = 2
HOLD_ENTRIES = 1_000_000
#: entries one read returns at most
READ_MAX = 10_000

_PUT, _TOMBSTONE, _REMOVE = int(Op.PUT), int(Op.TOMBSTONE), int(Op.REMOVE)


def hold_bound(retain: Retention) -> int:
    """How many entries the log may grow to while a follower holds it back."""
    return HOLD_FACTOR * retain.entries if retain.entries is not None else HOLD_ENTRIES


class ChangeLog:
    """The store thread's view of the log: epoch, head and floor."""

    def __init__(self, conn: sqlite3.Connection, wall: Callable[[], int]) -> None:
        self.wall = wall
        self.epoch = 1
        self.head = Position(1, 0, GENESIS)
        self.floor = Position(1, 0, GENESIS)
        #: (seq, canonical bytes) appended since the last take_appended()
        self.appended: list[tuple[int, bytes]] = []
        self.reload(conn)

    def reload(self, conn: sqlite3.Connection) -> None:
        """Reread epoch, floor and head from the database (after a rollback)."""
        meta = dict(conn.execute(
            "SELECT k, v FROM meta WHERE k IN ('log_epoch', 'log_floor')").fetchall())
        self.epoch = int(meta.get("log_epoch", 1))
        raw = meta.get("log_floor")
        if raw is None:
            self.floor = Position(self.epoch, 0, GENESIS)
        else:
            epoch, seq, hash_ = msgpack.unpackb(raw)
            self.floor = Position(epoch, seq, hash_)
        row = conn.execute("SELECT entry FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        self.head = decode(row[0]).position if row else self.floor
        # A rollback undid the newest appends: they were never committed.
        while self.appended and self.appended[-1][0] > self.head.seq:
            self.appended.pop()

    def take_appended(self) -> list[tuple[int, bytes]]:
        """What was appended since the last call (call after COMMIT)."""
        out, self.appended = self.appended, []
        return out

    def append(self, conn: sqlite3.Connection, collection: str,
               changes: Sequence[ChangeRow]) -> None:
        """One entry per change, chained to the head, in the current transaction."""
        epoch = self.epoch
        seq = self.head.seq
        prev = self.head.hash
        at = self.wall()
        pack = packer().pack
        rows: list[tuple[int, bytes]] = []
        add = rows.append
        for key, old, new in changes:
            # One field at a time (a 4-tuple assignment builds a tuple per entry).
            if new is not None:
                origin = new.origin
                hlc = new.hlc
                if new.deleted:
                    op = _TOMBSTONE
                    value = None
                else:
                    op = _PUT
                    value = new.value
            else:
                assert old is not None
                op = _REMOVE
                origin = old.origin
                hlc = old.hlc
                value = old.digest
            seq += 1
            # The canonical bytes of agent.core.changelog.encode, inline.
            data = pack([FORMAT, epoch, seq, prev, origin, hlc, collection, key, op, value])
            add((seq, data))
            prev = blake3(data).digest()
        # Rows with ``at`` from a generator: each is freed once bound (one
        # container per entry less for the cyclic garbage collector).
        conn.executemany("INSERT INTO log VALUES (?,?,?)", ((s, d, at) for s, d in rows))
        self.head = Position(epoch, seq, prev)
        self.appended.extend(rows)

    def read(self, conn: sqlite3.Connection, after_seq: int, limit: int) -> list[LogEntry]:
        """Up to ``limit`` (at most READ_MAX) entries after ``after_seq``, in order.
        Entries at or below the floor are gone: the answer then starts above it."""
        return [decode(data) for data, in conn.execute(
            "SELECT entry FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, max(0, min(limit, READ_MAX))))]

    def compact(self, conn: sqlite3.Connection, retain: Retention, now_ms: int,
                min_needed_seq: int | None = None, batch: int = COMPACT_BATCH) -> int:
        """Delete up to ``batch`` of the oldest entries beyond ``retain``, never
        the newest one, and none at or after ``min_needed_seq`` while the log
        stays within :func:`hold_bound`. Moves the floor to the last deleted
        entry. Returns how many were deleted (``batch``: call again)."""
        floor, head = self.floor.seq, self.head.seq
        cut = floor
        if retain.entries is not None:
            cut = max(cut, head - retain.entries)
        if retain.age_s is not None and cut < floor + batch:
            # Entries are appended in time order (near enough: ``at`` is the
            # wall clock), so the old ones are a prefix: scan at most one batch.
            young_from = now_ms - int(retain.age_s * 1000)
            for seq, at in conn.execute(
                    "SELECT seq, at FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
                    (floor, batch)):
                if at >= young_from:
                    break
                cut = max(cut, seq)
        cut = min(cut, head - 1, floor + batch)
        if min_needed_seq is not None and head - (min_needed_seq - 1) <= hold_bound(retain):
            cut = min(cut, min_needed_seq - 1)
        if cut <= floor:
            return 0
        [data] = conn.execute("SELECT entry FROM log WHERE seq=?", (cut,)).fetchone()
        conn.execute("DELETE FROM log WHERE seq <= ?", (cut,))
        self.floor = decode(data).position
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_floor', ?)",
                     (msgpack.packb(list(self.floor)),))
        return cut - floor


#: entries and bytes a :class:`RecentLog` keeps at most
RECENT_ENTRIES = 16_384
RECENT_BYTES = 4 << 20


class RecentLog:
    """The newest committed entries, (seq, canonical bytes), in memory: the
    event loop's copy, fed by the store after each commit, read by the
    leader without a round trip to the store thread. Holds at most
    ``max_entries`` entries and ``max_bytes`` bytes (the oldest go first;
    none until :meth:`keep` says how many: only a leader needs them); a read
    it cannot answer whole answers None (read the table instead)."""

    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        self.keep(max_entries, max_bytes)

    def keep(self, max_entries: int = RECENT_ENTRIES, max_bytes: int = RECENT_BYTES) -> None:
        """Hold up to this many entries and bytes from the next commit on."""
        self.clear()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # A list read by index from ``_start`` (dropping the oldest moves the
        # start; the list is cut when half of it is dropped ones).
        self._rows: list[tuple[int, bytes]] = []
        self._start = 0
        self._bytes = 0

    def add(self, rows: list[tuple[int, bytes]]) -> None:
        """Entries just committed, in log order."""
        if not rows or not self.max_entries:
            return
        held = self._rows
        if len(held) > self._start and rows[0][0] != held[-1][0] + 1:
            self.clear()  # not a continuation of what is held: start again
            held = self._rows
        held.extend(rows)
        self._bytes += sum(len(r[1]) for r in rows)
        while len(held) - self._start > self.max_entries or self._bytes > self.max_bytes:
            self._bytes -= len(held[self._start][1])
            self._start += 1
        if self._start > len(held) // 2:
            del held[:self._start]
            self._start = 0

    def clear(self) -> None:
        self._rows = []
        self._start = 0
        self._bytes = 0

    def read(self, after_seq: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]] | None:
        """As agent.store.stream.read_raw: the entries after ``after_seq``, at
        most ``limit`` and, beyond the first, ``max_bytes`` bytes in all;
        None if the first of them is not held."""
        held, start = self._rows, self._start
        if len(held) <= start or limit <= 0:
            return None
        i = start + after_seq + 1 - held[start][0]
        if not start <= i < len(held):
            return None
        out: list[tuple[int, bytes]] = []
        size = 0
        for row in held[i:i + limit]:
            size += len(row[1])
            if out and size > max_bytes:
                break
            out.append(row)
        return out
