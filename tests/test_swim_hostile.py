"""Hostile input to the SWIM core: random, mutated and forged datagrams and
push-pull payloads.

What must hold whatever arrives: the core never raises; every refused input is
counted under a DropReason; memory stays bounded (members, broadcasts, every
container it holds); what it sends decodes at its peers; a forged SUSPECT or
DEAD cannot kill a member faster than the suspicion timeout; a forged ALIVE
with a far-ahead incarnation is refused; a datagram whose card names another
node than its authenticated sender is refused.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import wire
from agent.core.addr import Addr
from agent.core.swim import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    DropReason,
    MemberFailed,
    Params,
    SelfInfo,
    Send,
    Swim,
    TimerKind,
    codec,
)
from agent.core.swim.codec import Alive, Card, Dead, Digests, Left, Packet, Suspect
from agent.core.swim.suspicion import expected_confirmations, suspicion_bounds
from agent.core.wire import JS_SAFE, Digest
from tests.swim_harness import Net, addr_of, node_id_of

ME = node_id_of(1)
M = node_id_of(2)  # the member forged news are about
X = b"\xee" * 16  # an attacker, or an insider that lies
ATTACKER: Addr = ("10.66.6.6", 7946)
HOSTS = [f"10.77.{i // 250}.{i % 250 + 1}" for i in range(2000)]


# --- building inputs -----------------------------------------------------------------


def pkt(ptype: int, card_id: bytes, updates: Sequence[codec.Update] = (), *, inc: int = 0,
        lc: int = 0, seq: int = 0, target: bytes = b"",
        target_addr: tuple[str, int] | None = None) -> bytes:
    card = Card(card_id, inc, lc, codec.digest_hash(()))
    return codec.encode_packet(Packet(ptype, card, updates=tuple(updates), seq=seq,
                                      target=target, target_addr=target_addr))


def alive(i: int, inc: int = 0, host: str | None = None) -> Alive:
    return Alive(node_id_of(i), inc, host or addr_of(i)[0], addr_of(i)[1], 8000 + i)


def state(entries: Iterable[tuple[Alive, int]]) -> bytes:
    out = []
    for a, status in entries:
        out.append(codec.Entry(a, status, 0, Digests(a.node_id, a.incarnation, 0,
                                                     codec.digest_hash(()), ())))
    return codec.encode_state(codec.State(False, tuple(out)), 4096)


def drops(core: Swim) -> int:
    return sum(core.stats[r.value] for r in DropReason)


class Solo:
    """One core and its timers, driven by hand: nobody answers its datagrams.
    ``kinds`` limits which timers fire (the probe timers would suspect every
    silent member on their own and hide what forged input does)."""

    def __init__(self, params: Params | None = None, kinds: Iterable[TimerKind] = ()) -> None:
        self.params = params or Params()
        self.now = 0.0
        self.core = Swim(SelfInfo(ME, 0, "n1", 7946, 8001, host=addr_of(1)[0]), self.params,
                         random.Random(7), self.now)
        self.kinds = set(kinds)
        self.timers: list[tuple[float, int, Any]] = []
        self.n = 0
        self.events: list[Any] = []
        self.sent: list[Send] = []
        self.core.start(self.now, [])
        self.drain()

    def drain(self) -> None:
        for t in self.core.take_timers():
            self.n += 1
            heapq.heappush(self.timers, (t.deadline, self.n, t.timer))
        for s in self.core.take_outgoing():
            assert len(s.data) <= wire.PAYLOAD_BUDGET
            codec.decode_packet(s.data)  # a peer must accept what we send
            self.sent.append(s)
        for pp in self.core.take_push_pulls():
            codec.decode_state(pp.data, self.params.max_members)
        self.events.extend(self.core.take_events())

    def feed(self, data: bytes, src: Addr, sender: bytes | None = None) -> None:
        self.core.receive(data, src, self.now, sender)
        self.drain()

    def hello(self, i: int, inc: int = 0) -> None:
        """Member i introduces itself (authenticated)."""
        self.feed(pkt(codec.GOSSIP, node_id_of(i), [alive(i, inc)], inc=inc), addr_of(i),
                  node_id_of(i))
        assert self.core.members[node_id_of(i)].status == ALIVE

    def run_to(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        while self.timers and self.timers[0][0] <= until and not stop():
            deadline, _, timer = heapq.heappop(self.timers)
            self.now = max(self.now, deadline)
            if timer.kind in self.kinds:
                self.core.handle_timer(timer, self.now)
                self.drain()
        if not stop():
            self.now = max(self.now, until)

    def status(self, node_id: bytes = M) -> int | None:
        m = self.core.members.get(node_id)
        return None if m is None else m.status


def bounded(core: Swim) -> None:
    """Members, broadcasts and every container the core holds stay bounded."""
    p = core.params
    assert len(core.members) <= p.max_members
    limit = 4 * p.max_members + p.max_broadcasts + p.max_relays + 64
    for name, value in vars(core).items():
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            assert len(value) <= limit, (name, len(value))
    assert 0 <= core.me.incarnation < JS_SAFE


def outputs_valid(core: Swim) -> None:
    for s in core.take_outgoing():
        assert len(s.data) <= wire.PAYLOAD_BUDGET
        codec.decode_packet(s.data)
    for pp in core.take_push_pulls():
        codec.decode_state(pp.data, core.params.max_members)
    for t in core.take_timers():
        assert t.deadline == t.deadline and t.deadline < float("inf")
    core.take_events()


# --- a corpus of real traffic -------------------------------------------------------


def _converged() -> Net:
    net = Net(seed=11)
    for i in range(1, 6):
        net.add(i, seeds=[1] if i > 1 else [])
    net.run_until(lambda: net.converged([1, 2, 3, 4, 5]), timeout=30)
    net.core(3).set_digests([Digest("c", b"\x03" * 16, 3)])
    net.kill(5)  # failures, suspicions and PING_REQs in the traffic too
    net.run(15)
    return net


_NET = _converged()
CORPUS = sorted({s.data for s in _NET.sent}, key=lambda d: (d[1], len(d)))
PRISTINE = _NET.core(1)


def _push_pull_payload(core: Swim) -> bytes:
    c = copy.deepcopy(core)
    c.join([addr_of(99)], _NET.now)
    return c.take_push_pulls()[-1].data


PP_CORPUS = [_push_pull_payload(_NET.core(i)) for i in (1, 2, 3)]


def test_the_corpus_covers_every_datagram_type() -> None:
    assert {d[1] for d in CORPUS} >= {codec.PING, codec.ACK, codec.PING_REQ, codec.GOSSIP}


def fresh() -> Swim:
    core = copy.deepcopy(PRISTINE)
    outputs_valid(core)
    return core


# --- never raises, refusals counted -------------------------------------------------


def check_one(core: Swim, data: bytes, src: Addr, now: float, sender: bytes | None) -> None:
    reason: DropReason | None = None
    try:
        codec.decode_packet(data)
    except codec.SwimDecodeError as e:
        reason = e.reason
    before = (drops(core), core.stats[reason.value if reason else ""],
              core.stats[DropReason.RATE_LIMITED.value])
    core.receive(data, src, now, sender)
    if reason is not None:
        after = (drops(core), core.stats[reason.value], core.stats[DropReason.RATE_LIMITED.value])
        assert after[0] == before[0] + 1
        assert after[1] == before[1] + 1 or after[2] == before[2] + 1
    outputs_valid(core)
    bounded(core)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500), st.integers(0, 1999))
def test_random_bytes_never_raise_and_are_counted(data: bytes, host: int) -> None:
    core = fresh()
    check_one(core, data, (HOSTS[host], 7946), _NET.now, None)


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, val in ops:
        if not b:
            break
        i = pos % len(b)
        if op == 0:
            b[i] ^= 1 << (val % 8)
        elif op == 1:
            b[i] = val
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = bytes([val]) * (1 + val % 5)
        elif op == 4:
            del b[i:i + 1 + val % 8]
        else:
            j = val % len(b)
            b[i:i] = b[j:j + 8]
    return bytes(b)


MUTATIONS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2000), st.integers(0, 255)),
                     min_size=1, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), MUTATIONS, st.sampled_from([None, "card", "other"]))
def test_mutated_datagrams_never_raise_and_are_counted(
        data: bytes, ops: list[tuple[int, int, int]], who: str | None) -> None:
    core = fresh()
    bad = mutate(data, ops)
    sender: bytes | None = None
    if who is not None:
        try:
            card_id = codec.decode_packet(bad).card.node_id
        except codec.SwimDecodeError:
            card_id = X
        sender = card_id if who == "card" else X
    check_one(core, bad, addr_of(data[-1] % 4 + 2), _NET.now, sender)


def test_every_decode_failure_has_its_own_reason() -> None:
    core = fresh()
    ping = next(d for d in CORPUS if d[1] == codec.PING)
    cases = {
        b"": DropReason.DECODE_TRUNCATED,
        bytes([wire.VERSION + 1]) + ping[1:]: DropReason.DECODE_VERSION,
        bytes([wire.VERSION, 99]) + ping[2:]: DropReason.DECODE_TYPE,
        ping[:-3]: DropReason.DECODE_FIELD,
        ping + b"\x00" * wire.MAX_DATAGRAM: DropReason.DECODE_TOO_BIG,
    }
    for i, (data, reason) in enumerate(cases.items()):
        before = core.stats[reason.value]
        core.receive(data, (HOSTS[i], 7946), _NET.now)
        assert core.stats[reason.value] == before + 1, reason


def test_a_flood_from_one_address_is_rate_limited_and_counted() -> None:
    core = fresh()
    ping = next(d for d in CORPUS if d[1] == codec.GOSSIP)
    for _ in range(1000):
        core.receive(ping, ATTACKER, _NET.now)
    assert core.stats[DropReason.RATE_LIMITED.value] >= 1000 - 2 * Params().max_datagrams_per_source
    assert len(core.take_outgoing()) <= 2 * Params().max_datagrams_per_source


# --- structured hostile datagrams -----------------------------------------------------

IDS = [ME, M, node_id_of(3), node_id_of(4), node_id_of(5), X, node_id_of(77), b"\x00" * 16]
INCS = st.sampled_from([0, 1, 2, 15, 16, 17, 1000, 2**32, JS_SAFE - 1, JS_SAFE])
NODE = st.sampled_from(IDS)
HOST = st.sampled_from(["", "10.0.0.2", "10.66.6.6", "::1", "255.255.255.255", "0.0.0.0"])
DIGEST = st.builds(Digest, st.text(min_size=1, max_size=8), st.binary(min_size=1, max_size=32),
                   st.integers(0, JS_SAFE), st.integers(0, JS_SAFE))
UPDATE = st.one_of(
    st.builds(Alive, NODE, INCS, HOST, st.integers(0, 65535), st.integers(0, 65535),
              st.integers(0, 65535), st.integers(0, 255), st.text(max_size=70)),
    st.builds(Suspect, NODE, INCS, NODE),
    st.builds(Dead, NODE, INCS, NODE),
    st.builds(Left, NODE, INCS),
    st.builds(Digests, NODE, INCS, INCS, st.binary(min_size=8, max_size=8),
              st.lists(DIGEST, max_size=4).map(tuple), st.sampled_from([None, True, False])),
)
PACKET = st.builds(
    lambda t, card, inc, lc, ups, seq, target, taddr, want: codec.encode_packet(Packet(
        t, Card(card, inc, lc, b"\x01" * 8), want_digests=want, updates=tuple(ups), seq=seq,
        target=target, target_addr=taddr)),
    st.sampled_from(codec.TYPES), NODE, INCS, INCS, st.lists(UPDATE, max_size=6),
    st.sampled_from([0, 1, 2, 3, 1000, 2**32 - 1, JS_SAFE]), NODE,
    st.sampled_from([None, ("10.0.0.2", 7946), ("10.66.6.6", 1), ("::1", 65535)]),
    st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(PACKET, st.sampled_from([None, "card", "other"]),
                          st.integers(0, 1999), st.floats(0, 3)), min_size=1, max_size=12))
def test_forged_sessions_keep_the_core_sound(
        steps: list[tuple[bytes, str | None, int, float]]) -> None:
    """Sequences of well-formed lies, with time passing and timers firing."""
    core = fresh()
    start = core.me.incarnation
    timers: list[tuple[float, int, Any]] = []
    now, n = _NET.now, 0
    for data, who, host, dt in steps:
        try:
            card_id = codec.decode_packet(data).card.node_id
        except codec.SwimDecodeError:  # a PING_REQ without an address: also a lie
            card_id = X
        sender = None if who is None else card_id if who == "card" else X
        core.receive(data, (HOSTS[host], 7946), now, sender)
        for t in core.take_timers():
            n += 1
            heapq.heappush(timers, (t.deadline, n, t.timer))
        outputs_valid(core)
        bounded(core)
        now += dt
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            core.handle_timer(timer, now)
            for t in core.take_timers():
                n += 1
                heapq.heappush(timers, (t.deadline, n, t.timer))
            outputs_valid(core)
            bounded(core)
    # each lie about us can cost one refutation, of at most INCARNATION_STEP + 1
    assert core.me.incarnation <= start + 17 * 7 * len(steps)


# --- push-pull ----------------------------------------------------------------------


def check_push_pull(core: Swim, data: bytes, src: Addr) -> None:
    before = drops(core)
    reply = core.handle_push_pull(data, src, _NET.now)
    if reply is None:
        assert drops(core) == before + 1
    else:
        codec.decode_state(reply, core.params.max_members)
    before = drops(core)
    try:
        codec.decode_state(data, core.params.max_members)
        decodes = True
    except codec.SwimDecodeError:
        decodes = False
    core.receive_push_pull_reply(data, src, _NET.now)
    if not decodes:
        assert drops(core) == before + 1
    outputs_valid(core)
    bounded(core)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(0, 1999))
def test_random_push_pull_payloads_never_raise_and_are_counted(data: bytes, host: int) -> None:
    check_push_pull(fresh(), data, (HOSTS[host], 7946))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PP_CORPUS), MUTATIONS, st.integers(0, 1999))
def test_mutated_push_pull_payloads_never_raise_and_are_counted(
        data: bytes, ops: list[tuple[int, int, int]], host: int) -> None:
    check_push_pull(fresh(), mutate(data, ops), (HOSTS[host], 7946))


def test_an_oversized_push_pull_is_cut_or_refused_and_counted() -> None:
    s = Solo(Params(max_members=16))
    big = state((alive(1000 + i), ALIVE) for i in range(100))
    assert s.core.handle_push_pull(big, ATTACKER, s.now) is not None
    s.drain()
    assert len(s.core.members) <= 16
    assert s.core.stats[DropReason.TABLE_FULL.value] >= 100 - 16
    huge = big + b"\x00" * codec.MAX_PUSH_PULL
    assert s.core.handle_push_pull(huge, ATTACKER, s.now) is None
    assert s.core.stats[DropReason.DECODE_TOO_BIG.value] == 1


# --- memory bounds ------------------------------------------------------------------


def test_floods_of_strangers_fill_the_table_no_further() -> None:
    p = Params(max_members=8, max_broadcasts=16)
    s = Solo(p, kinds=set(TimerKind))
    for k in range(1500):
        i = 100 + k
        src = (HOSTS[k % len(HOSTS)], 7946)
        s.feed(pkt(codec.GOSSIP, node_id_of(i), [alive(i)]), src)  # their own word
        s.feed(pkt(codec.GOSSIP, X, [alive(5000 + k), Left(node_id_of(9000 + k), 3),
                                     Suspect(node_id_of(i), 0, X)]), src)
        s.feed(pkt(codec.LEAVE2, node_id_of(20000 + k)), src)  # unknown members leaving
        if k % 100 == 0:
            s.core.handle_push_pull(state((alive(30000 + k + j), ALIVE) for j in range(50)),
                                    src, s.now)
            s.drain()
        bounded(s.core)
        s.run_to(s.now + 0.05)
    assert s.core.stats[DropReason.TABLE_FULL.value] > 0
    s.run_to(s.now + 200)
    bounded(s.core)


def test_probe_order_stays_bounded_when_a_member_is_cycled_dead_and_alive() -> None:
    p = Params(max_members=8)
    s = Solo(p)
    s.hello(2)
    for inc in range(2000):
        src = (HOSTS[inc % len(HOSTS)], 7946)
        s.feed(pkt(codec.GOSSIP, X, [Dead(M, inc, X)]), src)
        s.feed(pkt(codec.GOSSIP, X, [alive(2, inc + 1)]), src)
    bounded(s.core)


# --- forged suspicions and deaths -------------------------------------------------------


def _with_members(extra: int) -> tuple[Solo, float, float]:
    s = Solo(kinds={TimerKind.SUSPECT_TIMEOUT, TimerKind.REAP})
    s.hello(2)
    for i in range(3, 3 + extra):
        s.hello(i)
    s.run_to(1.0)
    p = s.params
    n = len(s.core.members) + 1
    lo, hi = suspicion_bounds(n, p.probe_interval, p.suspicion_mult, p.suspicion_max_mult,
                              p.suspicion_min)
    return s, lo, hi


@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
@pytest.mark.parametrize("extra", [0, 10])
def test_a_forged_suspect_kills_no_faster_than_the_suspicion_timeout(
        sender: bytes | None, extra: int) -> None:
    s, lo, hi = _with_members(extra)
    t0 = s.now
    s.feed(pkt(codec.GOSSIP, X, [Suspect(M, 0, X)]), ATTACKER, sender)
    assert s.status() == SUSPECT
    k = expected_confirmations(s.params.suspicion_mult, len(s.core.members) + 1)
    first = lo if k == 0 else hi
    s.run_to(t0 + first - 0.01, stop=lambda: s.status() == DEAD)
    assert s.status() == SUSPECT, s.now - t0
    s.run_to(t0 + hi + 1.0)
    assert s.status() == DEAD  # the suspicion does end: the check above is not vacuous


@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
def test_forged_confirmations_shorten_a_suspicion_to_its_minimum_only(
        sender: bytes | None) -> None:
    s, lo, _ = _with_members(10)
    t0 = s.now
    accusers = [bytes([0xA0 + j]) * 16 for j in range(10)]
    s.feed(pkt(codec.GOSSIP, X, [Suspect(M, 0, a) for a in accusers]), ATTACKER, sender)
    for a in accusers:  # and again, one per datagram
        s.feed(pkt(codec.GOSSIP, X, [Suspect(M, 0, a)]), ATTACKER, sender)
    s.run_to(t0 + lo - 0.01, stop=lambda: s.status() == DEAD)
    assert s.status() == SUSPECT, s.now - t0


def test_a_suspicion_raised_by_a_forged_message_is_refuted_by_the_live_member() -> None:
    net = Net(seed=4)
    for i in range(1, 5):
        net.add(i, seeds=[1] if i > 1 else [])
    net.run_until(lambda: net.converged([1, 2, 3, 4]), timeout=30)
    a = net.core(1)
    m = a.members[net.core(2).me.node_id]
    a.receive(pkt(codec.GOSSIP, X, [Suspect(m.node_id, m.incarnation, X)]), ATTACKER, net.now)
    assert m.status == SUSPECT
    net.run_until(lambda: net.converged([1, 2, 3, 4]), timeout=10)
    net.run(30)
    assert net.converged([1, 2, 3, 4])
    for i in (1, 3, 4):
        assert MemberFailed(net.core(2).me.node_id) not in net.events[addr_of(i)]


@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
def test_a_forged_dead_kills_no_faster_than_the_suspicion_timeout(
        sender: bytes | None) -> None:
    s, lo, _ = _with_members(10)
    t0 = s.now
    s.feed(pkt(codec.GOSSIP, X, [Dead(M, 0, X)]), ATTACKER, sender)
    s.run_to(t0 + lo - 0.01, stop=lambda: s.status() == DEAD)
    assert s.status() != DEAD
    assert MemberFailed(M) not in s.events


def _from(s: Solo, i: int, update: codec.Update) -> None:
    """Member i, authenticated, gossips ``update``."""
    s.feed(pkt(codec.GOSSIP, node_id_of(i), [update]), addr_of(i), node_id_of(i))


def test_a_dead_heard_on_a_corroborated_suspicion_takes_effect_at_once() -> None:
    """Members 3 and 4 confirm 2's suspicion of M: a DEAD from any of them is
    believed straight away, as memberlist does, instead of each agent waiting
    out its own minimum (which made every agent's verdict as late as the last
    one to hear the suspicion)."""
    s, lo, _ = _with_members(10)
    t0 = s.now
    _from(s, 3, Suspect(M, 0, node_id_of(3)))
    _from(s, 4, Suspect(M, 0, node_id_of(4)))
    assert s.status() == SUSPECT
    _from(s, 5, Dead(M, 0, node_id_of(5)))
    assert s.status() == DEAD and s.now - t0 < lo


def test_a_dead_heard_before_corroboration_takes_effect_when_it_comes() -> None:
    s, lo, _ = _with_members(10)
    k = expected_confirmations(s.params.suspicion_mult, len(s.core.members) + 1)
    assert k >= 1
    t0 = s.now
    _from(s, 3, Dead(M, 0, node_id_of(3)))
    for i in range(4, 4 + k):
        assert s.status() == SUSPECT  # fewer confirmations than the k waited for
        _from(s, i, Suspect(M, 0, node_id_of(i)))
    assert s.status() == DEAD and s.now - t0 < lo
    assert MemberFailed(M) in s.events


@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
def test_accusers_that_are_not_members_do_not_corroborate_a_forged_dead(
        sender: bytes | None) -> None:
    s, lo, _ = _with_members(10)
    t0 = s.now
    forged = [Suspect(M, 0, bytes([0xE0 + i]) * 16) for i in range(5)]
    s.feed(pkt(codec.GOSSIP, X, [Dead(M, 0, X), *forged]), ATTACKER, sender)
    s.run_to(t0 + lo - 0.01, stop=lambda: s.status() == DEAD)
    assert s.status() == SUSPECT


# --- forged incarnations ------------------------------------------------------------


@pytest.mark.parametrize("jump", [17, 1000, JS_SAFE - 1])
@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
def test_a_forged_alive_with_a_far_ahead_incarnation_is_refused(
        jump: int, sender: bytes | None) -> None:
    s = Solo()
    s.hello(2)
    s.feed(pkt(codec.GOSSIP, X, [alive(2, jump, host=ATTACKER[0])]), ATTACKER, sender)
    m = s.core.members[M]
    assert (m.incarnation, m.host, m.status) == (0, addr_of(2)[0], ALIVE)
    assert s.core.stats[DropReason.INCARNATION_JUMP.value] == 1


@pytest.mark.parametrize("jump", [17, 1000])
def test_a_card_forged_in_a_members_name_cannot_jump_its_incarnation(jump: int) -> None:
    """Keyless swarm (no sender): only the member's own address speaks for it."""
    s = Solo()
    s.hello(2)
    s.feed(pkt(codec.GOSSIP, M, [alive(2, jump, host=ATTACKER[0])], inc=jump), ATTACKER)
    m = s.core.members[M]
    assert (m.incarnation, m.host) == (0, addr_of(2)[0])
    assert s.core.stats[DropReason.INCARNATION_JUMP.value] >= 1


