"""Writes on a follower: forwarded to the leader, read back once applied, and
kept locally (then pushed by Merkle sync) when the leader is out of reach.
Frames and the leader's dedupe table are :mod:`agent.core.forwarding`'s.

Rules:

* While the agent is ``Follower`` (it hears from its leader), a write
  through the API (PUT, DELETE, batch POST) is sent to the leader over
  :func:`agent.net.stream.connect` (the PSK handshake applies) and arrives on
  the leader's sync listener, routed by its first byte
  (:data:`~agent.core.forwarding.FIRST_BYTE`) to :meth:`ForwardServer.serve`.
  The client's answer waits until the leader committed the write; it
  carries the item as the leader wrote it and the leader's log position.
* Each write has a random 64-bit id (from the agent's seeded rng), so a
  request re-sent after a broken connection is answered from the leader's
  :class:`~agent.core.forwarding.Dedupe` (the last 65,536 writes of at most
  10 minutes and 16 MiB, in memory; answers kept without the value) rather
  than written twice; a request reusing a pair for another write is refused
  (``forward_refused_id_conflict``). After that window, or
  after a leader restart or failover, a re-sent write is written again: the
  same value as a newer version.
* Connections to the leader are pooled (:data:`POOL`), each kept idle for
  :data:`POOL_IDLE` seconds at most, half the leader's :data:`IDLE_TIMEOUT`;
  a pooled connection that fails anyway (the leader closed it) does not
  count as one of a write's 3 attempts (``forward_pooled_failed``): the
  request goes again, same id, on a fresh connection. A request whose
  encoding cannot fit one frame is kept locally at once
  (``forward_too_large``), never sent.
* Every request carries the epoch the follower knows; the leader writes only
  requests of its own epoch and otherwise answers with its epoch: a higher
  one is remembered (persisted with :meth:`Store.see_epoch`) and the request
  sent again, a lower one marks that leader as deposed (the write is then
  kept locally, as below). A leader accepts forwarded writes only while it
  is leader (with etcd: while :meth:`Election.is_leader` holds, so never
  after its lease could have expired).
* Read-your-writes on the device: after a forwarded write, a GET of that
  key waits until the follower has applied the leader's position (the
  applied position is read from the store, written in the same transaction
  as the data), at most :data:`READ_WAIT` seconds; then it serves what it
  has. At most :data:`MAX_PENDING` keys are remembered (the oldest go).
* When the write cannot reach the leader within :data:`FORWARD_TIMEOUT`
  (role ``Edge``, leader unreachable, deposed, or not leader) it is written
  locally as on any agent and its collection is marked unsent. If a request
  went out and no answer came (the leader may have committed it), the same
  request (same id) is sent once more first, for :data:`RESOLVE_TIMEOUT`
  seconds: a committed one is answered from the leader's dedupe table and
  not written again locally (``forward_resolved``). See docs/PROTOCOL.md for
  the window that remains. Before the
  follower's next HELLO to a leader (and, while connected, every interval)
  the unsent collections are reconciled with the leader by Merkle sync
  (both ways, last writer wins), so what was written while away reaches the
  leader before streaming resumes; at start every collection is, once (a
  write kept locally before a restart is not forgotten).
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgpack

from agent.core.changelog import Position
from agent.core.forwarding import (
    BATCH,
    DELETE,
    FIRST_BYTE,
    ID_CONFLICT,
    NOT_LEADER,
    OK,
    PUT,
    WRONG_EPOCH,
    Answer,
    Dedupe,
    DedupeConflict,
    ProtocolError,
    Request,
    WrittenItem,
    decode,
    encode,
    request_digest,
)
from agent.net.stream import Framed, connect
from agent.runtime.counters import count as _count
from agent.runtime.sync_service import SESSION_ERRORS, long_lived, sync_once
from agent.store import StoreError, encode_value
from merkle.frames import SALT_LEN
from merkle.tree import Item

if TYPE_CHECKING:
    from agent.config import HostPort
    from agent.net.handshake import StreamKeys
    from agent.runtime.leadership import Replication
    from agent.store import Store

log = logging.getLogger("hs_gossip.forwarding")

#: seconds a forwarded write may take (connect, handshake, commit, answer)
FORWARD_TIMEOUT = 5.0
#: seconds a write whose outcome is unknown after FORWARD_TIMEOUT is asked
#: about once more (same id) before it is written locally
RESOLVE_TIMEOUT = 2.0
#: seconds a read of a key written through the leader waits for it to apply
READ_WAIT = 2.0
#: keys whose forwarded position is remembered for read-your-writes
MAX_PENDING = 100_000
#: connections kept open to the leader (writes in flight at once)
POOL = 8
#: forwarding connections a leader serves at once
MAX_CONNECTIONS = 256
#: seconds a leader keeps an idle forwarding connection
IDLE_TIMEOUT = 120.0
#: seconds a follower keeps a pooled connection idle (well inside the leader's
#: IDLE_TIMEOUT, so the pool does not hand out connections the leader closed)
POOL_IDLE = IDLE_TIMEOUT / 2
#: bytes a sealed frame may add to its body (AEAD nonce and tag, with room)
SEAL_RESERVE = 64
#: what a failed forwarding exchange raises
FAILURES = (*SESSION_ERRORS, ProtocolError)

#: intervals between two looks for unsent local writes while not following
IDLE_LOOK = 5


def _value(data: bytes) -> Any:
    """A forwarded value: msgpack of a JSON value (no bin, no ext)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0,
                               max_ext_len=0)
    except Exception:  # msgpack raises many types for bad input
        raise ProtocolError("bad value") from None


