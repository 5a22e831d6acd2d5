"""Sans-I/O membership: heartbeats, peer exchange, health, TTL, leave, refutation.

The core never touches a socket or a clock. The shell feeds it datagrams with
:meth:`Membership.receive`, calls :meth:`Membership.tick` once per interval,
and drains :meth:`take_outgoing` (datagrams to send) and :meth:`take_events`
(what changed). Time is a float in seconds from the shell's monotonic clock;
randomness comes from the ``rng`` given to the constructor. Two runs fed the
same inputs produce the same outputs.

Theory of operation (heartbeat counters, as in Scuttlebutt and Cassandra):

* Every member owns ``(incarnation, heartbeat)``. It raises ``heartbeat`` on
  each tick and sends a heartbeat datagram to ``fanout`` random peers (and to
  its seeds while it has no healthy peer). The datagram carries its own entry
  and a sample of other entries, freshest first, so news travels
  transitively: an agent seeded with one address learns the whole swarm, and
  keeps it after the seeds die.
* An entry carries ``age_ms``: how long ago *the sender* last saw that member
  make progress, by the sender's own monotonic clock. The receiver sets
  ``last_progress = now - age`` by its own monotonic clock. No wall clock is
  ever compared across machines; a dead member's entry arrives already old
  and is not revived by gossip.
* A member is healthy while it made progress (a higher heartbeat or
  incarnation, seen directly or through any peer) within a threshold that
  grows slowly with swarm size (see :meth:`Membership.suspect_after`); it is
  dropped after ``ttl`` seconds without progress. The drop leaves a tombstone
  for another ``ttl`` so stale gossip cannot bring it back; only real
  progress can.
* A higher incarnation always wins. A restarted agent starts with a higher
  incarnation (kept on disk), so its new entry replaces the old one.
* Suspicion is a local verdict; entries gossiped about an unhealthy member
  carry status SUSPECT. Receivers keep their own verdict, but the member
  itself, on hearing a claim about itself that would beat its own entry
  (suspected or left at its current incarnation, a higher incarnation, or a
  higher heartbeat at the same incarnation), refutes by raising its
  incarnation one above the claim, which then wins everywhere.
* Numbers from the wire are bounded (see :data:`INCARNATION_STEP`): only
  the member itself raises its incarnation, one at a time, so a claim far
  above what is known is forged or corrupted. We never adopt it (a counted
  drop), so we never refute to, emit or save a number peers would refuse.
  A member's address moves only on fresh evidence: a higher incarnation,
  progress, or its own datagram from the address we know. "M itself" is a
  datagram from the source M's accepted datagrams last came from, not M's
  advertised address (they differ behind NAT).
* Tombstones are capped at ``max_peers`` (soonest due dropped first); a
  departure of a member we never knew is recorded only from its own word.
* Leave: a member shutting down sends LEAVE to every peer it knows and its
  entry (status LEFT) keeps being gossiped from tombstones for ``ttl``; peers
  drop it at once.
* Join: heartbeats to seeds set ``want_state``; the seed answers with its own
  heartbeat and the full peer list in STATE datagrams (push-pull), at most
  once per interval per source address.
* Binding: with a cluster key, :meth:`Membership.receive` is told which node
  the datagram authenticated as; a heartbeat, LEAVE or STATE whose own sender
  is another node is refused, so a key holder cannot speak as someone else.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from agent.core import wire
from agent.core.addr import Addr
from agent.core.wire import ALIVE, LEFT, SUSPECT, Digest, Entry

#: after joining, seeds that are not members are retried every this many ticks
SEED_RETRY = 10
#: at most this many extra heartbeat rounds per interval to spread joins (push)
PUSH_PER_INTERVAL = 5
#: freshest entries put first in every heartbeat
FRESH_ENTRIES = 6
#: entries that fit one datagram next to a heartbeat's own fields (~40 bytes each)
ENTRIES_PER_DATAGRAM = 30
#: the most an incarnation claim may exceed what we know (ours, or a member's)
#: and still be believed. Incarnations rise by one per restart or refutation,
#: so honest news is a few steps ahead at most; beyond this it is ignored.
#: A larger jump is taken only from the member itself at its known address.
INCARNATION_STEP = 16
#: the largest incarnation, heartbeat or logical clock we hold or send: what
#: every peer's decoder accepts
MAX_COUNTER = wire.JS_SAFE
#: the most a peer's logical clock may run ahead of ours and be adopted (a
#: clock advances once per tick and per local write: 2**32 is decades of it)
LC_STEP = 2**32

# --- events (outcomes, named as nouns) ---------------------------------------


@dataclass(frozen=True)
class MemberJoined:
    node_id: bytes
    addr: Addr


@dataclass(frozen=True)
class MemberRestarted:
    node_id: bytes
    incarnation: int


@dataclass(frozen=True)
class MemberUnhealthy:
    node_id: bytes


@dataclass(frozen=True)
class MemberRecovered:
    node_id: bytes


@dataclass(frozen=True)
class MemberLeft:
    node_id: bytes


@dataclass(frozen=True)
class MemberExpired:
    node_id: bytes


@dataclass(frozen=True)
class IncarnationRaised:
    """We refuted a suspicion; the shell must persist the new incarnation."""

    incarnation: int


Event = (
    MemberJoined | MemberRestarted | MemberUnhealthy | MemberRecovered | MemberLeft
    | MemberExpired | IncarnationRaised
)


@dataclass(frozen=True)
class Params:
    """Timing and bounds. Defaults match the agent's defaults (interval 1 s)."""

    interval: float = 1.0
    #: seconds without progress before a member is reported unhealthy
    #: (5 intervals: tolerates 4 lost or delayed heartbeat rounds)
    suspect_after: float = 5.0
    #: seconds without progress before a member is dropped (HyperspaceDB: 30 s)
    ttl: float = 30.0
    #: peers each heartbeat goes to (memberlist gossips to 3)
    fanout: int = 3
    #: cap on the peer table; further unknown members are ignored and counted
    max_peers: int = 1024
    #: seeds contacted per tick while not joined
    max_seeds: int = 16
    #: full-state answers to joiners per interval, all sources together
    max_state_replies: int = 16
    #: datagrams accepted per interval from one source address (burst: twice
    #: that). Peers send a handful; a full-state answer for 1024 members is ~35.
    max_datagrams_per_source: int = 100