def test_forged_news_about_ourselves_cannot_push_our_incarnation_far() -> None:
    s = Solo()
    s.hello(2)
    s.feed(pkt(codec.GOSSIP, X, [Alive(ME, 1000, "10.0.0.1", 7946, 1)]), ATTACKER, X)
    s.feed(pkt(codec.GOSSIP, X, [Suspect(ME, 1000, X)]), ATTACKER, X)
    s.feed(pkt(codec.GOSSIP, X, [Dead(ME, JS_SAFE, X)]), ATTACKER, X)
    assert s.core.me.incarnation == 0
    s.feed(pkt(codec.GOSSIP, X, [Suspect(ME, 0, X)]), ATTACKER, X)
    assert s.core.me.incarnation == 1  # an ordinary suspicion is refuted


@pytest.mark.parametrize("jump", [17, 10**9])
def test_a_push_pull_in_a_members_name_cannot_jump_its_incarnation(jump: int) -> None:
    s = Solo()
    s.hello(2)
    s.core.handle_push_pull(state([(alive(2, jump, host=ATTACKER[0]), ALIVE)]), ATTACKER, s.now)
    s.drain()
    m = s.core.members[M]
    assert (m.incarnation, m.host) == (0, addr_of(2)[0])


def test_a_push_pull_entry_about_a_third_member_cannot_jump_its_incarnation() -> None:
    s = Solo()
    s.hello(2)
    payload = state([(alive(9), ALIVE), (alive(2, 1000, host=ATTACKER[0]), ALIVE),
                     (alive(2, 1000), DEAD)])
    s.core.handle_push_pull(payload, addr_of(9), s.now)
    s.drain()
    m = s.core.members[M]
    assert (m.incarnation, m.host, m.status) == (0, addr_of(2)[0], ALIVE)


