"""SWIM + Lifeguard membership, sans-I/O: probes, suspicion, dissemination, push-pull.

The shell (or a simulator) drives :class:`Swim` with datagrams, push-pull
payloads and timers, and drains what it wants done: datagrams
(:meth:`Swim.take_outgoing`), TCP exchanges (:meth:`Swim.take_push_pulls`),
timers (:meth:`Swim.take_timers`) and outcome events
(:meth:`Swim.take_events`). Time is a float from the shell's monotonic clock;
randomness comes from the ``rng`` given to the constructor, so the same
inputs give the same outputs. Work per call is proportional to what happened:
only push-pull, leave, the seed retry and the reshuffle of the probe order
(once per round of N probes) walk the table. The class is built in three
layers: :class:`~agent.core.swim.table.Table`
(members and the rules that change them), :class:`~agent.core.swim.exchange.Exchange`
(joining and push-pull) and :class:`Swim` here (probes, datagrams, timers).

Theory of operation (Das, Gupta, Motivala 2002; Lifeguard, Dadgar et al. 2018):

* **Probe.** Every period (``probe_interval`` x awareness) we PING the next
  member of a shuffled round-robin list of ALIVE and SUSPECT members (new
  members go in at a random position: every member is probed within two
  rounds). No ACK within ``probe_timeout`` x awareness: we ask
  ``indirect_checks`` random ALIVE members to PING_REQ it for us (they relay
  its ACK, or send a NACK when their own ping went unanswered) and re-send a
  direct ping, then once more halfway to the period's end (under plain loss
  the retries save most probes). No ACK by the end of the period: the target
  is SUSPECT (or, already suspected, we confirm the suspicion).
* **Local health (awareness).** A failed probe whose helpers did not even
  NACK raises our score by one per missing NACK; having to refute raises it;
  a successful probe lowers it. Probe interval, probe timeout and suspicion
  timeouts are multiplied by score + 1: an agent starved of CPU or bandwidth
  slows its own verdicts instead of accusing healthy members.
* **Suspicion and death** (rules in ``table.py``): a SUSPECT lasts between
  min and max (``suspicion.py``), shortened by independent accusers, cut so
  a member is declared DEAD before ``ttl`` passes without a sign of life.
  A DEAD heard from others starts or confirms our own suspicion and takes
  effect once that suspicion is corroborated (the independent accusers it
  waits for, all of them members) or ran its minimum: a lone accuser's DEAD
  kills no faster than a SUSPECT.
  Suspects and the dead are told so first in every datagram we send them
  (Lifeguard's buddy system), so a living one refutes at once. An
  uncorroborated suspicion checks the suspect (direct and through helpers)
  one period before its verdict: a refutation that gossip lost on its way
  to us arrives on the suspect's answer.
* **Refutation.** Only a member raises its own incarnation (claim + 1,
  gossiped as ALIVE, IncarnationRaised for the shell to save). A member we
  reaped as dead that speaks to us again is told it is dead (in our reply, or
  in our push-pull answer) so that it refutes; ALIVE news at the incarnation
  we hold a member dead at makes us gossip the DEAD again.
* **Dissemination.** Every accepted change is queued (``broadcasts.py``:
  one item per member, each sent retransmit_mult x ceil(log10(N+1)) times,
  least-sent and newest first) and piggybacked on every datagram up to the
  budget. While the queue is not empty a GOSSIP round every
  ``gossip_interval`` sends it to ``gossip_fanout`` random members; an idle
  swarm sends only pings and acks (~55 and ~40 bytes).
* **The card.** Every datagram starts with its sender's (node id,
  incarnation, logical clock, 8-byte digest hash). A receiver whose copy of
  the sender's digests does not match the hash sets ``want_digests`` on its
  next datagram to it (or sends a GOSSIP asking, when it has nothing to
  reply), and the member answers with its own ALIVE and DIGESTS updates
  first in line. The same flag asks a sender we do not know at all (its
  ALIVE passed us by) for its card. Own digest and app-health changes are
  gossiped as DIGESTS updates, ordered by (incarnation, version), so a change
  reaches members that never exchange a datagram with the owner.
* **Join and push-pull** (``exchange.py``): seeds get our table over TCP
  until one answers; the seed and our own queue gossip our ALIVE (nothing
  goes to every member), and one catch-up push-pull follows; every ``push_pull_interval`` (scaled up
  with N) a full table is exchanged with one random member, merged with the
  gossip rules.
* **Table** (``table.py``): members stay in :attr:`Swim.members` in every
  status; a non-ALIVE member not confirmed alive for ``ttl`` (counted from
  when it stopped being ALIVE here, or its last sign of life if later) is
  removed (MemberExpired) and leaves a tombstone for another ``ttl``. At
  most ``max_members`` members and as many tombstones.
* **Leave.** LEFT is gossiped and sent directly (LEAVE2) to every member;
  receivers apply it at once. Once leaving we answer nothing.
* **Binding.** ``sender`` (the node id that authenticated the datagram) must
  be the card's node id, else SENDER_MISMATCH; each source address gets a
  token bucket of datagrams.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from agent.core import wire
from agent.core.addr import Addr
from agent.core.swim import codec
from agent.core.swim.codec import Alive, Card, Dead, Left, Suspect
from agent.core.swim.events import (
    DropReason,
    Event,
    IncarnationRaised,
    Send,
    SetTimer,
    Timer,
    TimerKind,
)
from agent.core.swim.exchange import Exchange
from agent.core.swim.members import ALIVE, DEAD, SUSPECT, Member, SelfInfo, Tombstone
from agent.core.swim.params import Params
from agent.core.swim.table import EPS, LC_STEP, NACK_FRACTION
from agent.core.wire import JS_SAFE, Digest

#: a digest list this small rides in the reply itself; a larger one gets its
#: own datagrams
SMALL_DIGESTS = 600
#: direct pings re-sent after the probe timeout (at the timeout, then evenly
#: spaced over the rest of the period): at 20 % loss a round trip fails 36 %
#: of the time, and every probe that fails for nothing costs a suspicion
#: gossiped to the whole swarm (with the helpers' retried relays, a probe of
#: a live member then fails ~2e-4 of the time at 20 % loss, instead of ~1e-2)
DIRECT_RETRIES = 5


#: stats counter of each datagram type received (decoded, before any check
#: of who sent it), for the metrics exporter
_IN_COUNTER = {codec.PING: "pings_in", codec.ACK: "acks_in", codec.PING_REQ: "ping_reqs_in",
               codec.NACK: "nacks_in", codec.GOSSIP: "gossip_in", codec.LEAVE2: "leaves_in"}


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
    #: direct pings re-sent so far, and when the period ends
    retries: int = 0
    end: float = 0.0
    #: the helpers asked for an indirect probe: only they may relay its ACK
    helpers: frozenset[bytes] = frozenset()


@dataclass
class _Relay:
    requester: Addr
    seq: int
    #: the member probed for the requester: only its ACK is relayed
    target: bytes
    #: where we ping it, and whether the one retry went out
    addr: Addr = ("", 0)
    retried: bool = False


class Swim(Exchange):
    """One agent's membership state machine (see the module docstring)."""

    def __init__(self, me: SelfInfo, params: Params, rng: random.Random, now: float) -> None:
        super().__init__(me, params, rng, now)
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._asked: dict[Addr, float] = {}
        self._next_probe = math.inf
        #: last checks of suspects before the verdict: seq -> (suspect, helpers)
        self._checks: dict[int, tuple[bytes, frozenset[bytes]]] = {}
        #: a DEAD about the sender of the datagram (or push-pull) being handled
        self._tell_dead = b""

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

    def set_role(self, role: int) -> None:
        """A new role (Edge, Leader, Follower: agent.core.wire.ROLES) spreads
        as our ALIVE at a new incarnation, like a new HTTP port: every member
        then shows it. Roles change when a coordinator comes or goes, so this
        costs one incarnation per change, not per period."""
        role = max(0, min(int(role), 255))
        if role == self.me.role:
            return
        self.me.role = role
        if self._started and not self._leaving and self.me.incarnation < JS_SAFE - 1:
            self.me.incarnation += 1
            self._events.append(IncarnationRaised(self.me.incarnation, "role"))
            self._broadcast(self.me.node_id, codec.encode_update(self._own_alive()))

    def bump_lc(self) -> int:
        self.lc = min(self.lc + 1, JS_SAFE)
        return self.lc

    # --- outputs ---------------------------------------------------------------

    def take_outgoing(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def take_timers(self) -> list[SetTimer]:
        out, self._timers = self._timers, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    @property
    def leaving(self) -> bool:
        """We called :meth:`leave`: nothing more is answered."""
        return self._leaving

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
        self.stats[_IN_COUNTER[p.type]] += 1
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
        requester_ok = False
        if p.type == codec.PING_REQ:
            # Judged before this datagram's card moves the member's address.
            known = self.members.get(card.node_id)
            requester_ok = (known is not None and known.status == ALIVE
                            and (own or src in (known.addr, known.src)))
        for u in p.updates:
            if u.node_id == card.node_id:
                self._apply(u, now, src=src, own=own)
            else:
                self._apply(u, now)
        m = self._on_card(card, src, now, own)
        # A sender we do not know (its ALIVE passed us by): ask for its card.
        ask = m is None and p.type != codec.LEAVE2 and self._may_ask(src, now)
        if ask:
            # One we reaped as dead still speaking: tell it, so it refutes
            # (its ALIVE at the same incarnation stays refused).
            tomb = self._tombs.get(card.node_id)
            if tomb is not None and tomb.status == DEAD and card.incarnation <= tomb.incarnation:
                self._tell_dead = codec.encode_update(
                    Dead(card.node_id, tomb.incarnation, self.me.node_id))
        replied = False
        if p.type == codec.PING:
            self._reply(codec.ACK, src, m, p.seq, p.want_digests, now, ask)
            replied = True
        elif p.type == codec.ACK:
            self._on_ack(p.seq, card.node_id, now)
        elif p.type == codec.NACK:
            pr = self._probe
            if p.seq in self._checks:
                pass  # a last check waits for an ACK only
            elif pr is None or pr.seq != p.seq or pr.done:
                self._drop(DropReason.UNKNOWN_PROBE)
            elif card.node_id not in pr.helpers:
                self._drop(DropReason.WRONG_ACKER)
            else:
                pr.nacks += 1
        elif p.type == codec.PING_REQ:
            self._relay(p.seq, p.target, p.target_addr, src, requester_ok)
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
        if self._tell_dead:
            first.append(self._tell_dead)
            self._tell_dead = b""
        parts: list[bytes] = []
        if wants and (m is None or now - m.digests_sent >= self.params.digests_answer_every):
            if m is not None:
                m.digests_sent = now
            first.append(codec.encode_update(self._own_alive()))
            parts = [codec.encode_update(p) for p in codec.digests_parts(self._own_digests())]
            if len(parts) == 1 and len(parts[0]) <= SMALL_DIGESTS:
                first.append(parts.pop())
        # No gossip for an address that is not a member's: a stranger's
        # datagram must not make us send it a full one (amplification).
        self._send(addr, ptype, m, seq=seq, first=first, ask=ask, piggyback=m is not None)
        for part in parts:  # a larger list: one datagram per part
            self._send(addr, codec.GOSSIP, m, first=[part], piggyback=False)

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
        if card.incarnation == m.incarnation:
            # Only a card we took (not one refused as far ahead) moves these.
            m.lc = max(m.lc, card.lc)
            m.dhash = card.dhash
        return m

    def _on_ack(self, seq: int, acker: bytes, now: float) -> None:
        """An ACK counts only from the member probed, or relayed by a helper
        we asked; seqs are random, so a forger must also guess the number."""
        pr = self._probe
        if pr is not None and pr.seq == seq and not pr.done:
            if acker != pr.node_id and acker not in pr.helpers:
                return self._drop(DropReason.WRONG_ACKER)
            if not pr.acked:
                pr.acked = True
                self._aware.apply(-1)
                target = self.members.get(pr.node_id)
                if target is not None and target.status in (ALIVE, SUSPECT):
                    target.last_alive = now
            return
        relay = self._relays.get(seq)
        if relay is not None:
            if acker != relay.target:
                return self._drop(DropReason.WRONG_ACKER)
            del self._relays[seq]
            self._send(relay.requester, codec.ACK, None, seq=relay.seq)
            return
        check = self._checks.get(seq)
        if check is not None:
            if acker != check[0] and acker not in check[1]:
                return self._drop(DropReason.WRONG_ACKER)
            del self._checks[seq]
            self._check_answered(check[0], now)
            return
        if pr is None or pr.seq != seq:
            self._drop(DropReason.UNKNOWN_PROBE)

    def _relay(self, seq: int, target: bytes, addr: Addr | None, src: Addr,
               requester_ok: bool) -> None:
        """Probe ``target`` for the member at ``src`` (indirect probe).

        Served only for a known ALIVE member speaking from its own address,
        and sent to the target's known address when we know it: otherwise
        anyone could make us send datagrams to any address (reflection).
        The ping carries no piggyback, so it is no larger than the request."""
        if not requester_ok:
            return self._drop(DropReason.UNKNOWN_REQUESTER)
        if len(self._relays) >= self.params.max_relays:
            return self._drop(DropReason.RELAY_BUSY)
        m = self.members.get(target)
        if m is not None:
            addr = m.addr
        if addr is None:
            return self._drop(DropReason.NO_ADDRESS)
        mine = self._next_seq()
        self._relays[mine] = _Relay(src, seq, target, addr)
        self._send(addr, codec.PING, m, seq=mine, target=target, piggyback=False)
        # One retry halfway to the NACK: under loss it saves most indirect
        # probes (a helper's path is four datagrams, each may be lost).
        wait = self._aware.scale(self.params.probe_timeout) * NACK_FRACTION
        self._timer(self._now + wait / 2, TimerKind.PROBE_TIMEOUT, mine)

    # --- timers ---------------------------------------------------------------------

    def handle_timer(self, timer: Timer, now: float) -> None:
        self._now = now
        kind, key = timer.kind, timer.key
        if kind == TimerKind.GOSSIP:
            if now + EPS >= self._gossip_due:
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
            self._suspect_or_check(key, now)
        elif kind == TimerKind.REAP and isinstance(key, bytes):
            self._reap(key, now)
        elif kind == TimerKind.PUSH_PULL:
            if now + EPS >= self._next_push_pull:
                self._periodic_push_pull(now)
        elif kind == TimerKind.JOIN and now + EPS >= self._next_join:
            self._retry_join(now)

    def timer_pending(self, timer: Timer) -> bool:
        """Whether ``timer`` (one we handed out) would still do anything if it
        fired: False for a probe's timeouts once its ACK came, a suspicion
        that ended, a reaped member, a GOSSIP round with nothing queued, and
        all but GOSSIP once leaving. The shell may drop a timer for which
        this is False instead of waking up for it; a timer dropped so is
        never needed again (the core arms a fresh one if it is). True may
        still be a timer the core ignores when it fires (re-armed earlier
        or later). O(1)."""
        kind, key = timer.kind, timer.key
        if kind == TimerKind.GOSSIP:
            return bool(self._bq)
        if self._leaving:
            return False
        pr = self._probe
        if kind == TimerKind.PROBE_TIMEOUT:
            if key in self._relays or key in self._checks:
                return True
            return pr is not None and pr.seq == key and not pr.acked and not pr.done
        if kind == TimerKind.PROBE_END:
            # Once acked, the next probe closes this one (same outcome).
            return pr is not None and pr.seq == key and not pr.acked and not pr.done
        if kind == TimerKind.SUSPECT_TIMEOUT and isinstance(key, bytes):
            m = self.members.get(key)
            return m is not None and m.status == SUSPECT and key in self._suspicions
        if kind == TimerKind.REAP and isinstance(key, bytes):
            m = self.members.get(key)
            return (m is not None and m.status not in (ALIVE, SUSPECT)) or key in self._tombs
        if kind == TimerKind.JOIN:
            return self._next_join != math.inf
        return True  # PROBE and PUSH_PULL: the periodic ones

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
        self._probe = _Probe(seq, m.node_id, m.addr, m.incarnation, end=now + interval)
        self._send(m.addr, codec.PING, m, seq=seq, target=m.node_id)
        self.stats["probes"] += 1
        self._timer(now + self._aware.scale(self.params.probe_timeout),
                    TimerKind.PROBE_TIMEOUT, seq)
        self._timer(now + interval, TimerKind.PROBE_END, seq)

    def _probe_timeout(self, seq: int, now: float) -> None:
        relay = self._relays.get(seq)
        if relay is not None:
            if not relay.retried:
                relay.retried = True
                self._send(relay.addr, codec.PING, self.members.get(relay.target), seq=seq,
                           target=relay.target, piggyback=False)
                wait = self._aware.scale(self.params.probe_timeout) * NACK_FRACTION
                self._timer(now + wait / 2, TimerKind.PROBE_TIMEOUT, seq)
                return
            # Our ping for someone else got no answer: tell them so (Lifeguard
            # NACK), which shows them their own link to us works.
            del self._relays[seq]
            self._send(relay.requester, codec.NACK, None, seq=relay.seq)
            return
        check = self._checks.get(seq)
        if check is not None:
            # The suspect did not answer our last check yet: one more direct try.
            m = self.members.get(check[0])
            if m is not None and m.status == SUSPECT:
                self._send(m.addr, codec.PING, m, seq=seq, target=m.node_id)
            return
        pr = self._probe
        if pr is None or pr.seq != seq or pr.acked or pr.done:
            return
        target = self.members.get(pr.node_id)
        if pr.indirect:
            # Another direct try, evenly spaced up to the period's end.
            if pr.retries < DIRECT_RETRIES:
                pr.retries += 1
                self._send(pr.addr, codec.PING, target, seq=seq, target=pr.node_id)
                if pr.retries < DIRECT_RETRIES:
                    left = DIRECT_RETRIES - pr.retries + 1
                    self._timer(now + (pr.end - now) / left, TimerKind.PROBE_TIMEOUT, seq)
            return
        pr.indirect = True
        helpers = self._random_members(self.params.indirect_checks, exclude=pr.node_id,
                                       statuses=(ALIVE,))
        pr.helpers = frozenset(h.node_id for h in helpers)
        for h in helpers:
            self._send(h.addr, codec.PING_REQ, h, seq=seq, target=pr.node_id,
                       target_addr=pr.addr)
        pr.expected_nacks = len(helpers)
        # One more direct try now and more later: cheap, and under plain loss
        # they save most probes that would otherwise end in a suspicion.
        pr.retries = 1
        self._send(pr.addr, codec.PING, target, seq=seq, target=pr.node_id)
        self._timer(now + (pr.end - now) / DIRECT_RETRIES, TimerKind.PROBE_TIMEOUT, seq)

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

    def _suspect_or_check(self, node_id: bytes, now: float) -> None:
        """A suspicion is about to run out. Unless independent accusers
        corroborated it, the suspect gets a last check one probe period
        before the verdict (Lifeguard's re-probe of a suspect): a PING that
        tells it it is suspected, the same through ``indirect_checks``
        helpers, and a direct retry. A suspect that refuted when the rest of
        the swarm heard it, but whose refutation gossip passed us by (at 20 %
        loss a few members in a thousand), answers with its new incarnation
        on its card; one that had not heard answers after refuting. The
        verdict on a member that really failed comes no later: the check
        runs inside the suspicion, not after it."""
        m = self.members.get(node_id)
        s = self._suspicions.get(node_id)
        if m is None or s is None or m.status != SUSPECT:
            return
        if s.checked or s.corroborated:
            if now + EPS >= self._suspect_deadline(m, s):
                self._forget_checks(node_id)
            return self._suspect_timeout(node_id, now)
        if now + EPS < self._suspect_wake(m, s):
            return  # re-armed later (or a stale timer)
        s.checked = True
        deadline = self._suspect_deadline(m, s)
        wait = self.params.probe_interval
        # The verdict leaves the check at least half a period to be answered.
        self._timer(max(deadline, now + wait / 2), TimerKind.SUSPECT_TIMEOUT, node_id)
        if len(self._checks) >= self.params.max_relays:
            self._checks.clear()  # answers that never came: bounded
        seq = self._next_seq()
        helpers = self._random_members(self.params.indirect_checks, exclude=node_id,
                                       statuses=(ALIVE,))
        self._checks[seq] = (node_id, frozenset(h.node_id for h in helpers))
        self.stats["suspect_checks"] += 1
        self._send(m.addr, codec.PING, m, seq=seq, target=node_id)
        for h in helpers:
            self._send(h.addr, codec.PING_REQ, h, seq=seq, target=node_id, target_addr=m.addr)
        self._timer(now + min(self._aware.scale(self.params.probe_timeout), wait / 2),
                    TimerKind.PROBE_TIMEOUT, seq)

    def _check_answered(self, node_id: bytes, now: float) -> None:
        """The suspect (or a helper for it) answered our last check: it lives.
        Had it refuted, its card already cleared the suspicion; if not, the
        suspicion starts over (our ping told it, so it refutes)."""
        self.stats["suspect_checks_answered"] += 1
        m = self.members.get(node_id)
        s = self._suspicions.get(node_id)
        if m is None or s is None or m.status != SUSPECT:
            return
        s.started, s.checked = now, False
        m.last_alive = max(m.last_alive, now)
        self._timer(self._suspect_wake(m, s), TimerKind.SUSPECT_TIMEOUT, node_id)

    def _forget_checks(self, node_id: bytes) -> None:
        for seq in [q for q, c in self._checks.items() if c[0] == node_id]:
            del self._checks[seq]

    def _gossip(self, now: float) -> None:
        self._gossip_due = math.inf
        if not self._bq:
            return
        for m in self._random_members(self.params.gossip_fanout, exclude=b"",
                                      statuses=(ALIVE, SUSPECT)):
            self._send(m.addr, codec.GOSSIP, m)
        if self._bq:
            self._arm_gossip(now)

    # --- helpers ------------------------------------------------------------------

    def _next_seq(self) -> int:
        """A random probe number (a forged ACK must guess it), unused by
        any probe of ours in flight."""
        while True:
            seq = self.rng.randint(1, wire.MAX_AGE_MS)
            if seq not in self._relays and seq not in self._checks and (
                    self._probe is None or self._probe.seq != seq):
                return seq

