"""The async face of the store: one thread owns the writing connection;
callers in the event loop queue typed operations and await their result.

Rules:

* The thread drains whatever is queued into one transaction (group commit),
  each operation in its own SAVEPOINT so that one failing operation does not
  undo the others. Waiters are woken once per batch.
* A failure outside any one operation (a bug in the store's own code) rolls
  the whole batch back, rereads the mirrors and fails every operation of the
  batch: no write is acknowledged that was not kept.
* Operations are the methods below; there is no way to run arbitrary code on
  the store thread except a read-only tree view (:meth:`Store.with_tree`).
* Reads (get, list, verify without repair, tree views) run on the same thread
  but outside any write transaction: they need no disk space, so they keep
  working on a full disk, and they see every commit before them (a client
  that got an answer to a write reads it back).
* A full disk refuses writes with :class:`StorageFull` (logged once, not per
  request); the next batch simply tries again, so writes come back by
  themselves when space returns. A damaged file found at run time answers
  :class:`StoreCorrupt` (the start-up check moves such a file aside).
* Every method is a checkpoint; a cancelled call may still be carried out (it
  was queued) but nothing is left half-done.
* :meth:`Store.digests` answers from the state of the last commit, without a
  query, so the event loop can read it at any time.
* So does :attr:`Store.recent_log`: the newest committed log entries
  (agent.store.log.RecentLog), handed to the event loop after each commit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import sniffio

from agent.core.changelog import LogEntry, Position, Retention
from agent.core.clock import HLC
from agent.store import stream
from agent.store.check import CheckResult, check_at_start, is_corrupt, is_full, set_aside
from agent.store.checkpoint import WAL_SAFETY_PAGES, Checkpointer
from agent.store.log import COMPACT_BATCH, RecentLog
from agent.store.schema import DB_FILE
from agent.store.tree import SqliteTree
from agent.store.values import CollectionInfo, StoreError
from agent.store.writer import Writer
from merkle.reconcile import SendRequest, item_batches
from merkle.tree import Item

log = logging.getLogger("hs_gossip.store")

T = TypeVar("T")
#: operations per transaction at most
GROUP_MAX = 512


def wall_ms() -> int:
    """The real wall clock in Unix milliseconds, for the HLC of item versions."""
    return time.time_ns() // 1_000_000


class StorageFull(StoreError):
    """The disk holding the database is full: the write was not kept. Reads
    still work; writes work again once space is freed."""

    status = 507


class StoreCorrupt(StoreError):
    """SQLite found the database damaged while reading it."""

    status = 503


class _Op:
    __slots__ = ("error", "event", "fn", "read", "result")

    def __init__(self, fn: Callable[[Writer], Any], event: anyio.Event | None,
                 read: bool = False) -> None:
        self.fn = fn
        self.event = event
        self.read = read
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


def _compact(w: Writer, now: int, retain: Retention, min_needed_seq: int | None,
             batch: int) -> int:
    return w.compact_log(retain, now, min_needed_seq, batch)


class Store:
    """Replicated collections in SQLite. Create inside the event loop with
    :meth:`open`."""

    def __init__(self, data_dir: Path, origin: bytes, max_value: int = 1 << 20,
                 max_skew: float = 300.0, clock: Callable[[], int] | None = None,
                 ran_before: bool = False) -> None:
        self.path = data_dir / DB_FILE
        self._wall = clock or wall_ms
        self.hlc = HLC(self._wall)
        #: what the start-up check found (a damaged file is moved aside first)
        self.check: CheckResult = check_at_start(self.path, ran_before)
        problem = None
        try:
            self._writer = Writer(self.path, self.hlc, origin, max_value, max_skew, self._wall)
        except sqlite3.Error as e:
            if not is_corrupt(e):
                # Locked by another process, no permission, an I/O error: the
                # file may be healthy, so it is left where it is.
                raise StoreError(f"cannot open the database {self.path}: {e}") from None
            problem = f"{type(e).__name__} while opening: {e}"
        if problem is not None:
            # Past the check, yet unreadable: the same remedy (the failed
            # connection is gone with the exception).
            self.check = set_aside(self.path, problem)
            self._writer = Writer(self.path, self.hlc, origin, max_value, max_skew, self._wall)
        self._writer.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        self._checkpointer = Checkpointer(self.path)
        # SimpleQueue: put and get are C, no Condition to notify in Python
        # (a hand-over each way per write: its cost is per write).
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._digests: list[CollectionInfo] = self._writer.infos()
        self._wake: Callable[[Callable[[], None]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="hs-gossip-store", daemon=True)
        self.write_seconds = 0.0
        self.batches = 0
        self.ops = 0
        self.on_change: Callable[[], None] | None = None
        #: called in the event loop after every batch that wrote (the
        #: change-log stream wakes on it); never blocks the store thread
        self.commit_listeners: list[Callable[[], None]] = []
        #: the change log's head as of the last commit (no query)
        self.log_head: Position = self._writer.log.head
        #: the newest committed log entries, for the event loop (no query)
        self.recent_log = RecentLog()
        #: what the last batch committed to the log, for _notify (store thread)
        self._fresh: list[tuple[int, bytes]] = []
        #: the last write failed for lack of space (cleared by the next commit)
        self.full = False
        self.corrupt_reads = 0

    @classmethod
    async def open(cls, data_dir: Path, origin: bytes, max_value: int = 1 << 20,
                   max_skew: float = 300.0, clock: Callable[[], int] | None = None,
                   ran_before: bool = False) -> Store:
        """Check the file (see agent.store.check), then open it. ``ran_before``:
        the agent has run here before, so a missing database is news."""
        store = await anyio.to_thread.run_sync(
            lambda: cls(data_dir, origin, max_value, max_skew, clock, ran_before))
        store._wake = _waker()
        store._checkpointer.thread.start()
        store._thread.start()
        return store

    # --- thread ---------------------------------------------------------------

    def _run(self) -> None:
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
            self._fresh = []
            try:
                self._run_batch(batch)
            except BaseException as e:  # the thread must live on: callers wait on it
                self._abandon(batch, e)
            self._notify(batch)
        self._close_db()

    def _run_batch(self, batch: list[_Op]) -> None:
        # Reads first, each outside any transaction: nothing else writes this
        # file, so they see a consistent state, and they cost no disk space.
        for o in batch:
            if o.read:
                self._run_read(o)
        writes = [o for o in batch if not o.read]
        if writes:
            self._run_writes(writes)
        self.batches += 1
        self.ops += len(batch)

    def _abandon(self, batch: list[_Op], e: BaseException) -> None:
        """A failure outside any one operation (a bug, no memory): roll back
        whatever the batch left open, reread the mirrors and fail every
        operation of the batch, so that no write is acknowledged that was not
        kept (and no result is reported for a batch that broke halfway)."""
        log.error("store thread: batch failed, rolled back: %s", e, exc_info=e)
        w = self._writer
        try:
            if w.conn.in_transaction:
                w.conn.execute("ROLLBACK")
            w.reload()
            w.log.take_appended()  # nothing of it was committed
            self._fresh = []
            self._digests = w.infos()
            self.log_head = w.log.head
        except BaseException as again:
            log.error("store thread: recovering from a failed batch failed too: %s", again)
        err = StoreError(f"database operation failed: {e}")
        for o in batch:
            o.result = None
            o.error = err

    def _run_read(self, o: _Op) -> None:
        try:
            o.result = o.fn(self._writer)
        except sqlite3.Error as e:
            o.error = self._translate(e)
        except BaseException as e:  # handed to the waiting caller
            o.error = e

    def _run_writes(self, batch: list[_Op]) -> None:
        w = self._writer
        conn = w.conn
        t0 = time.perf_counter()
        start = conn.total_changes
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
                    before = conn.total_changes
                    try:
                        o.result = o.fn(w)
                    except BaseException as e:  # handed to the waiting caller
                        o.error = e
                        conn.execute(f"ROLLBACK TO op{i}")
                        if conn.total_changes != before:
                            # The mirrors may hold changes of the undone op
                            # (one that wrote no row changed none: writer.py).
                            w.reload()
                    conn.execute(f"RELEASE op{i}")
            w.save_clock()
            conn.execute("COMMIT")
            self._fresh = w.log.take_appended()
        except sqlite3.Error as e:
            # Disk full, I/O error: nothing of this batch was kept.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = self._translate(e)
            if not isinstance(err, StorageFull):
                log.error("store write failed, batch rolled back: %s", e)
            for o in batch:
                o.result = None
                if o.error is None or isinstance(o.error, sqlite3.Error):
                    o.error = err
            if conn.total_changes != start:  # else no mirror moved (a full disk at BEGIN)
                w.reload()
            w.log.take_appended()  # nothing of it was committed
        else:
            if self.full:
                self.full = False
                log.warning("storage has space again: writes are accepted")
        for o in batch:
            if isinstance(o.error, sqlite3.Error):
                o.error = self._translate(o.error)
        self.write_seconds += time.perf_counter() - t0
        self._checkpointer.dirty.set()
        self._digests = w.infos()
        self.log_head = w.log.head

    def _translate(self, e: sqlite3.Error) -> StoreError:
        """The caller's error for an SQLite failure; logged here, once per episode."""
        if is_full(e):
            if not self.full:
                self.full = True
                log.error("storage full: writes to %s are refused until space is freed "
                          "(reads, gossip and the API go on): %s", self.path, e)
            return StorageFull(f"storage full: no space left for {self.path}; writes are "
                               "refused until space is freed (reads still work)")
        if is_corrupt(e):
            self.corrupt_reads += 1
            if self.corrupt_reads == 1 or self.corrupt_reads % 1000 == 0:
                log.error("the database %s is damaged (%s, %d time(s)); restart the agent: "
                          "the start-up check moves the file aside and re-syncs from peers",
                          self.path, e, self.corrupt_reads)
            return StoreCorrupt(f"the database is damaged ({e}); restart the agent to "
                                "move it aside and re-sync from peers")
        return StoreError(f"database operation failed: {e}")

    def _close_db(self) -> None:
        """Checkpoint the WAL into the file and close; on a full disk the WAL
        stays and is replayed at the next start (nothing is lost)."""
        self._checkpointer.stop()
        conn = self._writer.conn
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("WAL checkpoint at close failed (%s); the WAL is kept and "
                        "replayed at the next start", e)
        try:
            conn.close()
        except sqlite3.Error as e:
            log.warning("closing the database failed: %s", e)

    def _run_alone(self, o: _Op) -> None:
        conn = self._writer.conn
        before = conn.total_changes
        try:
            o.result = o.fn(self._writer)
        except BaseException as e:  # handed to the waiting caller
            o.error = e
            conn.execute("ROLLBACK")
            if conn.total_changes != before:  # else it changed no mirror either
                self._writer.reload()
            conn.execute("BEGIN IMMEDIATE")

    def _notify(self, batch: list[_Op]) -> None:
        events = [o.event for o in batch if o.event is not None]
        callback = self.on_change
        listeners = list(self.commit_listeners) if any(not o.read for o in batch) else []
        fresh = self._fresh
        if self._wake is None:
            return

        def wake() -> None:
            self.recent_log.add(fresh)
            for ev in events:
                ev.set()
            if callback is not None:
                callback()
            for listener in listeners:
                listener()

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._wake(wake)

    async def _call(self, fn: Callable[[Writer], T], read: bool = False) -> T:
        """Run ``fn`` on the store thread inside a (grouped) transaction, or
        with ``read`` outside any transaction (it must not write)."""
        op = _Op(fn, anyio.Event(), read)
        self._queue.put(op)
        assert op.event is not None
        with anyio.CancelScope(shield=True):
            await op.event.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[no-any-return]

    # --- local operations -------------------------------------------------------

    async def put(self, name: str, key: str, value: Any) -> Item:
        change = await self._call(lambda w: w.put(name, key, value))
        assert change.new is not None
        return change.new

    async def put_many(self, name: str, values: dict[str, Any]) -> int:
        """Write many items in one transaction, all or nothing; returns how many changed."""
        return len(await self._call(lambda w: w.put_many(name, values)))

    async def delete(self, name: str, key: str) -> Item | None:
        """The tombstone written, or None if there was no live item."""
        change = await self._call(lambda w: w.delete(name, key))
        return None if change is None else change.new

    async def get(self, name: str, key: str) -> Item | None:
        return await self._call(lambda w: w.get(name, key), read=True)

    async def list_items(self, name: str, prefix: str = "", after: str = "",
                         limit: int = 100) -> list[Item]:
        return await self._call(lambda w: w.list_items(name, prefix, after, limit),
                                read=True)

    # --- replication ------------------------------------------------------------

    async def apply_remote(self, name: str, items: list[Item]) -> tuple[int, int]:
        """Apply items from a peer; returns (changed, rejected)."""
        changes, rejected = await self._call(lambda w: w.apply_remote(name, items))
        return len(changes), rejected

    async def purge_tombstones(self, name: str, horizon: int,
                               expected: bytes | None = None) -> int | None:
        """Tombstones purged; None if ``expected`` was given and not met."""
        gone = await self._call(lambda w: w.purge_tombstones(name, horizon, expected))
        return None if gone is None else len(gone)

    async def drop_stale(self, name: str, items: list[Item], horizon: int = 0,
                         expected: bytes | None = None) -> int:
        """How many of these exact versions were removed (see
        :meth:`Writer.drop_stale` for ``horizon`` and ``expected``)."""
        return len(await self._call(lambda w: w.drop_stale(name, items, horizon, expected)))

    async def verify(self, name: str, repair: bool = False) -> dict[str, Any]:
        report, _ = await self._call(lambda w: w.verify(name, repair), read=not repair)
        return report

    async def with_tree(self, name: str, fn: Callable[[SqliteTree], T]) -> T:
        """Run ``fn`` with a read-only view of the collection's tree, on the
        store thread (the reconciliation session reads the tree)."""
        return await self._call(lambda w: fn(w.tree(name)), read=True)

    async def item_batches(self, name: str,
                           requests: list[SendRequest]) -> AsyncIterator[list[Item]]:
        """The items a reconciliation session asked to ship, one bounded batch
        per store call: a large transfer never sits in memory whole, and local
        writes interleave with it."""
        gen = await self.with_tree(name, partial(item_batches, requests=requests))
        while (batch := await self._call(lambda _w: next(gen, None), read=True)) is not None:
            yield batch

    # --- change log ---------------------------------------------------------------

    async def log_position(self) -> Position:
        """(epoch, seq, hash) of the last entry of the change log."""
        return await self._call(lambda w: w.log_position(), read=True)

    async def log_floor(self) -> Position:
        """The position of the newest compacted entry: the log holds exactly
        the entries after it ((epoch, 0, GENESIS) before any compaction)."""
        return await self._call(lambda w: w.log_floor(), read=True)

    async def read_log(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        """Up to ``limit`` entries (at most 10,000) after ``after_seq``, in order."""
        return await self._call(lambda w: w.read_log(after_seq, limit), read=True)

    # --- change-log streaming (agent.store.stream) ------------------------------

    async def stream_position(self) -> tuple[Position, int]:
        """(this follower's applied position in its leader's log, the
        highest leader epoch seen); ((0, 0, GENESIS), 0) before any."""
        return await self._call(lambda w: stream.position(w.conn), read=True)

    async def apply_stream(self, entries: list[LogEntry], last_hash: bytes | None = None,
                           hashed: bool = False) -> tuple[Position, int]:
        """Verify a batch of the leader's entries against the applied
        position and apply it in one transaction that also records the new
        position; returns (it, entries the store refused). ChainBroken:
        nothing was applied. ``hashed``: every entry comes straight from
        agent.core.changelog.decode, so its hash is that of its bytes."""
        return await self._call(lambda w: stream.apply(w, entries, last_hash, hashed))

    async def adopt_stream_position(self, pos: Position) -> None:
        """Record ``pos`` as applied (after catching up by Merkle sync)."""
        await self._call(lambda w: stream.adopt(w, pos))

    async def see_epoch(self, epoch: int, leader: str | None = None,
                        log_id: bytes | None = None) -> bool:
        """Remember a leader epoch (and its leader); whether anything changed."""
        return await self._call(lambda w: stream.see_epoch(w, epoch, leader, log_id))

    async def upstream(self) -> stream.Upstream:
        """Applied position, highest epoch seen and the leader of it."""
        return await self._call(lambda w: stream.upstream(w.conn), read=True)

    async def log_epoch(self) -> int:
        """The epoch this agent stamps on its own new log entries."""
        return await self._call(stream.log_epoch, read=True)

    async def promote(self, me: str) -> int:
        """Raise the log epoch above every epoch seen (agent.store.stream.promote)."""
        return await self._call(lambda w: stream.promote(w, me))

    async def snapshot_progress(self) -> stream.Progress | None:
        return await self._call(lambda w: stream.progress(w.conn), read=True)

    async def begin_snapshot(self, at: Position, log_id: bytes, roots: tuple[Any, ...],
                             resumed: stream.Progress | None) -> stream.Progress:
        return await self._call(lambda w: stream.begin_snapshot(w, at, log_id, roots, resumed))

    async def apply_chunk(self, p: stream.Progress, collection: str, items: list[Item],
                          chash: bytes) -> tuple[stream.Progress, int]:
        """Apply one snapshot chunk and record the progress, in one transaction."""
        return await self._call(lambda w: stream.apply_chunk(w, p, collection, items, chash))

    async def finish_snapshot(self, p: stream.Progress, leader: str) -> None:
        await self._call(lambda w: stream.finish_snapshot(w, p, leader))

    async def drop_snapshot(self) -> None:
        await self._call(stream.drop_snapshot)

    async def read_log_raw(self, after_seq: int, limit: int,
                           max_bytes: int) -> list[tuple[int, bytes]]:
        """Entries after ``after_seq`` as stored: (seq, canonical bytes)."""
        return await self._call(lambda w: stream.read_raw(w.conn, after_seq, limit, max_bytes),
                                read=True)

    async def log_hash_at(self, seq: int) -> bytes | None:
        """The hash of this agent's log entry ``seq`` (the floor's at the floor)."""
        return await self._call(lambda w: stream.hash_at(w, seq), read=True)

    async def compact_log(self, retain: Retention, min_needed_seq: int | None = None,
                          batch: int = COMPACT_BATCH) -> int:
        """Delete the entries beyond ``retain`` (see agent.store.log), at most
        ``batch`` per transaction so writes interleave; ``min_needed_seq``:
        the oldest entry a connected follower still needs. Returns how many
        entries were deleted."""
        total = 0
        while True:
            n = await self._call(partial(_compact, now=self._wall(), retain=retain,
                                         min_needed_seq=min_needed_seq, batch=batch))
            total += n
            if n < batch:
                return total

    def digests(self) -> list[CollectionInfo]:
        """Collections as of the last commit: no query, safe from the event loop."""
        return self._digests

    async def close(self) -> None:
        """Finish queued work, checkpoint the WAL and close."""
        self._queue.put(None)
        await anyio.to_thread.run_sync(self._thread.join)