# --- sender binding --------------------------------------------------------------------


@pytest.mark.parametrize("ptype", codec.TYPES)
def test_a_card_naming_another_node_than_the_sender_is_refused(ptype: int) -> None:
    s = Solo()
    s.hello(2)
    s.hello(3)
    before = (s.core.me.incarnation, {k: (m.status, m.incarnation, m.host, m.lc)
                                      for k, m in s.core.members.items()})
    data = pkt(ptype, M, [Suspect(node_id_of(3), 0, M), Alive(ME, 3, "10.0.0.1", 1, 1),
                          Left(M, 5), alive(50)], inc=3, lc=10**6, seq=1, target=ME,
               target_addr=addr_of(3))
    s.core.receive(data, addr_of(2), s.now, node_id_of(3))
    assert s.core.stats[DropReason.SENDER_MISMATCH.value] == 1
    assert s.core.take_outgoing() == [] and s.core.take_events() == []
    after = (s.core.me.incarnation, {k: (m.status, m.incarnation, m.host, m.lc)
                                     for k, m in s.core.members.items()})
    assert after == before
    assert s.core.lc < 10**6


# --- digests ------------------------------------------------------------------------


def test_hearsay_digests_cannot_outrank_the_members_own_word() -> None:
    s = Solo()
    s.hello(2)
    fake = (Digest("c", b"\x01" * 16, 5),)
    real = (Digest("c", b"\x02" * 16, 7),)
    s.feed(pkt(codec.GOSSIP, X, [Digests(M, 0, JS_SAFE, codec.digest_hash(fake), fake)]),
           ATTACKER, X)
    s.feed(pkt(codec.GOSSIP, M, [Digests(M, 0, 1, codec.digest_hash(real), real)]),
           addr_of(2), M)
    assert s.core.members[M].digests == real


