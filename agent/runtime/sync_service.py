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
* Interrupting a session at any point is safe: received items are applied in
  whole batches by last-writer-wins, and applying an item twice is a no-op.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from agent.core.clock import COUNTER_BITS
from agent.core.sync_plan import SyncPlanner
from agent.net.stream import Framed, SyncError, connect, listen
from agent.runtime.errors import StartupError
from agent.store import Store, StoreError, check_name
from merkle import frames
from merkle.frames import SALT_LEN, Done, Frame, Hello, Items, ProtocolError
from merkle.reconcile import Session
from merkle.tree import Item

log = logging.getLogger("hs_gossip.sync")

FRAME_OVERHEAD = 1 << 20
SESSION_TIMEOUT = 300.0
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


async def _receive(conn: Framed) -> Frame:
    return frames.decode(await conn.receive())


async def _exchange(store: Store, conn: Framed, session: Session, name: str,
                    first: Frame, result: SyncResult, peer_horizon_ms: int,
                    drop_before_ms: int = 0) -> None:
    """Alternate until the session is done. ``first`` is the peer's first frame.

    Items older than the peer's tombstone horizon are not shipped: it would
    refuse them. Those also older than ``drop_before_ms`` are changes the
    swarm has moved past, and are removed here once the session is over, so
    that the two replicas can agree. Only the initiator passes a
    ``drop_before_ms``, taken from the peer's heartbeat and never later than
    now minus the grace: a HELLO from any TCP client can make us withhold
    items, never delete them."""
    peer_horizon = peer_horizon_ms << COUNTER_BITS
    drop_before = min(drop_before_ms, peer_horizon_ms) << COUNTER_BITS
    stale: list[Item] = []
    try:
        await _alternate(store, conn, session, name, first, result, peer_horizon, stale)
    finally:
        stale = [i for i in stale if i.hlc < drop_before]
        if stale:
            with anyio.CancelScope(shield=True):
                result.dropped = await store.drop_stale(name, stale)
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
                    grace_s: float = 604800.0, *, salt: bytes) -> SyncResult:
    """Reconcile collection ``name`` with the agent at host:port (initiator).
    ``peer_horizon_ms``: the tombstone horizon its heartbeat advertised;
    ``salt``: the session's (SALT_LEN bytes, fresh for every session)."""
    check_name(name)
    result = SyncResult(name)
    session = Session(salt)
    t0 = time.monotonic()
    with anyio.fail_after(SESSION_TIMEOUT):
        async with await connect(host, port, max_frame) as conn:
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
                                drop_before_ms)
                result.messages = session.messages_in + session.messages_out
            result.bytes_in, result.bytes_out = conn.bytes_in, conn.bytes_out
    result.seconds = time.monotonic() - t0
    return result


async def handle_connection(store: Store, conn: Framed, stats: dict[str, int]) -> None:
    """Answer one session on an accepted connection; errors are logged, not raised."""
    try:
        with anyio.fail_after(SESSION_TIMEOUT):
            hello = await _receive(conn)
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
                 *, rng: random.Random) -> None:
        self.store = store
        #: draws the salt of every session started here
        self.rng = rng  # salts: derived from the agent's seed
        self.tombstone_grace = tombstone_grace
        self.bind = bind
        self.port = port
        self.interval = interval
        self.max_frame = max_value * 2 + FRAME_OVERHEAD
        self.planner = SyncPlanner(concurrency=concurrency, cooldown=2 * interval)
        self.stats: dict[str, int] = {}
        self.durations: list[float] = []  # the last 100 sessions started here
        self.seconds_total = 0.0  # all of them, for the metrics summary

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            listener = await listen(self.bind, self.port, self.max_frame)
        except OSError as e:
            raise StartupError(
                f"cannot listen for sync on TCP {self.bind}:{self.port} "
                f"(HS_GOSSIP_SYNC_PORT): {e.strerror or e}") from None
        task_status.started()
        await listener.serve(partial(handle_connection, self.store, stats=self.stats))

    async def run(self, peers: Any) -> None:
        """``peers()`` returns [(peer_key, host, sync_port, {collection: state_hash},
        {collection: tombstone horizon ms})]."""
        async with anyio.create_task_group() as tg:
            while True:
                current = peers()
                targets = {p[0]: p for p in current}
                ours = {c.name: c.state_hash for c in self.store.digests()}
                plan = self.planner.plan(anyio.current_time(), ours,
                                         [(p[0], p[3]) for p in current])
                for key, name in plan:
                    _, host, port, _, horizons = targets[key]
                    tg.start_soon(self._one, key, host, port, name, horizons.get(name, 0))
                await anyio.sleep(self.interval)

    async def _one(self, key: str, host: str, port: int, name: str, horizon_ms: int) -> None:
        ok = False
        try:
            r = await sync_once(self.store, host, port, name, self.max_frame, horizon_ms,
                                self.tombstone_grace, salt=self.rng.randbytes(SALT_LEN))
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
        except SESSION_ERRORS as e:
            self.stats["sync_failures"] = self.stats.get("sync_failures", 0) + 1
            log.warning("sync of %s with %s:%d failed: %s", name, host, port,
                        e or type(e).__name__)
        finally:
            self.planner.finished(key, name, anyio.current_time(), ok)
