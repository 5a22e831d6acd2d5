"""Leader election of coordinator candidates through etcd, and finding the
leader from etcd for everyone else.

A candidate runs :meth:`Election.run`: it holds a lease (granted, then kept
alive every ttl/3), campaigns for the leader key with it (create the key only
if absent), and once it wins, the key's create revision is its epoch. It
keeps the lease alive and checks the key is still its own; the rule of
:mod:`agent.core.lease` says until when it may act as leader, counted from
when each keepalive was SENT. It steps down when the lease is gone, the key
is no longer its own, or the limit passes without a successful keepalive;
then it revokes that lease (best effort) and campaigns again with a new one.

Rules:

* ``is_leader(now)`` is the gate for every write a leader accepts; it turns
  False at the limit by itself, whether or not this loop still runs (a loop
  that is stuck or cancelled keeps no one leader).
* Cancelling :meth:`run` is what a crash looks like: nothing is revoked, the
  lease runs out in etcd and another candidate takes over after the TTL.
  :meth:`resign` is the clean way out (key deleted, lease revoked at once).
* ``on_change(epoch)`` is called with the epoch when a term begins and with
  None when it ends, from the loop; it must not block.
* Non-candidates use :class:`LeaderWatch`: it reads the key every
  ``interval`` and reports who holds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from agent.core.lease import Term, begin_term, keepalive_period
from agent.net.etcd import EtcdClient, EtcdError, Leader

log = logging.getLogger("hs_gossip")


def leader_key(cluster: str) -> str:
    """The etcd key coordinators of swarm ``cluster`` campaign for."""
    return f"/hs-gossip/{cluster}/leader"


def campaign_interval(ttl: float) -> float:
    """How often a waiting candidate tries the key again: a tenth of the TTL
    (0.2 s to 2 s), so it takes over soon after the old lease runs out."""
    return min(2.0, max(0.2, ttl / 10))


class Election:
    """One coordinator candidate. ``value`` is what followers read from the
    key to reach this candidate (its address, say)."""

    def __init__(self, client: EtcdClient, key: str, value: bytes, *, ttl: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int | None], None] | None = None) -> None:
        self.client = client
        self.key = key
        self.value = value
        self.ttl = ttl
        self.clock = clock
        self.on_change = on_change
        self._term: Term | None = None
        self._lease_id: int | None = None
        #: when the request that last renewed ``_lease_id`` was sent
        self._lease_sent_at = 0.0
        self._lease_ttl = float(ttl)

    # --- what the rest of the agent reads -------------------------------------

    def is_leader(self, now: float | None = None) -> bool:
        term = self._term
        return term is not None and term.is_leader(self.clock() if now is None else now)

    @property
    def epoch(self) -> int | None:
        """The epoch of the current term, None when not leader."""
        term = self._term
        return term.epoch if term is not None and term.is_leader(self.clock()) else None

    @property
    def term(self) -> Term | None:
        """The current (or just lapsed) term: its epoch and its limit."""
        return self._term

    # --- the loop --------------------------------------------------------------

    async def run(self) -> None:
        """Campaign, lead, step down, campaign again: until cancelled."""
        while True:
            term = await self._acquire()
            self._begin(term)
            # Cancelled while leading: the term still ends at its limit
            # (is_leader reads the clock); nothing to undo.
            why = await self._hold()
            await self._step_down(why)

    async def resign(self) -> None:
        """Leave cleanly: stop being leader now, delete the key if ours and
        revoke the lease, so another candidate takes over without waiting for
        the TTL. Call it with :meth:`run` cancelled."""
        term, lease_id = self._term, self._lease_id
        self._end("resigned")
        if lease_id is None:
            return
        try:
            if term is not None:
                await self.client.resign(self.key, lease_id)
            await self.client.revoke(lease_id)
        except EtcdError as e:
            log.warning("etcd: resign: %s (the lease runs out by itself)", e)
        self._lease_id = None

    async def _acquire(self) -> Term:
        """Keep a lease alive and try the key until this lease holds it."""
        interval = campaign_interval(self.ttl)
        while True:
            try:
                await self._ensure_lease()
                assert self._lease_id is not None
                epoch = await self.client.campaign(self.key, self.value, self._lease_id)
            except EtcdError as e:
                log.warning("etcd: campaign for %s: %s", self.key, e)
                epoch = None
            if epoch is not None:
                term = begin_term(epoch, self._lease_id or 0, self._lease_sent_at,
                                  self._lease_ttl, self.clock())
                if term is not None:
                    return term
                # Won too late to use it: let the key go and try again.
                await self._drop_lease()
            await anyio.sleep(interval)

    async def _ensure_lease(self) -> None:
        """A lease renewed within the keepalive period, granted anew if gone."""
        now = self.clock()
        if self._lease_id is not None and now < self._lease_sent_at + keepalive_period(self.ttl):
            return
        if self._lease_id is not None:
            sent = self.clock()
            left = await self.client.keepalive(self._lease_id)
            if left > 0:
                self._lease_sent_at, self._lease_ttl = sent, float(left)
                return
            self._lease_id = None
        sent = self.clock()
        self._lease_id = await self.client.grant(self.ttl)
        self._lease_sent_at, self._lease_ttl = sent, float(self.ttl)

    async def _hold(self) -> str:
        """Keep the term alive; return why it ended."""
        retry = campaign_interval(self.ttl)
        assert self._term is not None
        next_at = self._term.next_keepalive(self.ttl)
        while True:
            term = self._term
            assert term is not None and self._lease_id is not None
            # Wake for the next keepalive, or at the limit to step down on time.
            await anyio.sleep(max(0.0, min(next_at, term.until) - self.clock()))
            sent = self.clock()
            if not term.is_leader(sent):
                return "no keepalive succeeded before the limit"
            ttl_left: int | None = None
            holder: Leader | None = None
            # Nothing waits past the limit: then the term is over anyway.
            with anyio.move_on_after(term.until - sent):
                try:
                    ttl_left = await self.client.keepalive(self._lease_id)
                    holder = await self.client.leader(self.key) if ttl_left > 0 else None
                except EtcdError as e:
                    log.warning("etcd: keepalive: %s", e)
                    next_at = self.clock() + retry
                    continue
            if ttl_left is None:
                return "no keepalive succeeded before the limit"
            renewed = term.renewed(sent, ttl_left, self.clock())
            if renewed is None:
                return "the lease expired" if ttl_left <= 0 else "keepalive answered too late"
            if holder is None or holder.lease_id != self._lease_id or holder.epoch != term.epoch:
                return "the leader key is no longer ours"
            self._term = renewed
            self._lease_sent_at, self._lease_ttl = sent, float(ttl_left)
            next_at = renewed.next_keepalive(self.ttl)

    def _begin(self, term: Term) -> None:
        self._term = term
        log.info("etcd: leader of %s, epoch %d", self.key, term.epoch)
        if self.on_change is not None:
            self.on_change(term.epoch)

    def _end(self, why: str) -> None:
        if self._term is None:
            return
        log.warning("etcd: stepped down from epoch %d: %s", self._term.epoch, why)
        self._term = None
        if self.on_change is not None:
            self.on_change(None)

    async def _step_down(self, why: str) -> None:
        self._end(why)
        await self._drop_lease()

    async def _drop_lease(self) -> None:
        """Revoke the lease (best effort, bounded): if etcd still holds the
        key for it, the next candidate need not wait for the TTL."""
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is None:
            return
        with anyio.move_on_after(self.client.timeout):
            try:
                await self.client.revoke(lease_id)
            except EtcdError as e:
                log.warning("etcd: revoke: %s", e)


class LeaderWatch:
    """Who holds the leader key, read every ``interval`` seconds.
    ``current`` is the last holder read (None: nobody, or not read yet);
    ``on_change`` is called with each new holder. While etcd cannot be
    reached ``current`` keeps the last answer and ``reachable`` is False."""

    def __init__(self, client: EtcdClient, key: str, *, interval: float,
                 on_change: Callable[[Leader | None], None] | None = None) -> None:
        self.client = client
        self.key = key
        self.interval = interval
        self.on_change = on_change
        self.current: Leader | None = None
        self.reachable = False

    async def poll(self) -> Leader | None:
        """Read the key once; report a change. Raises EtcdError."""
        try:
            leader = await self.client.leader(self.key)
        except EtcdError:
            self.reachable = False
            raise
        self.reachable = True
        if leader != self.current:
            self.current = leader
            if self.on_change is not None:
                self.on_change(leader)
        return leader

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except EtcdError as e:
                log.warning("etcd: reading the leader: %s", e)
            await anyio.sleep(self.interval)
