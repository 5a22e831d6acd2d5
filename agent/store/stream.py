"""A follower's side of change-log streaming in SQLite: its applied position
in the leader's log, and applying the leader's entries; and the leader's
read of its own log as stored bytes. Runs on the store thread, inside the
transaction the store opened (see :mod:`agent.store.store`).

Rules:

* The applied position is the leader's ``(epoch, seq, hash)`` of the last
  entry applied here, kept in the one row of ``upstream`` (schema 4) with the
  highest leader epoch seen. No row: nothing applied yet, ``(0, 0,
  GENESIS)``. The writer mirrors the two (``Writer.applied``): written
  after the row, dropped by a reload, so a batch need not read them back.
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
* ``upstream`` also keeps the leader of the highest epoch seen (its address,
  the id of the log the applied position is in): a restarted follower finds
  the leader it last followed, a deposed leader stays deposed.
* A snapshot being installed is one row of ``snapshot_progress`` (schema 5):
  the position it was taken at, the roots announced, the last (collection,
  key) kept, the digest sums of what was received and the last chunk's
  hash. :func:`apply_chunk` writes the chunk's items (last writer wins, as
  Merkle sync does: rows of this agent's own stay; a stored item of the same
  version but other content, which only corruption or a refused snapshot
  leaves, is replaced) and the progress in one transaction;
  :func:`finish_snapshot` records the snapshot's position as applied and
  drops the progress in one transaction.
* The leader reads a snapshot through :class:`SnapshotReader`: its own
  read-only connection holding one read transaction (WAL: the writer goes on
  committing meanwhile and never waits for it), read in bounded chunks.
* :func:`promote` raises this agent's log epoch to one above every epoch it
  has seen and records it as the highest seen, in one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from agent.core.changelog import (
    GENESIS,
    ChainBroken,
    LogEntry,
    Op,
    Position,
    decode,
    verify_chain,
)
from agent.core.replication import Root, RootSums
from agent.store.nodes import load_nodes
from agent.store.schema import ITEM_COLUMNS, row_item
from agent.store.values import StoreError
from agent.store.writer import Writer
from merkle.tree import Item

NOTHING = Position(0, 0, GENESIS)
REMOVE, TOMBSTONE = Op.REMOVE, Op.TOMBSTONE


@dataclass(frozen=True)
class Upstream:
    """What ``upstream`` holds."""

    applied: Position
    epoch_seen: int
    leader: str  # the address of the leader of epoch_seen ("" unknown)
    log_id: bytes  # the leader whose log ``applied`` is in (b"" unknown)


def upstream(conn: sqlite3.Connection) -> Upstream:
    row = conn.execute("SELECT epoch, seq, hash, epoch_seen, leader, log_id FROM upstream "
                       "WHERE id=0").fetchone()
    if row is None:
        return Upstream(NOTHING, 0, "", b"")
    return Upstream(Position(row[0], row[1], bytes(row[2])), row[3], row[4], bytes(row[5]))


def position(conn: sqlite3.Connection) -> tuple[Position, int]:
    """(the applied position, the highest leader epoch seen)."""
    u = upstream(conn)
    return u.applied, u.epoch_seen


def _applied(w: Writer) -> tuple[Position, int]:
    """:func:`position`, from the writer's mirror of it (read from the
    table once after each reload, then kept by :func:`_save`)."""
    if w.applied is None:
        w.applied = position(w.conn)
    return w.applied


def _save(w: Writer, pos: Position, epoch_seen: int,
          leader: str | None = None, log_id: bytes | None = None) -> None:
    """Write the applied position and the highest epoch seen, and the leader
    and log id when given (else they stay as stored: '' and b'' when there
    is no row yet), then the mirror (after the row, as writer.py says)."""
    sets, args = "epoch=?, seq=?, hash=?, epoch_seen=?", [pos.epoch, pos.seq, pos.hash, epoch_seen]
    if leader is not None:
        sets += ", leader=?"
        args.append(leader)
    if log_id is not None:
        sets += ", log_id=?"
        args.append(log_id)
    if w.conn.execute(f"UPDATE upstream SET {sets} WHERE id=0", args).rowcount == 0:
        w.conn.execute("INSERT INTO upstream (id, epoch, seq, hash, epoch_seen, leader, log_id) "
                       "VALUES (0, ?, ?, ?, ?, ?, ?)",
                       (pos.epoch, pos.seq, pos.hash, epoch_seen,
                        "" if leader is None else leader, b"" if log_id is None else log_id))
    w.applied = (pos, epoch_seen)


def adopt(w: Writer, pos: Position) -> None:
    """Take ``pos`` as the applied position without applying entries (after
    this agent caught up with the leader some other way: Merkle sync)."""
    _, seen = _applied(w)
    _save(w, pos, max(seen, pos.epoch))


def see_epoch(w: Writer, epoch: int, leader: str | None = None,
              log_id: bytes | None = None) -> bool:
    """Remember a leader epoch (only ever raises it) and, for the highest,
    its leader's address and log id. Returns whether anything changed."""
    u = upstream(w.conn)
    if epoch < u.epoch_seen:
        return False
    if epoch == u.epoch_seen and (leader is None or leader == u.leader) \
            and (log_id is None or log_id == u.log_id):
        return False
    _save(w, u.applied, epoch, leader, log_id)
    return True


