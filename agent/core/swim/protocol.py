"""SWIM + Lifeguard membership, sans-I/O: probes, suspicion, dissemination, push-pull.

The shell (or a simulator) drives :class:`Swim` with datagrams, push-pull
payloads and timers, and drains what it wants done: datagrams
(:meth:`Swim.take_outgoing`), TCP exchanges (:meth:`Swim.take_push_pulls`),
timers (:meth:`Swim.take_timers`) and outcome events
(:meth:`Swim.take_events`). Time is a float from the shell's monotonic clock;
randomness comes from the ``rng`` given to the constructor, so the same
inputs give the same outputs. Work per call is proportional to what happened:
only push-pull, leave, the seed retry and the reshuffle of the probe order
(once per round of N probes) walk the table.

Theory of operation (Das, Gupta, Motivala 2002; Lifeguard, Dadgar et al. 2018):

* **Probe.** Every period (``probe_interval`` x awareness) we PING the next
  member of a shuffled round-robin list of ALIVE and SUSPECT members (new
  members go in at a random position: every member is probed within two
  rounds). No ACK within ``probe_timeout`` x awareness: we ask
  ``indirect_checks`` random ALIVE members to PING_REQ it for us (they relay
  its ACK, or send a NACK when their own ping went unanswered) and re-send
  one direct ping. No ACK by the end of the period: the target is SUSPECT.
* **Local health (awareness).** A failed probe whose helpers did not even
  NACK raises our score by one per missing NACK; having to refute raises it;
  a successful probe lowers it. Probe interval, probe timeout and suspicion
  timeouts are multiplied by score + 1: an agent starved of CPU or bandwidth
  slows its own verdicts instead of accusing healthy members.
* **Suspicion.** A SUSPECT lasts between min = ``suspicion_mult`` x log10(N)
  x interval (at least ``suspicion_min``) and ``suspicion_max_mult`` x min;
  each independent SUSPECT of the same member from another accuser shortens
  it towards min (``suspicion.py``); it is also cut so a member is declared
  DEAD before ``ttl`` passes without a sign of life. Then DEAD is gossiped.
* **Refutation.** Only a member raises its own incarnation. Hearing SUSPECT,
  DEAD or LEFT (when not leaving) about ourselves at an incarnation >= ours,
  we take claim + 1 and gossip ALIVE; IncarnationRaised lets the shell save
  it. A claim more than INCARNATION_STEP above what we know is forged or
  corrupt and refused, unless the member itself says it.
* **Precedence** (per member): a higher incarnation wins; at equal
  incarnation LEFT > DEAD > SUSPECT > ALIVE. ALIVE news needs a *higher*
  incarnation to clear a suspicion, a death or a departure; a higher
  incarnation of a DEAD or LEFT member is a restart (MemberRestarted).
* **Dissemination.** Every accepted change is queued (``broadcasts.py``:
  one item per member, each sent retransmit_mult x ceil(log10(N+1)) times,
  least-sent and newest first) and piggybacked on every datagram up to the
  budget. While the queue is not empty a GOSSIP round every
  ``gossip_interval`` sends it to ``gossip_fanout`` random members; an idle
  swarm sends only pings and acks (~60 and ~40 bytes).
* **The card.** Every datagram starts with its sender's (node id,
  incarnation, logical clock, 8-byte digest hash). A receiver whose copy of
  the sender's digests does not match the hash sets ``want_digests`` on its
  next datagram to it (or sends a GOSSIP asking, when it has nothing to reply),
  and the member answers with its own DIGESTS update first in line. Own
  digest and app-health changes are gossiped as DIGESTS updates, ordered by
  (incarnation, version), so a change reaches members that never exchange a
  datagram with the owner.
* **Push-pull.** Every ``push_pull_interval`` (scaled up above 32 members)
  and when joining, a full table goes over TCP to one member, which answers
  with its own; both merge with the gossip rules. ALIVE entries learned this
  way are not re-gossiped (the other side already spreads them; a joiner
  re-gossiping a whole table would flood the swarm), changes of status are.
* **Table.** Members stay in :attr:`Swim.members` in every status; a
  non-ALIVE member not confirmed alive for ``ttl`` is removed (MemberExpired)
  and leaves a tombstone for another ``ttl``: ALIVE news at or below its
  incarnation is refused (DEAD_STAYS_DEAD). At most ``max_members`` members
  and as many tombstones.
* **Leave.** LEFT is gossiped and sent directly (LEAVE2) to every member;
  receivers apply it at once. A departure of an unknown member is recorded
  only from its own word.
* **Binding.** ``sender`` (the node id that authenticated the datagram) must
  be the card's node id, else SENDER_MISMATCH; each source address gets a
  token bucket of datagrams.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from agent.core import wire
from agent.core.addr import Addr
from agent.core.swim import codec
from agent.core.swim.awareness import Awareness
from agent.core.swim.broadcasts import BroadcastQueue
from agent.core.swim.codec import Alive, Card, Dead, Digests, Left, Packet, Suspect
from agent.core.swim.events import (
    DigestsChanged,
    DropReason,
    Event,
    IncarnationRaised,
    MemberExpired,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberRestarted,
    MemberSuspected,
    PushPull,
    Send,
    SetTimer,
    Timer,
    TimerKind,
)
from agent.core.swim.members import ALIVE, DEAD, LEFT, SUSPECT, Member, SelfInfo, Tombstone
from agent.core.swim.params import Params
from agent.core.swim.suspicion import Suspicion, expected_confirmations, suspicion_bounds
from agent.core.wire import JS_SAFE, Digest

#: the most an incarnation claim may exceed what we know and still be believed
#: (incarnations rise by one per restart or refutation); beyond it only the
#: member itself is believed
INCARNATION_STEP = 16
#: the most a peer's logical clock may run ahead of ours and be adopted
LC_STEP = 2**32
#: timers firing this close to their deadline count as due (float rounding)
EPS = 1e-9
#: a relay waits this fraction of the probe timeout before it NACKs
NACK_FRACTION = 0.8
#: key suffix of DIGESTS items in the broadcast queue (they must not replace
#: the member's ALIVE/SUSPECT/DEAD item, which is keyed by its bare node id)
_DIGESTS_KEY = b"d"


@dataclass
class _Probe:
    seq: int
    node_id: bytes
    addr: Addr
    incarnation: int
    acked: bool = False
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    done: bool = False


@dataclass
class _Relay:
    requester: Addr
    seq: int


class Swim:
    """One agent's membership state machine (see the module docstring)."""

    def __init__(self, me: SelfInfo, params: Params, rng: random.Random, now: float) -> None:
        self.me = me
        self.params = params
        self.rng = rng
        self.lc = 0
        self.digests: tuple[Digest, ...] = ()
        self.dhash = codec.digest_hash(())
        self.app_healthy: bool | None = None
        self.members: dict[bytes, Member] = {}
        self.stats: Counter[str] = Counter()
        self.seeds_tried: tuple[Addr, ...] = ()
        self.seeds_reached = False
        self._now = now
        self._meta_version = 0
        self._aware = Awareness(params.max_awareness)
        self._bq = BroadcastQueue(params.retransmit_mult, params.max_broadcasts)
        self._tombs: dict[bytes, Tombstone] = {}
        self._suspicions: dict[bytes, Suspicion] = {}
        self._order: list[bytes] = []
        self._order_i = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._asked: dict[Addr, float] = {}
        self._seq = 0
        self._seeds: list[Addr] = []
        self._join_backoff = params.join_retry
        self._next_probe = math.inf
        self._next_push_pull = math.inf
        self._next_join = math.inf
        self._gossip_armed = False
        self._started = False
        self._leaving = False
        self._buckets: dict[str, tuple[float, float]] = {}
        self._out: list[Send] = []
        self._push_pulls: list[PushPull] = []
        self._timers: list[SetTimer] = []
        self._events: list[Event] = []

    # --- inputs: lifecycle ------------------------------------------------

    def start(self, now: float, seeds: list[Addr]) -> None:
        """Arm the probe and push-pull timers, announce ourselves, join ``seeds``."""
        self._now = now
        self._started = True
        # A random phase keeps agents started together from probing in lockstep.
        self._next_probe = now + self.rng.uniform(0.0, self.params.probe_interval)
        self._timer(self._next_probe, TimerKind.PROBE)
        self._next_push_pull = now + self._push_pull_every()
        self._timer(self._next_push_pull, TimerKind.PUSH_PULL)
        self._broadcast(self.me.node_id, codec.encode_update(self._own_alive()))
        self.join(seeds, now)

    def join(self, addrs: list[Addr], now: float) -> None:
        """Push-pull with each address; unreached ones are retried (JOIN timer)."""
        self._now = now
        if self._leaving:
            return
        new = [a for a in dict.fromkeys(addrs) if a not in self._seeds]
        self._seeds.extend(new)
        self.seeds_tried = tuple(dict.fromkeys(self.seeds_tried + tuple(addrs)))
        for addr in dict.fromkeys(addrs):
            self._push_pull_to(addr, join=True)
        if self._seeds and self._next_join == math.inf:
            self._next_join = now + self._join_backoff
            self._timer(self._next_join, TimerKind.JOIN)

    def leave(self, now: float) -> None:
        """Gossip LEFT and tell every member directly. Idempotent."""
        self._now = now
        if self._leaving:
            return
        self._leaving = True
        item = codec.encode_update(Left(self.me.node_id, self.me.incarnation))
        self._broadcast(self.me.node_id, item)
        for m in self.members.values():
            if m.status in (ALIVE, SUSPECT):
                self._send(m.addr, codec.LEAVE2, m, first=[item])

    # --- inputs: our own card ------------------------------------------------

    def set_digests(self, digests: Sequence[Digest]) -> None:
        """Recompute our digest hash; gossip the new list when it changed."""
        self.digests = tuple(digests)
        dhash = codec.digest_hash(self.digests)
        if dhash != self.dhash:
            self.dhash = dhash
            self._meta_changed()

    def set_app_healthy(self, healthy: bool | None) -> None:
        if healthy != self.app_healthy:
            self.app_healthy = healthy
            self._meta_changed()

    def set_http_port(self, port: int) -> None:
        """A new HTTP port after start needs a new incarnation to spread."""
        if port == self.me.http_port:
            return
        self.me.http_port = port
        if self._started and not self._leaving:
            self._raise_incarnation(self.me.incarnation)

    def bump_lc(self) -> int:
        self.lc = min(self.lc + 1, JS_SAFE)
        return self.lc

    # --- outputs ---------------------------------------------------------------

    def take_outgoing(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def take_push_pulls(self) -> list[PushPull]:
        out, self._push_pulls = self._push_pulls, []
        return out

    def take_timers(self) -> list[SetTimer]:
        out, self._timers = self._timers, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    @property
    def joined(self) -> bool:
        """At least one ALIVE member."""
        return any(m.status == ALIVE for m in self.members.values())

    def health_score(self) -> int:
        """Lifeguard awareness score (0 = healthy)."""
        return self._aware.score

    def tombstone(self, node_id: bytes) -> Tombstone | None:
        return self._tombs.get(node_id)

    # --- datagrams ---------------------------------------------------------------

    def receive(self, data: bytes, src: Addr, now: float, sender: bytes | None = None) -> None:
        """Handle one datagram. Never raises on bad input: it is counted."""
        self._now = now
        self.stats["bytes_in"] += len(data)
        if self._leaving:
            return self._drop(DropReason.LEAVING)
        if not self._admit(src[0], now):
            return self._drop(DropReason.RATE_LIMITED)
        try:
            p = codec.decode_packet(data)
        except codec.SwimDecodeError as e:
            return self._drop(e.reason)
        card = p.card
        if sender is not None and sender != card.node_id:
            return self._drop(DropReason.SENDER_MISMATCH)
        if card.node_id == self.me.node_id:
            return self._drop(DropReason.FROM_SELF)
        if (p.type == codec.PING) != (p.target == self.me.node_id) and p.type in (
                codec.PING, codec.PING_REQ):
            # A ping for whoever had our address before, or a request to probe
            # ourselves: do not answer for someone else.
            return self._drop(DropReason.NOT_FOR_US)
        own = sender is not None
        for u in p.updates:
            if u.node_id == card.node_id:
                self._apply(u, now, src=src, own=own)
            else:
                self._apply(u, now)
        m = self._on_card(card, src, now, own)
        # A sender we do not know (its ALIVE passed us by): ask for its card.
        ask = m is None and p.type != codec.LEAVE2 and self._may_ask(src, now)
        replied = False
        if p.type == codec.PING:
            self._reply(codec.ACK, src, m, p.seq, p.want_digests, now, ask)
            replied = True
        elif p.type == codec.ACK:
            self._on_ack(p.seq, m, now)
        elif p.type == codec.NACK:
            if self._probe is not None and self._probe.seq == p.seq and not self._probe.done:
                self._probe.nacks += 1
            else:
                self._drop(DropReason.UNKNOWN_PROBE)
        elif p.type == codec.PING_REQ:
            assert p.target_addr is not None
            self._relay(p.seq, p.target, p.target_addr, src, now)
        elif p.type == codec.LEAVE2:
            self._apply(Left(card.node_id, card.incarnation), now, src=src, own=own)
        if replied:
            return
        if m is not None and m.node_id in self.members:
            every = self.params.digests_answer_every
            wants = p.want_digests and now - m.digests_sent >= every
            lags = m.dhash != m.held_dhash and now - m.digests_asked >= every
            if wants or lags:
                self._reply(codec.GOSSIP, src, m, 0, wants, now)
        elif ask or (p.want_digests and self._may_ask(src, now)):
            self._reply(codec.GOSSIP, src, None, 0, p.want_digests, now, ask)

    def _may_ask(self, src: Addr, now: float) -> bool:
        """At most one card request or answer per unknown address per
        ``digests_answer_every`` (bounded memory)."""
        last = self._asked.get(src)
        if last is not None and now - last < self.params.digests_answer_every:
            return False
        if len(self._asked) >= self.params.max_members:
            self._asked.clear()
        self._asked[src] = now
        return True

    def _reply(self, ptype: int, addr: Addr, m: Member | None, seq: int, wants: bool,
               now: float, ask: bool = False) -> None:
        """A datagram back to ``addr``; asked for our card, ours goes first."""
        first: list[bytes] = []
        if wants and (m is None or now - m.digests_sent >= self.params.digests_answer_every):
            if m is not None:
                m.digests_sent = now
            first.append(codec.encode_update(self._own_alive()))
            first.append(codec.encode_update(self._own_digests()))
        self._send(addr, ptype, m, seq=seq, first=first, ask=ask)

    def _on_card(self, card: Card, src: Addr, now: float, own: bool) -> Member | None:
        """The sender's card: its clock, its digest hash, a sign of life."""
        if card.lc > self.lc:
            if card.lc - self.lc <= LC_STEP:
                self.lc = card.lc
            else:
                self._drop(DropReason.LC_JUMP)
        m = self.members.get(card.node_id)
        if m is None:
            return None
        if card.incarnation < m.incarnation:
            self._drop(DropReason.STALE_INCARNATION)
            return m
        if card.incarnation > m.incarnation:
            # The member itself at a higher incarnation: as good as its ALIVE.
            self._apply(Alive(m.node_id, card.incarnation, m.host, m.port, m.http_port,
                              m.sync_port, m.role, m.name), now, src=src, own=own)
        elif m.status in (ALIVE, SUSPECT):
            m.last_alive = now
            m.src = src
        if card.incarnation >= m.incarnation:
            m.lc = max(m.lc, card.lc)
            m.dhash = card.dhash
        return m

    def _on_ack(self, seq: int, m: Member | None, now: float) -> None:
        pr = self._probe
        if pr is not None and pr.seq == seq and not pr.done:
            if not pr.acked:
                pr.acked = True
                self._aware.apply(-1)
                target = self.members.get(pr.node_id)
                if target is not None and target.status in (ALIVE, SUSPECT):
                    target.last_alive = now
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, codec.ACK, None, seq=relay.seq)
            return
        if pr is None or pr.seq != seq:
            self._drop(DropReason.UNKNOWN_PROBE)

    def _relay(self, seq: int, target: bytes, addr: Addr, src: Addr, now: float) -> None:
        """Probe ``target`` for the member at ``src`` (indirect probe)."""
        if len(self._relays) >= self.params.max_relays:
            return self._drop(DropReason.RELAY_BUSY)
        mine = self._next_seq()
        self._relays[mine] = _Relay(src, seq)
        m = self.members.get(target)
        self._send(addr, codec.PING, m, seq=mine, target=target)
        wait = self._aware.scale(self.params.probe_timeout) * NACK_FRACTION
        self._timer(now + wait, TimerKind.PROBE_TIMEOUT, mine)

    # --- timers ---------------------------------------------------------------------

    def handle_timer(self, timer: Timer, now: float) -> None:
        self._now = now
        kind, key = timer.kind, timer.key
        if kind == TimerKind.GOSSIP:
            self._gossip(now)
        elif self._leaving:
            return
        elif kind == TimerKind.PROBE:
            if now + EPS >= self._next_probe:
                self._start_probe(now)
        elif kind == TimerKind.PROBE_TIMEOUT and isinstance(key, int):
            self._probe_timeout(key, now)
        elif kind == TimerKind.PROBE_END and isinstance(key, int):
            pr = self._probe
            if pr is not None and pr.seq == key and not pr.done:
                self._finish_probe(now)
        elif kind == TimerKind.SUSPECT_TIMEOUT and isinstance(key, bytes):
            self._suspect_timeout(key, now)
        elif kind == TimerKind.REAP and isinstance(key, bytes):
            self._reap(key, now)
        elif kind == TimerKind.PUSH_PULL:
            if now + EPS >= self._next_push_pull:
                self._periodic_push_pull(now)
        elif kind == TimerKind.JOIN and now + EPS >= self._next_join:
            self._retry_join(now)

    def _start_probe(self, now: float) -> None:
        if self._probe is not None and not self._probe.done:
            self._finish_probe(now)
        interval = self._aware.scale(self.params.probe_interval)
        self._next_probe = now + interval
        self._timer(self._next_probe, TimerKind.PROBE)
        m = self._next_target()
        if m is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, m.node_id, m.addr, m.incarnation)
        self._send(m.addr, codec.PING, m, seq=seq, target=m.node_id)
        self.stats["probes"] += 1
        self._timer(now + self._aware.scale(self.params.probe_timeout),
                    TimerKind.PROBE_TIMEOUT, seq)
        self._timer(now + interval, TimerKind.PROBE_END, seq)

    def _probe_timeout(self, seq: int, now: float) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            # Our ping for someone else got no answer: tell them so (Lifeguard
            # NACK), which shows them their own link to us works.
            self._send(relay.requester, codec.NACK, None, seq=relay.seq)
            return
        pr = self._probe
        if pr is None or pr.seq != seq or pr.acked or pr.done or pr.indirect:
            return
        pr.indirect = True
        target = self.members.get(pr.node_id)
        helpers = self._random_members(self.params.indirect_checks, exclude=pr.node_id,
                                       statuses=(ALIVE,))
        for h in helpers:
            self._send(h.addr, codec.PING_REQ, h, seq=seq, target=pr.node_id,
                       target_addr=pr.addr)
        pr.expected_nacks = len(helpers)
        # One more direct try: cheap, and it saves the probe under plain loss.
        self._send(pr.addr, codec.PING, target, seq=seq, target=pr.node_id)

    def _finish_probe(self, now: float) -> None:
        pr = self._probe
        assert pr is not None
        pr.done = True
        if pr.acked:
            return
        self.stats["probes_failed"] += 1
        if pr.expected_nacks > 0:
            self._aware.apply(max(pr.expected_nacks - pr.nacks, 0))
        else:
            self._aware.apply(1)
        m = self.members.get(pr.node_id)
        if m is not None and m.status in (ALIVE, SUSPECT) and m.incarnation == pr.incarnation:
            # Suspect it, or confirm a suspicion others started (Lifeguard).
            self._apply(Suspect(m.node_id, m.incarnation, self.me.node_id), now)

    def _suspect_timeout(self, node_id: bytes, now: float) -> None:
        m = self.members.get(node_id)
        s = self._suspicions.get(node_id)
        if m is None or s is None or m.status != SUSPECT:
            return
        if now + EPS < self._suspect_deadline(m, s):
            return  # re-armed later (or a stale timer)
        self._apply(Dead(node_id, m.incarnation, self.me.node_id), now)

    def _reap(self, node_id: bytes, now: float) -> None:
        m = self.members.get(node_id)
        if m is not None:
            if m.status in (ALIVE, SUSPECT) or now + EPS < m.last_alive + self.params.ttl:
                return
            del self.members[node_id]
            self._put_tomb(node_id, Tombstone(m.incarnation, m.status, now + self.params.ttl))
            self._events.append(MemberExpired(node_id))
            self._timer(now + self.params.ttl, TimerKind.REAP, node_id)
            return
        t = self._tombs.get(node_id)
        if t is not None and now + EPS >= t.until:
            del self._tombs[node_id]

    def _gossip(self, now: float) -> None:
        self._gossip_armed = False
        if not self._bq:
            return
        for m in self._random_members(self.params.gossip_fanout, exclude=b"",
                                      statuses=(ALIVE, SUSPECT)):
            self._send(m.addr, codec.GOSSIP, m)
        if self._bq:
            self._arm_gossip(now)

    # --- the rules of the table ---------------------------------------------------

    def _apply(self, u: codec.Update, now: float, src: Addr | None = None,
               own: bool = False, spread: bool = True) -> None:
        """Fold one update into the table. ``src`` is set when the update is
        the member's own word (its datagram or its push-pull entry); ``own``
        when that word is authenticated or comes from where it spoke before."""
        if u.node_id == self.me.node_id:
            return self._about_me(u)
        if isinstance(u, Digests):
            return self._apply_digests(u, spread)
        m = self.members.get(u.node_id)
        if m is None:
            if isinstance(u, Alive):
                self._add(u, now, src, spread)
            elif isinstance(u, Left) and src is not None:
                # Only M's own word records a departure of a member we never knew.
                self._put_tomb(u.node_id, Tombstone(u.incarnation, LEFT, now + self.params.ttl))
                self._timer(now + self.params.ttl, TimerKind.REAP, u.node_id)
            return
        if u.incarnation < m.incarnation:
            return self._drop(DropReason.STALE_INCARNATION)
        from_m = src is not None and (own or src == (m.src or m.addr))
        if u.incarnation > m.incarnation + INCARNATION_STEP and not from_m:
            return self._drop(DropReason.INCARNATION_JUMP)
        if isinstance(u, Alive):
            self._alive(m, u, now, src, spread)
        elif isinstance(u, Suspect):
            self._suspect(m, u, now)
        else:
            status = DEAD if isinstance(u, Dead) else LEFT
            same = u.incarnation == m.incarnation
            if (m.status == LEFT and same) or (m.status == DEAD and status == DEAD and same):
                return
            self._set_status(m, status, now, u.incarnation)
            self._events.append(MemberFailed(m.node_id) if status == DEAD
                                else MemberLeft(m.node_id))
            item = codec.encode_update(u)
            self._broadcast(m.node_id, item)
            self._timer(max(now, m.last_alive + self.params.ttl), TimerKind.REAP, m.node_id)

    def _add(self, u: Alive, now: float, src: Addr | None, spread: bool) -> None:
        tomb = self._tombs.get(u.node_id)
        if tomb is not None and u.incarnation <= tomb.incarnation:
            return self._drop(DropReason.DEAD_STAYS_DEAD)
        host = u.host or (src[0] if src is not None else "")
        if not host or not u.port:
            return self._drop(DropReason.NO_ADDRESS)
        if len(self.members) >= self.params.max_members:
            return self._drop(DropReason.TABLE_FULL)
        self._tombs.pop(u.node_id, None)
        empty = codec.digest_hash(())
        m = Member(u.node_id, u.incarnation, ALIVE, host, u.port, u.http_port,
                   u.sync_port or u.port, u.role, u.name, 0, empty, (), None, now, now,
                   src=src, held_dhash=empty)
        self.members[u.node_id] = m
        # A random place in the rest of this round: probed within two rounds.
        self._order.insert(self.rng.randint(self._order_i, len(self._order)), u.node_id)
        self._events.append(MemberJoined(u.node_id, m.addr))
        if spread:
            self._broadcast(m.node_id, codec.encode_update(self._alive_of(m)))

    def _alive(self, m: Member, u: Alive, now: float, src: Addr | None, spread: bool) -> None:
        if u.incarnation == m.incarnation:
            if m.status in (DEAD, LEFT):
                self._drop(DropReason.DEAD_STAYS_DEAD)
            return
        was = m.status
        host = u.host or (src[0] if src is not None else "") or m.host
        m.host, m.port, m.http_port = host, u.port or m.port, u.http_port
        m.sync_port, m.role, m.name = u.sync_port or m.port, u.role, u.name
        if src is not None:
            m.src = src
        m.last_alive = now
        self._set_status(m, ALIVE, now, u.incarnation)
        if was == SUSPECT:
            self._events.append(MemberRecovered(m.node_id))
        elif was in (DEAD, LEFT):
            self._events.append(MemberRestarted(m.node_id, m.incarnation))
            self._order.insert(self.rng.randint(self._order_i, len(self._order)), m.node_id)
        if spread or was != ALIVE:
            self._broadcast(m.node_id, codec.encode_update(self._alive_of(m)))

    def _suspect(self, m: Member, u: Suspect, now: float) -> None:
        if m.status in (DEAD, LEFT):
            return
        if m.status == SUSPECT and u.incarnation == m.incarnation:
            s = self._suspicions.get(m.node_id)
            if s is not None and s.confirm(u.accuser):
                # An independent confirmation: the deadline moves earlier.
                self.stats["suspicion_confirmations"] += 1
                self._timer(self._suspect_deadline(m, s), TimerKind.SUSPECT_TIMEOUT, m.node_id)
                self._broadcast(m.node_id, codec.encode_update(u))
            return
        was = m.status
        self._set_status(m, SUSPECT, now, u.incarnation)
        n = len(self.members) + 1
        p = self.params
        lo, hi = suspicion_bounds(n, p.probe_interval, p.suspicion_mult,
                                  p.suspicion_max_mult, p.suspicion_min)
        s = Suspicion(u.accuser, now, self._aware.scale(lo), self._aware.scale(hi),
                      expected_confirmations(p.suspicion_mult, n))
        self._suspicions[m.node_id] = s
        if was == ALIVE:
            self._events.append(MemberSuspected(m.node_id))
        self._broadcast(m.node_id, codec.encode_update(u))
        self._timer(self._suspect_deadline(m, s), TimerKind.SUSPECT_TIMEOUT, m.node_id)

    def _suspect_deadline(self, m: Member, s: Suspicion) -> float:
        # Declared dead before ttl passes without a sign of life.
        cap = m.last_alive + self.params.ttl - self.params.probe_interval
        return max(s.started, min(s.deadline, cap))

    def _set_status(self, m: Member, status: int, now: float, incarnation: int) -> None:
        m.incarnation = incarnation
        if status != m.status:
            m.status = status
            m.status_since = now
        if status != SUSPECT:
            self._suspicions.pop(m.node_id, None)

    def _apply_digests(self, u: Digests, spread: bool) -> None:
        m = self.members.get(u.node_id)
        if m is None:
            return self._drop(DropReason.UNKNOWN_MEMBER)
        version = (u.incarnation, u.version)
        if version <= m.digests_version:
            return
        if u.incarnation > m.incarnation + INCARNATION_STEP:
            return self._drop(DropReason.INCARNATION_JUMP)
        m.digests_version = version
        m.app_healthy = u.app_healthy
        if u.incarnation >= m.incarnation:
            m.dhash = u.dhash
        held = codec.digest_hash(u.digests)
        changed = held != m.held_dhash
        m.digests, m.held_dhash = u.digests, held
        if changed:
            self._events.append(DigestsChanged(m.node_id))
            if spread:
                self._broadcast(m.node_id + _DIGESTS_KEY, codec.encode_update(u))

    def _about_me(self, u: codec.Update) -> None:
        """News about ourselves: refute what would make others drop us."""
        mine = self.me.incarnation
        if isinstance(u, Digests) or self._leaving:
            return
        if isinstance(u, Alive):
            if u.incarnation > mine:
                self._raise_incarnation(u.incarnation)
            return
        if u.incarnation < mine:
            return
        self._aware.apply(1)
        self._raise_incarnation(u.incarnation)

    def _raise_incarnation(self, claim: int) -> None:
        if claim > self.me.incarnation + INCARNATION_STEP or claim >= JS_SAFE:
            # Only we raise our incarnation: a claim far above it is forged.
            return self._drop(DropReason.INCARNATION_JUMP)
        self.me.incarnation = claim + 1
        self.stats["refutations"] += 1
        self._events.append(IncarnationRaised(self.me.incarnation))
        self._broadcast(self.me.node_id, codec.encode_update(self._own_alive()))

    def _put_tomb(self, node_id: bytes, tomb: Tombstone) -> None:
        """At most ``max_members`` tombstones; each lasts ttl from when it
        was written, so insertion order is expiry order: the first goes first."""
        self._tombs.pop(node_id, None)
        while self._tombs and len(self._tombs) >= self.params.max_members:
            del self._tombs[next(iter(self._tombs))]
            self.stats["tombstones_evicted"] += 1
        self._tombs[node_id] = tomb

    # --- push-pull -------------------------------------------------------------------

    def handle_push_pull(self, data: bytes, src: Addr, now: float) -> bytes | None:
        """Server side: merge the caller's table, answer with ours (None: refused)."""
        self._now = now
        if self._leaving:
            self._drop(DropReason.LEAVING)
            return None
        if not self._admit(src[0], now):
            self._drop(DropReason.RATE_LIMITED)
            return None
        if not self._merge_state(data, src, now):
            return None
        self.stats["push_pull_served"] += 1
        return self._state_payload(join=False)

    def receive_push_pull_reply(self, data: bytes, src: Addr, now: float) -> None:
        self._now = now
        if self._leaving:
            return
        if self._merge_state(data, src, now) and src in self._seeds:
            self.seeds_reached = True

    def push_pull_failed(self, addr: Addr, now: float) -> None:
        self._now = now
        self.stats["push_pull_failed"] += 1

    def _merge_state(self, data: bytes, src: Addr, now: float) -> bool:
        try:
            state = codec.decode_state(data, self.params.max_members)
        except codec.SwimDecodeError as err:
            self._drop(err.reason)
            return False
        if state.truncated:
            self.stats[DropReason.TABLE_FULL.value] += state.truncated
        first = state.entries[0]
        sender = first.alive.node_id
        if sender == self.me.node_id:
            # We are in our own seed list.
            self._seeds = [s for s in self._seeds if s != src]
            self._drop(DropReason.FROM_SELF)
            return False
        self.stats["push_pull_merged"] += 1
        self._apply(first.alive, now, src=(src[0], first.alive.port), own=True)
        self._apply(first.digests, now, spread=False)
        m = self.members.get(sender)
        if m is not None and first.alive.incarnation >= m.incarnation:
            m.lc = max(m.lc, first.lc)
        for e in state.entries[1:]:
            nid, inc = e.alive.node_id, e.alive.incarnation
            if e.status == ALIVE:
                self._apply(e.alive, now, spread=False)
            elif e.status == LEFT:
                self._apply(Left(nid, inc), now)
            elif nid in self.members or nid == self.me.node_id:
                # A peer's DEAD is our SUSPECT (memberlist): we check for ourselves.
                self._apply(e.alive, now, spread=False)
                self._apply(Suspect(nid, inc, sender), now)
            if e.status != LEFT:
                self._apply(e.digests, now, spread=False)
        return True

    def _state_payload(self, join: bool) -> bytes:
        entries = [codec.Entry(self._own_alive(), ALIVE, self.lc, self._own_digests())]
        for m in self.members.values():
            entries.append(codec.Entry(
                self._alive_of(m), m.status, m.lc,
                Digests(m.node_id, max(m.digests_version[0], 0),
                        max(m.digests_version[1], 0), m.held_dhash, m.digests,
                        m.app_healthy)))
        return codec.encode_state(codec.State(join, tuple(entries)), self.params.max_members)

    def _push_pull_to(self, addr: Addr, join: bool) -> None:
        self._push_pulls.append(PushPull(addr, self._state_payload(join)))
        self.stats["push_pulls_out"] += 1

    def _push_pull_every(self) -> float:
        n = len(self.members) + 1
        scale = 1 if n <= 32 else math.ceil(math.log2(n) - math.log2(32)) + 1
        return self.params.push_pull_interval * scale

    def _periodic_push_pull(self, now: float) -> None:
        self._next_push_pull = now + self._push_pull_every()
        self._timer(self._next_push_pull, TimerKind.PUSH_PULL)
        alive = [m for m in self.members.values() if m.status == ALIVE]
        if alive:
            self._push_pull_to(self.rng.choice(alive).addr, join=False)

    def _retry_join(self, now: float) -> None:
        if not self.seeds_reached:
            for addr in self._seeds:
                self._push_pull_to(addr, join=True)
            self._join_backoff = min(self._join_backoff * 2, self.params.join_retry_max)
            self._next_join = now + self._join_backoff
        else:
            # Seeds that are not members: groups that formed apart merge.
            known = {m.addr for m in self.members.values() if m.status in (ALIVE, SUSPECT)}
            for addr in self._seeds:
                if addr not in known:
                    self._push_pull_to(addr, join=True)
            self._next_join = now + self.params.join_retry_max
        if self._seeds:
            self._timer(self._next_join, TimerKind.JOIN)
        else:
            self._next_join = math.inf

    # --- helpers ------------------------------------------------------------------

    def _own_alive(self) -> Alive:
        me = self.me
        return Alive(me.node_id, me.incarnation, me.host, me.port, me.http_port,
                     me.sync_port, me.role, me.name)

    def _own_digests(self) -> Digests:
        return Digests(self.me.node_id, self.me.incarnation, self._meta_version, self.dhash,
                       self.digests, self.app_healthy)

    def _alive_of(self, m: Member) -> Alive:
        return Alive(m.node_id, m.incarnation, m.host, m.port, m.http_port, m.sync_port,
                     m.role, m.name)

    def _meta_changed(self) -> None:
        self._meta_version = min(self._meta_version + 1, JS_SAFE)
        self._broadcast(self.me.node_id + _DIGESTS_KEY,
                        codec.encode_update(self._own_digests()))

    def _broadcast(self, key: bytes, item: bytes) -> None:
        self._bq.put(key, item)
        if self._started:
            self._arm_gossip(self._now)

    def _arm_gossip(self, now: float) -> None:
        if not self._gossip_armed:
            self._gossip_armed = True
            self._timer(now + self.params.gossip_interval, TimerKind.GOSSIP)

    def _send(self, addr: Addr, ptype: int, to: Member | None, seq: int = 0,
              target: bytes = b"", target_addr: Addr | None = None,
              first: Sequence[bytes] = (), ask: bool = False) -> None:
        """One datagram to ``addr`` (member ``to`` if known), carrying our card,
        ``first`` and as many queued updates as fit."""
        now = self._now
        every = self.params.digests_answer_every
        want = ask or (to is not None and to.dhash != to.held_dhash
                       and now - to.digests_asked >= every)
        if want and to is not None:
            to.digests_asked = now
        items = list(first)
        if to is not None and to.status in (SUSPECT, DEAD):
            # Lifeguard's buddy system: tell a suspect first, so it can refute.
            cls = Suspect if to.status == SUSPECT else Dead
            items.insert(0, codec.encode_update(cls(to.node_id, to.incarnation,
                                                    self.me.node_id)))
        n = len(self.members) + 1
        card = Card(self.me.node_id, self.me.incarnation, self.lc, self.dhash)
        packet = Packet(ptype, card, want, (), seq, target, target_addr)
        data = codec.assemble(packet, lambda room: self._bq.take(room, n), items)
        self._out.append(Send(addr, data))
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._order_i < len(self._order):
                nid = self._order[self._order_i]
                self._order_i += 1
                m = self.members.get(nid)
                if m is not None and m.status in (ALIVE, SUSPECT):
                    return m
            # A round is over: reshuffle (O(N) once per N probes).
            self._order = [nid for nid, m in self.members.items()
                           if m.status in (ALIVE, SUSPECT)]
            self.rng.shuffle(self._order)
            self._order_i = 0
        return None

    def _random_members(self, k: int, exclude: bytes,
                        statuses: tuple[int, ...]) -> list[Member]:
        """Up to ``k`` distinct random members in ``statuses``: O(k) tries in
        the probe order list, not a walk over the table."""
        out: dict[bytes, Member] = {}
        order = self._order
        for _ in range(4 * k):
            if len(out) >= k or not order:
                break
            nid = order[self.rng.randrange(len(order))]
            m = self.members.get(nid)
            if m is not None and nid != exclude and m.status in statuses:
                out[nid] = m
        return list(out.values())

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < wire.MAX_AGE_MS else 1
        return self._seq

    def _timer(self, deadline: float, kind: TimerKind, key: bytes | int = 0) -> None:
        self._timers.append(SetTimer(deadline, Timer(kind, key)))

    def _drop(self, reason: DropReason) -> None:
        self.stats[reason.value] += 1

    def _admit(self, host: str, now: float) -> bool:
        """Token bucket per source address: a flood from one address must not
        starve the others or burn the CPU of a small device."""
        rate = float(self.params.max_datagrams_per_source)
        burst = 2.0 * rate
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= 4 * self.params.max_members:
                # Forget the idlest half rather than grow without bound.
                by_age = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
                for k, _ in by_age[: len(by_age) // 2]:
                    del self._buckets[k]
            bucket = (burst, now)
        tokens, last = bucket
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1.0, now)
        return True