# --- forged acks --------------------------------------------------------------------


PROBING = (TimerKind.PROBE, TimerKind.PROBE_TIMEOUT, TimerKind.PROBE_END)


def pings_to(s: Solo, node_id: bytes, since: int = 0) -> list[Packet]:
    out = []
    for sent in s.sent[since:]:
        p = codec.decode_packet(sent.data)
        if p.type == codec.PING and p.target == node_id:
            out.append(p)
    return out


@pytest.mark.parametrize("acker", ["stranger", "member not asked"])
def test_an_ack_from_anyone_but_the_target_or_a_helper_keeps_no_dead_member_alive(
        acker: str) -> None:
    """An on-path forger sees our pings to a dead member and answers them."""
    s = Solo(kinds=PROBING)
    s.hello(2)
    s.hello(3)
    forger, src = (X, ATTACKER) if acker == "stranger" else (node_id_of(3), addr_of(3))
    seen = 0
    while s.now < 5.0 and s.status() == ALIVE:
        s.run_to(s.now + 0.05)
        asked = {codec.decode_packet(x.data).seq for x in s.sent
                 if codec.decode_packet(x.data).type == codec.PING_REQ}
        for p in pings_to(s, M, seen):
            if p.seq not in asked:  # once 3 is asked to help, it may relay an ack
                s.feed(pkt(codec.ACK, forger, seq=p.seq), src)
        seen = len(s.sent)
    assert s.status() == SUSPECT
    assert s.core.stats[DropReason.WRONG_ACKER.value] > 0