def promote(w: Writer, me: str) -> int:
    """Make this agent's log epoch one above every epoch it has seen (its
    own log's and its leaders'), recorded as the highest seen with itself
    as its leader, in one transaction. Returns the new epoch."""
    u = upstream(w.conn)
    epoch = max(u.epoch_seen, w.log.epoch, w.log.head.epoch) + 1
    w.conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_epoch', ?)", (epoch,))
    w.log.epoch = epoch
    _save(w, u.applied, epoch, me)
    return epoch


def log_epoch(w: Writer) -> int:
    """The epoch this agent stamps on its own new entries."""
    return w.log.epoch


# --- snapshots ------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """A snapshot being installed (one row of ``snapshot_progress``)."""

    at: Position
    log_id: bytes
    roots: tuple[Root, ...]
    #: the last (collection, key) kept; None before the first chunk
    last: tuple[str, str] | None
    sums: RootSums
    chunk_hash: bytes  # of the last chunk applied (GENESIS: none yet)
    next_index: int
    items: int  # received in all runs


def progress(conn: sqlite3.Connection) -> Progress | None:
    row = conn.execute("SELECT state FROM snapshot_progress WHERE id=0").fetchone()
    if row is None:
        return None
    (e, s, h, log_id, roots, last, sums, chash, nxt, items) = msgpack.unpackb(row[0])
    return Progress(Position(e, s, h), log_id,
                    tuple(Root(n, int.from_bytes(t, "big"), c) for n, t, c in roots),
                    None if last is None else (last[0], last[1]),
                    RootSums({n: (int.from_bytes(t, "big"), c) for n, t, c in sums}),
                    chash, nxt, items)


def _save_progress(conn: sqlite3.Connection, p: Progress) -> None:
    state = msgpack.packb([
        *p.at, p.log_id, [[r.name, r.total.to_bytes(32, "big"), r.count] for r in p.roots],
        None if p.last is None else list(p.last),
        [[n, t.to_bytes(32, "big"), c] for n, (t, c) in sorted(p.sums.sums.items())],
        p.chunk_hash, p.next_index, p.items], use_bin_type=True)
    conn.execute("INSERT OR REPLACE INTO snapshot_progress VALUES (0, ?)", (state,))


def begin_snapshot(w: Writer, at: Position, log_id: bytes, roots: tuple[Root, ...],
                   resumed: Progress | None) -> Progress:
    """Start installing a snapshot (or a resumed run of ``resumed``): a run
    verifies against its own roots, so the sums start afresh; the chunk
    chain starts again at GENESIS."""
    p = Progress(at, log_id, roots, resumed.last if resumed else None, RootSums(), GENESIS, 0,
                 resumed.items if resumed else 0)
    _save_progress(w.conn, p)
    return p


def apply_chunk(w: Writer, p: Progress, collection: str, items: list[Item],
                chash: bytes) -> tuple[Progress, int]:
    """Apply one chunk's items (last writer wins) and record how far the
    snapshot got, in one transaction. Returns (the new progress, items the
    store refused)."""
    # The leader's item replaces one of the same version but other content
    # (only corruption makes such a pair, e.g. what a refused snapshot left).
    clash = [old for it in items if (old := w.get(collection, it.key)) is not None
             and (old.hlc, old.origin) == (it.hlc, it.origin) and old.digest != it.digest]
    if clash:
        w.drop_stale(collection, clash)
    _, refused = w.apply_remote(collection, items) if items else ([], 0)
    sums = RootSums(p.sums.sums)
    for it in items:
        sums.add(collection, it.digest)
    last = (collection, items[-1].key) if items else p.last
    new = Progress(p.at, p.log_id, p.roots, last, sums, chash, p.next_index + 1,
                   p.items + len(items))
    _save_progress(w.conn, new)
    return new, refused


def finish_snapshot(w: Writer, p: Progress, leader: str) -> None:
    """The snapshot is installed: its position is the applied one."""
    w.conn.execute("DELETE FROM snapshot_progress")
    u = upstream(w.conn)
    _save(w, p.at, max(u.epoch_seen, p.at.epoch), leader, p.log_id)


def drop_snapshot(w: Writer) -> None:
    """Forget a snapshot being installed (its items stay: last writer wins)."""
    w.conn.execute("DELETE FROM snapshot_progress")


