"""Joining and push-pull: the full-state exchanges of the SWIM core over TCP.

:class:`Exchange` is the part of :class:`agent.core.swim.protocol.Swim` that
talks to seeds and exchanges whole tables; the shell runs the TCP side
(``take_push_pulls`` -> connect, send, hand the reply to
:meth:`Exchange.receive_push_pull_reply` or report
:meth:`Exchange.push_pull_failed`; the server side calls
:meth:`Exchange.handle_push_pull`).

Rules:

* **Join.** Seeds get our table by push-pull: the first join asks one
  random seed and moves on to the next only when that one fails (refused,
  timed out), as a seed answers with its whole table and one is all a joiner
  needs; unreached seeds are then all retried every ``join_retry``
  doubling to ``join_retry_max`` until one answers (a seed whose answer is
  still awaited, for up to ``push_pull_timeout``, is not asked again); once joined, seeds that
  are not members are retried every 0.5-1 x ``join_retry_max`` (jittered; groups that formed
  apart merge). Our ALIVE goes straight to at most ``join_announce``
  random members (every member of a small swarm), never to every member of
  a large one (memberlist sends to none): the seed gossips it on after
  merging it, as does our own queue. When the
  first seed answers we schedule one catch-up push-pull ``join_catch_up``
  later: members that joined at the same time are missing from each
  other's seed tables; the seed holds them all by then.
* **Periodic.** Every ``push_pull_interval``, scaled like memberlist
  (x ceil(log2(N/32)) + 1 above 32 members) so the swarm's total stays flat,
  with one random ALIVE member. It opens with a *summary* (our own entry and
  the hash of our table's (node id, incarnation, status) rows): a peer that
  agrees answers with its own summary; one that does not answers with its
  whole table, and if we still differ after merging it, ours follows. A first join
  is always a whole table. Answering a summary costs the peer a hash of its
  table (rate limited per address like every answer).
* **Merge** with the gossip rules of ``table.py``: a peer's DEAD counts as a
  SUSPECT (we check for ourselves), LEFT is taken, digests by version. ALIVE
  members new to us are gossiped on only once we were joined: a joiner's
  first table is news to nobody and re-gossiping it would flood the swarm;
  after a healed partition it is news to our whole side. A TCP peer speaks
  for the member it names only from that member's address; a peer we reaped
  as dead is told so in our answer, so that it refutes.
* **Bounded.** A payload is at most ``codec.MAX_PUSH_PULL`` bytes and
  ``max_members + 1`` entries (the rest counted as TABLE_FULL); answers are
  rate limited per source address like datagrams.
"""

from __future__ import annotations

import dataclasses
import math
import random

from agent.core.addr import Addr
from agent.core.swim import codec
from agent.core.swim.codec import Digests, Left, Suspect
from agent.core.swim.events import DropReason, PushPull, TimerKind
from agent.core.swim.members import ALIVE, DEAD, LEFT, SUSPECT, SelfInfo
from agent.core.swim.params import Params
from agent.core.swim.table import Table


