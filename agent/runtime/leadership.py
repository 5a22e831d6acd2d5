"""Who leads the change-log stream: the agent's part in streaming (a
leader, a follower of agent.runtime.replication, or neither), promotion,
stepping down, and finding a new leader by asking other agents.

Rules:

* Every agent with replication answers replication frames on its TCP sync
  port (:meth:`Replication.route`): a leader serves HELLO
  (agent.runtime.replication's Leader); any agent answers PROBE with INFO,
  and a HELLO sent to a non-leader with INFO too (where it stands, and the
  leader it knows).
* Epochs fence leaders. Every frame carries its sender's epoch; a follower
  persists the highest epoch seen with that epoch's leader (address and log
  id) and refuses frames of a lower epoch (``epoch_refused``, logged), then
  goes to the leader it knows for the higher epoch. ``promote`` makes this
  agent leader at one above every epoch it has seen, persisted in the
  transaction that raises it; without ``force`` only if no agent it can reach
  (the swarm's members, its coordinator, the leader it last knew) has seen a
  higher epoch or stands further in the same log (:func:`promotion_refusal`).
  The new leader announces itself (INFO) to the swarm's members.
* A higher epoch is a claim, never a proof: a HELLO, an ACK or an INFO
  saying so makes this agent PROBE the agent the claim names (or the leader
  found by asking around when it names none), and only that agent's INFO
  saying it is Leader at that epoch or above is believed
  (``epoch_claims_unconfirmed`` otherwise; one claim checked at a time).
  Asking around is one round at a time and at most one per
  :data:`ASK_EVERY` seconds (callers meanwhile share the last answer).
* A leader that hears a confirmed higher epoch steps down:
  it drops its followers, records the epoch and follows the leader named (or
  the one it finds), merging its own writes first as a diverged follower
  does: what it wrote that was never streamed is kept and reaches the new
  leader by Merkle sync.
* Where followers find a new leader: the leader named for the highest epoch
  they have seen (the persisted record, an INFO answering its HELLO, an
  announcement), else, while Edge, by asking every swarm member and the configured
  coordinator with PROBE (after ``edge_after`` seconds, then twice as long
  each time nobody knows a newer leader, up to :data:`SEARCH_MAX`) and
  following the highest-epoch leader any INFO names (:func:`pick_leader`).
  A restarted follower dials its configured coordinator first: a deposed
  leader there is refused for its lower epoch and the follower goes to the
  recorded leader (and that deposed leader, hearing the higher epoch in the
  HELLO, steps down). An agent that was promoted stays leader across
  restarts; a leader restarted after it was deposed follows the recorded
  leader.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from agent.config import parse_host_port
from agent.core.changelog import GENESIS, Position
from agent.core.replication import (
    TAG,
    Hello,
    Info,
    Probe,
    ProtocolError,
    decode,
    encode,
    pick_leader,
    promotion_refusal,
)
from agent.net.stream import StreamHandshakeError, connect
from agent.runtime.counters import count as _count

if TYPE_CHECKING:
    from agent.config import Config, HostPort
    from agent.net.handshake import StreamKeys
    from agent.net.stream import Framed
    from agent.runtime.replication import Follower, Leader, ReplicationView
    from agent.runtime.sync_service import SyncService
    from agent.store import Store

log = logging.getLogger("hs_gossip.replication")

#: seconds one PROBE may take (connect, handshake, answer)
PROBE_TIMEOUT = 2.0
#: agents asked at once at most (promotion, finding a leader)
PROBE_MAX = 64
#: seconds between two searches for a leader at most, while Edge
SEARCH_MAX = 60.0
#: seconds between two rounds of asking around at least
ASK_EVERY = 3.0


def _stream_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    # agent.runtime.replication (Leader, Follower: ~0.2 MiB of code) is
    # imported when this agent leads or follows, not by every agent.
    from agent.runtime.replication import STREAM_ERRORS

    return (*STREAM_ERRORS, *more)


class PromotionRefused(Exception):
    """Promotion was refused; the message says why."""


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
    except _stream_errors(StreamHandshakeError):
        return None


async def tell(addr: HostPort, info: Info, max_frame: int, keys: StreamKeys | None,
               timeout: float = PROBE_TIMEOUT) -> bool:
    """Send ``info`` unasked (a new leader announcing itself)."""
    try:
        with anyio.fail_after(timeout):
            async with await connect(addr.host, addr.port, max_frame, keys) as conn:
                await conn.send(encode(info))
        return True
    except _stream_errors(StreamHandshakeError):
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
        #: a claim of a newer leader being confirmed; a search under way
        self._confirming = False
        self._searching = False
        #: ask_around's round under way, and the last one's answer and time
        self._asking: anyio.Event | None = None
        self._asked: list[tuple[str, Info]] = []
        self._asked_at = -math.inf
        #: set while a follower runs (the search for a leader waits on it)
        self._following = anyio.Event()
        #: handed to every follower this agent runs (agent.runtime.forwarding)
        self.before_hello: Callable[[HostPort], Awaitable[None]] | None = None
        if cfg.role == "leader":
            self.leader = self._new_leader(None)
        elif cfg.coordinator is not None:
            self.follower = self._new_follower(cfg.coordinator)
        sync.streams[TAG] = self.route

    def _new_leader(self, epoch: int | None) -> Leader:
        from agent.runtime.replication import Leader

        leader = Leader(self.store, self.node_id, self.interval, epoch=epoch)
        leader.on_higher_epoch = self._on_higher_epoch
        leader.stats = self.stats  # counters outlive role changes
        return leader

    def _new_follower(self, coordinator: HostPort, merge_first: bool = False) -> Follower:
        from agent.runtime.replication import Follower

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
            self._spawn(self._find_leader_loop)
            await anyio.sleep_forever()

    def _spawn(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``work`` in the agent's task group; a failure is logged and
        counted (``task_failures``), never taken down with the agent."""
        assert self._tg is not None

        async def guarded() -> None:
            try:
                await work(*args)
            except Exception:
                _count(self.stats, "task_failures")
                log.exception("replication task %s failed", work.__name__)

        self._tg.start_soon(guarded)

    def _start_follower(self, f: Follower) -> None:
        assert self._tg is not None
        scope = anyio.CancelScope()
        self._follower_scope = scope
        self._following.set()

        async def run() -> None:
            with scope:
                await f.run()

        self._tg.start_soon(run)

    def _stop_follower(self) -> None:
        if self._follower_scope is not None:
            self._follower_scope.cancel()
        self._follower_scope = None
        self.follower = None
        self._following = anyio.Event()

    async def _find_leader_loop(self) -> None:
        """While Edge, ask around for the leader of the highest epoch: after
        ``edge_after`` seconds, then less and less often (up to
        :data:`SEARCH_MAX` seconds apart) while nobody knows a newer one."""
        wait = 0.0
        while True:
            f = self.follower
            if f is None:  # a leader, or neither: nothing to look for
                await self._following.wait()
                continue
            if f.role(anyio.current_time()) != "Edge":
                wait = f.edge_after
            await anyio.sleep(wait or f.edge_after)
            if f is not self.follower or f.role(anyio.current_time()) != "Edge":
                continue
            found = pick_leader(f.epoch_seen, await self.ask_around())
            if found is not None and found[0] != str(f.coordinator) \
                    and await self._follow_confirmed(f, found[1], found[0]):
                _count(self.stats, "leaders_found")
                wait = f.edge_after
            else:
                wait = min(2 * (wait or f.edge_after), SEARCH_MAX)

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

    async def ask_around(self) -> list[tuple[str, Info]]:
        """The INFOs of the agents that answer, (address, info). One round at
        a time, at most one per :data:`ASK_EVERY` seconds: a caller meanwhile
        gets the round under way's answer, or the last one's (an unsolicited
        INFO or a claim cannot make this agent probe the swarm in a loop)."""
        while self._asking is not None:
            await self._asking.wait()
        if anyio.current_time() - self._asked_at < ASK_EVERY:
            _count(self.stats, "ask_around_reused")
            return list(self._asked)
        self._asking = anyio.Event()
        try:
            self._asked = await self._ask(self.known())
            self._asked_at = anyio.current_time()
        finally:
            self._asking.set()
            self._asking = None
        return list(self._asked)

    async def _ask(self, targets: list[HostPort]) -> list[tuple[str, Info]]:
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

    async def _confirmed(self, epoch: int, addr: str) -> tuple[HostPort, int] | None:
        """Whether a claim that a leader of ``epoch`` (or higher) is at
        ``addr`` ("": unnamed) holds: only that agent's own INFO, answering
        our PROBE, says so (it is Leader at ``epoch`` or above); a claimant's
        word alone is never believed. An unnamed leader is looked for by
        asking around first. Returns (its address, its epoch), else None
        (counted: ``epoch_claims_unconfirmed``)."""
        if not addr:
            found = pick_leader(epoch, await self.ask_around())
            addr = "" if found is None else found[0]
        info = None
        target = None
        with contextlib.suppress(ValueError):
            target = parse_host_port(addr) if addr else None
        if target is not None:
            info = await probe(target, self.node_id, self.epoch_seen(), self.max_frame,
                               self.keys())
            _count(self.stats, "probes")
        if target is None or info is None or info.role != "Leader" or info.epoch < epoch \
                or info.node_id == self.node_id:
            _count(self.stats, "epoch_claims_unconfirmed")
            log.warning("a claim of a leader at epoch %d (%s) was not confirmed by that agent: "
                        "ignored", epoch, addr or "unnamed")
            return None
        return target, info.epoch

    async def _follow_confirmed(self, f: Follower, epoch: int, addr: str) -> bool:
        """Switch follower ``f`` to ``addr`` once that agent confirmed it
        leads ``epoch``; whether it did."""
        found = await self._confirmed(epoch, addr)
        if found is None or f is not self.follower or found[1] < f.epoch_seen:
            return False
        f.retarget(found[0])
        return True

    def _on_newer_leader(self, epoch: int, addr: str) -> None:
        """Someone says a leader of an epoch at least the highest seen is at
        ``addr``. Believed at once only when it is this agent's own record
        (the leader it persisted for the epoch it has seen); otherwise that
        agent is asked first (one claim at a time; others meanwhile are
        dropped, counted ``epoch_claims_dropped``)."""
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
        if epoch == f.epoch_seen and addr == f.leader_addr:
            f.retarget(target)
            return
        if self._confirming:
            _count(self.stats, "epoch_claims_dropped")
            return
        self._confirming = True

        async def confirm() -> None:
            try:
                await self._follow_confirmed(f, epoch, addr)
            finally:
                self._confirming = False

        self._spawn(confirm)

    def _on_higher_epoch(self, epoch: int, addr: str) -> None:
        """This leader is deposed: step down (in a task: called from frames)."""
        if self._tg is not None and not self._switching:
            self._switching = True
            self._spawn(self._step_down, epoch, addr)

    async def _step_down(self, epoch: int, addr: str) -> None:
        try:
            leader = self.leader
            if leader is None or epoch <= leader.epoch:
                return
            # A claim is no proof: the leader it names (or one found by
            # asking around) must say so itself.
            found = await self._confirmed(epoch, addr)
            if found is None or self.leader is not leader:
                return
            target, epoch = found
            _count(self.stats, "stepped_down")
            leader.depose()
            self.leader = None
            await self.store.see_epoch(epoch, str(target))
            self._epoch_seen = max(self._epoch_seen, epoch)
            log.warning("stepped down: leader %s confirmed epoch %d, newer than this leader's; "
                        "following it, this agent's own writes merged into it first (last "
                        "writer wins)", target, epoch)
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
                self._spawn(self._announce, epoch)
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
            try:
                await conn.send(encode(self.info()))
            except _stream_errors():
                pass
            return
        if isinstance(f, Info) and f.role == "Leader" and f.epoch > self.epoch_seen():
            # A new leader announces itself. Its sync address is not the
            # connection's source: ask around (rate-limited) and follow the
            # highest epoch, once the leader found confirmed it.
            _count(self.stats, "announcements_heard")
            if self._tg is None or self._searching:
                return
            log.warning("a leader announces epoch %d (this agent saw %d): looking for it",
                        f.epoch, self.epoch_seen())
            self._searching = True
            self._spawn(self._search, f.epoch)
            return
        _count(self.stats, "frames_unexpected")

    async def _search(self, epoch: int) -> None:
        try:
            found = pick_leader(epoch, await self.ask_around())
            if found is not None:
                self._on_newer_leader(found[1], found[0])
        finally:
            self._searching = False

    # --- what others read -----------------------------------------------------------------

    def min_needed_seq(self) -> int | None:
        return None if self.leader is None else self.leader.min_needed_seq()

    def leader_epoch(self) -> int | None:
        """This agent's epoch while it is the leader, else None."""
        return None if self.leader is None else self.leader.epoch

    def forward_target(self, now: float) -> HostPort | None:
        """The leader to forward writes to now; None: write locally."""
        return None if self.follower is None else self.follower.forward_target(now)

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
            from agent.runtime.replication import ReplicationView

            head = self.store.log_head
            return ReplicationView("Leader", None, self.leader.downstream(), self.leader.epoch,
                                   head.seq, tuple(sorted(stats.items())))
        f = self.follower
        if f is None:
            return None
        from agent.runtime.replication import ReplicationView

        return ReplicationView(f.role(now), str(f.coordinator), (), f.epoch_seen,
                               f.applied.seq, tuple(sorted(stats.items())))
