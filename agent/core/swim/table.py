"""The member table and its rules: what each piece of news does to it.

:class:`Table` is the part of :class:`agent.core.swim.protocol.Swim` that
holds the members, tombstones and suspicions and folds updates into them;
the protocol (probes, datagrams, push-pull, timers) feeds it. Every change
it accepts is queued for gossip and reported as an outcome event.

Rules:

* **Precedence** per member: a higher incarnation wins; at equal incarnation
  LEFT > DEAD > SUSPECT > ALIVE. ALIVE news clears a suspicion, a death or a
  departure only with a *higher* incarnation; a higher incarnation of a DEAD
  or LEFT member is a restart (MemberRestarted) and replaces the entry.
* **Only a member raises its own incarnation.** News about ourselves that
  would make others drop us (SUSPECT, DEAD, or LEFT while we are not
  leaving, at an incarnation >= ours) is refuted: incarnation = claim + 1,
  gossiped as ALIVE, IncarnationRaised, awareness +1. A claim more than
  INCARNATION_STEP above what we know is forged or corrupt: refused (and
  never refuted to), unless the member itself says it.
* **Suspicion** (``suspicion.py``): bounds from log10(N), scaled by our
  awareness; each independent accuser shortens the deadline (the timer is
  re-armed); the deadline is also cut so a suspect is declared dead before
  ``ttl`` passes without a sign of life.
* **Dead stays dead.** A non-ALIVE member not confirmed alive for ``ttl``
  is removed (MemberExpired); its tombstone (incarnation, status) stays
  another ``ttl``, and ALIVE news at or below it is refused
  (DEAD_STAYS_DEAD); ALIVE news at the very incarnation we hold it dead at
  makes us gossip the DEAD again, so that a living member refutes.
  Tombstones are capped at ``max_members``, soonest due dropped first. A
  departure of an unknown member is recorded only from its own word.
* **Bounded.** At most ``max_members`` members (TABLE_FULL beyond).
* **Digests** are ordered by (incarnation, version): an older list never
  replaces a newer one; a new list is reported (DigestsChanged).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

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



class Table:
    """Members, tombstones, suspicions and the rules that change them."""

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
        self._now = now
        self._meta_version = 0
        self._aware = Awareness(params.max_awareness)
        self._bq = BroadcastQueue(params.retransmit_mult, params.max_broadcasts)
        self._tombs: dict[bytes, Tombstone] = {}
        self._suspicions: dict[bytes, Suspicion] = {}
        #: the probe order: a shuffled round of ALIVE and SUSPECT members
        self._order: list[bytes] = []
        self._order_i = 0
        self._in_order: set[bytes] = set()
        #: deadline of the GOSSIP timer that counts (inf: none armed); an
        #: earlier one that fires is stale and ignored
        self._gossip_due = math.inf
        self._started = False
        self._leaving = False
        self._timers: list[SetTimer] = []
        self._events: list[Event] = []
        self._out: list[Send] = []
        self._buckets: dict[str, tuple[float, float]] = {}

    # --- timers of the table --------------------------------------------------

    def _suspect_timeout(self, node_id: bytes, now: float) -> None:
        m = self.members.get(node_id)
        s = self._suspicions.get(node_id)
        if m is None or s is None or m.status != SUSPECT:
            return
        if now + EPS < self._suspect_deadline(m, s):
            return  # re-armed later (or a stale timer)
        self._gone(m, Dead(node_id, m.incarnation, self.me.node_id), DEAD, now)

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

    # --- the rules ------------------------------------------------------------

    def _apply(self, u: codec.Update, now: float, src: Addr | None = None,
               own: bool = False, spread: bool = True) -> None:
        """Fold one update into the table. ``src`` is set when the update is
        the member's own word (its datagram or its push-pull entry); ``own``
        when that word is authenticated or comes from where it spoke before."""
        if u.node_id == self.me.node_id:
            return self._about_me(u)
        if isinstance(u, Digests):
            return self._apply_digests(u, spread, src, own)
        m = self.members.get(u.node_id)
        if m is None:
            if isinstance(u, Alive):
                self._add(u, now, src, spread)
            elif isinstance(u, Left) and src is not None:
                # Only M's own word records a departure of a member we never knew.
                self._put_tomb(u.node_id, Tombstone(u.incarnation, LEFT, now + self.params.ttl))
                self._timer(now + self.params.ttl, TimerKind.REAP, u.node_id)
            else:
                self._drop(DropReason.UNKNOWN_MEMBER)
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
        elif isinstance(u, Dead):
            if m.status in (ALIVE, SUSPECT) and not self._death_due(m, u, now):
                # Hearsay of a death counts as one accuser's confirmation; it
                # takes effect once our suspicion is corroborated by the
                # independent accusers it waits for (or ran its minimum), so
                # a lone accuser, forged or just on a lossy link, kills no
                # faster than a SUSPECT would.
                self._suspect(m, Suspect(m.node_id, u.incarnation, u.accuser), now)
                s = self._suspicions.get(m.node_id)
                if s is None or m.incarnation != u.incarnation or not s.corroborated:
                    if s is not None and m.incarnation == u.incarnation:
                        s.dead_from = u.accuser
                    return None
            self._gone(m, u, DEAD, now)
        else:
            self._gone(m, u, LEFT, now)

    def _death_due(self, m: Member, u: Dead, now: float) -> bool:
        """Whether our suspicion of M at the DEAD's incarnation is corroborated
        or ran its minimum."""
        s = self._suspicions.get(m.node_id)
        return (s is not None and m.status == SUSPECT and m.incarnation == u.incarnation
                and (s.corroborated or now + EPS >= s.started + s.min_s))

    def _gone(self, m: Member, u: Dead | Left, status: int, now: float) -> None:
        """M is DEAD or LEFT: report, gossip, and reap it after ttl without life."""
        same = u.incarnation == m.incarnation
        if (m.status == LEFT and same) or (m.status == DEAD and status == DEAD and same):
            return self._drop(DropReason.DUPLICATE)
        self._set_status(m, status, now, u.incarnation)
        self._events.append(MemberFailed(m.node_id) if status == DEAD
                            else MemberLeft(m.node_id))
        self._broadcast(m.node_id, codec.encode_update(u))
        self._timer(max(now, m.last_alive + self.params.ttl), TimerKind.REAP, m.node_id)

    def _add(self, u: Alive, now: float, src: Addr | None, spread: bool) -> None:
        tomb = self._tombs.get(u.node_id)
        if tomb is not None and u.incarnation <= tomb.incarnation:
            if tomb.status == DEAD and u.incarnation == tomb.incarnation:
                self._dead_again(u.node_id, tomb.incarnation)
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
        self._into_order(u.node_id)
        self._events.append(MemberJoined(u.node_id, m.addr))
        if spread:
            self._broadcast(m.node_id, codec.encode_update(self._alive_of(m)))

    def _dead_again(self, node_id: bytes, incarnation: int) -> None:
        """Others still spread M alive at the incarnation we hold it dead at:
        gossip our verdict again. If M lives, it hears it and refutes (then
        everyone takes its higher incarnation); if not, the others suspect it
        and find out. Without this, a member declared dead across a healed
        partition would stay unknown here until it happened to probe us."""
        self._broadcast(node_id, codec.encode_update(
            Dead(node_id, incarnation, self.me.node_id)))

    def _alive(self, m: Member, u: Alive, now: float, src: Addr | None, spread: bool) -> None:
        if u.incarnation == m.incarnation:
            if m.status in (DEAD, LEFT):
                if m.status == DEAD:
                    self._dead_again(m.node_id, m.incarnation)
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
            self._into_order(m.node_id)
        if spread or was != ALIVE:
            self._broadcast(m.node_id, codec.encode_update(self._alive_of(m)))

    def _suspect(self, m: Member, u: Suspect, now: float) -> None:
        if m.status in (DEAD, LEFT):
            return self._drop(DropReason.DEAD_STAYS_DEAD)
        if m.status == SUSPECT and u.incarnation == m.incarnation:
            s = self._suspicions.get(m.node_id)
            known = u.accuser in self.members or u.accuser == self.me.node_id
            if s is not None and known and s.confirm(u.accuser):
                # An independent confirmation: the deadline moves earlier.
                self.stats["suspicion_confirmations"] += 1
                # Passed on with what is left of the suspicion's own sends
                # while that is still queued: memberlist restarts the count,
                # so with k confirmations every member sent each suspicion
                # (k + 1) x retransmit_limit times, which is what a partition
                # of 500 from 500 (or a whole swarm restarting) chokes on.
                self._broadcast(m.node_id, codec.encode_update(u), keep_count=True)
                if s.dead_from is not None and s.corroborated:
                    return self._gone(m, Dead(m.node_id, m.incarnation, s.dead_from), DEAD, now)
                self._timer(self._suspect_wake(m, s), TimerKind.SUSPECT_TIMEOUT, m.node_id)
            return None
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
        self._timer(self._suspect_wake(m, s), TimerKind.SUSPECT_TIMEOUT, m.node_id)

    def _suspect_deadline(self, m: Member, s: Suspicion) -> float:
        # Declared dead before ttl passes without a sign of life.
        cap = m.last_alive + self.params.ttl - self.params.probe_interval
        return max(s.started, min(s.deadline, cap))

    def _suspect_wake(self, m: Member, s: Suspicion) -> float:
        """When the SUSPECT_TIMEOUT timer is due: at the deadline, or one
        probe period before it while the suspect still gets a last check
        (an uncorroborated suspicion, see Swim)."""
        deadline = self._suspect_deadline(m, s)
        if s.checked or s.corroborated:
            return deadline
        return max(s.started, deadline - self.params.probe_interval)

    def _set_status(self, m: Member, status: int, now: float, incarnation: int) -> None:
        m.incarnation = incarnation
        if m.status == ALIVE and status != ALIVE:
            # ALIVE with nobody doubting it counts as confirmed alive: we hear
            # directly from most members only every N periods or so, so the
            # ttl runs from when it stopped being ALIVE here.
            m.last_alive = max(m.last_alive, now)
        if status != m.status:
            m.status = status
            m.status_since = now
        if status != SUSPECT:
            self._suspicions.pop(m.node_id, None)

    def _apply_digests(self, u: Digests, spread: bool, src: Addr | None, own: bool) -> None:
        m = self.members.get(u.node_id)
        if m is None:
            return self._drop(DropReason.UNKNOWN_MEMBER)
        version = (u.incarnation, u.version)
        # The member's own word at its current incarnation is taken whatever
        # version hearsay claimed before (a forged far-ahead version must not
        # freeze its digests until it restarts).
        from_m = src is not None and (own or src == (m.src or m.addr)) \
            and u.incarnation >= m.incarnation
        if version == m.digests_version:
            return
        if version < m.digests_version and not from_m:
            return self._drop(DropReason.STALE_DIGESTS)
        if u.incarnation > m.incarnation + INCARNATION_STEP:
            return self._drop(DropReason.INCARNATION_JUMP)
        digests = u.digests
        if u.parts > 1:
            # A list larger than a datagram comes in parts: gossip each new
            # part on, take the list once every part of this version is here.
            if m.parts_version != version:
                m.parts_version, m.parts = version, {}
            if u.part in m.parts:
                return
            m.parts[u.part] = u.digests
            if spread:
                self._broadcast(self._digests_key(m.node_id, u), codec.encode_update(u))
            if not all(i in m.parts for i in range(u.parts)):
                return
            digests = tuple(d for i in range(u.parts) for d in m.parts[i])
            m.parts_version, m.parts = (-1, -1), {}
        m.digests_version = version
        m.app_healthy = u.app_healthy
        if u.incarnation >= m.incarnation:
            m.dhash = u.dhash
        held = codec.digest_hash(digests)
        changed = held != m.held_dhash
        m.digests, m.held_dhash = digests, held
        if changed:
            self._events.append(DigestsChanged(m.node_id))
            if spread and u.parts == 1:
                self._broadcast(self._digests_key(m.node_id, u), codec.encode_update(u))

    @staticmethod
    def _digests_key(node_id: bytes, u: Digests) -> bytes:
        """Queue key of a DIGESTS update: apart from the member's ALIVE/SUSPECT/
        DEAD item (keyed by the bare node id), one per part."""
        return node_id + _DIGESTS_KEY + (bytes([u.part]) if u.parts > 1 else b"")

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

    # --- the probe order --------------------------------------------------------

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
            self._in_order = set(self._order)
        return None

    def _into_order(self, node_id: bytes) -> None:
        """A new (or restarted) member goes in at a random place in the rest
        of this round, so it is probed within two rounds; once per round at
        most, so the list stays bounded by the table."""
        if node_id not in self._in_order:
            self._in_order.add(node_id)
            self._order.insert(self.rng.randint(self._order_i, len(self._order)), node_id)

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

    # --- helpers ---------------------------------------------------------------

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
        for part in codec.digests_parts(self._own_digests()):
            self._broadcast(self._digests_key(self.me.node_id, part), codec.encode_update(part))

    def _broadcast(self, key: bytes, item: bytes, keep_count: bool = False) -> None:
        was_empty = not self._bq
        self._bq.put(key, item, keep_count)
        if self._started:
            # An empty queue made the armed GOSSIP timer moot (the shell may
            # have dropped it, see Swim.timer_pending): arm a fresh one.
            self._arm_gossip(self._now, fresh=was_empty)

    def _arm_gossip(self, now: float, fresh: bool = False) -> None:
        if fresh or self._gossip_due == math.inf:
            self._gossip_due = now + self.params.gossip_interval
            self._timer(self._gossip_due, TimerKind.GOSSIP)

    def _timer(self, deadline: float, kind: TimerKind, key: bytes | int = 0) -> None:
        self._timers.append(SetTimer(deadline, Timer(kind, key)))

    def _drop(self, reason: DropReason) -> None:
        self.stats[reason.value] += 1

    def _send(self, addr: Addr, ptype: int, to: Member | None, seq: int = 0,
              target: bytes = b"", target_addr: Addr | None = None,
              first: Sequence[bytes] = (), ask: bool = False,
              piggyback: bool = True) -> None:
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
        take = (lambda room: self._bq.take(room, n)) if piggyback else None
        data = codec.assemble(packet, take, items)
        self._out.append(Send(addr, data))
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)

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