def test_probe_numbers_cannot_be_guessed_from_the_last_one() -> None:
    s = Solo(kinds=PROBING)
    for i in range(2, 6):
        s.hello(i)
    s.run_to(60.0)
    seqs = list(dict.fromkeys(codec.decode_packet(x.data).seq for x in s.sent
                              if codec.decode_packet(x.data).type == codec.PING))
    assert len(seqs) >= 4
    assert not any(b - a in range(1, 100) for a, b in itertools.pairwise(seqs))


def test_an_ack_from_the_target_and_a_relayed_one_from_a_helper_still_count() -> None:
    s = Solo(kinds=PROBING)
    s.hello(2)
    s.hello(3)
    s.run_to(s.now + 0.01, stop=lambda: bool(pings_to(s, M)))
    s.run_to(3.0, stop=lambda: bool(pings_to(s, M)))
    p = pings_to(s, M)[0]
    s.feed(pkt(codec.ACK, M, seq=p.seq), addr_of(2))
    s.run_to(s.now + 1.5)
    assert s.status() == ALIVE and s.core.stats["probes_failed"] == 0
    # later, a probe of 2 goes indirect: the helper (3) relays 2's ack
    def ping_req() -> Packet | None:
        for x in s.sent:
            p = codec.decode_packet(x.data)
            if p.type == codec.PING_REQ and p.target == M:
                return p
        return None

    s.sent.clear()
    seen = 0
    while ping_req() is None and s.now < 60.0:
        s.run_to(s.now + 0.05)
        for p in pings_to(s, node_id_of(3), seen):  # 3 answers, 2 stays silent
            s.feed(pkt(codec.ACK, node_id_of(3), seq=p.seq), addr_of(3))
        seen = len(s.sent)
    req = ping_req()
    assert req is not None
    failed = s.core.stats["probes_failed"]
    s.feed(pkt(codec.ACK, node_id_of(3), seq=req.seq), addr_of(3))
    s.run_to(s.now + 1.0)
    assert s.core.stats["probes_failed"] == failed
    assert s.status() == ALIVE
    assert s.core.stats[DropReason.WRONG_ACKER.value] == 0