@dataclass
class Member:
    node_id: bytes
    incarnation: int
    heartbeat: int
    host: str
    port: int
    http_port: int
    role: int
    last_progress: float
    name: str = ""
    lc: int = 0
    digests: tuple[Digest, ...] = ()
    app_healthy: bool | None = None
    healthy: bool = True
    last_direct: float | None = None
    sync_port: int = 0
    #: source address of the last datagram of M's own we accepted: what
    #: reaches M, even when M advertises another address (NAT, advertise)
    src: Addr | None = None

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)


@dataclass
class _Tombstone:
    incarnation: int
    heartbeat: int
    status: int
    until: float
    entry: Entry


@dataclass
class SelfInfo:
    node_id: bytes
    incarnation: int
    name: str
    port: int
    http_port: int
    host: str = ""  # advertised numeric address, "" to let peers use the source address
    role: int = 0
    sync_port: int = 0  # 0: same number as the gossip port


@dataclass
class Membership:
    me: SelfInfo
    params: Params
    rng: random.Random
    now: float
    heartbeat: int = 0
    lc: int = 0
    digests: tuple[Digest, ...] = ()
    app_healthy: bool | None = None
    members: dict[bytes, Member] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    _seeds: list[Addr] = field(default_factory=list)
    _tombs: dict[bytes, _Tombstone] = field(default_factory=dict)
    _out: list[tuple[bytes, Addr]] = field(default_factory=list)
    _events: list[Event] = field(default_factory=list)
    _state_sent: dict[Addr, float] = field(default_factory=dict)
    _leaving: bool = False
    _announced: bool = False  # sent the immediate heartbeat round that follows joining
    _push_due: bool = False  # a member joined or restarted since the last round
    _last_push: float = -1e9
    _digest_offset: int = 0
    _rr_offset: int = 0
    _left_offset: int = 0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    # --- inputs ----------------------------------------------------------

    def set_seeds(self, seeds: list[Addr]) -> None:
        """Numeric seed addresses. Seeds that turn out to be ourselves are removed."""
        self._seeds = list(dict.fromkeys(seeds))

    def add_seeds(self, seeds: list[Addr]) -> None:
        self._seeds = list(dict.fromkeys(self._seeds + list(seeds)))

    def set_digests(self, digests: list[Digest] | tuple[Digest, ...]) -> None:
        self.digests = tuple(digests)

    def set_app_healthy(self, healthy: bool | None) -> None:
        self.app_healthy = healthy

    def set_http_port(self, port: int) -> None:
        self.me.http_port = port

    def bump_lc(self) -> int:
        self.lc = min(self.lc + 1, MAX_COUNTER)
        return self.lc

    @property
    def joined(self) -> bool:
        return any(m.healthy for m in self.members.values())

    def tick(self, now: float) -> None:
        """Advance our heartbeat, update verdicts, send one round of heartbeats."""
        self.now = now
        if self._leaving:
            return
        self.heartbeat = min(self.heartbeat + 1, MAX_COUNTER)
        self.bump_lc()
        self._push_due = False  # this round carries the news
        self._update_health(now)
        self._expire(now)
        targets = self._pick_targets()
        for addr in targets:
            self._send_heartbeat(addr, want_state=False)
        # Seeds we have no member for are asked every tick until we have joined
        # (so a late seed still gets contacted), then every SEED_RETRY ticks,
        # which merges groups that formed apart (e.g. seeds booted last).
        if not self.joined or self.heartbeat % SEED_RETRY == 0:
            known = {m.addr for m in self.members.values()}
            for addr in self._seeds[: self.params.max_seeds]:
                if addr not in known:
                    self._send_heartbeat(addr, want_state=True)

    def push(self, now: float) -> bool:
        """An extra round of heartbeats when a member joined or restarted since
        the last round, without advancing our counter, at most PUSH_PER_INTERVAL
        times per interval. The shell calls it after each datagram it hands in:
        news of a join then spreads in fractions of an interval instead of
        whole intervals (memberlist gossips every 200 ms for the same reason),
        and an idle swarm sends nothing extra."""
        self.now = now
        if (not self._push_due or self._leaving
                or now - self._last_push < self.params.interval / PUSH_PER_INTERVAL):
            return False
        self._push_due = False
        self._last_push = now
        for addr in self._pick_targets():
            self._send_heartbeat(addr, want_state=False)
        return True

    def leave(self, now: float) -> None:
        """Announce departure to every known member. Idempotent."""
        self.now = now
        if self._leaving:
            return
        self._leaving = True
        data = wire.encode_leave(wire.Leave(self._self_entry(status=LEFT)))
        for m in self.members.values():
            self._queue(data, m.addr)

    def receive(self, data: bytes, src: Addr, now: float, sender: bytes | None = None) -> None:
        """Handle one datagram. Never raises on bad input: it is counted.

        ``sender`` is the node_id that authenticated the datagram (None when
        datagrams are not authenticated): a message whose own entry names
        another node is refused (``drop_sender_mismatch``). Entries about
        other members inside a heartbeat or STATE remain gossip."""
        self.now = now
        self.stats["bytes_in"] += len(data)
        if not self._admit(src[0], now):
            self.stats["drop_rate_limited"] += 1
            return
        try:
            msg = wire.decode(data)
        except wire.DecodeError as e:
            self.stats["drop_" + e.reason] += 1
            return
        if sender is not None and sender != (
                msg.sender_id if isinstance(msg, wire.State) else msg.sender.node_id):
            self.stats["drop_sender_mismatch"] += 1
            return
        if isinstance(msg, wire.Heartbeat):
            self.stats["heartbeats_in"] += 1
            self._on_heartbeat(msg, src, now)
        elif isinstance(msg, wire.Leave):
            self.stats["leaves_in"] += 1
            self._merge(msg.sender, src, now, direct=True)
        else:
            self.stats["state_in"] += 1
            if msg.sender_id != self.me.node_id:
                for entry in msg.peers:
                    self._merge(entry, None, now, direct=False)
        if not self._announced and self.joined:
            # Just joined: tell a few members now rather than at the next tick,
            # so the swarm learns of us up to an interval sooner.
            self._announced = True
            if not self._leaving:
                for addr in self._pick_targets():
                    self._send_heartbeat(addr, want_state=False)

    def _admit(self, host: str, now: float) -> bool:
        """Token bucket per source address. A healthy peer sends a few
        datagrams per interval; a flood from one address must not starve the
        others or burn the CPU of a small device."""
        rate = self.params.max_datagrams_per_source / self.params.interval
        burst = 2.0 * self.params.max_datagrams_per_source
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= 4 * self.params.max_peers:
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

    # --- outputs ---------------------------------------------------------

    def take_outgoing(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def live_members(self) -> list[Member]:
        return list(self.members.values())

    # --- internals -------------------------------------------------------

    def _queue(self, data: bytes, addr: Addr) -> None:
        self._out.append((data, addr))
        self.stats["bytes_out"] += len(data)

    def _self_entry(self, status: int = ALIVE) -> Entry:
        return Entry(self.me.node_id, self.me.incarnation, self.heartbeat, status,
                     self.me.host, self.me.port, self.me.http_port, 0, self.me.role)

    def _entry_of(self, m: Member, now: float) -> Entry:
        age = max(0, int((now - m.last_progress) * 1000))
        return Entry(m.node_id, m.incarnation, m.heartbeat, ALIVE if m.healthy else SUSPECT,
                     m.host, m.port, m.http_port, age, m.role)

    def _pick_targets(self) -> list[Addr]:
        ms = list(self.members.values())
        k = min(self.params.fanout, len(ms))
        return [m.addr for m in self.rng.sample(ms, k)] if k else []

    def suspect_after(self) -> float:
        """Seconds without progress before a member is reported unhealthy.

        ``params.suspect_after x max(1, log10(N))`` plus the time our own table
        takes to cycle through our heartbeats (N / (fanout x entries per
        datagram) intervals). News crosses the swarm in O(log N) rounds
        (memberlist scales its suspicion timeout the same way), and since
        bytes per interval are capped, relaying every entry takes longer as
        N grows: a fixed threshold would flap in large swarms."""
        n = len(self.members) + 1
        p = self.params
        relay = p.interval * n / (p.fanout * (ENTRIES_PER_DATAGRAM - FRESH_ENTRIES))
        return p.suspect_after * max(1.0, math.log10(n)) + relay

    def _sample_entries(self, target: Addr) -> list[Entry]:
        """Recently-left members first, then the freshest entries (news spreads
        fast), then the rest of the table in round-robin order across heartbeats,
        so every entry is relayed at a steady rate whatever the swarm size
        (random picks would leave a coupon-collector tail of stale entries)."""
        now = self.now
        # Departures in rotation, so every one is relayed whatever sits first.
        gone = [t.entry for t in self._tombs.values() if t.status == LEFT]
        start = self._left_offset % len(gone) if gone else 0
        left = (gone[start:] + gone[:start])[:4]
        self._left_offset += 4
        ms = list(self.members.values())
        fresh = sorted(ms, key=lambda m: m.last_progress, reverse=True)[:FRESH_ENTRIES]
        n = len(ms)
        start = self._rr_offset % n if n else 0
        ring = ms[start:] + ms[:start]
        # Advance by roughly what one datagram holds; the codec cuts the rest.
        self._rr_offset += ENTRIES_PER_DATAGRAM - FRESH_ENTRIES
        seen = {m.node_id for m in fresh}
        rest = [m for m in ring if m.node_id not in seen]
        return left + [self._entry_of(m, now) for m in fresh + rest]

    def _wants(self) -> tuple[bytes, ...]:
        """The members whose news is oldest but who are not yet given up for
        dead. Random relaying leaves a tail of stale entries that grows with N;
        asking the peers we talk to anyway cuts that tail at a bounded cost."""
        now = self.now
        limit = 2 * self.suspect_after()
        floor = 2 * self.params.interval
        stale = [m for m in self.members.values() if floor < now - m.last_progress < limit]
        stale.sort(key=lambda m: m.last_progress)
        return tuple(m.node_id for m in stale[: wire.MAX_WANTS])

    def _answer_wants(self, wants: tuple[bytes, ...], src: Addr, now: float) -> None:
        fresh = self.suspect_after() / 2
        entries = []
        for nid in wants:
            m = self.members.get(nid)
            if m is not None and now - m.last_progress < fresh:
                entries.append(self._entry_of(m, now))
        if entries:
            self.stats["wants_answered"] += 1
            for data in wire.encode_state(self.me.node_id, entries):
                self._queue(data, src)

    def _rotated_digests(self) -> list[Digest]:
        if not self.digests:
            return []
        n = len(self.digests)
        off = self._digest_offset % n
        return list(self.digests[off:] + self.digests[:off])

    def _send_heartbeat(self, addr: Addr, want_state: bool) -> None:
        hb = wire.Heartbeat(
            sender=self._self_entry(),
            name=self.me.name,
            lc=self.lc,
            digests=tuple(self._rotated_digests()),
            peers=tuple(self._sample_entries(addr)),
            want_state=want_state,
            app_healthy=self.app_healthy,
            wants=self._wants(),
            sync_port=self.me.sync_port,
        )
        data, n_digests, _ = wire.encode_heartbeat(hb)
        if n_digests < len(self.digests):
            # Too many collections for one datagram: rotate which ones go first.
            self._digest_offset += max(1, n_digests)
        self.stats["heartbeats_out"] += 1
        self._queue(data, addr)

    def _send_state(self, addr: Addr, now: float) -> None:
        last = self._state_sent.get(addr)
        if last is not None and now - last < self.params.interval:
            self.stats["state_rate_limited"] += 1
            return
        if len(self._state_sent) >= self.params.max_state_replies:
            # Bounds what spoofed joiners can make us send per interval.
            self.stats["state_rate_limited"] += 1
            return
        self._state_sent[addr] = now
        entries = [self._entry_of(m, now) for m in self.members.values()]
        for data in wire.encode_state(self.me.node_id, entries):
            self.stats["state_out"] += 1
            self._queue(data, addr)

    def _on_heartbeat(self, hb: wire.Heartbeat, src: Addr, now: float) -> None:
        if hb.sender.node_id == self.me.node_id:
            # Our own datagram (we are in our seed list, or a loop): forget the seed.
            self._seeds = [s for s in self._seeds if s != src]
            self.stats["drop_self"] += 1
            return
        if hb.lc > self.lc:
            if hb.lc - self.lc <= LC_STEP:
                self.lc = hb.lc
            else:
                self.stats["drop_implausible_lc"] += 1
        if self._merge(hb.sender, src, now, direct=True):
            m = self.members[hb.sender.node_id]
            # Only an entry we took carries the rest: a replayed or forged
            # heartbeat refused as older or implausible must not move sync or
            # change digests.
            m.name = hb.name
            m.lc = hb.lc
            m.digests = hb.digests
            m.app_healthy = hb.app_healthy
            m.last_direct = now
            m.sync_port = hb.sync_port or m.port
        for e in hb.peers:
            self._merge(e, None, now, direct=False)
        if hb.wants and not self._leaving:
            self._answer_wants(hb.wants, src, now)
        if hb.want_state and not self._leaving:
            # Answer a joiner at once instead of waiting for our next tick.
            self._send_heartbeat(src, want_state=False)
            self._send_state(src, now)

    def _merge(self, e: Entry, src: Addr | None, now: float, direct: bool) -> bool:
        """Fold one entry into the table; True when it was taken into a live
        member (not refused as older or implausible, not a departure).
        ``src`` is the datagram's source when the entry is the sender's own
        (its address is then trusted from src)."""
        if e.node_id == self.me.node_id:
            self._maybe_refute(e)
            return False
        host, port = e.host, e.port
        if direct and src is not None:
            # The source address is what reaches the sender; an advertised
            # address wins if the sender set one.
            host = e.host or src[0]
        if not host or not port:
            self.stats["drop_no_address"] += 1
            return False
        age = 0.0 if direct else e.age_ms / 1000.0
        progress_at = now - age
        m = self.members.get(e.node_id)
        if m is None:
            added = self._add(e, host, port, progress_at, now, direct)
            if added is not None and direct:
                added.src = src
            return added is not None
        if e.incarnation < m.incarnation:
            return False
        # M itself, speaking from where its datagrams come from (not where it
        # says it lives: behind NAT or with an advertised address they differ).
        from_m = direct and src is not None and src == (m.src or m.addr)
        if e.incarnation > m.incarnation + INCARNATION_STEP and not from_m:
            # Far ahead of what we know, and not M itself speaking from where
            # we know it: forged or corrupted. Adopting it would make M's real
            # heartbeats look stale everywhere (M cannot refute it either).
            self.stats["drop_implausible_incarnation"] += 1
            return False
        if e.status == LEFT:
            self._remove(m, LEFT, now, e)
            self._events.append(MemberLeft(m.node_id))
            return False
        if e.incarnation > m.incarnation:
            if not (e.status == ALIVE or direct):
                return False
            restarted = e.heartbeat < m.heartbeat
            m.incarnation, m.heartbeat = e.incarnation, e.heartbeat
            m.last_progress = max(m.last_progress, progress_at)
            m.host, m.port, m.http_port, m.role = host, port, e.http_port, e.role
            if direct:
                m.src = src
            if restarted:
                self._events.append(MemberRestarted(m.node_id, e.incarnation))
                self._push_due = True
            self._refresh_health(m, now)
            return True
        # Older news of M (reordered, delayed or replayed) is refused.
        older = e.heartbeat < m.heartbeat
        progressed = e.heartbeat > m.heartbeat
        if progressed:
            m.heartbeat = e.heartbeat
            m.last_progress = max(m.last_progress, progress_at)
        elif (not older
              and progress_at > m.last_progress + self.params.interval / 2):
            # The same counter heard with a much smaller age tells us when it
            # really advanced. Small gains are transit time, not news: taking
            # them would let a dead member's entry grow younger as it circulates.
            m.last_progress = progress_at
        if direct:
            if progressed or (not older and (host, port) == m.addr):
                m.host, m.port, m.http_port, m.role = host, port, e.http_port, e.role
                m.src = src
            elif (host, port) != m.addr:
                # A replayed or delayed datagram from elsewhere is no evidence
                # that M moved: only news at least as fresh as ours moves it.
                self.stats["stale_address_ignored"] += 1
        self._refresh_health(m, now)
        return not older

    def _add(self, e: Entry, host: str, port: int, progress_at: float, now: float,
             direct: bool) -> Member | None:
        if e.status == LEFT:
            # Only M's own word (its LEAVE or own entry) makes a tombstone for
            # a member we never knew: hearsay about unknown ids would let
            # anyone fill the table with departures of nobody.
            if direct:
                self._note_tomb(e, now)
            return None
        if now - progress_at >= self.params.ttl:
            return None
        tomb = self._tombs.get(e.node_id)
        if tomb is not None:
            newer = e.incarnation > tomb.incarnation or (
                e.incarnation == tomb.incarnation and e.heartbeat > tomb.heartbeat
                and tomb.status != LEFT
            )
            if not newer:
                self.stats["stale_entry_ignored"] += 1
                return None
            del self._tombs[e.node_id]
        if len(self.members) >= self.params.max_peers:
            self.stats["drop_table_full"] += 1
            return None
        m = Member(e.node_id, e.incarnation, e.heartbeat, host, port, e.http_port, e.role,
                   progress_at)
        m.healthy = now - progress_at <= self.suspect_after()
        self.members[e.node_id] = m
        self._events.append(MemberJoined(e.node_id, (host, port)))
        self._push_due = True
        return m

    def _note_tomb(self, e: Entry, now: float) -> None:
        t = self._tombs.get(e.node_id)
        if t is None or e.incarnation >= t.incarnation:
            self._put_tomb(e.node_id, _Tombstone(
                e.incarnation, e.heartbeat, LEFT, now + self.params.ttl, e))

    def _remove(self, m: Member, status: int, now: float, e: Entry | None = None) -> None:
        """Drop M and keep a tombstone at the newest state we know: the
        departure's own (a LEFT may come at a higher incarnation than ours),
        so gossip at an incarnation in between cannot bring M back."""
        del self.members[m.node_id]
        entry = e or Entry(m.node_id, m.incarnation, m.heartbeat, status, m.host, m.port,
                           m.http_port, 0, m.role)
        self._put_tomb(m.node_id, _Tombstone(entry.incarnation, entry.heartbeat, status,
                                             now + self.params.ttl, entry))

    def _put_tomb(self, node_id: bytes, tomb: _Tombstone) -> None:
        """Keep at most ``max_peers`` tombstones, dropping the soonest due.
        Each is kept ``ttl`` from when it was written and time never goes
        back, so re-inserting on every write keeps the table in expiry order:
        the first one is the soonest due."""
        self._tombs.pop(node_id, None)
        while self._tombs and len(self._tombs) >= self.params.max_peers:
            del self._tombs[next(iter(self._tombs))]
            self.stats["tombstones_evicted"] += 1
        self._tombs[node_id] = tomb

    def _maybe_refute(self, e: Entry) -> None:
        """Answer a claim about ourselves that would beat our own entry: one
        above the highest *plausible* claim (see :data:`INCARNATION_STEP`)."""
        mine = self.me.incarnation
        if self._leaving or e.incarnation < mine:
            return
        if e.incarnation == mine and e.status == ALIVE and e.heartbeat <= self.heartbeat:
            return  # true (or older) news of us
        if e.incarnation > mine + INCARNATION_STEP or e.incarnation >= MAX_COUNTER:
            # Only we raise our incarnation: a claim far above it is forged or
            # corrupted. Refuting it would walk us towards numbers peers refuse.
            self.stats["drop_implausible_self"] += 1
            return
        self.me.incarnation = e.incarnation + 1
        self.stats["refutations"] += 1
        self._events.append(IncarnationRaised(self.me.incarnation))

    def _refresh_health(self, m: Member, now: float) -> None:
        healthy = now - m.last_progress <= self.suspect_after()
        if healthy != m.healthy:
            m.healthy = healthy
            self._events.append(MemberRecovered(m.node_id) if healthy
                                else MemberUnhealthy(m.node_id))

    def _update_health(self, now: float) -> None:
        for m in list(self.members.values()):
            self._refresh_health(m, now)

    def _expire(self, now: float) -> None:
        for m in list(self.members.values()):
            if now - m.last_progress > self.params.ttl:
                self._remove(m, SUSPECT, now)
                self._events.append(MemberExpired(m.node_id))
        for nid, t in list(self._tombs.items()):
            if now > t.until:
                del self._tombs[nid]
        for addr, at in list(self._state_sent.items()):
            if now - at > self.params.interval:
                del self._state_sent[addr]
