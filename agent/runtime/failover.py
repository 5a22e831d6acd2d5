"""Automatic failover through etcd: with HS_GOSSIP_ETCD the leader is not
fixed by configuration but elected, and every agent follows whoever holds
the leader key. The election itself is :mod:`agent.runtime.election`'s (no
home-made consensus); streaming is :mod:`agent.runtime.replication`'s
Leader and Follower, run here as the election decides.

Rules:

* ``HS_GOSSIP_ROLE=candidate`` campaigns for the key
  ``/hs-gossip/<cluster>/leader`` with its sync address as the value. While
  :meth:`Election.is_leader` holds it is the leader: it serves its change
  log to followers and accepts forwarded writes, with the epoch of the term
  (the key's create revision) in every frame. The moment its term ends (lease
  lost, or the safety margin before the lease could expire, see
  :mod:`agent.core.lease`) it stops: new streams and forwarded writes are
  refused and the streams it was serving are cancelled.
* Every agent (candidates while not leader too) reads the key every
  ``campaign_interval(ttl)`` seconds (:class:`LeaderWatch`) and follows the
  address found there, as a Follower of agent.runtime.replication would
  follow HS_GOSSIP_COORDINATOR; a new holder cancels the stream to the old
  one and starts one to the new (DIVERGED there means a Merkle sync both
  ways, so nothing either side wrote is lost).
* The highest epoch seen counts the key's revision too: a follower fences a
  deposed leader as soon as etcd names its successor, before any frame of
  the new one arrived.
* A clean shutdown resigns (:meth:`Failover.close`: key deleted, lease
  revoked), so another candidate takes over at once; a crash leaves the
  lease to run out (the TTL).
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import TYPE_CHECKING

import anyio

from agent.config import parse_host_port
from agent.core.replication import TAG
from agent.net.etcd import EtcdClient, EtcdError
from agent.runtime.counters import count as _count
from agent.runtime.election import Election, LeaderWatch, campaign_interval, leader_key
from agent.runtime.replication import Follower, Leader, ReplicationView

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.config import Config, HostPort
    from agent.net.etcd import Leader as KeyHolder
    from agent.net.handshake import StreamKeys
    from agent.net.stream import Framed
    from agent.runtime.sync_service import SyncService
    from agent.store import Store

log = logging.getLogger("hs_gossip.failover")


class ElectedLeader(Leader):
    """A Leader whose epoch is its current etcd term's."""

    def __init__(self, store: Store, node_id: bytes, interval: float,
                 election: Election) -> None:
        super().__init__(store, node_id, interval)
        self.election = election

    @property
    def epoch(self) -> int:
        term = self.election.term
        return 0 if term is None else term.epoch