# --- indirect probes cannot be used to reflect or amplify traffic ----------------------


VICTIM: Addr = ("10.99.9.9", 7946)


def _full_queue(s: Solo) -> None:
    """Plenty of news queued: every datagram could carry a full piggyback."""
    s.feed(pkt(codec.GOSSIP, node_id_of(2), [alive(i) for i in range(10, 30)]), addr_of(2),
           node_id_of(2))


@pytest.mark.parametrize("sender", [None, X], ids=["unauthenticated", "insider"])
def test_a_ping_req_from_a_stranger_sends_nothing_to_the_address_it_names(
        sender: bytes | None) -> None:
    s = Solo()
    s.hello(2)
    _full_queue(s)
    s.sent.clear()
    for target in (M, b"\x42" * 16):
        s.feed(pkt(codec.PING_REQ, X, seq=5, target=target, target_addr=VICTIM), ATTACKER,
               sender)
    assert [x for x in s.sent if x.addr != ATTACKER] == []
    assert s.core.stats[DropReason.UNKNOWN_REQUESTER.value] == 2
    # whatever goes back to the stranger is no larger than a small reply
    assert all(len(x.data) <= 120 for x in s.sent)


def test_a_ping_req_in_a_members_name_from_elsewhere_is_refused() -> None:
    s = Solo()
    s.hello(2)
    s.hello(3)
    s.sent.clear()
    s.feed(pkt(codec.PING_REQ, node_id_of(3), seq=5, target=M, target_addr=VICTIM), ATTACKER)
    assert not any(x.addr in (VICTIM, addr_of(2)) for x in s.sent)
    assert s.core.stats[DropReason.UNKNOWN_REQUESTER.value] == 1


