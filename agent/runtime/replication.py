"""Change-log streaming between a leader and its followers: the leader side
serving followers on the sync listener, the follower side that connects to
its coordinator, promotion, and fencing by epochs. Frames and decisions are
:mod:`agent.core.replication`'s; the store side is :mod:`agent.store.stream`.

Rules:

* Every agent with replication answers replication frames on its TCP sync
  port: the listener routes a connection whose first frame starts with the
  replication tag to :meth:`Replication.route` (agent.runtime.sync_service).
  A leader serves HELLO (:meth:`Leader.serve`); any agent answers PROBE with
  INFO, and a HELLO sent to a non-leader with INFO too (where it stands, and
  the leader it knows). Streams with keys run the PSK handshake like every
  TCP stream.
* Per follower the leader sends the backlog, then live entries as they
  commit: it wakes on the store's commit notification, never by polling,
  and sends a keepalive when it sent nothing for one interval. It sends no
  more than :data:`WINDOW_ENTRIES` entries and :data:`WINDOW_BYTES` bytes
  beyond the follower's last ACK; entries are read from the store per batch,
  so the leader holds at most one batch per follower in memory, and commits
  never wait for a follower (a slow one only slows its own task).
* The leader keeps each follower's acknowledged position; the oldest one
  holds log compaction back (agent.store.log.hold_bound).
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
* Epochs fence leaders. Every frame carries its sender's epoch; a follower
  persists the highest epoch seen with that epoch's leader (address and log
  id) and refuses frames of a lower epoch (``epoch_refused``, logged), then
  goes to the leader it knows for the higher epoch. ``promote`` makes this
  agent leader at one above every epoch it has seen, persisted in the
  transaction that raises it; without ``force`` only if no agent it can reach
  (the swarm's members, its coordinator, the leader it last knew) has seen a
  higher epoch or stands further in the same log (:func:`promotion_refusal`).
  The new leader announces itself (INFO) to the swarm's members.
* A leader that hears a higher epoch (a HELLO, an ACK, an INFO) steps down:
  it drops its followers, records the epoch and follows the leader named (or
  the one it finds), merging its own writes first as a diverged follower
  does: what it wrote that was never streamed is kept and reaches the new
  leader by Merkle sync.
* Where followers find a new leader: the leader named for the highest epoch
  they have seen (by a refused frame's sender, an INFO, the persisted
  record), else, while Edge, by asking every swarm member and the configured
  coordinator with PROBE and following the highest-epoch leader any INFO
  names (:func:`pick_leader`). A restarted agent starts with its configured
  coordinator unless it recorded a newer epoch's leader; an agent that was
  promoted stays leader across restarts; a leader restarted after it was
  deposed follows the recorded leader.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from agent.config import parse_host_port
from agent.core import changelog
from agent.core.changelog import GENESIS, ChainBroken, EntryInvalid, Position
from agent.core.replication import (
    SNAPSHOT_AHEAD,
    TAG,
    Ack,
    Chunk,
    ChunkAck,
    Diverged,
    Entries,
    Hello,
    Info,
    Probe,
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
    pick_leader,
    promotion_refusal,
)
from agent.net.stream import Framed, StreamHandshakeError, connect
from agent.runtime.sync_service import SESSION_ERRORS, sync_once
from agent.store.stream import SnapshotReader
from merkle.frames import SALT_LEN
from merkle.tree import Item

if TYPE_CHECKING:
    from agent.config import Config, HostPort
    from agent.net.handshake import StreamKeys
    from agent.runtime.sync_service import SyncService
    from agent.store import Store
    from agent.store.stream import Progress

log = logging.getLogger("hs_gossip.replication")

#: entries and bytes a leader sends one follower beyond its last ACK
WINDOW_ENTRIES = 8192
WINDOW_BYTES = 8 << 20
#: one ENTRIES frame at most (a single larger entry still goes alone)
BATCH_ENTRIES = 2048
BATCH_BYTES = 1 << 20
#: one snapshot CHUNK at most (items; bytes of keys and values)
SNAPSHOT_ITEMS = 512
SNAPSHOT_BYTES = 256 << 10
#: followers one leader serves at once; more are refused
MAX_FOLLOWERS = 256
#: seconds a follower gives the leader to accept and finish the handshake
CONNECT_TIMEOUT = 5.0
#: seconds one PROBE may take (connect, handshake, answer)
PROBE_TIMEOUT = 2.0
#: agents asked at once at most (promotion, finding a leader)
PROBE_MAX = 64
#: the longest wait between two connection attempts
MAX_BACKOFF = 30.0
#: failures a stream may end with (anything else is a bug and propagates)
STREAM_ERRORS = (*SESSION_ERRORS, ProtocolError, ChainBroken, EntryInvalid)


def _count(stats: dict[str, int], key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


class SnapshotRefused(ProtocolError):
    """A snapshot chunk or its roots did not verify: nothing of it is
    recorded as applied, and the follower asks for a new one."""


class PromotionRefused(Exception):
    """Promotion was refused; the message says why."""


# --- what the view shows ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownstreamView:
    """One connected follower, as its leader sees it."""

    addr: str
    node_id: str  # hex
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


class Leader:
    """Serves the change log to followers, at ``epoch`` (the log's head
    epoch when not given)."""

    def __init__(self, store: Store, node_id: bytes, interval: float,
                 window_entries: int = WINDOW_ENTRIES, window_bytes: int = WINDOW_BYTES,
                 epoch: int | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.interval = interval
        self.window_entries = window_entries
        self.window_bytes = window_bytes
        self.followers: dict[int, _Downstream] = {}
        self.stats: dict[str, int] = {}
        self._epoch = epoch
        self._next = 0
        #: called with (epoch, its leader's address or "") when a follower
        #: shows a higher epoch than ours: we are deposed
        self.on_higher_epoch: Callable[[int, str], None] | None = None
        store.commit_listeners.append(self.wake)

    @property
    def epoch(self) -> int:
        return self.store.log_head.epoch if self._epoch is None else self._epoch

    def wake(self) -> None:
        """A commit happened: every follower's sender looks for new entries."""
        for d in self.followers.values():
            d.event.set()

    def depose(self) -> None:
        """Stop feeding every follower (a higher epoch exists)."""
        for d in self.followers.values():
            d.scope.cancel()
        if self.wake in self.store.commit_listeners:
            self.store.commit_listeners.remove(self.wake)

    def min_needed_seq(self) -> int | None:
        """The oldest entry a connected follower still needs (compaction hold)."""
        if not self.followers:
            return None
        return min(d.window.acked_seq for d in self.followers.values()) + 1

    def downstream(self) -> tuple[DownstreamView, ...]:
        head = self.store.log_head.seq
        return tuple(sorted(
            (DownstreamView(d.addr, d.node_id.hex(), d.acked, d.start.seq,
                            max(0, head - d.acked.seq)) for d in self.followers.values()),
            key=lambda v: v.addr))

    def _higher(self, epoch: int, leader: str) -> None:
        _count(self.stats, "higher_epoch_heard")
        log.warning("a follower has seen epoch %d, this leader is at %d: stepping down",
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
            tg.start_soon(self._until_done, self._acks(conn, d, epoch), tg.cancel_scope, failed)
            await self._until_done(self._send(conn, d, epoch), tg.cancel_scope, failed)
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
            while (got := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
                while unacked >= SNAPSHOT_AHEAD:
                    await self._chunk_ack(conn, epoch, index - unacked)
                    unacked -= 1
                name, items = got
                wire = tuple((i.key, i.hlc, i.origin, i.deleted, i.value) for i in items)
                prev = chunk_hash(prev, index, name, wire)
                await conn.send(encode(Chunk(epoch, index, name, wire, prev)))
                _count(self.stats, "snapshot_items_sent", len(items))
                index += 1
                unacked += 1
            while unacked:
                await self._chunk_ack(conn, epoch, index - unacked)
                unacked -= 1
            return at
        finally:
            await anyio.to_thread.run_sync(reader.close)

    async def _chunk_ack(self, conn: Framed, epoch: int, index: int) -> None:
        with anyio.fail_after(3 * self.interval + CONNECT_TIMEOUT):
            f = decode(await conn.receive())
        if not isinstance(f, ChunkAck) or f.epoch != epoch or f.index != index:
            raise ProtocolError(f"expected CHUNK_ACK {index} of this epoch")

    @staticmethod
    async def _until_done(work: Coroutine[Any, Any, None], scope: anyio.CancelScope,
                          failed: list[BaseException]) -> None:
        try:
            await work
        except STREAM_ERRORS as e:
            failed.append(e)
        finally:
            scope.cancel()

    async def _send(self, conn: Framed, d: _Downstream, epoch: int) -> None:
        last_sent = anyio.current_time()
        while True:
            # A fresh event before looking: a commit from here on wakes us.
            d.event = anyio.Event()
            room_entries, room_bytes = d.window.room()
            if room_entries and d.window.sent_seq < self.store.log_head.seq:
                rows = await self.store.read_log_raw(
                    d.window.sent_seq, min(room_entries, BATCH_ENTRIES),
                    min(room_bytes, BATCH_BYTES))
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
                await conn.send(encode(Entries(epoch, data, changelog.decode(data[-1]).hash)))
                _count(self.stats, "entries_streamed", len(data))
                last_sent = anyio.current_time()
                continue
            with anyio.move_on_after(max(0.0, last_sent + self.interval - anyio.current_time())):
                await d.event.wait()
            if anyio.current_time() - last_sent >= self.interval:
                await conn.send(encode(Entries(epoch, ())))
                last_sent = anyio.current_time()

    async def _acks(self, conn: Framed, d: _Downstream, epoch: int) -> None:
        while True:
            # The follower answers every frame, keepalives included.
            with anyio.fail_after(3 * self.interval + CONNECT_TIMEOUT):
                f = decode(await conn.receive())
            if isinstance(f, Ack) and f.epoch > epoch:
                self._higher(f.epoch, "")
                raise ProtocolError(f"ACK of epoch {f.epoch}: deposed")
            if not isinstance(f, Ack) or f.epoch != epoch:
                raise ProtocolError("expected an ACK of this epoch")
            d.window.acked(f.position.seq)
            d.acked = f.position
            d.event.set()


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
        while True:
            # The leader sends at least a keepalive every interval; the slack
            # covers a leader whose store is busy with a large write.
            with anyio.fail_after(self.edge_after):
                f = decode(await conn.receive())
            if not isinstance(f, Entries):
                raise ProtocolError("expected ENTRIES")
            self._check_epoch(f.epoch, "ENTRIES")
            if f.epoch != epoch:
                raise ProtocolError("ENTRIES of another epoch in one stream")
            self._heard()
            if f.entries:
                entries = [changelog.decode(b) for b in f.entries]
                self.applied, refused = await self.store.apply_stream(entries, f.last_hash)
                _count(self.stats, "entries_applied", len(entries))
                if refused:
                    _count(self.stats, "entries_refused", refused)
            await conn.send(encode(Ack(epoch, self.applied)))


# --- asking around ---------------------------------------------------------------------


async def probe(addr: HostPort, node_id: bytes, epoch: int, max_frame: int,
                keys: StreamKeys | None, timeout: float = PROBE_TIMEOUT) -> Info | None:
    """The INFO of the agent at ``addr``; None if it does not answer in time."""
    try:
        with anyio.fail_after(timeout):
            async with await connect(addr.host, addr.port, max_frame, keys) as conn:
                await conn.send(encode(Probe(epoch, node_id)))
                f = decode(await conn.receive())
        return f if isinstance(f, Info) else None
    except (*STREAM_ERRORS, StreamHandshakeError):
        return None


async def tell(addr: HostPort, info: Info, max_frame: int, keys: StreamKeys | None,
               timeout: float = PROBE_TIMEOUT) -> bool:
    """Send ``info`` unasked (a new leader announcing itself)."""
    try:
        with anyio.fail_after(timeout):
            async with await connect(addr.host, addr.port, max_frame, keys) as conn:
                await conn.send(encode(info))
        return True
    except (*STREAM_ERRORS, StreamHandshakeError):
        return False


# --- wiring ------------------------------------------------------------------------------


class Replication:
    """The agent's part in streaming: a leader, a follower, or neither; and
    the switch between them (promotion, stepping down, a new leader)."""

    def __init__(self, cfg: Config, store: Store, sync: SyncService, node_id: bytes,
                 keys: Callable[[], StreamKeys | None], rng: random.Random,
                 peers: Callable[[], list[HostPort]] | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.interval = cfg.interval
        self.max_frame = sync.max_frame
        self.keys = keys
        self.rng = rng
        self.tombstone_grace = cfg.tombstone_grace
        self.configured_role = cfg.role
        self.coordinator = cfg.coordinator
        #: the swarm's members' sync addresses (asked when promoting or
        #: looking for a leader)
        self.peers = peers or (lambda: [])
        self.stats: dict[str, int] = {}
        self.leader: Leader | None = None
        self.follower: Follower | None = None
        self._epoch_seen = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._follower_scope: anyio.CancelScope | None = None
        self._switching = False
        #: handed to every follower this agent runs (agent.runtime.forwarding)
        self.before_hello: Callable[[HostPort], Awaitable[None]] | None = None
        if cfg.role == "leader":
            self.leader = self._new_leader(None)
        elif cfg.coordinator is not None:
            self.follower = self._new_follower(cfg.coordinator)
        sync.streams[TAG] = self.route

    def _new_leader(self, epoch: int | None) -> Leader:
        leader = Leader(self.store, self.node_id, self.interval, epoch=epoch)
        leader.on_higher_epoch = self._on_higher_epoch
        leader.stats = self.stats  # counters outlive role changes
        return leader

    def _new_follower(self, coordinator: HostPort, merge_first: bool = False) -> Follower:
        f = Follower(self.store, coordinator, self.node_id, self.interval, self.max_frame,
                     self.keys, self.rng, self.tombstone_grace, merge_first)
        f.on_newer_leader = self._on_newer_leader
        f.stats = self.stats
        f.before_hello = self.before_hello or (
            None if self.follower is None else self.follower.before_hello)
        return f

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        u = await self.store.upstream()
        self._epoch_seen = u.epoch_seen
        own = await self.store.log_epoch()
        if u.log_id == self.node_id and u.epoch_seen == own and u.epoch_seen > 0 \
                and self.leader is None:
            # Promoted before a restart: still the leader of its epoch.
            self.follower = None
            self.leader = self._new_leader(own)
            log.warning("leader of epoch %d (promoted before this start)", own)
        elif self.leader is not None:
            if u.epoch_seen > own and u.leader:
                log.warning("this leader was deposed (epoch %d seen, own %d): following %s",
                            u.epoch_seen, own, u.leader)
                self.leader.depose()
                self.leader = None
                self.follower = self._new_follower(parse_host_port(u.leader), merge_first=True)
            else:
                self.leader._epoch = own
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.follower is not None:
                self._start_follower(self.follower)
            tg.start_soon(self._find_leader_loop)
            await anyio.sleep_forever()

    def _start_follower(self, f: Follower) -> None:
        assert self._tg is not None
        scope = anyio.CancelScope()
        self._follower_scope = scope

        async def run() -> None:
            with scope:
                await f.run()

        self._tg.start_soon(run)

    def _stop_follower(self) -> None:
        if self._follower_scope is not None:
            self._follower_scope.cancel()
        self._follower_scope = None
        self.follower = None

    async def _find_leader_loop(self) -> None:
        """While Edge, ask around for the leader of the highest epoch."""
        while True:
            f = self.follower
            wait = self.interval if f is None else f.edge_after
            await anyio.sleep(wait)
            f = self.follower
            if f is None or f.role(anyio.current_time()) != "Edge":
                continue
            infos = await self.ask_around()
            found = pick_leader(f.epoch_seen, infos)
            if found is not None and found[0] != str(f.coordinator):
                _count(self.stats, "leaders_found")
                self._on_newer_leader(found[1], found[0])

    def known(self) -> list[HostPort]:
        """Every agent worth asking: the swarm's members, the configured
        coordinator, the one followed now and the leader last recorded."""
        out: list[HostPort] = list(self.peers())
        for a in (self.coordinator, None if self.follower is None else self.follower.coordinator):
            if a is not None:
                out.append(a)
        if self.follower is not None and self.follower.leader_addr:
            with contextlib.suppress(ValueError):
                out.append(parse_host_port(self.follower.leader_addr))
        return list(dict.fromkeys(out))[:PROBE_MAX]

    async def ask_around(self, targets: list[HostPort] | None = None) -> list[tuple[str, Info]]:
        """The INFOs of the agents that answer, (address, info)."""
        targets = self.known() if targets is None else targets
        out: list[tuple[str, Info]] = []
        keys = self.keys()

        async def one(addr: HostPort) -> None:
            info = await probe(addr, self.node_id, self.epoch_seen(), self.max_frame, keys)
            if info is not None and info.node_id != self.node_id:
                out.append((str(addr), info))

        async with anyio.create_task_group() as tg:
            for addr in targets:
                tg.start_soon(one, addr)
        _count(self.stats, "probes", len(targets))
        return sorted(out, key=lambda x: x[0])

    # --- role changes ------------------------------------------------------------------

    def _on_newer_leader(self, epoch: int, addr: str) -> None:
        """A leader of an epoch at least the highest seen is at ``addr``."""
        try:
            target = parse_host_port(addr)
        except ValueError:
            return
        if self.leader is not None:
            if epoch > self.leader.epoch:
                self._on_higher_epoch(epoch, addr)
            return
        f = self.follower
        if f is None or self._tg is None:
            return
        if epoch < f.epoch_seen:
            return
        f.retarget(target)

    def _on_higher_epoch(self, epoch: int, addr: str) -> None:
        """This leader is deposed: step down (in a task: called from frames)."""
        if self._tg is not None and not self._switching:
            self._switching = True
            self._tg.start_soon(self._step_down, epoch, addr)

    async def _step_down(self, epoch: int, addr: str) -> None:
        try:
            leader = self.leader
            if leader is None or epoch <= leader.epoch:
                return
            _count(self.stats, "stepped_down")
            leader.depose()
            self.leader = None
            await self.store.see_epoch(epoch, addr or None)
            self._epoch_seen = max(self._epoch_seen, epoch)
            target = None
            if addr:
                try:
                    target = parse_host_port(addr)
                except ValueError:
                    target = None
            if target is None:
                found = pick_leader(epoch, await self.ask_around())
                target = None if found is None else parse_host_port(found[0])
            log.warning("stepped down: epoch %d is newer than this leader's; following %s, "
                        "its own writes merged into the new leader first (last writer wins)",
                        epoch, target or "nobody yet")
            if target is None:
                target = self.coordinator
            if target is not None:
                self.follower = self._new_follower(target, merge_first=True)
                self._start_follower(self.follower)
        finally:
            self._switching = False

    async def promote(self, force: bool = False) -> int:
        """Make this agent the leader at one above every epoch it has seen.
        Without ``force`` only if no agent it reaches is further (see
        :func:`promotion_refusal`). Raises PromotionRefused; returns the
        new epoch."""
        if self.leader is not None:
            raise PromotionRefused(f"already the leader (epoch {self.leader.epoch})")
        if self._switching:
            raise PromotionRefused("a role change is under way")
        self._switching = True
        try:
            u = await self.store.upstream()
            if not force:
                infos = await self.ask_around()
                why = promotion_refusal(u.epoch_seen, u.log_id, u.applied, infos)
                if why is not None:
                    _count(self.stats, "promotions_refused")
                    log.warning("promotion refused: %s (use --force to promote anyway)", why)
                    raise PromotionRefused(why)
            self._stop_follower()
            epoch = await self.store.promote("")
            await self.store.see_epoch(epoch, "", self.node_id)
            self._epoch_seen = epoch
            self.leader = self._new_leader(epoch)
            _count(self.stats, "promotions")
            log.warning("promoted to leader at epoch %d%s (was at seq %d of the old leader's "
                        "log)", epoch, " (forced)" if force else "", u.applied.seq)
            if self._tg is not None:
                self._tg.start_soon(self._announce, epoch)
            return epoch
        finally:
            self._switching = False

    async def _announce(self, epoch: int) -> None:
        """Tell the swarm's members (INFO): their followers switch to us."""
        info = self.info()
        keys = self.keys()
        async with anyio.create_task_group() as tg:
            for addr in self.peers()[:PROBE_MAX]:
                tg.start_soon(tell, addr, info, self.max_frame, keys)
        log.info("announced epoch %d to %d swarm members", epoch, len(self.peers()))

    # --- the sync listener's route -------------------------------------------------------

    def info(self) -> Info:
        if self.leader is not None:
            return Info(self.leader.epoch, self.node_id, "Leader", "", self.node_id,
                        self.store.log_head)
        f = self.follower
        if f is None:
            return Info(self._epoch_seen, self.node_id, "", "", b"",
                        Position(0, 0, GENESIS))
        return Info(f.epoch_seen, self.node_id, f.role(anyio.current_time()),
                    f.leader_addr or str(f.coordinator), f.leader_id or b"", f.applied)

    async def route(self, conn: Framed, first: bytes) -> None:
        """A replication connection: HELLO for the leader, PROBE and INFO for anyone."""
        try:
            f = decode(first)
        except ProtocolError as e:
            _count(self.stats, "frames_refused")
            log.info("replication frame from %s refused: %s", conn.peer, e)
            return
        if isinstance(f, Hello) and self.leader is not None:
            await self.leader.serve(conn, first)
            return
        if isinstance(f, Hello | Probe):
            if f.epoch > self.epoch_seen() and isinstance(f, Hello) and f.leader:
                self._on_newer_leader(f.epoch, f.leader)
            with contextlib.suppress(*STREAM_ERRORS):
                await conn.send(encode(self.info()))
            return
        if isinstance(f, Info) and f.role == "Leader" and f.epoch > self.epoch_seen():
            # A new leader announces itself. Its sync address is not the
            # connection's source: ask around and follow the highest epoch.
            _count(self.stats, "announcements_heard")
            log.warning("a leader announces epoch %d (this agent saw %d): looking for it",
                        f.epoch, self.epoch_seen())
            found = pick_leader(f.epoch, await self.ask_around())
            if found is not None:
                self._on_newer_leader(found[1], found[0])
            return
        _count(self.stats, "frames_unexpected")

    # --- what others read -----------------------------------------------------------------

    def min_needed_seq(self) -> int | None:
        return None if self.leader is None else self.leader.min_needed_seq()

    def leader_epoch(self) -> int | None:
        """This agent's epoch while it is the leader, else None."""
        return None if self.leader is None else self.leader.epoch

    def forward_target(self, now: float) -> HostPort | None:
        """The leader to forward writes to now; None: write locally."""
        f = self.follower
        return f.coordinator if f is not None and f.role(now) == "Follower" else None

    def epoch_seen(self) -> int:
        """The highest leader epoch this agent has seen."""
        own = 0 if self.leader is None else self.leader.epoch
        f = 0 if self.follower is None else self.follower.epoch_seen
        return max(self._epoch_seen, own, f)

    def heard_epoch(self, epoch: int, leader: str) -> None:
        """Another path (a forwarded write's answer, gossip) saw ``epoch``
        with its leader at ``leader`` ("" unknown): a leader steps down, a
        follower switches to it."""
        if epoch <= self.epoch_seen() and not (self.follower is not None and leader):
            return
        if leader:
            self._on_newer_leader(epoch, leader)
        else:
            self._on_higher_epoch(epoch, "")

    def view(self, now: float) -> ReplicationView | None:
        stats = dict(self.stats)
        if self.leader is not None:
            head = self.store.log_head
            return ReplicationView("Leader", None, self.leader.downstream(), self.leader.epoch,
                                   head.seq, tuple(sorted(stats.items())))
        f = self.follower
        if f is None:
            return None
        return ReplicationView(f.role(now), str(f.coordinator), (), f.epoch_seen,
                               f.applied.seq, tuple(sorted(stats.items())))