# --- the leader's side -------------------------------------------------------------


class ForwardServer:
    """Answers forwarded writes. ``epoch()`` is this agent's epoch while it
    accepts writes as leader, None while it does not."""

    def __init__(self, store: Store, epoch: Callable[[], int | None], max_frame: int,
                 dedupe: Dedupe | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.epoch = epoch
        self.max_frame = max_frame
        self.dedupe = dedupe or Dedupe()
        self.clock = clock
        self.stats: dict[str, int] = {}
        self.connections = 0
        self._inflight: dict[tuple[bytes, int], anyio.Event] = {}

    async def serve(self, conn: Framed, first: bytes) -> None:
        """One follower's forwarding connection, after its one-byte frame."""
        if self.connections >= MAX_CONNECTIONS:
            _count(self.stats, "forward_refused_busy")
            return
        self.connections += 1
        long_lived()  # capped above, timed per request below
        try:
            while True:
                with anyio.fail_after(IDLE_TIMEOUT):
                    data = await conn.receive()
                req = decode(data)
                if not isinstance(req, Request):
                    raise ProtocolError("expected REQUEST")
                await conn.send(encode(await self.handle(req)))
        except anyio.EndOfStream:
            pass
        except FAILURES as e:
            _count(self.stats, "forward_streams_failed")
            log.info("forwarding from %s ended: %s", conn.peer, e or type(e).__name__)
        finally:
            self.connections -= 1

    async def handle(self, req: Request) -> Answer:
        epoch = self.epoch()
        if epoch is None:
            _count(self.stats, "forward_refused_not_leader")
            return Answer(0, req.id, NOT_LEADER, "not the leader", None)
        if req.epoch != epoch:
            _count(self.stats, "forward_refused_epoch")
            return Answer(epoch, req.id, WRONG_EPOCH,
                          f"request of epoch {req.epoch}, leader at {epoch}", None)
        key = (req.origin, req.id)
        digest = request_digest(req)
        while (ev := self._inflight.get(key)) is not None:
            await ev.wait()  # the same request, re-sent while the first commits
        try:
            done = self.dedupe.get(req.origin, req.id, digest, self.clock())
        except DedupeConflict as e:
            # Another write under the same (origin, id): never its answer.
            _count(self.stats, "forward_refused_id_conflict")
            log.warning("forwarded write refused: %s", e)
            return Answer(epoch, req.id, ID_CONFLICT, str(e), None)
        if done is not None:
            _count(self.stats, "forward_deduplicated")
            return done
        ev = self._inflight[key] = anyio.Event()
        try:
            answer = await self._write(req, epoch)
            if answer.status == OK:
                self.dedupe.put(req.origin, req.id, digest, answer, self.clock())
            return answer
        finally:
            del self._inflight[key]
            ev.set()

    async def _write(self, req: Request, epoch: int) -> Answer:
        try:
            if req.op == PUT:
                key, value = req.args
                item: Item | None = await self.store.put(req.collection, key, _value(value))
            elif req.op == DELETE:
                item = await self.store.delete(req.collection, req.args[0])
                if item is None:
                    return Answer(epoch, req.id, 404, f"no item {req.args[0]!r} in "
                                  f"collection {req.collection!r}", self.store.log_head)
            else:
                values = {k: _value(v) for k, v in req.args}
                n = await self.store.put_many(req.collection, values)
                _count(self.stats, "forward_written", len(values))
                return Answer(epoch, req.id, OK, "", self.store.log_head, None, n)
        except ProtocolError as e:
            return Answer(epoch, req.id, 400, str(e), None)
        except StoreError as e:
            return Answer(epoch, req.id, int(getattr(e, "status", 400)), str(e)[:400], None)
        _count(self.stats, "forward_written")
        assert item is not None
        # The head after our commit: at or past our entry.
        return Answer(epoch, req.id, OK, "", self.store.log_head,
                      WrittenItem(item.key, item.hlc, item.origin, item.deleted, item.value))


# --- the follower's side -----------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """What a write through the API did: ``status`` 200 with the item (None
    for a batch, ``written`` items) or an error status and message.
    ``position``: the leader's log position when the leader committed it;
    None when it was written locally."""

    status: int
    message: str = ""
    item: Item | None = None
    written: int = 0
    position: Position | None = None


class WriteGate(Protocol):
    """What the API's collection routes call for writes and reads."""

    async def put(self, name: str, key: str, value: Any) -> Written: ...

    async def delete(self, name: str, key: str) -> Written: ...

    async def put_many(self, name: str, values: dict[str, Any]) -> Written: ...

    async def settle(self, name: str, key: str) -> None: ...