def test_a_members_ping_req_goes_to_the_known_address_without_piggyback() -> None:
    s = Solo()
    s.hello(2)
    s.hello(3)
    _full_queue(s)
    s.sent.clear()
    s.feed(pkt(codec.PING_REQ, node_id_of(3), seq=5, target=M, target_addr=VICTIM),
           addr_of(3), node_id_of(3))
    assert [x.addr for x in s.sent] == [addr_of(2)]
    assert len(s.sent[0].data) < 100
    # an unknown target: pinged at the given address, still without piggyback
    s.sent.clear()
    s.feed(pkt(codec.PING_REQ, node_id_of(3), seq=6, target=b"\x42" * 16,
               target_addr=VICTIM), addr_of(3), node_id_of(3))
    assert [x.addr for x in s.sent] == [VICTIM] and len(s.sent[0].data) < 100


def test_a_ping_req_without_an_address_decodes_and_uses_the_known_one() -> None:
    data = pkt(codec.PING_REQ, node_id_of(3), seq=5, target=M)
    assert codec.decode_packet(data).target_addr is None
    s = Solo()
    s.hello(2)
    s.hello(3)
    s.sent.clear()
    s.feed(data, addr_of(3), node_id_of(3))
    assert [x.addr for x in s.sent] == [addr_of(2)]
    s.sent.clear()
    s.feed(pkt(codec.PING_REQ, node_id_of(3), seq=6, target=b"\x42" * 16), addr_of(3),
           node_id_of(3))
    assert s.sent == [] and s.core.stats[DropReason.NO_ADDRESS.value] == 1


