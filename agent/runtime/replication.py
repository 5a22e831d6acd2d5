"""Change-log streaming between a leader and its followers: the leader side
serving followers on the sync listener, and the follower side that connects
to HS_GOSSIP_COORDINATOR. Frames and decisions are
:mod:`agent.core.replication`'s; the store side is :mod:`agent.store.stream`.

Rules:

* The leader (HS_GOSSIP_ROLE=leader) answers on its TCP sync port: the
  listener routes a connection whose first frame starts with the
  replication tag to :meth:`Leader.serve` (agent.runtime.sync_service).
  Streams with keys run the PSK handshake like every TCP stream.
* Per follower the leader sends the backlog, then live entries as they
  commit: it wakes on the store's commit notification, never by polling,
  and sends a keepalive when it sent nothing for one interval. It sends no
  more than :data:`WINDOW_ENTRIES` entries and :data:`WINDOW_BYTES` bytes
  beyond the follower's last ACK; entries are read from the store per batch,
  so the leader holds at most one batch per follower in memory, and commits
  never wait for a follower (a slow one only slows its own task).
* The leader keeps each follower's acknowledged position; the oldest one
  holds log compaction back (agent.store.log.hold_bound).
* A follower connects through agent.net.stream.connect, sends HELLO with
  its applied position (persisted, so a restart resumes from it), applies
  each batch in one store transaction that also records the new position,
  and ACKs. DIVERGED or SNAPSHOT_NEEDED: it runs Merkle sync with the leader
  for every collection the leader listed (both ways, last writer wins:
  nothing it wrote is dropped), records the leader's head as applied, and
  asks again from there. Snapshots proper come later.
* Its role is ``Follower`` while it hears from the leader, ``Edge`` when
  the leader has not answered for :meth:`Follower.edge_after` seconds
  (3 x HS_GOSSIP_INTERVAL + :data:`CONNECT_TIMEOUT`); either way it accepts
  writes, and gossip and Merkle sync go on underneath. It reconnects with
  exponential backoff, from one interval up to :data:`MAX_BACKOFF`.
* A batch that breaks the chain is refused whole (nothing applied), counted
  (``chain_refused``) and logged; the follower reconnects from its position.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from agent.core import changelog
from agent.core.changelog import ChainBroken, EntryInvalid, Position
from agent.core.replication import (
    TAG,
    Ack,
    Diverged,
    Entries,
    Hello,
    ProtocolError,
    SnapshotNeeded,
    Stream,
    Verdict,
    Window,
    answer_hello,
    decode,
    encode,
    epoch_ok,
)
from agent.net.stream import Framed, StreamHandshakeError, connect
from agent.runtime.sync_service import SESSION_ERRORS, sync_once
from merkle.frames import SALT_LEN

if TYPE_CHECKING:
    from agent.config import Config, HostPort
    from agent.net.handshake import StreamKeys
    from agent.runtime.sync_service import SyncService
    from agent.store import Store

log = logging.getLogger("hs_gossip.replication")

#: entries and bytes a leader sends one follower beyond its last ACK
WINDOW_ENTRIES = 8192
WINDOW_BYTES = 8 << 20
#: one ENTRIES frame at most (a single larger entry still goes alone)
BATCH_ENTRIES = 2048
BATCH_BYTES = 1 << 20
#: followers one leader serves at once; more are refused
MAX_FOLLOWERS = 256
#: seconds a follower gives the leader to accept and finish the handshake
CONNECT_TIMEOUT = 5.0
#: the longest wait between two connection attempts
MAX_BACKOFF = 30.0
#: failures a stream may end with (anything else is a bug and propagates)
STREAM_ERRORS = (*SESSION_ERRORS, ProtocolError, ChainBroken, EntryInvalid)


def _count(stats: dict[str, int], key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


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


class Leader:
    """Serves the change log to followers."""

    def __init__(self, store: Store, node_id: bytes, interval: float,
                 window_entries: int = WINDOW_ENTRIES, window_bytes: int = WINDOW_BYTES) -> None:
        self.store = store
        self.node_id = node_id
        self.interval = interval
        self.window_entries = window_entries
        self.window_bytes = window_bytes
        self.followers: dict[int, _Downstream] = {}
        self.stats: dict[str, int] = {}
        self._next = 0
        store.commit_listeners.append(self.wake)

    @property
    def epoch(self) -> int:
        return self.store.log_head.epoch

    def wake(self) -> None:
        """A commit happened: every follower's sender looks for new entries."""
        for d in self.followers.values():
            d.event.set()

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
        key = self._next
        self._next += 1
        d = _Downstream(conn.peer, hello.node_id, hello.position,
                        Window(hello.position.seq, self.window_entries, self.window_bytes),
                        hello.position)
        # Registered before the answer is decided, so compaction holds for it.
        self.followers[key] = d
        try:
            if hello.epoch > epoch:
                _count(self.stats, "hello_newer_epoch")
                await conn.send(encode(Diverged(epoch, self.node_id, self.store.log_head,
                                                f"follower saw epoch {hello.epoch}", ())))
                return
            floor = await self.store.log_floor()
            head = self.store.log_head
            pos = hello.position
            known = await self.store.log_hash_at(pos.seq) if floor.seq < pos.seq < head.seq \
                else None
            answer = answer_hello(floor, head, pos, lambda seq: known if seq == pos.seq else None)
            names = tuple(c.name for c in self.store.digests())
            if answer.verdict is Verdict.DIVERGED:
                _count(self.stats, "answered_diverged")
                log.warning("follower %s diverged: %s", conn.peer, answer.reason)
                await conn.send(encode(Diverged(epoch, self.node_id, head, answer.reason, names)))
                return
            if answer.verdict is Verdict.SNAPSHOT_NEEDED:
                _count(self.stats, "answered_snapshot_needed")
                log.warning("follower %s needs a snapshot: %s", conn.peer, answer.reason)
                await conn.send(encode(SnapshotNeeded(epoch, self.node_id, floor, head, names)))
                return
            _count(self.stats, "answered_stream")
            log.info("streaming to follower %s from seq %d (%s)", conn.peer, pos.seq,
                     answer.reason)
            await conn.send(encode(Stream(epoch, self.node_id, head)))
            # Two tasks, one per direction; the first to end ends both (its
            # error is kept and raised here, outside the task group).
            failed: list[BaseException] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_done, self._acks(conn, d, epoch), tg.cancel_scope,
                              failed)
                await self._until_done(self._send(conn, d, epoch), tg.cancel_scope, failed)
            if failed:
                raise failed[0]
        finally:
            del self.followers[key]

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
                    # is told SNAPSHOT_NEEDED.
                    _count(self.stats, "follower_gap")
                    raise ProtocolError(f"entries after seq {d.window.sent_seq} are gone")
                data = tuple(r[1] for r in rows)
                await conn.send(encode(Entries(epoch, data, changelog.decode(data[-1]).hash)))
                d.window.sent(rows[-1][0], sum(map(len, data)))
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
                 tombstone_grace: float = 604800.0) -> None:
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
        self.last_heard = float("-inf")
        self.leader_id: bytes | None = None
        self.stats: dict[str, int] = {}
        self._edge_logged = True  # nothing to say before the first connection
        #: awaited before each HELLO with the leader's address: what this agent
        #: wrote while away reaches the leader first (agent.runtime.forwarding)
        self.before_hello: Callable[[HostPort], Awaitable[None]] | None = None

    @property
    def edge_after(self) -> float:
        """Seconds without a frame from the leader before the role is Edge."""
        return 3 * self.interval + CONNECT_TIMEOUT

    def role(self, now: float) -> str:
        return "Follower" if now - self.last_heard <= self.edge_after else "Edge"

    async def run(self) -> None:
        self.applied, self.epoch_seen = await self.store.stream_position()
        backoff = self.interval
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_edge)
            while True:
                try:
                    await self._session()
                    backoff = self.interval  # asked to come back at once (after a resync)
                    continue
                except StreamHandshakeError as e:
                    _count(self.stats, "connect_failures")
                    log.warning("leader %s refused the stream handshake (%s)", self.coordinator,
                                e.cause)
                except ChainBroken as e:
                    _count(self.stats, "chain_refused")
                    log.error("refused a batch from leader %s: %s", self.coordinator, e)
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

    def _check_epoch(self, epoch: int) -> None:
        if not epoch_ok(epoch, self.epoch_seen):
            _count(self.stats, "epoch_refused")
            raise ProtocolError(f"frame of epoch {epoch} below the highest seen "
                                f"({self.epoch_seen})")

    async def _session(self) -> None:
        host, port = self.coordinator.host, self.coordinator.port
        if self.before_hello is not None:
            await self.before_hello(self.coordinator)
        with anyio.fail_after(CONNECT_TIMEOUT):
            conn = await connect(host, port, self.max_frame, self.keys())
        async with conn:
            await conn.send(encode(Hello(self.epoch_seen, self.node_id, self.applied)))
            with anyio.fail_after(CONNECT_TIMEOUT + 3 * self.interval):
                answer = decode(await conn.receive())
            if isinstance(answer, Entries | Ack | Hello):
                raise ProtocolError("expected an answer to HELLO")
            self._check_epoch(answer.epoch)
            if answer.epoch > self.epoch_seen:
                await self.store.see_epoch(answer.epoch)
                self.epoch_seen = answer.epoch
            self.leader_id = answer.leader_id
            self._heard()
            if isinstance(answer, Stream):
                _count(self.stats, "streams")
                await self._follow(conn, answer.epoch)
                return
            why = answer.reason if isinstance(answer, Diverged) else "position compacted away"
            _count(self.stats, "resyncs")
            log.warning("leader %s answered %s (%s): catching up by Merkle sync, then "
                        "streaming from its seq %d", self.coordinator,
                        type(answer).__name__, why, answer.head.seq)
        # Off the stream connection: one sync session per collection.
        for name in answer.collections:
            await sync_once(self.store, host, port, name, self.max_frame, 0,
                            self.tombstone_grace, salt=self.rng.randbytes(SALT_LEN),
                            keys=self.keys())
            self._heard()
        await self.store.adopt_stream_position(answer.head)
        self.applied = answer.head

    async def _follow(self, conn: Framed, epoch: int) -> None:
        while True:
            # The leader sends at least a keepalive every interval; the slack
            # covers a leader whose store is busy with a large write.
            with anyio.fail_after(self.edge_after):
                f = decode(await conn.receive())
            if not isinstance(f, Entries):
                raise ProtocolError("expected ENTRIES")
            self._check_epoch(f.epoch)
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