class SnapshotReader:
    """A snapshot of every collection as of one read transaction on a
    read-only connection of its own: the writer keeps committing meanwhile.
    Not thread-safe: call from one thread at a time (the runtime calls it
    through ``anyio.to_thread``). Close it to end the read transaction."""

    def __init__(self, path: Path, after: tuple[str, str] | None = None) -> None:
        try:
            self._open(path, after)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read a snapshot of {path}: {e}") from None

    def _open(self, path: Path, after: tuple[str, str] | None) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute("BEGIN")
        self.after = after
        # The first read fixes the transaction's view: the position and the
        # roots below are those of the items read after.
        row = self.conn.execute("SELECT entry FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            self.at = decode(bytes(row[0])).position
        else:
            meta = dict(self.conn.execute(
                "SELECT k, v FROM meta WHERE k IN ('log_epoch', 'log_floor')").fetchall())
            raw = meta.get("log_floor")
            if raw is None:
                self.at = Position(int(meta.get("log_epoch", 1)), 0, GENESIS)
            else:
                e, s, h = msgpack.unpackb(raw)
                self.at = Position(e, s, h)
        self.colls = [(cid, name) for cid, name in self.conn.execute(
            "SELECT id, name FROM collections ORDER BY name")
            if after is None or name >= after[0]]
        self.roots = tuple(self._root(cid, name) for cid, name in self.colls)

    def _root(self, cid: int, name: str) -> Root:
        if self.after is None or name != self.after[0]:
            total, count = load_nodes(self.conn, cid).get((0, 0), (0, 0))
            return Root(name, total, count)
        sums = RootSums()
        for (digest,) in self.conn.execute("SELECT digest FROM items WHERE coll=? AND key > ?",
                                           (cid, self.after[1])):
            sums.add(name, bytes(digest))
        total, count = sums.sums.get(name, (0, 0))
        return Root(name, total, count)

    def chunks(self, max_items: int, max_bytes: int) -> Iterator[tuple[str, list[Item]]]:
        """(collection, items in key order) of at most ``max_items`` items
        and, beyond the first, ``max_bytes`` bytes of values. StoreError if
        the file cannot be read."""
        try:
            yield from self._chunks(max_items, max_bytes)
        except sqlite3.Error as e:
            raise StoreError(f"reading a snapshot: {e}") from None

    def _chunks(self, max_items: int, max_bytes: int) -> Iterator[tuple[str, list[Item]]]:
        for cid, name in self.colls:
            key = self.after[1] if self.after is not None and name == self.after[0] else None
            while True:
                if key is None:
                    rows = self.conn.execute(
                        f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=? ORDER BY key LIMIT ?",
                        (cid, max_items)).fetchall()
                else:
                    rows = self.conn.execute(
                        f"SELECT {ITEM_COLUMNS} FROM items WHERE coll=? AND key > ? "
                        "ORDER BY key LIMIT ?", (cid, key, max_items)).fetchall()
                if not rows:
                    break
                out: list[Item] = []
                size = 0
                for r in rows:
                    size += len(r[4] or b"") + len(r[0])
                    if out and size > max_bytes:
                        break
                    out.append(row_item(r[0], r[1], bytes(r[2]), r[3],
                                        None if r[4] is None else bytes(r[4]), bytes(r[5])))
                key = out[-1].key
                yield name, out

    def close(self) -> None:
        self.conn.close()


def apply(w: Writer, entries: list[LogEntry], last_hash: bytes | None = None,
          hashed: bool = False) -> tuple[Position, int]:
    """Verify and apply a batch of the leader's entries; returns (the new
    applied position, how many entries the store refused). Raises
    ChainBroken (nothing applied) if they do not continue the chain.
    ``hashed``: the entries come straight from
    :func:`agent.core.changelog.decode`, which computed each hash from the
    entry's bytes, so the chain check need not hash them again."""
    pos, seen = _applied(w)
    if not entries:
        return pos, 0
    end = verify_chain(entries, pos.hash, pos.seq, rehash=not hashed)
    if last_hash is not None and end != last_hash:
        raise ChainBroken(entries[-1].seq, "the batch does not end at the hash the leader sent")
    refused = 0
    # Consecutive entries of one collection and one kind go in one change;
    # order is kept, so a later entry for a key sees the earlier one.
    start = 0
    while start < len(entries):
        name, removing = entries[start].collection, entries[start].op is REMOVE
        stop = start + 1
        while stop < len(entries) and entries[stop].collection == name \
                and (entries[stop].op is REMOVE) == removing:
            stop += 1
        group = entries[start:stop]
        start = stop
        # Fields by unpacking: LogEntry is a tuple (epoch, seq, prev_hash,
        # hash, origin, hlc, collection, key, op, value).
        if removing:
            w.drop_stale(name, [Item(key, hlc, origin, True, None, value or b"")
                                for _, _, _, _, origin, hlc, _, key, _, value in group])
        else:
            items = [Item(key, hlc, origin, op is TOMBSTONE, value)
                     for _, _, _, _, origin, hlc, _, key, op, value in group]
            _, rejected = w.apply_remote(name, items)
            refused += rejected
    new = entries[-1].position
    _save(w, new, max(seen, new.epoch))
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