class Failover:
    """The agent's part in streaming when the leader is elected in etcd."""

    def __init__(self, cfg: Config, store: Store, sync: SyncService, node_id: bytes,
                 keys: Callable[[], StreamKeys | None], rng: random.Random, advertise: str,
                 client: EtcdClient | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.interval = cfg.interval
        self.max_frame = sync.max_frame
        self.keys = keys
        self.rng = rng
        self.tombstone_grace = cfg.tombstone_grace
        self.client = client or EtcdClient(list(cfg.etcd))
        key = leader_key(cfg.cluster)
        self.addr = parse_host_port(f"{advertise}:{cfg.effective_sync_port}"
                                    if ":" not in advertise
                                    else f"[{advertise}]:{cfg.effective_sync_port}")
        self.stats: dict[str, int] = {}
        self.election: Election | None = None
        self.leader: ElectedLeader | None = None
        if cfg.role == "candidate":
            self.election = Election(self.client, key, str(self.addr).encode(),
                                     ttl=cfg.etcd_ttl, on_change=self._on_term)
            self.leader = ElectedLeader(store, node_id, cfg.interval, self.election)
            sync.streams[TAG] = self._serve
        self.watch = LeaderWatch(self.client, key, interval=campaign_interval(cfg.etcd_ttl),
                                 on_change=self._on_holder)
        self.follower: Follower | None = None
        #: awaited by each follower before its HELLO (agent.runtime.forwarding)
        self.before_hello: Callable[[HostPort], Awaitable[None]] | None = None
        self._changed = anyio.Event()
        self._serving: set[anyio.CancelScope] = set()

    # --- what the election and the watch tell us ---------------------------------

    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader()

    def _on_term(self, epoch: int | None) -> None:
        if epoch is None:
            _count(self.stats, "terms_ended")
            for scope in self._serving:
                scope.cancel()  # a deposed leader feeds nobody
        else:
            _count(self.stats, "terms_won")
        self._changed.set()

    def _on_holder(self, holder: KeyHolder | None) -> None:
        _count(self.stats, "leader_changes")
        log.info("etcd names leader %s", "nobody" if holder is None else
                 f"{holder.value.decode(errors='replace')} (epoch {holder.epoch})")
        self._changed.set()

    def _target(self) -> HostPort | None:
        """The leader to follow now; None when leading or none is known."""
        if self.is_leader():
            return None
        holder = self.watch.current
        if holder is None:
            return None
        try:
            addr = parse_host_port(holder.value.decode())
        except (ValueError, UnicodeDecodeError):
            _count(self.stats, "leader_value_invalid")
            return None
        # Our own key from before a restart: its lease runs out, then someone wins.
        return None if addr == self.addr and self.election is not None else addr

    # --- Upstream (agent.runtime.forwarding) ----------------------------------------

    def leader_epoch(self) -> int | None:
        return None if self.election is None else self.election.epoch

    def forward_target(self, now: float) -> HostPort | None:
        return None if self.follower is None else self.follower.forward_target(now)

    def epoch_seen(self) -> int:
        holder = self.watch.current
        return max(0 if self.follower is None else self.follower.epoch_seen,
                   0 if holder is None else holder.epoch)

    # --- running ---------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.election is not None:
                tg.start_soon(self.election.run)
            tg.start_soon(self.watch.run)
            await self._follow()

    async def _follow(self) -> None:
        """Follow the leader etcd names, switching when it changes."""
        while True:
            target = self._target()
            if target is None:
                self.follower = None
                self._changed = anyio.Event()
                if self._target() is None:
                    await self._changed.wait()
                continue
            f = Follower(self.store, target, self.node_id, self.interval, self.max_frame,
                         self.keys, self.rng, self.tombstone_grace)
            f.before_hello = self.before_hello
            self.follower = f
            _count(self.stats, "follows")
            log.info("following leader %s", target)
            async with anyio.create_task_group() as tg:
                tg.start_soon(f.run)
                while True:
                    self._changed = anyio.Event()
                    if self._target() != target:
                        break
                    await self._changed.wait()
                tg.cancel_scope.cancel()

    async def _serve(self, conn: Framed, first: bytes) -> None:
        """A follower's stream, served only while this agent is leader."""
        if self.leader is None or not self.is_leader():
            _count(self.stats, "streams_refused_not_leader")
            return
        with anyio.CancelScope() as scope:
            self._serving.add(scope)
            try:
                await self.leader.serve(conn, first)
            finally:
                self._serving.discard(scope)

    def min_needed_seq(self) -> int | None:
        return None if self.leader is None else self.leader.min_needed_seq()

    def view(self, now: float) -> ReplicationView:
        stats = dict(self.stats)
        stats["etcd_reachable"] = int(self.watch.reachable)
        if self.leader is not None:
            for k, v in self.leader.stats.items():
                stats[k] = stats.get(k, 0) + v
        if self.is_leader() and self.leader is not None:
            return ReplicationView("Leader", None, self.leader.downstream(),
                                   self.leader.epoch, self.store.log_head.seq,
                                   tuple(sorted(stats.items())))
        f = self.follower
        if f is not None:
            for k, v in f.stats.items():
                stats[k] = stats.get(k, 0) + v
        return ReplicationView("Edge" if f is None else f.role(now),
                               None if f is None else str(f.coordinator), (),
                               self.epoch_seen(), 0 if f is None else f.applied.seq,
                               tuple(sorted(stats.items())))

    async def close(self) -> None:
        """Resign (clean shutdown: another candidate takes over at once)."""
        with anyio.move_on_after(2 * self.client.timeout):
            if self.election is not None:
                await self.election.resign()
        with contextlib.suppress(EtcdError):
            await self.client.aclose()