# --- wiring ------------------------------------------------------------------------------


class Replication:
    """The agent's part in streaming: a leader, a follower, or neither."""

    def __init__(self, cfg: Config, store: Store, sync: SyncService, node_id: bytes,
                 keys: Callable[[], StreamKeys | None], rng: random.Random) -> None:
        self.store = store
        self.leader: Leader | None = None
        self.follower: Follower | None = None
        if cfg.role == "leader":
            self.leader = Leader(store, node_id, cfg.interval)
            sync.streams[TAG] = self.leader.serve
        elif cfg.coordinator is not None:
            self.follower = Follower(store, cfg.coordinator, node_id, cfg.interval,
                                     sync.max_frame, keys, rng, cfg.tombstone_grace)

    async def run(self) -> None:
        if self.follower is not None:
            await self.follower.run()

    def min_needed_seq(self) -> int | None:
        return None if self.leader is None else self.leader.min_needed_seq()

    def view(self, now: float) -> ReplicationView | None:
        if self.leader is not None:
            head = self.store.log_head
            return ReplicationView("Leader", None, self.leader.downstream(), head.epoch,
                                   head.seq, tuple(sorted(self.leader.stats.items())))
        f = self.follower
        if f is None:
            return None
        return ReplicationView(f.role(now), str(f.coordinator), (), f.applied.epoch,
                               f.applied.seq, tuple(sorted(f.stats.items())))