class Upstream(Protocol):
    """The replication state forwarding reads (agent.runtime.replication's
    Replication, or agent.runtime.failover's Failover)."""

    def leader_epoch(self) -> int | None:
        """This agent's epoch while it accepts writes as leader, else None."""

    def forward_target(self, now: float) -> HostPort | None:
        """The leader to forward to now; None: write locally."""

    def epoch_seen(self) -> int:
        """The highest leader epoch this agent has seen."""


class Forwarding:
    """Both sides: serves forwarded writes (answering only while leader) and
    forwards this agent's API writes while it follows a leader."""

    def __init__(self, store: Store, upstream: Upstream, node_id: bytes, max_frame: int,
                 keys: Callable[[], StreamKeys | None], rng: random.Random, interval: float,
                 tombstone_grace: float = 604800.0,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self.store = store
        #: how run() waits between looks: the agent's rounds, so an idle
        #: agent spends no wakeup of its own on this loop
        self._sleep = sleep
        self.upstream = upstream
        self.node_id = node_id
        self.max_frame = max_frame
        self.keys = keys
        self.rng = rng
        self.interval = interval
        self.tombstone_grace = tombstone_grace
        self.server = ForwardServer(store, upstream.leader_epoch, max_frame)
        self.stats = self.server.stats
        self._epoch = 0
        #: pooled connections: (leader, connection, idle since)
        self._idle: list[tuple[HostPort, Framed, float]] = []
        self._slots = anyio.Semaphore(POOL)
        self._pending: OrderedDict[tuple[str, str], Position] = OrderedDict()
        self._committed = anyio.Event()
        store.commit_listeners.append(self._on_commit)
        #: collections written locally and not yet reconciled with a leader
        #: (name -> a counter bumped by each such write); None: all of them
        self._unsent: dict[str, int] | None = None

    # --- wiring ------------------------------------------------------------------

    def routes(self) -> dict[int, Callable[[Framed, bytes], Awaitable[None]]]:
        """The long-lived route to register on the sync listener."""
        return {FIRST_BYTE: self.server.serve}

    async def run(self) -> None:
        """While following, push locally written collections every interval."""
        target: HostPort | None = None
        while True:
            # Not following: look again only every IDLE_LOOK intervals (the
            # push before each HELLO is what matters; this is the safety
            # net), so an agent without a leader does not wake every interval.
            await self._sleep(self.interval * (1 if target is not None else IDLE_LOOK))
            target = self.upstream.forward_target(anyio.current_time())
            if target is not None and self._unsent != {}:
                try:
                    await self.push(target)
                except FAILURES as e:
                    log.debug("pushing local writes to %s: %s", target, e or type(e).__name__)

    def _on_commit(self) -> None:
        self._committed.set()
        self._committed = anyio.Event()

    # --- the API's writes --------------------------------------------------------

    async def put(self, name: str, key: str, value: Any) -> Written:
        data = encode_value(value)
        ans = await self._forward(PUT, name, (key, data))
        if ans is None:
            item = await self.store.put(name, key, value)
            self._wrote_locally(name)
            return Written(OK, item=item)
        return self._answered(name, key, ans, data)

    async def delete(self, name: str, key: str) -> Written:
        ans = await self._forward(DELETE, name, (key,))
        if ans is None:
            item = await self.store.delete(name, key)
            if item is None:
                return Written(404, f"no item {key!r} in collection {name!r}")
            self._wrote_locally(name)
            return Written(OK, item=item)
        return self._answered(name, key, ans)

    async def put_many(self, name: str, values: dict[str, Any]) -> Written:
        ans = await self._forward(BATCH, name,
                                  tuple((k, encode_value(v)) for k, v in values.items()))
        if ans is None:
            n = await self.store.put_many(name, values)
            self._wrote_locally(name)
            return Written(OK, written=n)
        if ans.status == OK and ans.position is not None:
            for k in values:
                self._remember(name, k, ans.position)
        return Written(ans.status, ans.message, written=ans.written, position=ans.position)

    def _answered(self, name: str, key: str, ans: Answer, sent: bytes | None = None) -> Written:
        item = None
        if ans.item is not None:
            it = ans.item
            # An answer from the leader's dedupe table has no value: it is
            # the one this agent sent.
            value = sent if it.value is None and not it.deleted else it.value
            item = Item(it.key, it.hlc, it.origin, it.deleted, value)
        if ans.position is not None:
            self._remember(name, key, ans.position)
        return Written(ans.status, ans.message, item, position=ans.position)

    def _wrote_locally(self, name: str) -> None:
        _count(self.stats, "writes_kept_locally")
        if self._unsent is not None:
            self._unsent[name] = self._unsent.get(name, 0) + 1

    # --- forwarding --------------------------------------------------------------

    async def _forward(self, op: int, name: str, args: tuple[Any, ...]) -> Answer | None:
        """The leader's answer, or None: write locally."""
        target = self.upstream.forward_target(anyio.current_time())
        if target is None:
            return None
        # A request larger than a frame can never be sent: kept locally at
        # once (its size does not depend on the epoch or the id).
        size = len(encode(Request(0, self.node_id, 0, op, name, args)))
        if size + SEAL_RESERVE + 16 > self.max_frame:
            _count(self.stats, "forward_too_large")
            log.info("write to %s kept locally: %d bytes, over the %d-byte frame limit", name,
                     size, self.max_frame)
            return None
        # Random: another agent cannot guess it to pre-empt this write.
        id_ = self.rng.getrandbits(64)
        #: the last request sent whose outcome is unknown (it may have been
        #: committed: the answer was lost or is late)
        unknown: Request | None = None
        with anyio.move_on_after(FORWARD_TIMEOUT):
            async with self._slots:
                for _ in range(3):
                    epoch = max(self._epoch, self.upstream.epoch_seen())
                    unknown = Request(epoch, self.node_id, id_, op, name, args)
                    try:
                        ans = await self._exchange(target, unknown)
                    except FAILURES as e:
                        _count(self.stats, "forward_failures")
                        log.debug("forwarding to %s: %s", target, e or type(e).__name__)
                        await anyio.sleep(0.05)
                        continue
                    unknown = None
                    if ans.epoch < epoch or ans.status == NOT_LEADER:
                        # A deposed leader: nothing of ours is written there.
                        _count(self.stats, "forward_refused_stale_leader")
                        break
                    if ans.status == WRONG_EPOCH:
                        await self._see_epoch(ans.epoch)
                        continue
                    if ans.epoch > epoch:
                        await self._see_epoch(ans.epoch)
                    _count(self.stats, "writes_forwarded")
                    return ans
        if unknown is not None and (resolved := await self._resolve(target, unknown)):
            return resolved
        _count(self.stats, "forward_gave_up")
        log.info("write to %s kept locally: leader %s did not take it", name, target)
        return None

    async def _resolve(self, target: HostPort, req: Request) -> Answer | None:
        """Ask once more with the SAME request (id and epoch) before writing
        locally: if the leader committed it (or is committing it), its dedupe
        table answers, and the write is not made a second time locally with
        a newer HLC (which could overwrite, by last writer wins, another
        client's later write on the leader). None: still unknown."""
        with anyio.move_on_after(RESOLVE_TIMEOUT):
            async with self._slots:
                try:
                    ans = await self._exchange(target, req)
                except FAILURES:
                    return None
                if ans.epoch == req.epoch and ans.status not in (WRONG_EPOCH, NOT_LEADER):
                    _count(self.stats, "forward_resolved")
                    return ans
        return None

    async def _see_epoch(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch
            await self.store.see_epoch(epoch)

    async def _pooled(self, target: HostPort) -> Framed | None:
        """A pooled connection to ``target`` idle for less than
        :data:`POOL_IDLE`; the others are closed."""
        now = anyio.current_time()
        while self._idle:
            at, c, since = self._idle.pop()
            if at == target and now - since < POOL_IDLE:
                return c
            await c.aclose()
        return None

    async def _exchange(self, target: HostPort, req: Request) -> Answer:
        """One request and its answer. A pooled connection that fails (the
        leader may have closed it) is not an attempt: the request goes again
        (same id: the leader's dedupe answers it if it was committed) on a
        fresh connection."""
        while (conn := await self._pooled(target)) is not None:
            try:
                return await self._on(conn, target, req)
            except FAILURES as e:
                _count(self.stats, "forward_pooled_failed")
                log.debug("pooled connection to %s: %s", target, e or type(e).__name__)
        conn = await connect(target.host, target.port, self.max_frame, self.keys())
        try:
            await conn.send(bytes([FIRST_BYTE]))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.aclose()
            raise
        return await self._on(conn, target, req)

    async def _on(self, conn: Framed, target: HostPort, req: Request) -> Answer:
        ok = False
        try:
            await conn.send(encode(req))
            ans = decode(await conn.receive())
            if not isinstance(ans, Answer) or ans.id != req.id:
                raise ProtocolError("expected the ANSWER to our request")
            ok = True
            return ans
        finally:
            if ok:
                self._idle.append((target, conn, anyio.current_time()))
            else:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

    # --- read-your-writes ----------------------------------------------------------

    def _remember(self, name: str, key: str, pos: Position) -> None:
        self._pending[(name, key)] = pos
        self._pending.move_to_end((name, key))
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    async def settle(self, name: str, key: str) -> None:
        """Wait (at most READ_WAIT) until a key written through the leader
        has come back through the stream."""
        pos = self._pending.get((name, key))
        if pos is None:
            return
        with anyio.move_on_after(READ_WAIT):
            while True:
                applied, _ = await self.store.stream_position()
                if applied.seq >= pos.seq:
                    if self._pending.get((name, key)) == pos:
                        del self._pending[(name, key)]
                    return
                committed = self._committed
                with anyio.move_on_after(0.05):
                    await committed.wait()
        _count(self.stats, "read_wait_timeouts")

    # --- what was written while away reaches the leader ------------------------

    async def push(self, target: HostPort) -> None:
        """Reconcile the collections written locally with the leader at
        ``target`` (Merkle sync, both ways). Raises what sync raises."""
        unsent = self._unsent
        names = [c.name for c in self.store.digests()] if unsent is None else list(unsent)
        before = dict(unsent) if unsent is not None else {}
        for name in names:
            await sync_once(self.store, target.host, target.port, name, self.max_frame, 0,
                            self.tombstone_grace, salt=self.rng.randbytes(SALT_LEN),
                            keys=self.keys())
            _count(self.stats, "pushes")
        if unsent is None:
            self._unsent = {}
            if names:
                log.info("reconciled %d collection(s) with leader %s", len(names), target)
            return
        for name, n in before.items():
            # A write kept locally while we pushed stays unsent.
            if self._unsent is not None and self._unsent.get(name) == n:
                del self._unsent[name]
        log.info("local writes of %s reconciled with leader %s", ", ".join(names), target)

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop()[1].aclose()


class StaticUpstream:
    """:class:`Upstream` for a fixed leader (HS_GOSSIP_ROLE=leader) or a
    fixed coordinator (HS_GOSSIP_COORDINATOR): reads
    agent.runtime.replication's Replication."""

    def __init__(self, replication: Replication) -> None:
        self.replication = replication

    def leader_epoch(self) -> int | None:
        leader = self.replication.leader
        return None if leader is None else leader.epoch

    def forward_target(self, now: float) -> HostPort | None:
        f = self.replication.follower
        return None if f is None else f.forward_target(now)

    def epoch_seen(self) -> int:
        f = self.replication.follower
        return 0 if f is None else f.epoch_seen
