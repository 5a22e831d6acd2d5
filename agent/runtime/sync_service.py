"""Merkle delta sync between agents over TCP: the sessions and the service.

* Which (peer, collection) pairs to reconcile, and when, is decided by
  :class:`agent.core.sync_plan.SyncPlanner` (no I/O): one session per peer,
  a concurrency cap, backoff after failures, a cool-down after success.
* TCP connections are opened, accepted and framed only in
  :mod:`agent.net.stream` (length prefix, size cap, timeouts, the seal/open
  seam). The frames themselves are encoded and validated only in
  :mod:`merkle.frames`; the reconciliation is :class:`merkle.reconcile.Session`,
  whose calls run on the store thread with a read-only view of the tree.
* :func:`handle_connection` answers sessions; :func:`sync_once` starts one.
  Salts come from the service's RNG (injected, so that runs can be replayed).
* Resources are bounded per connection and per peer: at most
  :meth:`SyncService.max_sessions` sessions are served at once, and
  :data:`SESSIONS_PER_HOST` from one address; a connection over either cap
  is closed at once (``sync_refused_busy``). A HELLO may be at most
  :data:`HELLO_MAX_FRAME` bytes; every frame must arrive whole within
  :func:`frame_deadline` (a minimum rate, so a trickling peer cannot hold a
  slot for the whole session deadline); frames decode within
  :func:`merkle.frames.decode_budget`. See docs/PROTOCOL.md for the bound.
* The listener is shared: the first byte of a connection's first frame says
  what it is. A sync HELLO is a msgpack array (its first byte is an array
  header, 0x90-0x9f or 0xdc); any other first byte is looked up in
  :attr:`SyncService.routes` (membership push-pull registers there), and
  an unknown one is refused (``stream_refused_kind``). Every first frame
  is at most :data:`HELLO_MAX_FRAME` bytes, refused at its length prefix;
  a route that needs more reads it in later frames under its own limit.
  Kinds in :attr:`SyncService.streams` (the change-log stream,
  agent.runtime.replication; forwarded writes) may turn long-lived: they
  run under the sync slot and session deadline until they call
  :func:`long_lived` (once the connection really is a stream), then give
  back their slot, run without the deadline, and cap and time themselves.
* Interrupting a session at any point is safe: received items are applied in
  whole batches by last-writer-wins, and applying an item twice is a no-op.
* With cluster keys, both ends of every connection run the stream handshake
  (:mod:`agent.net.handshake`) before any frame. Its key material comes from
  the ``keys`` function (asked per connection, so a reloaded keyring
  applies to the next one: the agent passes its seal's keyring); none
  given: keyless. Refused
  handshakes are counted by cause (``handshake_failed_<cause>``) and logged
  at most once per cause per :data:`REFUSAL_LOG_INTERVAL`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from agent.core.clock import COUNTER_BITS
from agent.core.sync_plan import SyncPlanner
from agent.net.stream import (
    IO_TIMEOUT,
    Framed,
    StreamHandshakeError,
    SyncError,
    connect,
    listen,
)
from agent.runtime.errors import StartupError
from agent.runtime.timers import Rounds
from agent.store import Store, StoreError, check_name
from merkle import frames
from merkle.frames import SALT_LEN, Done, Frame, Hello, Items, ProtocolError
from merkle.reconcile import Session
from merkle.tree import Item

if TYPE_CHECKING:
    from agent.net.handshake import StreamKeys

log = logging.getLogger("hs_gossip.sync")

FRAME_OVERHEAD = 1 << 20
#: at most one log line per refusal cause in this many seconds
REFUSAL_LOG_INTERVAL = 60.0
SESSION_TIMEOUT = 300.0
#: the slowest a frame may arrive, bytes per second, beyond one IO_TIMEOUT
MIN_RATE = 64 * 1024
#: largest HELLO accepted (a real one is under 2 KiB: its collection name,
#: 16 child summaries and counts)
HELLO_MAX_FRAME = 8 * 1024
#: sessions served at once for one source address (a peer starts one per
#: collection it syncs with us, one at a time)
SESSIONS_PER_HOST = 2
#: what a failed session may raise; anything else is a bug and propagates
SESSION_ERRORS = (OSError, anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError,
                  SyncError, ProtocolError, StoreError)


@dataclass
class SyncResult:
    collection: str
    items_in: int = 0
    items_out: int = 0
    rejected: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # our items older than the peer's horizon, removed here
    messages: int = 0
    seconds: float = 0.0


class RefusalLog:
    """Counts refused connections by cause into ``stats`` and logs one line
    per cause per interval (never one per connection)."""

    def __init__(self, stats: dict[str, int], interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self.last: dict[str, float] = {}
        self.since: dict[str, int] = {}

    def __call__(self, cause: str, peer: str) -> None:
        key = f"handshake_failed_{cause}"
        self.stats[key] = self.stats.get(key, 0) + 1
        self.since[cause] = self.since.get(cause, 0) + 1
        now = self.clock()
        last = self.last.get(cause)
        if last is None or now - last >= self.interval:
            log.warning("refused %d sync connection(s) (%s), the last from %s",
                        self.since[cause], cause, peer)
            self.last[cause] = now
            self.since[cause] = 0


def frame_deadline(max_frame: int) -> float:
    """Seconds a frame of up to ``max_frame`` bytes has to arrive whole."""
    return IO_TIMEOUT + max_frame / MIN_RATE


async def _receive(conn: Framed) -> Frame:
    with anyio.fail_after(frame_deadline(conn.max_frame)):
        data = await conn.receive()
    return frames.decode(data)


async def _receive_first(conn: Framed, max_size: int) -> bytes:
    """The first frame of a served connection, raw, at most ``max_size`` bytes."""
    limit = conn.max_frame
    conn.max_frame = min(limit, max_size)
    try:
        with anyio.fail_after(frame_deadline(conn.max_frame)):
            return await conn.receive()
    finally:
        conn.max_frame = limit


def _is_msgpack_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first == 0xDC


async def _exchange(store: Store, conn: Framed, session: Session, name: str,
                    first: Frame, result: SyncResult, peer_horizon_ms: int,
                    drop_before_ms: int = 0, peer_state: bytes | None = None) -> None:
    """Alternate until the session is done. ``first`` is the peer's first frame.

    Items older than the peer's tombstone horizon are not shipped: it would
    refuse them. Those also older than ``drop_before_ms`` are changes the
    swarm has moved past, and are removed here once the session is over, so
    that the two replicas can agree; if that leaves us with ``peer_state``
    (the peer's state_hash), we take its horizon at once (the adopt rule of
    agent.core.tombstones). Only the initiator passes a ``drop_before_ms``
    and a ``peer_state``, taken from the peer's heartbeat, the first never
    later than now minus the grace: a HELLO from any TCP client can make us
    withhold items, never delete them."""
    peer_horizon = peer_horizon_ms << COUNTER_BITS
    drop_before = min(drop_before_ms, peer_horizon_ms) << COUNTER_BITS
    # A horizon later than now - grace is not followed (see tombstones.choose).
    adopt = peer_state if peer_horizon_ms <= drop_before_ms else None
    stale: list[Item] = []
    try:
        await _alternate(store, conn, session, name, first, result, peer_horizon, stale)
    finally:
        stale = [i for i in stale if i.hlc < drop_before]
        if stale:
            with anyio.CancelScope(shield=True):
                result.dropped = await store.drop_stale(name, stale, peer_horizon, adopt)
            log.warning("removed %d item(s) of %s older than a peer's tombstone horizon "
                        "(changes the swarm moved past while this agent was away)",
                        result.dropped, name)


async def _alternate(store: Store, conn: Framed, session: Session, name: str, first: Frame,
                     result: SyncResult, peer_horizon: int, stale: list[Item]) -> None:
    msg = first
    while True:
        if isinstance(msg, Items):
            items = list(msg.items)
            _, rejected = await store.apply_remote(name, items)
            result.items_in += len(items)
            result.rejected += rejected
            msg = await _receive(conn)
            continue
        reply = await store.with_tree(name, partial(session.receive, frame=msg))
        requests = session.take_sends()
        if requests:
            async for batch in store.item_batches(name, requests):
                if peer_horizon:
                    stale.extend(i for i in batch if i.hlc < peer_horizon)
                    batch = [i for i in batch if i.hlc >= peer_horizon]
                if batch:
                    await conn.send(frames.encode(Items(tuple(batch))))
                    result.items_out += len(batch)
        if reply is None:
            return
        await conn.send(frames.encode(reply))
        if session.done:
            return
        msg = await _receive(conn)


async def sync_once(store: Store, host: str, port: int, name: str,
                    max_frame: int, peer_horizon_ms: int = 0,
                    grace_s: float = 604800.0, *, salt: bytes,
                    keys: StreamKeys | None = None,
                    peer_state: bytes | None = None) -> SyncResult:
    """Reconcile collection ``name`` with the agent at host:port (initiator).
    ``peer_horizon_ms`` and ``peer_state``: the tombstone horizon and
    state_hash its heartbeat advertised;
    ``salt``: the session's (SALT_LEN bytes, fresh for every session);
    ``keys``: the cluster keys for the stream handshake (None: cleartext)."""
    check_name(name)
    result = SyncResult(name)
    session = Session(salt)
    t0 = time.monotonic()
    with anyio.fail_after(SESSION_TIMEOUT):
        async with await connect(host, port, max_frame, keys) as conn:
            mine = next((c.horizon for c in store.digests() if c.name == name), 0)
            hello = await store.with_tree(
                name, partial(session.hello, collection=name,
                              horizon_ms=mine >> COUNTER_BITS))
            await conn.send(frames.encode(hello))
            first = await _receive(conn)
            if isinstance(first, Done):
                result.messages = 2
            else:
                drop_before_ms = int(time.time() * 1000) - int(grace_s * 1000)
                await _exchange(store, conn, session, name, first, result, peer_horizon_ms,
                                drop_before_ms, peer_state)
                result.messages = session.messages_in + session.messages_out
            result.bytes_in, result.bytes_out = conn.bytes_in, conn.bytes_out
    result.seconds = time.monotonic() - t0
    return result


#: intervals between two plans while every peer's digests match ours and
#: nothing pokes the service (a safety net: changes poke it at once)
IDLE_PLAN_INTERVALS = 5

#: a handler for connections whose first frame starts with its byte: it gets
#: the connection and that frame, and must bound its own time and memory
Route = Callable[[Framed, bytes], Awaitable[None]]


#: set while a ``streams`` route runs: turns its connection long-lived
_LONG_LIVED: ContextVar[Callable[[], None] | None] = ContextVar("long_lived", default=None)


def long_lived() -> None:
    """Called by a ``streams`` route once its connection has become a
    long-lived stream: its sync slot is given back and the session deadline
    lifted. Until then (a PROBE, a refused HELLO) it holds both."""
    become = _LONG_LIVED.get()
    if become is not None:
        become()


async def handle_connection(store: Store, conn: Framed, stats: dict[str, int],
                            routes: Mapping[int, Route] | None = None,
                            streams: Mapping[int, Route] | None = None,
                            release: Callable[[], None] | None = None) -> None:
    """Answer one connection: a sync session, or what ``routes`` says for
    its first byte. ``streams`` are routes for long-lived connections (the
    change-log stream, agent.runtime.replication): once they call
    :func:`long_lived` they run without the session deadline, after
    ``release()`` gave back their sync slot, and cap and time themselves.
    Errors are logged, not raised."""
    try:
        with anyio.fail_after(SESSION_TIMEOUT) as scope:
            first = await _receive_first(conn, HELLO_MAX_FRAME)
            stream = (streams or {}).get(first[0]) if first else None
            if stream is not None:
                def become() -> None:
                    scope.deadline = math.inf
                    if release is not None:
                        release()

                token = _LONG_LIVED.set(become)
                try:
                    await stream(conn, first)
                finally:
                    _LONG_LIVED.reset(token)
                return
            if first and not _is_msgpack_array(first[0]):
                route = (routes or {}).get(first[0])
                if route is None:
                    stats["stream_refused_kind"] = stats.get("stream_refused_kind", 0) + 1
                    return
                await route(conn, first)
                return
            hello = frames.decode(first)
            if not isinstance(hello, Hello):
                raise ProtocolError("expected HELLO")
            name = hello.collection
            check_name(name)
            session = Session(hello.salt)  # the responder uses the initiator's salt
            result = SyncResult(name)
            await _exchange(store, conn, session, name, hello, result, hello.horizon_ms)
            stats["sync_served"] = stats.get("sync_served", 0) + 1
            stats["sync_bytes_in"] = stats.get("sync_bytes_in", 0) + conn.bytes_in
            stats["sync_bytes_out"] = stats.get("sync_bytes_out", 0) + conn.bytes_out
            stats["sync_items_in"] = stats.get("sync_items_in", 0) + result.items_in
            stats["sync_items_out"] = stats.get("sync_items_out", 0) + result.items_out
            if result.items_in or result.items_out:
                log.info("sync %s with %s: %d items in, %d out", name, conn.peer,
                         result.items_in, result.items_out)
    except SESSION_ERRORS as e:
        stats["sync_served_failed"] = stats.get("sync_served_failed", 0) + 1
        log.warning("sync session from %s failed: %s", conn.peer, e or type(e).__name__)


# --- the service wired into the agent ---------------------------------------------


class SyncService:
    """Serves sync sessions and starts them when heartbeats show a difference."""

    def __init__(self, store: Store, bind: str, port: int, interval: float,
                 concurrency: int, max_value: int, tombstone_grace: float = 604800.0,
                 *, rng: random.Random,
                 keys: Callable[[], StreamKeys | None] | None = None) -> None:
        self.store = store
        #: the cluster keys now (None: keyless, cleartext streams)
        self.keys: Callable[[], StreamKeys | None] = keys or self._no_keys
        #: draws the salt of every session started here
        self.rng = rng  # salts: derived from the agent's seed
        self.tombstone_grace = tombstone_grace
        self.bind = bind
        self.port = port
        self.interval = interval
        self.max_frame = max_value * 2 + FRAME_OVERHEAD
        self.planner = SyncPlanner(concurrency=concurrency, cooldown=2 * interval)
        #: sessions served at once: room for every peer's sessions to us
        #: while ours run, a few more; beyond it connections are closed at once
        self.max_sessions = 2 * concurrency + 4
        self.serving: dict[str, int] = {}  # source host -> sessions served now
        self.stats: dict[str, int] = {}
        self.refused = RefusalLog(self.stats)
        self._poked = anyio.Event()
        #: the agent's rounds: the idle plan waits for one (None: a timer)
        self.rounds: Rounds | None = None
        #: other kinds of connection on this listener, by first byte
        self.routes: dict[int, Route] = {}
        #: long-lived kinds (the change-log stream): no session deadline, no
        #: sync slot; each caps its own connections
        self.streams: dict[int, Route] = {}
        self.durations: list[float] = []  # the last 100 sessions started here
        self.seconds_total = 0.0  # all of them, for the metrics summary

    @staticmethod
    def _no_keys() -> StreamKeys | None:
        return None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            listener = await listen(self.bind, self.port, self.max_frame, self.keys,
                                    self.refused)
        except OSError as e:
            raise StartupError(
                f"cannot listen for sync on TCP {self.bind}:{self.port} "
                f"(HS_GOSSIP_SYNC_PORT): {e.strerror or e}") from None
        task_status.started()
        await listener.serve(self._serve_one)

    async def _serve_one(self, conn: Framed) -> None:
        """One incoming connection, within the session caps."""
        # the source address is the per-host cap's key
        host = conn.remote_addr()[0] or conn.peer
        if (sum(self.serving.values()) >= self.max_sessions
                or self.serving.get(host, 0) >= SESSIONS_PER_HOST):
            self.stats["sync_refused_busy"] = self.stats.get("sync_refused_busy", 0) + 1
            return  # the listener closes the connection
        self.serving[host] = self.serving.get(host, 0) + 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.serving[host] -= 1
                if not self.serving[host]:
                    del self.serving[host]

        try:
            await handle_connection(self.store, conn, self.stats, self.routes, self.streams,
                                    release)
        finally:
            release()

    def poke(self) -> None:
        """A digest changed (ours or a peer's): plan now."""
        self._poked.set()

    async def run(self, peers: Any) -> None:
        """Plan sessions each interval while some peer differs from us, else
        when poked (at least every IDLE_PLAN_INTERVALS). ``peers()`` returns
        [(peer_key, host, sync_port, {collection: state_hash},
        {collection: tombstone horizon ms})]."""
        async with anyio.create_task_group() as tg:
            while True:
                current = peers()
                targets = {p[0]: p for p in current}
                ours = {c.name: c.state_hash for c in self.store.digests()}
                plan = self.planner.plan(anyio.current_time(), ours,
                                         [(p[0], p[3]) for p in current])
                for key, name in plan:
                    _, host, port, states, horizons = targets[key]
                    tg.start_soon(self._one, key, host, port, name, horizons.get(name, 0),
                                  states.get(name))
                # In step with every peer: nothing to plan until a digest
                # changes (poke) or a while has passed; otherwise look again
                # next interval (sessions in flight, pairs cooling down).
                in_step = not plan and all(p[3] == ours for p in current)
                self._poked = anyio.Event()
                wait = self.interval * (IDLE_PLAN_INTERVALS if in_step else 1)
                if in_step and self.rounds is not None:
                    # The safety-net plan rides on the agent's round (no
                    # wakeup of its own); a timer a little later covers for
                    # rounds that stop.
                    self.rounds.wake_at(anyio.current_time() + wait, self._poked)
                    wait += self.interval
                with anyio.move_on_after(wait):
                    await self._poked.wait()

    async def _one(self, key: str, host: str, port: int, name: str, horizon_ms: int,
                   peer_state: bytes | None = None) -> None:
        ok = False
        try:
            r = await sync_once(self.store, host, port, name, self.max_frame, horizon_ms,
                                self.tombstone_grace, salt=self.rng.randbytes(SALT_LEN),
                                keys=self.keys(), peer_state=peer_state)
            ok = True
            self.stats["sync_runs"] = self.stats.get("sync_runs", 0) + 1
            self.stats["sync_bytes_in"] = self.stats.get("sync_bytes_in", 0) + r.bytes_in
            self.stats["sync_bytes_out"] = self.stats.get("sync_bytes_out", 0) + r.bytes_out
            self.stats["sync_items_in"] = self.stats.get("sync_items_in", 0) + r.items_in
            self.stats["sync_items_out"] = self.stats.get("sync_items_out", 0) + r.items_out
            self.durations = [*self.durations[-99:], r.seconds]
            self.seconds_total += r.seconds
            if r.items_in or r.items_out or r.rejected:
                log.info("synced %s with %s:%d: %d items in, %d out, %d rejected, "
                         "%d bytes, %.2fs", name, host, port, r.items_in, r.items_out,
                         r.rejected, r.bytes_in + r.bytes_out, r.seconds)
        except StreamHandshakeError as e:
            # counted and logged like a refused incoming connection
            self.stats["sync_failures"] = self.stats.get("sync_failures", 0) + 1
            self.refused(e.cause, f"{host}:{port} (outgoing)")
        except SESSION_ERRORS as e:
            self.stats["sync_failures"] = self.stats.get("sync_failures", 0) + 1
            log.warning("sync of %s with %s:%d failed: %s", name, host, port,
                        e or type(e).__name__)
        finally:
            self.planner.finished(key, name, anyio.current_time(), ok)