# --- ignored input is counted --------------------------------------------------------


def test_ignored_news_is_counted() -> None:
    s = Solo(kinds=[TimerKind.SUSPECT_TIMEOUT])
    s.hello(2)
    s.hello(3)
    c = s.core.stats

    def counted(reason: DropReason, data: bytes) -> None:
        before = c[reason.value]
        s.feed(data, ATTACKER, X)
        assert c[reason.value] == before + 1, reason

    d5 = (Digest("c", b"\x05" * 16, 5),)
    s.feed(pkt(codec.GOSSIP, X, [Digests(M, 0, 5, codec.digest_hash(d5), d5)]), ATTACKER, X)
    counted(DropReason.STALE_DIGESTS,
            pkt(codec.GOSSIP, X, [Digests(M, 0, 3, codec.digest_hash(()), ())]))
    counted(DropReason.UNKNOWN_MEMBER, pkt(codec.GOSSIP, X, [Left(node_id_of(40), 0)]))
    s.feed(pkt(codec.GOSSIP, X, [Left(node_id_of(3), 0)]), ATTACKER, X)
    assert s.status(node_id_of(3)) == LEFT
    counted(DropReason.DEAD_STAYS_DEAD, pkt(codec.GOSSIP, X, [Suspect(node_id_of(3), 0, X)]))
    counted(DropReason.DUPLICATE, pkt(codec.GOSSIP, X, [Left(node_id_of(3), 0)]))
    s.feed(pkt(codec.GOSSIP, X, [Suspect(M, 0, X)]), ATTACKER, X)
    s.run_to(s.now + 120.0)
    assert s.status() == DEAD
    counted(DropReason.DUPLICATE, pkt(codec.GOSSIP, X, [Dead(M, 0, X)]))