class Exchange(Table):
    """Seeds, joining and push-pull (see the module docstring)."""

    def __init__(self, me: SelfInfo, params: Params, rng: random.Random, now: float) -> None:
        super().__init__(me, params, rng, now)
        self.seeds_tried: tuple[Addr, ...] = ()
        self.seeds_reached = False
        self._seeds: list[Addr] = []
        self._join_backoff = params.join_retry
        self._next_push_pull = math.inf
        self._next_join = math.inf
        self._announced = False
        #: the seed our first table came from, for the catch-up push-pull
        self._catch_up_with: Addr | None = None
        #: a DEAD entry about the push-pull peer being answered (reaped here)
        self._dead_sender: codec.Entry | None = None
        self._push_pulls: list[PushPull] = []
        #: peers we opened a periodic exchange with by summary, reply pending
        self._summaries: dict[Addr, bool] = {}
        #: seeds with a join exchange in flight, and since when (at most max_seeds)
        self._joining: dict[Addr, float] = {}
        #: seeds asked one after the other by the first join (see join)
        self._join_tried: set[Addr] = set()

    def join(self, addrs: list[Addr], now: float) -> None:
        """Push-pull with each address; unreached ones are retried (JOIN timer).
        At most ``max_seeds`` are kept (see :meth:`_bounded`)."""
        self._now = now
        if self._leaving:
            return
        given = list(dict.fromkeys(addrs))
        self._seeds = self._bounded(self._seeds + [a for a in given if a not in self._seeds])
        tried = list(self.seeds_tried)
        self.seeds_tried = tuple(self._bounded(tried + [a for a in given if a not in tried]))
        kept = set(self._seeds)
        targets = [a for a in given if a in kept]
        if not self.seeds_reached and len(targets) > 1:
            # The first join asks one seed, the next only if that one fails
            # (see _join_one): every seed answers a join with its whole table,
            # so asking all k seeds at once costs k tables per joiner, k * N^2
            # entries for a swarm (re)starting at once, of which one is used.
            self._join_tried.clear()
            self._join_one(targets)
        else:
            for addr in targets:
                self._push_pull_to(addr, join=True)
        if self._seeds and self._next_join == math.inf:
            self._next_join = now + self._join_backoff
            self._timer(self._next_join, TimerKind.JOIN)

    def _join_one(self, addrs: list[Addr]) -> None:
        """A join exchange with one random seed of ``addrs`` not yet tried in
        this round and not in flight; none left: the JOIN timer retries all."""
        now = self._now
        left = [a for a in addrs if a not in self._join_tried and not (
            a in self._joining and now - self._joining[a] < self.params.push_pull_timeout)]
        if not left:
            return
        addr = left[self.rng.randrange(len(left))]
        self._join_tried.add(addr)
        self._push_pull_to(addr, join=True)

    def _bounded(self, addrs: list[Addr]) -> list[Addr]:
        """The first quarter of ``max_seeds`` addresses ever given (configured
        seeds come first) and the most recent others: discovery cannot make
        us remember and retry an unbounded list."""
        limit = self.params.max_seeds
        if len(addrs) <= limit:
            return addrs
        keep = limit // 4
        return addrs[:keep] + addrs[len(addrs) - (limit - keep):]

    def take_push_pulls(self) -> list[PushPull]:
        out, self._push_pulls = self._push_pulls, []
        return out

    @property
    def joined(self) -> bool:
        """At least one ALIVE member."""
        return any(m.status == ALIVE for m in self.members.values())

    def handle_push_pull(self, data: bytes, src: Addr, now: float) -> bytes | None:
        """Server side: merge the caller's table, answer with ours (None: refused)."""
        self._now = now
        if self._leaving:
            self._drop(DropReason.LEAVING)
            return None
        if not self._admit(src[0], now):
            self._drop(DropReason.RATE_LIMITED)
            return None
        state = self._merge_state(data, src, now, spread=self.joined)
        if state is None:
            return None
        self.stats["push_pull_served"] += 1
        if (state.table_hash is not None and self._dead_sender is None
                and state.table_hash == self._table_hash()):
            # We agree: say so in a summary of our own, not the whole table.
            self.stats["push_pull_same"] += 1
            return self._summary_payload()
        return self._state_payload(join=False, dead=self._dead_sender)

    def receive_push_pull_reply(self, data: bytes, src: Addr, now: float) -> None:
        self._now = now
        summary = self._summaries.pop(src, False)
        self._joining.pop(src, None)
        if self._leaving:
            return
        state = self._merge_state(data, src, now, spread=self.joined)
        if state is None:
            return
        if src in self._seeds:
            self.seeds_reached = True
            if not self._announced:
                self._announce(src)
        if not summary:
            return
        # We opened with a summary. A summary back: we agreed (or the tables
        # moved meanwhile). A full table back: the peer disagreed and we
        # merged its table; if it still lacks something of ours, it gets our
        # whole table too (the ordinary exchange, one more round trip).
        theirs = state.table_hash
        if theirs is None:
            theirs = codec.table_hash([(e.alive.node_id, e.alive.incarnation, e.status)
                                       for e in state.entries])
        if theirs != self._table_hash():
            self.stats["push_pull_mismatch"] += 1
            # The answer's first entry is its sender's own: its sync port.
            port = state.entries[0].alive.sync_port if state.entries else 0
            self._push_pull_to(src, join=False, tcp_port=port)

    def _announce(self, seed: Addr) -> None:
        """Once, when the first seed answered with its table: our ALIVE
        straight to at most ``join_announce`` random members (all of a small
        swarm, where gossip's few retransmissions can pass one by). Not to
        every member (memberlist sends to none): the seed merged our entry
        and gossips our ALIVE on, and so does our own queue (``start``); a
        joiner that told every member directly would cost O(N) datagrams per
        join, O(N^2) for a swarm restarting at once. Members that joined at about the same
        time missed each other in their seeds' tables and rely on gossip; one
        early push-pull with the seed that answered catches up: every joiner
        exchanged tables with it, so a few seconds later it holds whoever
        joined since (a random member would hold only what gossip brought it,
        which in a swarm starting at once is a queue of N fresh updates)."""
        self._announced = True
        self._catch_up_with = seed
        k = self.params.join_announce
        live = [m for m in self.members.values() if m.status in (ALIVE, SUSPECT)] \
            if len(self.members) <= k else self._random_members(k, b"", (ALIVE, SUSPECT))
        item = codec.encode_update(self._own_alive())
        for m in live[:k]:
            self._send(m.addr, codec.GOSSIP, m, first=[item], piggyback=False)
        catch_up = self._now + self.params.join_catch_up
        if catch_up < self._next_push_pull:
            self._next_push_pull = catch_up
            self._timer(catch_up, TimerKind.PUSH_PULL)
        self.stats["announced"] += 1

    def push_pull_failed(self, addr: Addr, now: float) -> None:
        self._now = now
        self._summaries.pop(addr, None)
        joining = self._joining.pop(addr, None) is not None
        self.stats["push_pull_failed"] += 1
        if joining and not self.seeds_reached and not self._leaving:
            # The seed we asked is down or unreachable: the next one now.
            self._join_one(self._seeds)

    def _merge_state(self, data: bytes, src: Addr, now: float,
                     spread: bool) -> codec.State | None:
        """Merge a peer's table with the gossip rules. ALIVE members new to us
        are gossiped on (``spread``) only once we were joined: a joiner's
        first table is news to nobody, and re-gossiping it would flood the
        swarm; later (a partition healing, gossip that missed us) it is news
        to our side too."""
        try:
            state = codec.decode_state(data, self.params.max_members)
        except codec.SwimDecodeError as err:
            self._drop(err.reason)
            return None
        if state.truncated:
            self.stats[DropReason.TABLE_FULL.value] += state.truncated
        first = state.entries[0]
        sender = first.alive.node_id
        if sender == self.me.node_id:
            # We are in our own seed list.
            self._seeds = [s for s in self._seeds if s != src]
            self._drop(DropReason.FROM_SELF)
            return None
        self.stats["push_pull_merged"] += 1
        tomb = self._tombs.get(sender)
        self._dead_sender = None
        if tomb is not None and tomb.status == DEAD and first.alive.incarnation <= tomb.incarnation:
            # Reaped as dead here: our answer says so, so that it refutes.
            self._dead_sender = codec.Entry(
                dataclasses.replace(first.alive, incarnation=tomb.incarnation), DEAD, 0,
                Digests(sender, 0, 0, codec.digest_hash(()), (), None))
        # A TCP peer is not authenticated as the member it names: it speaks
        # for it only from the member's known address (or as a new member).
        self._apply(first.alive, now, src=(src[0], first.alive.port))
        self._apply(first.digests, now, spread=False)
        m = self.members.get(sender)
        if m is not None and first.alive.incarnation >= m.incarnation:
            m.lc = max(m.lc, first.lc)
        for e in state.entries[1:]:
            nid, inc = e.alive.node_id, e.alive.incarnation
            if e.status == ALIVE:
                self._apply(e.alive, now, spread=spread)
            elif e.status == LEFT:
                self._apply(Left(nid, inc), now)
            elif nid in self.members or nid == self.me.node_id:
                # A peer's DEAD is our SUSPECT (memberlist): we check for ourselves.
                self._apply(e.alive, now, spread=False)
                self._apply(Suspect(nid, inc, sender), now)
            if e.status != LEFT and nid in self.members:
                self._apply(e.digests, now, spread=False)
        return state

    def _table_hash(self) -> bytes:
        """Hash of who we hold in which state, ourselves included (O(N log N),
        once per push-pull): equal on two members that agree."""
        rows = [(self.me.node_id, self.me.incarnation, ALIVE)]
        rows += [(nid, m.incarnation, m.status) for nid, m in self.members.items()]
        return codec.table_hash(rows)

    def _summary_payload(self) -> bytes:
        """Our own entry and the hash of our table: what a periodic exchange
        opens with (the whole table goes only where the hashes differ)."""
        own = codec.Entry(self._own_alive(), ALIVE, self.lc, self._own_digests())
        return codec.encode_state(codec.State(False, (own,), table_hash=self._table_hash()),
                                  self.params.max_members)

    def _state_payload(self, join: bool, dead: codec.Entry | None = None) -> bytes:
        entries = [codec.entry_bytes(
            codec.Entry(self._own_alive(), ALIVE, self.lc, self._own_digests()))]
        if dead is not None:
            entries.append(codec.entry_bytes(dead))
        for m in self.members.values():
            # Encoded again only when something it is encoded from changed.
            key = (m.incarnation, m.status, m.lc, m.digests_version, m.held_dhash,
                   m.app_healthy, m.host, m.port, m.http_port, m.sync_port, m.role, m.name)
            cached = m.entry_cache
            if cached is None or cached[0] != key:
                cached = (key, codec.entry_bytes(codec.Entry(
                    self._alive_of(m), m.status, m.lc,
                    Digests(m.node_id, max(m.digests_version[0], 0),
                            max(m.digests_version[1], 0), m.held_dhash, m.digests,
                            m.app_healthy))))
                m.entry_cache = cached
            entries.append(cached[1])
        return codec.encode_state_parts(join, entries, self.params.max_members)

    def _push_pull_to(self, addr: Addr, join: bool, summary: bool = False,
                      tcp_port: int = 0) -> None:
        if join:
            since = self._joining.get(addr)
            if since is not None and self._now - since < self.params.push_pull_timeout:
                # Still waiting for this seed's answer: a slow seed (busy
                # answering a whole swarm starting at once) is not asked twice.
                self.stats["join_in_flight"] += 1
                return
            if len(self._joining) >= self.params.max_seeds:
                self._joining.clear()
            self._joining[addr] = self._now
        if summary:
            if len(self._summaries) >= self.params.max_seeds:
                self._summaries.clear()  # replies that never came: bounded
            self._summaries[addr] = True
            data = self._summary_payload()
        else:
            data = self._state_payload(join)
        self._push_pulls.append(PushPull(addr, data, tcp_port))
        self.stats["push_pulls_out"] += 1

    def _push_pull_every(self) -> float:
        n = len(self.members) + 1
        scale = 1 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1
        return self.params.push_pull_interval * scale

    def _periodic_push_pull(self, now: float) -> None:
        self._next_push_pull = now + self._push_pull_every()
        self._timer(self._next_push_pull, TimerKind.PUSH_PULL)
        seed, self._catch_up_with = self._catch_up_with, None
        if seed is not None:
            # Its TCP port, once it is a member (O(N), once per join, like the exchange).
            port = next((m.sync_port for m in self.members.values() if m.addr == seed), 0)
            self._push_pull_to(seed, join=False, summary=self.params.push_pull_summary,
                               tcp_port=port)
            return
        alive = [m for m in self.members.values() if m.status == ALIVE]
        if alive:
            m = self.rng.choice(alive)
            self._push_pull_to(m.addr, join=False, summary=self.params.push_pull_summary,
                               tcp_port=m.sync_port)

    def _retry_join(self, now: float) -> None:
        if not self.seeds_reached:
            for addr in self._seeds:
                self._push_pull_to(addr, join=True)
            self._join_backoff = min(self._join_backoff * 2, self.params.join_retry_max)
            self._next_join = now + self._join_backoff
        else:
            # Seeds that are not members: groups that formed apart merge.
            known = {m.addr for m in self.members.values() if m.status in (ALIVE, SUSPECT)}
            # They open with a summary, as the periodic exchange does: while
            # a partition lasts every member retries the seeds on the other
            # side, and a whole table built for a connect that times out
            # costs O(N) each time; the seed answers with its table only when
            # ours differs, and gets ours after that (a merge).
            for addr in self._seeds:
                if addr not in known:
                    self._push_pull_to(addr, join=True, summary=self.params.push_pull_summary)
            # Jittered, at most join_retry_max: members that joined within
            # the same few seconds would otherwise retry in step for ever,
            # and after a partition heals the first retry (the merge) could
            # wait almost a whole interval.
            self._next_join = now + self.params.join_retry_max * self.rng.uniform(0.5, 1.0)
        if self._seeds:
            self._timer(self._next_join, TimerKind.JOIN)
        else:
            self._next_join = math.inf
