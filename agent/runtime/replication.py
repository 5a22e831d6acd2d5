"""Change-log streaming between a leader and its followers: the leader side
serving followers on the sync listener, and the follower side that connects
to its leader. Frames and decisions are
:mod:`agent.core.replication`'s; the store side is :mod:`agent.store.stream`.

Rules:

* The leader answers on its TCP sync port: the listener routes a
  connection whose first frame starts with the replication tag to
  agent.runtime.leadership's ``Replication.route``, which hands a HELLO to
  :meth:`Leader.serve` (agent.runtime.sync_service). Only a HELLO the
  leader accepts turns the connection long-lived (its sync slot given back,
  no session deadline); PROBE, INFO and refused HELLOs stay under both. Streams with keys run
  the PSK handshake like every TCP stream.
* Per follower the leader sends the backlog, then live entries as they
  commit: it wakes on the store's commit notification, never by polling,
  and sends a keepalive when it sent nothing for one interval. It sends no
  more than :data:`WINDOW_ENTRIES` entries and :data:`WINDOW_BYTES` bytes
  beyond the follower's last ACK. Live entries come from the store's
  in-memory copy of its newest commits (agent.store.log.RecentLog, bounded),
  older ones are read from the store per batch, so the leader holds at most
  one batch per follower besides that copy, and commits never wait for a
  follower (a slow one only slows its own task).
* A follower receives frames apart from applying them: what arrived while
  a batch was being applied is applied together, in one transaction, then
  acknowledged with one ACK, so a follower that fell behind catches up in
  a few commits rather than one per frame.
* The leader keeps each follower's acknowledged position; the oldest one
  holds log compaction back (bounded in size by agent.store.log.hold_bound),
  unless that follower is stalled: entries unacknowledged and no ACK
  advancing for :data:`STALL_LIMIT` seconds ends its stream (it reconnects
  and is streamed or gets a snapshot). A snapshot goes at
  :data:`SNAPSHOT_MIN_RATE` bytes/s at least after :data:`SNAPSHOT_GRACE`
  seconds, or is cut off (``snapshots_too_slow``): its read transaction
  keeps the WAL from checkpointing.
* Snapshots: a follower whose position was compacted away, that refused a
  batch (tampered, reordered, missing entry), or that was installing a
  snapshot when it stopped, gets one (:func:`agent.core.replication.decide`).
  The leader reads it from one read transaction on a read-only connection of
  its own (agent.store.stream.SnapshotReader: the writer never waits), sends
  it in CHUNKs of at most :data:`SNAPSHOT_ITEMS` items / :data:`SNAPSHOT_BYTES`
  bytes, at most SNAPSHOT_AHEAD unacknowledged, then STREAM and the log from
  the snapshot's position. The follower checks each chunk's chained hash,
  applies it with its progress in one transaction (a restarted follower
  resumes after the last key it kept), checks the digest sums against the
  announced roots at the end, and only then records the snapshot's position
  as applied. Every snapshot is counted (``snapshots``, ``snapshots_sent``)
  and logged on both sides; a chunk or root that does not verify is refused
  (``snapshots_refused``) and the follower asks for a new one.
* DIVERGED (the follower's position is not in the leader's log, or it is
  ahead: it followed another leader, or it was one): the follower merges
  first: Merkle sync with the leader for every collection either holds (both
  ways, last writer wins: its own rows stay and reach the leader; nothing it
  acknowledged is truncated), records the leader's head as applied and asks
  again from there.
* Its role is ``Follower`` while it hears from the leader, ``Edge`` when
  the leader has not answered for :meth:`Follower.edge_after` seconds
  (3 x HS_GOSSIP_INTERVAL + :data:`CONNECT_TIMEOUT`); either way it accepts
  writes, and gossip and Merkle sync go on underneath. It reconnects with
  exponential backoff, from one interval up to :data:`MAX_BACKOFF`.
* Epochs fence leaders: every frame carries its sender's epoch; a follower
  persists the highest epoch seen with that epoch's leader (address and log
  id), refuses frames of a lower epoch (``epoch_refused``, logged) and tells
  its owner (``on_newer_leader``) of the leader it knows for the higher one.
  A leader that sees a higher epoch in a HELLO or an ACK tells its owner
  (``on_higher_epoch``). Promotion, stepping down and finding a new leader
  are :mod:`agent.runtime.leadership`'s.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agent.core import changelog
from agent.core.changelog import GENESIS, ChainBroken, EntryInvalid, Position
from agent.core.replication import (
    SNAPSHOT_AHEAD,
    Ack,
    Chunk,
    ChunkAck,
    Diverged,
    Entries,
    Hello,
    Info,
    ProtocolError,
    Resume,
    Snapshot,
    SnapshotNeeded,
    Stream,
    Verdict,
    Window,
    chunk_hash,
    decide,
    decode,
    encode,
    epoch_ok,
)
from agent.net.stream import Framed, StreamHandshakeError, connect
from agent.runtime.counters import count as _count
from agent.runtime.sync_service import SESSION_ERRORS, long_lived, sync_once
from agent.store.stream import SnapshotReader
from merkle.frames import SALT_LEN
from merkle.tree import Item

if TYPE_CHECKING:
    from agent.config import HostPort
    from agent.net.handshake import StreamKeys
    from agent.store import Store
    from agent.store.stream import Progress

log = logging.getLogger("hs_gossip.replication")

#: entries and bytes a leader sends one follower beyond its last ACK
WINDOW_ENTRIES = 16384
WINDOW_BYTES = 8 << 20
#: one ENTRIES frame at most (a single larger entry still goes alone)
BATCH_ENTRIES = 4096
BATCH_BYTES = 1 << 20
#: one snapshot CHUNK at most (items; bytes of keys and values)
SNAPSHOT_ITEMS = 512
SNAPSHOT_BYTES = 256 << 10
#: a snapshot holds a read transaction (and so the WAL) while it is sent: it
#: may take SNAPSHOT_GRACE seconds plus one second per SNAPSHOT_MIN_RATE
#: bytes sent, then it is cut off (the follower may resume it)
SNAPSHOT_GRACE = 30.0
SNAPSHOT_MIN_RATE = 64 << 10
#: seconds a follower may leave entries unacknowledged without acknowledging
#: any of them; then its stream ends and it holds compaction back no more
STALL_LIMIT = 60.0
#: followers one leader serves at once; more are refused
MAX_FOLLOWERS = 256
#: seconds a follower gives the leader to accept and finish the handshake
CONNECT_TIMEOUT = 5.0
#: the longest wait between two connection attempts
MAX_BACKOFF = 30.0
#: ENTRIES frames a follower holds received and not yet applied (the leader's
#: window bounds what they hold, and the follower holds it to that: a frame
#: that would queue more than the window is a protocol error)
FOLLOW_QUEUE = 64
#: seconds a follower may wait to acknowledge what it applied (ACKs of
#: several frames go as one); a keepalive is answered at once. An ACK costs
#: each side a frame, a wake-up and a receive: at one per 4 ms frame that was
#: a sizeable share of both sides' CPU at 1,000 commits a second. 20 ms of
#: entries are far inside the window (16,384 entries is ~0.8 s at 20,000/s),
#: so acknowledging later never holds the leader's sending back.
ACK_DELAY = 0.02
#: seconds a leader leaves between two ENTRIES frames to one follower: what
#: commits meanwhile goes in the next frame. At 1,000 single-item commits a
#: second this makes a quarter of the frames, and with them of every
#: follower's receives and transactions (each costs more CPU and WAL pages
#: than its entry: ~10 pages for one entry, ~21 for five), for at most this
#: much more lag; a commit after a quiet spell goes at once. 2 ms left the
#: followers' CPU a third higher and the lag's p99 higher under load. The
#: sender sleeps the gap after each frame (one wake-up per frame), rather
#: than waking at each commit to find it must wait.
SEND_GAP = 0.004
#: ENTRIES frames kept for the followers that are sent the same ones next
#: (each at most BATCH_BYTES plus its framing)
FRAME_CACHE = 4
#: failures a stream may end with (anything else is a bug and propagates)
STREAM_ERRORS = (*SESSION_ERRORS, ProtocolError, ChainBroken, EntryInvalid)


#: an ENTRIES frame as received: its entries, decoded, its last hash and its
#: entries' size in bytes
_Frame = tuple[list[changelog.LogEntry], bytes, int]


@dataclass
class _Queued:
    """What a follower holds received and not yet applied."""

    entries: int = 0
    size: int = 0
    #: receiving has ended: what is left is applied, nothing acknowledged
    ended: bool = False

    def add(self, entries: int, size: int) -> None:
        self.entries += entries
        self.size += size


class SnapshotRefused(ProtocolError):
    """A snapshot chunk or its roots did not verify: nothing of it is
    recorded as applied, and the follower asks for a new one."""


async def _until_done(work: Coroutine[Any, Any, None], scope: anyio.CancelScope,
                      failed: list[BaseException]) -> None:
    """Run one of a stream's two tasks: the first to end ends the other (its
    error is kept in ``failed``, to be raised outside the task group)."""
    try:
        await work
    except STREAM_ERRORS as e:
        failed.append(e)
    finally:
        scope.cancel()


@contextlib.contextmanager
def _silence_limit() -> Iterator[anyio.CancelScope]:
    """One cancel scope for a whole stream of receives: the caller moves its
    deadline before each receive (and to infinity while it waits on anything
    else). A ``fail_after`` per frame cost a scope and a deadline registered
    and removed per frame, a sizeable share of a frame's handling at a few
    hundred frames a second. Raises TimeoutError as ``fail_after`` would."""
    with anyio.CancelScope() as scope:
        yield scope
    if scope.cancelled_caught:
        raise TimeoutError


# --- what the view shows ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownstreamView:
    """One connected follower, as its leader sees it."""

    addr: str
    node_id: str  # as everywhere in the API: a UUID
    acked: Position  # its last acknowledged position
    start_seq: int  # the position its HELLO named
    lag: int  # entries of the leader's log it has not acknowledged


@dataclass(frozen=True, slots=True)
class ReplicationView:
    role: str  # Leader, Follower or Edge
    upstream: str | None  # the coordinator's address
    downstream: tuple[DownstreamView, ...]
    epoch: int
    applied_seq: int  # a leader: its log's head; a follower: its applied position
    stats: tuple[tuple[str, int], ...]


# --- the leader -----------------------------------------------------------------------


@dataclass
class _Downstream:
    addr: str
    node_id: bytes
    start: Position
    window: Window
    acked: Position
    event: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: when its acknowledged position last advanced (or it had nothing to ack)
    progress_at: float = field(default_factory=anyio.current_time)

    def stalled(self, now: float, limit: float) -> bool:
        return self.window.in_flight_entries > 0 and now - self.progress_at > limit


class Leader:
    """Serves the change log to followers, at ``epoch`` (the log's head
    epoch when not given)."""

    def __init__(self, store: Store, node_id: bytes, interval: float,
                 window_entries: int = WINDOW_ENTRIES, window_bytes: int = WINDOW_BYTES,
                 epoch: int | None = None, stall_limit: float = STALL_LIMIT,
                 snapshot_grace: float = SNAPSHOT_GRACE,
                 snapshot_min_rate: float = SNAPSHOT_MIN_RATE,
                 send_gap: float = SEND_GAP) -> None:
        self.store = store
        self.send_gap = send_gap
        self.stall_limit = stall_limit
        self.snapshot_grace = snapshot_grace
        self.snapshot_min_rate = snapshot_min_rate
        self.node_id = node_id
        self.interval = interval
        self.window_entries = window_entries
        self.window_bytes = window_bytes
        self.followers: dict[int, _Downstream] = {}
        self.stats: dict[str, int] = {}
        self._epoch = epoch
        self._next = 0
        #: the newest ENTRIES frames encoded (see :meth:`_frame`)
        self._frames: dict[tuple[int, int, bytes], bytes] = {}
        #: called with (epoch, its leader's address or "") when a follower
        #: shows a higher epoch than ours: we are deposed
        self.on_higher_epoch: Callable[[int, str], None] | None = None
        store.commit_listeners.append(self.wake)
        store.recent_log.keep()  # live entries are streamed from memory

    @property
    def epoch(self) -> int:
        return self.store.log_head.epoch if self._epoch is None else self._epoch

    def wake(self) -> None:
        """A commit happened: every follower's sender looks for new entries."""
        for d in self.followers.values():
            d.event.set()

    def depose(self) -> None:
        """Stop feeding every follower (a higher epoch exists), and give back
        the in-memory copy of the newest entries (up to 4 MiB) kept for them."""
        for d in self.followers.values():
            d.scope.cancel()
        if self.wake in self.store.commit_listeners:
            self.store.commit_listeners.remove(self.wake)
        self.store.recent_log.keep(0, 0)
        self._frames.clear()

    def min_needed_seq(self) -> int | None:
        """The oldest entry a connected follower still needs (compaction
        hold). A stalled follower (see :data:`STALL_LIMIT`) holds nothing;
        the store bounds the hold by size too (agent.store.log.hold_bound)."""
        now = anyio.current_time()
        needs = [d.window.acked_seq for d in self.followers.values()
                 if not d.stalled(now, self.stall_limit)]
        return min(needs) + 1 if needs else None

    def downstream(self) -> tuple[DownstreamView, ...]:
        head = self.store.log_head.seq
        return tuple(sorted(
            (DownstreamView(d.addr, str(uuid.UUID(bytes=d.node_id)), d.acked, d.start.seq,
                            max(0, head - d.acked.seq)) for d in self.followers.values()),
            key=lambda v: v.addr))

    def _higher(self, epoch: int, leader: str) -> None:
        _count(self.stats, "higher_epoch_heard")
        log.warning("a follower claims epoch %d, this leader is at %d: checking the claim",
                    epoch, self.epoch)
        if self.on_higher_epoch is not None:
            self.on_higher_epoch(epoch, leader)

    async def serve(self, conn: Framed, first: bytes) -> None:
        """One follower's connection, from its HELLO (``first``) on."""
        try:
            await self._serve(conn, first)
        except STREAM_ERRORS as e:
            _count(self.stats, "follower_streams_failed")
            log.info("stream to follower %s ended: %s", conn.peer, e or type(e).__name__)

    async def _serve(self, conn: Framed, first: bytes) -> None:
        hello = decode(first)
        if not isinstance(hello, Hello):
            raise ProtocolError("expected HELLO")
        if len(self.followers) >= MAX_FOLLOWERS:
            _count(self.stats, "followers_refused_busy")
            return
        epoch = self.epoch
        if hello.epoch > epoch:
            # Answered at our (lower) epoch: the follower refuses it, and we go.
            _count(self.stats, "hello_newer_epoch")
            await conn.send(encode(Diverged(epoch, self.node_id, self.store.log_head,
                                            f"follower saw epoch {hello.epoch}", ())))
            self._higher(hello.epoch, hello.leader)
            return
        # A stream from here on: no sync slot, no session deadline (its
        # frames are timed below).
        long_lived()
        key = self._next
        self._next += 1
        d = _Downstream(conn.peer, hello.node_id, hello.position,
                        Window(hello.position.seq, self.window_entries, self.window_bytes),
                        hello.position)
        # Registered before the answer is decided, so compaction holds for it.
        self.followers[key] = d
        try:
            with d.scope:
                await self._answer(conn, d, hello, epoch)
        finally:
            del self.followers[key]

    async def _answer(self, conn: Framed, d: _Downstream, hello: Hello, epoch: int) -> None:
        floor = await self.store.log_floor()
        head = self.store.log_head
        known: dict[int, bytes | None] = {}
        for p in (hello.position, hello.resume.at if hello.resume else None):
            if p is not None and floor.seq < p.seq < head.seq:
                known[p.seq] = await self.store.log_hash_at(p.seq)
        answer = decide(floor, head, hello, lambda seq: known.get(seq))
        names = tuple(c.name for c in self.store.digests())
        if answer.verdict is Verdict.DIVERGED:
            _count(self.stats, "answered_diverged")
            log.warning("follower %s diverged: %s", conn.peer, answer.reason)
            await conn.send(encode(Diverged(epoch, self.node_id, head, answer.reason, names)))
            return
        if answer.verdict is Verdict.SNAPSHOT_NEEDED:  # decide() turns it into SNAPSHOT
            raise AssertionError("unreachable")
        start = hello.position
        if answer.verdict in (Verdict.SNAPSHOT, Verdict.RESUME):
            start = await self._snapshot(conn, d, hello, epoch, answer.reason,
                                         answer.verdict is Verdict.RESUME)
        else:
            _count(self.stats, "answered_stream")
            log.info("streaming to follower %s from seq %d (%s)", conn.peer, start.seq,
                     answer.reason)
        await conn.send(encode(Stream(epoch, self.node_id, head)))
        # Two tasks, one per direction; the first to end ends both (its
        # error is kept and raised here, outside the task group).
        failed: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_done, self._acks(conn, d, epoch), tg.cancel_scope, failed)
            await _until_done(self._send(conn, d, epoch), tg.cancel_scope, failed)
        if failed:
            raise failed[0]

    async def _snapshot(self, conn: Framed, d: _Downstream, hello: Hello, epoch: int,
                        reason: str, resume: bool) -> Position:
        """Send a snapshot (or the rest of one); returns the position the
        stream continues from."""
        after = (hello.resume.collection, hello.resume.key) if resume and hello.resume else None
        reader = await anyio.to_thread.run_sync(SnapshotReader, self.store.path, after)
        try:
            # A resumed snapshot continues the stream from where the first
            # run was taken: what changed since before its key comes as entries.
            at = hello.resume.at if resume and hello.resume else reader.at
            d.window = Window(at.seq, self.window_entries, self.window_bytes)
            d.acked = at
            _count(self.stats, "snapshots_resumed_sent" if resume else "snapshots_sent")
            log.warning("follower %s gets %s at seq %d (%s)", conn.peer,
                        "the rest of its snapshot" if resume else "a snapshot", at.seq, reason)
            await conn.send(encode(Snapshot(epoch, self.node_id, at, reader.roots, after)))
            chunks = reader.chunks(SNAPSHOT_ITEMS, SNAPSHOT_BYTES)
            prev, index, unacked = GENESIS, 0, 0
            # The read transaction keeps the WAL from checkpointing: the
            # snapshot must go at a minimum rate, or it is cut off.
            with anyio.CancelScope(deadline=anyio.current_time() + self.snapshot_grace) as cut:
                while (got := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
                    while unacked >= SNAPSHOT_AHEAD:
                        await self._chunk_ack(conn, epoch, index - unacked)
                        unacked -= 1
                    name, items = got
                    wire = tuple((i.key, i.hlc, i.origin, i.deleted, i.value) for i in items)
                    prev = chunk_hash(prev, index, name, wire)
                    frame = encode(Chunk(epoch, index, name, wire, prev))
                    cut.deadline += len(frame) / self.snapshot_min_rate
                    await conn.send(frame)
                    _count(self.stats, "snapshot_items_sent", len(items))
                    index += 1
                    unacked += 1
                while unacked:
                    await self._chunk_ack(conn, epoch, index - unacked)
                    unacked -= 1
            if cut.cancelled_caught:
                _count(self.stats, "snapshots_too_slow")
                log.warning("snapshot to follower %s cut off: slower than %d bytes/s", conn.peer,
                            self.snapshot_min_rate)
                raise ProtocolError("snapshot slower than the minimum rate")
            return at
        finally:
            await anyio.to_thread.run_sync(reader.close)

    async def _chunk_ack(self, conn: Framed, epoch: int, index: int) -> None:
        with anyio.fail_after(3 * self.interval + CONNECT_TIMEOUT):
            f = decode(await conn.receive())
        if not isinstance(f, ChunkAck) or f.epoch != epoch or f.index != index:
            raise ProtocolError(f"expected CHUNK_ACK {index} of this epoch")

    async def _send(self, conn: Framed, d: _Downstream, epoch: int) -> None:
        last_sent = anyio.current_time()
        while True:
            # A fresh event before looking: a commit from here on wakes us.
            d.event = anyio.Event()
            room_entries, room_bytes = d.window.room()
            if room_entries and d.window.sent_seq < self.store.log_head.seq:
                limit, max_bytes = min(room_entries, BATCH_ENTRIES), min(room_bytes, BATCH_BYTES)
                # Live entries are in memory (the store keeps the newest
                # committed ones); older ones are read from the table.
                rows = self.store.recent_log.read(d.window.sent_seq, limit, max_bytes)
                if rows is None:
                    rows = await self.store.read_log_raw(d.window.sent_seq, limit, max_bytes)
                if not rows or rows[0][0] != d.window.sent_seq + 1:
                    # Compacted away meanwhile: the follower asks again and
                    # gets a snapshot.
                    _count(self.stats, "follower_gap")
                    log.warning("entries after seq %d for follower %s were compacted away: "
                                "it will get a snapshot", d.window.sent_seq, conn.peer)
                    raise ProtocolError(f"entries after seq {d.window.sent_seq} are gone")
                data = tuple(r[1] for r in rows)
                # Counted as sent before the send: its ACK may come back (on
                # the other task) before send() returns.
                d.window.sent(rows[-1][0], sum(map(len, data)))
                await conn.send(self._frame(epoch, data))
                _count(self.stats, "entries_streamed", len(data))
                _count(self.stats, "entry_frames_streamed")
                last_sent = anyio.current_time()
                if self.send_gap > 0:
                    # What commits meanwhile goes in the next frame. Slept
                    # here, not on each commit's wake-up: one wake-up per
                    # frame, however many commits it carries.
                    await anyio.sleep(self.send_gap)
                continue
            with anyio.move_on_after(max(0.0, last_sent + self.interval - anyio.current_time())):
                await d.event.wait()
            if anyio.current_time() - last_sent >= self.interval:
                await conn.send(encode(Entries(epoch, ())))
                last_sent = anyio.current_time()

    def _frame(self, epoch: int, data: tuple[bytes, ...]) -> bytes:
        """The ENTRIES frame of ``data``, encoded once for every follower
        that is sent the same entries (followers in step get the same
        frames). The last entry's bytes name the whole run: they hold its
        seq and the hash of the entry before, which chains to the rest."""
        key = (epoch, len(data), data[-1])
        frame = self._frames.get(key)
        if frame is None:
            frame = encode(Entries(epoch, data, changelog.bytes_hash(data[-1])))
            _count(self.stats, "entry_frames_encoded")
            self._frames[key] = frame
            if len(self._frames) > FRAME_CACHE:
                del self._frames[next(iter(self._frames))]  # the oldest
        return frame

    async def _acks(self, conn: Framed, d: _Downstream, epoch: int) -> None:
        with _silence_limit() as limit:
            await self._acks_within(conn, d, epoch, limit)

    async def _acks_within(self, conn: Framed, d: _Downstream, epoch: int,
                           limit: anyio.CancelScope) -> None:
        while True:
            # The follower acknowledges within ACK_DELAY, keepalives at once.
            limit.deadline = anyio.current_time() + 3 * self.interval + CONNECT_TIMEOUT
            f = decode(await conn.receive(timeout=None))
            if isinstance(f, Ack) and f.epoch > epoch:
                self._higher(f.epoch, "")
                raise ProtocolError(f"ACK of epoch {f.epoch}: deposed")
            if not isinstance(f, Ack) or f.epoch != epoch:
                raise ProtocolError("expected an ACK of this epoch")
            now = anyio.current_time()
            if f.position.seq > d.window.acked_seq or not d.window.in_flight_entries:
                d.progress_at = now
            d.window.acked(f.position.seq)
            d.acked = f.position
            if d.window.sent_seq < self.store.log_head.seq:
                d.event.set()  # entries wait: the window may have held them back
            if d.stalled(now, self.stall_limit):
                _count(self.stats, "followers_stalled")
                log.warning("follower %s acknowledged nothing new for %.0fs: its stream ends "
                            "and it holds compaction back no more", conn.peer, self.stall_limit)
                raise ProtocolError("follower stalled")


# --- the follower ---------------------------------------------------------------------


class Follower:
    """Follows the leader at ``coordinator``."""

    def __init__(self, store: Store, coordinator: HostPort, node_id: bytes, interval: float,
                 max_frame: int, keys: Callable[[], StreamKeys | None], rng: random.Random,
                 tombstone_grace: float = 604800.0, merge_first: bool = False) -> None:
        self.store = store
        self.coordinator = coordinator
        self.node_id = node_id
        self.interval = interval
        self.max_frame = max_frame
        self.keys = keys
        self.rng = rng
        self.tombstone_grace = tombstone_grace
        self.applied = changelog.Position(0, 0, changelog.GENESIS)
        self.epoch_seen = 0
        #: the leader of epoch_seen as recorded ("" unknown)
        self.leader_addr = ""
        self.last_heard = float("-inf")
        self.leader_id: bytes | None = None
        self.stats: dict[str, int] = {}
        self._edge_logged = True  # nothing to say before the first connection
        #: awaited before each HELLO with the leader's address: what this agent
        #: wrote while away reaches the leader first (agent.runtime.forwarding)
        self.before_hello: Callable[[HostPort], Awaitable[None]] | None = None
        #: called with (epoch, address) when a newer leader is known: the
        #: owner switches to it (see Replication)
        self.on_newer_leader: Callable[[int, str], None] | None = None
        #: merge this agent's rows into the leader before the first HELLO (a
        #: deposed leader: its unstreamed writes must reach the new leader)
        self.merge_first = merge_first
        self._want_snapshot = False
        self._session_scope: anyio.CancelScope | None = None

    @property
    def edge_after(self) -> float:
        """Seconds without a frame from the leader before the role is Edge."""
        return 3 * self.interval + CONNECT_TIMEOUT

    def role(self, now: float) -> str:
        return "Follower" if now - self.last_heard <= self.edge_after else "Edge"

    def forward_target(self, now: float) -> HostPort | None:
        """The leader to forward writes to now; None (an Edge): write locally."""
        return self.coordinator if self.role(now) == "Follower" else None

    def retarget(self, coordinator: HostPort) -> None:
        """Follow another leader from now on (the current session ends)."""
        if coordinator != self.coordinator:
            _count(self.stats, "leader_switches")
            log.warning("following leader %s (was %s)", coordinator, self.coordinator)
            self.coordinator = coordinator
            self.last_heard = float("-inf")
            if self._session_scope is not None:
                self._session_scope.cancel()

    async def run(self) -> None:
        u = await self.store.upstream()
        self.applied, self.epoch_seen, self.leader_addr = u.applied, u.epoch_seen, u.leader
        backoff = self.interval
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_edge)
            while True:
                try:
                    with anyio.CancelScope() as self._session_scope:
                        await self._session()
                    if self._session_scope.cancelled_caught:
                        continue  # retargeted: at once
                    backoff = self.interval  # asked to come back at once (after a resync)
                    continue
                except StreamHandshakeError as e:
                    _count(self.stats, "connect_failures")
                    log.warning("leader %s refused the stream handshake (%s)", self.coordinator,
                                e.cause)
                except SnapshotRefused as e:
                    _count(self.stats, "snapshots_refused")
                    log.error("refused a snapshot from leader %s: %s; asking for a new one",
                              self.coordinator, e)
                    self._want_snapshot = True
                except ChainBroken as e:
                    _count(self.stats, "chain_refused")
                    log.error("refused a batch from leader %s: %s; asking for a snapshot",
                              self.coordinator, e)
                    self._want_snapshot = True
                    backoff = self.interval
                except STREAM_ERRORS as e:
                    _count(self.stats, "connect_failures")
                    log.debug("stream from leader %s ended: %s", self.coordinator,
                              e or type(e).__name__)
                await anyio.sleep(backoff * self.rng.uniform(0.8, 1.2))
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _watch_edge(self) -> None:
        """Log the turn to Edge once (the role itself is computed when asked)."""
        while True:
            await anyio.sleep(self.interval)
            if self.role(anyio.current_time()) == "Edge" and not self._edge_logged:
                self._edge_logged = True
                _count(self.stats, "turned_edge")
                log.warning("leader %s silent for %.1fs: role Edge (writes are kept locally "
                            "and reach the swarm by gossip and Merkle sync)",
                            self.coordinator, self.edge_after)

    def _heard(self) -> None:
        self.last_heard = anyio.current_time()
        if self._edge_logged:
            self._edge_logged = False
            log.info("following leader %s from seq %d: role Follower", self.coordinator,
                     self.applied.seq)

    def _refuse_epoch(self, epoch: int, what: str) -> None:
        _count(self.stats, "epoch_refused")
        log.warning("refused %s of epoch %d from %s: epoch %d seen (leader %s)", what, epoch,
                    self.coordinator, self.epoch_seen, self.leader_addr or "unknown")
        if self.leader_addr and self.leader_addr != str(self.coordinator) \
                and self.on_newer_leader is not None:
            self.on_newer_leader(self.epoch_seen, self.leader_addr)
        raise ProtocolError(f"frame of epoch {epoch} below the highest seen "
                            f"({self.epoch_seen})")

    def _check_epoch(self, epoch: int, what: str = "a frame") -> None:
        if not epoch_ok(epoch, self.epoch_seen):
            self._refuse_epoch(epoch, what)

    async def _merge(self, names: tuple[str, ...] | list[str]) -> None:
        """Merkle sync with the leader for ``names``: both ways, last writer
        wins, so this agent's rows stay and reach the leader."""
        host, port = self.coordinator.host, self.coordinator.port
        for name in names:
            await sync_once(self.store, host, port, name, self.max_frame, 0,
                            self.tombstone_grace, salt=self.rng.randbytes(SALT_LEN),
                            keys=self.keys())
            self._heard()

    async def _session(self) -> None:
        host, port = self.coordinator.host, self.coordinator.port
        if self.before_hello is not None:
            await self.before_hello(self.coordinator)
        if self.merge_first:
            _count(self.stats, "merges")
            log.warning("merging this agent's rows into leader %s before following it",
                        self.coordinator)
            await self._merge([c.name for c in self.store.digests()])
            self.merge_first = False
        prog = await self.store.snapshot_progress()
        resume = None
        if prog is not None and prog.last is not None and not self._want_snapshot:
            resume = Resume(prog.at, *prog.last)
        leader = self.leader_addr or (str(self.coordinator) if self.epoch_seen else "")
        with anyio.fail_after(CONNECT_TIMEOUT):
            conn = await connect(host, port, self.max_frame, self.keys())
        async with conn:
            await conn.send(encode(Hello(self.epoch_seen, self.node_id, self.applied,
                                         self._want_snapshot, resume, leader)))
            with anyio.fail_after(CONNECT_TIMEOUT + 3 * self.interval):
                answer = decode(await conn.receive())
            if isinstance(answer, Info):
                # Not a leader: it tells where it stands and whom it follows.
                self._check_epoch(answer.epoch, "an INFO")
                if answer.leader and answer.epoch >= self.epoch_seen \
                        and self.on_newer_leader is not None:
                    self.on_newer_leader(answer.epoch, answer.leader)
                raise ProtocolError(f"{self.coordinator} is not a leader")
            if not isinstance(answer, Stream | Diverged | SnapshotNeeded | Snapshot):
                raise ProtocolError("expected an answer to HELLO")
            self._check_epoch(answer.epoch, f"a {type(answer).__name__} answer")
            addr = str(self.coordinator)
            if answer.epoch > self.epoch_seen or self.leader_addr != addr:
                await self.store.see_epoch(answer.epoch, addr, answer.leader_id)
                self.epoch_seen, self.leader_addr = answer.epoch, addr
            self.leader_id = answer.leader_id
            self._heard()
            if isinstance(answer, Snapshot):
                await self._install(conn, answer)
                return
            if isinstance(answer, Stream):
                _count(self.stats, "streams")
                await self._follow(conn, answer.epoch)
                return
            why = answer.reason if isinstance(answer, Diverged) else "position compacted away"
            _count(self.stats, "resyncs")
            log.warning("leader %s answered %s (%s): merging this agent's rows by Merkle sync "
                        "(both ways, nothing dropped), then streaming from its seq %d",
                        self.coordinator, type(answer).__name__, why, answer.head.seq)
        # Off the stream connection: one sync session per collection, ours too.
        await self._merge(sorted({*answer.collections, *(c.name for c in self.store.digests())}))
        await self.store.adopt_stream_position(answer.head)
        self.applied = answer.head

    async def _install(self, conn: Framed, snap: Snapshot) -> None:
        """Receive a snapshot, verify it, then follow the stream after it."""
        prog = await self.store.snapshot_progress()
        resumed = None
        if snap.after is not None:
            if prog is None or prog.at != snap.at or prog.last != snap.after:
                raise SnapshotRefused("the leader resumes a snapshot this agent is not "
                                      "installing")
            resumed = prog
        p = await self.store.begin_snapshot(snap.at, snap.leader_id, snap.roots, resumed)
        self._want_snapshot = False
        _count(self.stats, "snapshots_resumed" if resumed else "snapshots")
        log.warning("installing %s from leader %s at its seq %d (%d collections)",
                    "the rest of a snapshot" if resumed else "a snapshot", self.coordinator,
                    snap.at.seq, len(snap.roots))
        names = {r.name for r in snap.roots}
        while True:
            with anyio.fail_after(self.edge_after):
                f = decode(await conn.receive())
            if f.epoch != snap.epoch:
                raise SnapshotRefused(f"a frame of epoch {f.epoch} inside a snapshot")
            self._heard()
            if isinstance(f, Stream):
                break
            if not isinstance(f, Chunk):
                raise SnapshotRefused("expected CHUNK or STREAM")
            p = await self._chunk(p, f, names)
            await conn.send(encode(ChunkAck(snap.epoch, f.index)))
        why = p.sums.mismatch(snap.roots)
        if why is not None:
            await self.store.drop_snapshot()
            raise SnapshotRefused(why)
        await self.store.finish_snapshot(p, str(self.coordinator))
        self.applied = p.at
        _count(self.stats, "snapshots_installed")
        log.warning("snapshot from leader %s installed (%d items in all, roots verified): "
                    "streaming from its seq %d", self.coordinator, p.items, p.at.seq)
        await self._follow(conn, snap.epoch)

    async def _chunk(self, p: Progress, f: Chunk, names: set[str]) -> Progress:
        if f.index != p.next_index:
            raise SnapshotRefused(f"chunk {f.index} where {p.next_index} was due")
        if f.hash != chunk_hash(p.chunk_hash, f.index, f.collection, f.items):
            raise SnapshotRefused(f"chunk {f.index} does not match its hash")
        if f.collection not in names or not f.items:
            raise SnapshotRefused(f"chunk {f.index} of an unannounced collection or empty")
        keys = [(f.collection, i[0]) for i in f.items]
        if keys != sorted(set(keys)) or (p.last is not None and keys[0] <= p.last):
            raise SnapshotRefused(f"chunk {f.index} out of key order")
        items = [Item(*i) for i in f.items]
        p, refused = await self.store.apply_chunk(p, f.collection, items, f.hash)
        _count(self.stats, "snapshot_items", len(items))
        _count(self.stats, "snapshot_chunks")
        if refused:
            _count(self.stats, "entries_refused", refused)
        return p

    async def _follow(self, conn: Framed, epoch: int) -> None:
        """Receive ENTRIES frames and apply them. Receiving runs apart from
        applying: frames that arrive while a batch is being applied wait in
        a bounded queue and are applied together in the next transaction, so
        a follower that fell behind (a pause, a busy core) catches up in a
        few large commits instead of one commit per frame. When receiving
        ends (the leader closed or went silent, a bad frame), what it queued
        before is still applied, as it would have been one frame at a time;
        when applying ends, receiving ends with it. The first error is
        raised here, as it was raised."""
        send, recv = anyio.create_memory_object_stream[_Frame](FOLLOW_QUEUE)
        failed: list[BaseException] = []
        queued = _Queued()
        async with anyio.create_task_group() as tg, recv:
            tg.start_soon(self._receive_then_close, conn, epoch, send, queued, failed)
            await _until_done(self._apply(conn, epoch, recv, queued), tg.cancel_scope, failed)
        if failed:
            raise failed[0]

    async def _receive_then_close(self, conn: Framed, epoch: int,
                                  out: MemoryObjectSendStream[_Frame], queued: _Queued,
                                  failed: list[BaseException]) -> None:
        """:meth:`_receive`, then close the queue: the apply task ends once
        it has applied what is in it (EndOfStream, after this error)."""
        async with out:
            try:
                await self._receive(conn, epoch, out, queued)
            except STREAM_ERRORS as e:
                failed.append(e)
            finally:
                queued.ended = True

    async def _receive(self, conn: Framed, epoch: int, out: MemoryObjectSendStream[_Frame],
                       queued: _Queued) -> None:
        """Frames in, decoded and checked against their own last hash; a
        keepalive is queued as an empty batch (it is acknowledged too). What
        waits to be applied stays within the leader's window: the leader
        sends nothing beyond it until an ACK, and this side acknowledges
        only what it applied, so a frame that would hold more is refused."""
        with _silence_limit() as limit:
            await self._receive_within(conn, epoch, out, queued, limit)

    async def _receive_within(self, conn: Framed, epoch: int,
                              out: MemoryObjectSendStream[_Frame], queued: _Queued,
                              limit: anyio.CancelScope) -> None:
        while True:
            # The leader sends at least a keepalive every interval; the slack
            # covers a leader whose store is busy with a large write.
            limit.deadline = anyio.current_time() + self.edge_after
            f = decode(await conn.receive(timeout=None))
            if not isinstance(f, Entries):
                raise ProtocolError("expected ENTRIES")
            self._check_epoch(f.epoch, "ENTRIES")
            if f.epoch != epoch:
                raise ProtocolError("ENTRIES of another epoch in one stream")
            self._heard()
            size = sum(map(len, f.entries))
            # Beyond the window only a single entry larger than the room left
            # may go (as agent.core.replication.Window lets the leader send).
            if queued.entries + len(f.entries) > WINDOW_ENTRIES or (
                    f.entries and (queued.size >= WINDOW_BYTES or (
                        queued.size + size > WINDOW_BYTES and len(f.entries) > 1))):
                raise ProtocolError("ENTRIES beyond the window: the leader sent more than "
                                    "it may before an ACK")
            entries = [changelog.decode(b) for b in f.entries]
            _count(self.stats, "entries_received", len(entries))
            if entries and entries[-1].hash != f.last_hash:
                raise ChainBroken(entries[-1].seq,
                                  "the batch does not end at the hash the leader sent")
            queued.add(len(entries), size)
            # Waiting for room in the queue is not the leader's silence.
            limit.deadline = float("inf")
            await out.send((entries, f.last_hash, size))

    async def _apply(self, conn: Framed, epoch: int, inbox: MemoryObjectReceiveStream[_Frame],
                     queued: _Queued) -> None:
        """Apply whatever has arrived in one transaction, then acknowledge it:
        at once after a keepalive or when the last ACK is :data:`ACK_DELAY`
        old, else within ACK_DELAY (a follower applying a frame per commit
        does not answer each with a frame of its own)."""
        acked_at = float("-inf")
        owed = False
        while True:
            batches: list[_Frame] = []
            if owed:
                with anyio.move_on_after(acked_at + ACK_DELAY - anyio.current_time()):
                    batches.append(await inbox.receive())
            else:
                batches.append(await inbox.receive())
            # (EndOfStream: receiving has ended; the next receive() says so
            # once what was taken here is applied)
            with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                while True:
                    batches.append(inbox.receive_nowait())
            entries = [e for b, _, _ in batches for e in b]
            if entries:
                # Each frame's entries were hashed from their bytes when decoded
                # (and checked against the frame's last hash): the store checks
                # that they chain from its applied position without hashing
                # them again.
                self.applied, refused = await self.store.apply_stream(
                    entries, entries[-1].hash, hashed=True)
                _count(self.stats, "entries_applied", len(entries))
                if refused:
                    _count(self.stats, "entries_refused", refused)
                # Applied: no longer held (and the leader hears of it by the next ACK).
                queued.add(-len(entries), -sum(n for _, _, n in batches))
            if queued.ended:
                continue  # the stream is over: apply what is left, acknowledge nothing
            now = anyio.current_time()
            keepalive = not batches or any(not b for b, _, _ in batches)
            if keepalive or now - acked_at >= ACK_DELAY:
                await conn.send(encode(Ack(epoch, self.applied)))
                acked_at, owed = now, False
            else:
                owed = True
