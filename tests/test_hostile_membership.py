"""Hostile input to the membership core and the agent around it: forged,
replayed and corrupted news, every number at its bounds. The core must never
adopt a number it could not send on, never let a third party move a member or
bring a departed one back, and stay joinable afterwards; the agent must save
every incarnation it refutes to, and start whatever its saved one says.

(Random and mutated datagrams, forged suspicions and deaths, sender binding
and memory bounds are in test_swim_hostile.py.)"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config
from agent.core.addr import Addr
from agent.core.swim import (
    ALIVE,
    LEFT,
    DropReason,
    IncarnationRaised,
    MemberSuspected,
    Params,
    SelfInfo,
    Swim,
    codec,
)
from agent.core.swim.codec import Alive, Card, Dead, Digests, Left, Packet, Suspect
from agent.core.swim.table import INCARNATION_STEP
from agent.core.wire import JS_SAFE, Digest
from agent.runtime import agent as agent_mod
from agent.runtime import identity
from tests.swim_harness import Net, addr_of, node_id_of

ATTACKER: Addr = ("10.9.9.9", 7946)
X = b"\xee" * 16  # a third party that lies
DIGESTS = (Digest("c", b"\x01" * 16, 1),)


def pkt(card_id: bytes, updates: Sequence[codec.Update] = (), *, inc: int = 0, lc: int = 0,
        ptype: int = codec.GOSSIP, dhash: bytes | None = None) -> bytes:
    card = Card(card_id, inc, lc, codec.digest_hash(()) if dhash is None else dhash)
    return codec.encode_packet(Packet(ptype, card, updates=tuple(updates)))


def alive_of(core: Swim, inc: int | None = None, host: str | None = None) -> Alive:
    """``core``'s own ALIVE, with some fields overridden."""
    me = core.me
    return Alive(me.node_id, me.incarnation if inc is None else inc,
                 me.host if host is None else host, me.port, me.http_port, me.sync_port,
                 me.role, me.name)


def pair(seed: int = 3, **kw: int) -> tuple[Net, Swim, Swim]:
    net = Net(seed=seed)
    a = net.add(1)
    b = net.add(2, seeds=[1], **kw)
    net.run_until(lambda: net.converged([1, 2]), timeout=10)
    return net, a, b


def feed(net: Net, i: int, data: bytes, src: Addr, sender: bytes | None = None) -> None:
    net.core(i).receive(data, src, net.now, sender)
    net._drain(addr_of(i))


def sees(a: Swim, b: Swim) -> bool:
    """``a`` lists ``b`` ALIVE at b's own incarnation."""
    m = a.members.get(b.me.node_id)
    return m is not None and m.status == ALIVE and m.incarnation == b.me.incarnation


# --- news about ourselves -------------------------------------------------------------


@pytest.mark.parametrize("claim", [0, 3, INCARNATION_STEP])
def test_a_plausible_suspicion_is_refuted_one_above_it(claim: int) -> None:
    """Up to the step, claims about us are what peers may hold: we refute
    them, one above the claim, or our real word stays refused where it spread."""
    net, a, _ = pair()
    feed(net, 1, pkt(X, [Suspect(a.me.node_id, claim, X)]), ATTACKER)
    assert a.me.incarnation == claim + 1
    assert IncarnationRaised(claim + 1) in net.events[addr_of(1)]
    assert a.stats[DropReason.INCARNATION_JUMP.value] == 0


def test_a_claim_that_would_beat_our_entry_is_refuted_even_when_alive() -> None:
    """A corrupted copy of our ALIVE at a higher incarnation would make peers
    refuse our real word: we take one above it."""
    net, a, _ = pair()
    feed(net, 1, pkt(X, [alive_of(a, inc=5)]), ATTACKER)
    assert a.me.incarnation == 6
    # true (or older) news of us is left alone
    feed(net, 1, pkt(X, [alive_of(a, inc=6), alive_of(a, inc=2)]), ATTACKER)
    assert a.me.incarnation == 6


def test_a_forged_raise_within_the_step_heals_by_refutation() -> None:
    """A forged ALIVE of b small enough to be believed spreads; b hears it,
    refutes, and its entry wins everywhere before anyone suspects it."""
    net = Net(seed=5)
    nodes = [net.add(1)] + [net.add(i, seeds=[1]) for i in (2, 3)]
    net.run_until(lambda: net.converged([1, 2, 3]), timeout=10)
    a, b = nodes[0], nodes[1]
    forged = b.me.incarnation + INCARNATION_STEP
    feed(net, 1, pkt(X, [alive_of(b, inc=forged)]), ATTACKER)
    assert a.members[b.me.node_id].incarnation == forged
    net.run(8.0)
    assert b.me.incarnation == forged + 1
    assert not any(isinstance(ev, MemberSuspected) for evs in net.events.values() for ev in evs)
    assert all(sees(x, y) for x in nodes for y in nodes if x is not y)


# --- who may speak for a member -------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True])
def test_a_member_far_ahead_is_believed_from_itself(keyed: bool) -> None:
    """What keeps real restarts working: a jump beyond the step from the
    member itself (its address keyless, its authenticated word keyed) is taken."""
    net, a, b = pair()
    nb = b.me.node_id
    jump = a.members[nb].incarnation + 100
    src = ATTACKER if keyed else addr_of(2)  # keyed: the seal vouches, wherever from
    feed(net, 1, pkt(nb, [alive_of(b, inc=jump)], inc=jump), src, nb if keyed else None)
    assert a.members[nb].incarnation == jump
    # the same from a third party is refused
    feed(net, 1, pkt(X, [alive_of(b, inc=jump + 100)]), ATTACKER, X if keyed else None)
    assert a.members[nb].incarnation == jump
    assert a.stats[DropReason.INCARNATION_JUMP.value] == 1


def test_a_member_behind_nat_is_believed_from_where_its_datagrams_come_from() -> None:
    """b advertises one address but its datagrams come from another (NAT,
    HS_GOSSIP_ADVERTISE). A refutation above the step reaches peers that
    never heard the forged claim only from b itself: it must be taken from
    b's source address, never from anyone else's."""
    net, a, b = pair()
    nat: Addr = ("192.0.2.5", 40000)
    nb = b.me.node_id
    feed(net, 1, pkt(nb, inc=b.me.incarnation), nat)
    assert a.members[nb].addr == addr_of(2)  # the advertised address stays
    jump = a.members[nb].incarnation + INCARNATION_STEP + 1
    feed(net, 1, pkt(nb, [alive_of(b, inc=jump)], inc=jump), ATTACKER)
    assert a.members[nb].incarnation == jump - INCARNATION_STEP - 1
    assert a.stats[DropReason.INCARNATION_JUMP.value] >= 1
    feed(net, 1, pkt(nb, [alive_of(b, inc=jump)], inc=jump), nat)
    assert a.members[nb].incarnation == jump
    assert a.members[nb].addr == addr_of(2)


def test_a_stale_word_from_elsewhere_does_not_move_a_member() -> None:
    """A replayed or delayed ALIVE of b (its own, at its current incarnation,
    advertising no host) from another address is no evidence that b moved;
    a higher incarnation is."""
    net, a, b = pair()
    nb = b.me.node_id
    feed(net, 1, pkt(nb, [alive_of(b, host="")], inc=b.me.incarnation), ATTACKER)
    assert a.members[nb].addr == addr_of(2)
    new: Addr = ("10.0.0.77", 7946)
    inc = b.me.incarnation + 1
    feed(net, 1, pkt(nb, [alive_of(b, inc=inc, host="")], inc=inc), new)
    assert a.members[nb].addr == new


@pytest.mark.parametrize("kind", ["older_incarnation", "implausible"])
def test_refused_news_changes_nothing_of_the_member(kind: str) -> None:
    """An old process's datagram (a lower incarnation) or a forged one far
    ahead moves none of the member's card: address, ports, name, clock,
    digests, last sign of life."""
    net, a, b = pair(incarnation=1)
    nb = b.me.node_id
    b.set_digests(DIGESTS)
    net._drain(addr_of(2))
    net.run_until(lambda: a.members[nb].digests == DIGESTS, timeout=5)
    net.kill(2)  # nothing of b's own from now on
    m = a.members[nb]

    def card() -> tuple[object, ...]:
        return (m.incarnation, m.addr, m.http_port, m.sync_port, m.name, m.lc, m.dhash,
                m.digests, m.last_alive, m.status)

    before = card()
    inc, src = (0, addr_of(2)) if kind == "older_incarnation" else (
        1 + INCARNATION_STEP + 1, ATTACKER)
    fake = (Digest("c", b"\xee" * 16, 9),)
    net.now += 0.5
    feed(net, 1, pkt(nb, [Alive(nb, inc, ATTACKER[0], 1, 2, 3, 0, "forged"),
                          Digests(nb, inc, 99, codec.digest_hash(fake), fake)],
                     inc=inc, lc=10**6, dhash=codec.digest_hash(fake)), src)
    assert card() == before


# --- departures -------------------------------------------------------------------------


def test_a_departure_at_a_higher_incarnation_is_not_undone_by_older_gossip() -> None:
    """b leaves at an incarnation above what we held: gossip at one in
    between must not bring it back, before or after it is reaped."""
    net, a, b = pair()
    nb = b.me.node_id
    known = a.members[nb].incarnation
    net.kill(2)
    feed(net, 1, pkt(nb, [Left(nb, known + 5)], inc=known + 5, ptype=codec.LEAVE2), addr_of(2))
    assert (a.members[nb].status, a.members[nb].incarnation) == (LEFT, known + 5)
    feed(net, 1, pkt(X, [alive_of(b, inc=known + 2)]), ATTACKER)
    assert (a.members[nb].status, a.members[nb].incarnation) == (LEFT, known + 5)
    net.run(2 * net.params.probe_interval + net.params.ttl)
    assert nb not in a.members
    feed(net, 1, pkt(X, [alive_of(b, inc=known + 5)]), ATTACKER)
    assert nb not in a.members
    feed(net, 1, pkt(X, [alive_of(b, inc=known + 6)]), ATTACKER)  # a real restart
    assert a.members[nb].status == ALIVE


def ghost(i: int) -> bytes:
    return uuid.UUID(int=1000 + i, version=4).bytes


def ghost_addr(i: int) -> Addr:
    return (f"10.8.{i // 250}.{i % 250 + 1}", 7946)


def lone(**params: int) -> Swim:
    me = SelfInfo(node_id_of(1), 0, "n1", 7946, 8001, host=addr_of(1)[0])
    core = Swim(me, Params(**params), random.Random(1), 0.0)  # type: ignore[arg-type]
    core.start(0.0, [])
    return core


def test_hearsay_of_an_unknown_members_departure_leaves_no_tombstone() -> None:
    """Anyone could fill the tombstones with departures of nobody by gossip;
    only a member's own word records its departure before we know it."""
    core = lone()
    core.receive(pkt(X, [Left(ghost(1), 1)]), ATTACKER, 1.0)
    assert core.tombstone(ghost(1)) is None
    core.receive(pkt(X, [Alive(ghost(1), 1, ghost_addr(1)[0], 7946, 0)]), ATTACKER, 1.0)
    assert core.members[ghost(1)].status == ALIVE  # nothing recorded blocks it
    # its own LEAVE is recorded, and holds against the same incarnation
    core.receive(pkt(ghost(2), inc=1, ptype=codec.LEAVE2), ghost_addr(2), 1.0)
    assert core.tombstone(ghost(2)) is not None
    core.receive(pkt(X, [Alive(ghost(2), 1, ghost_addr(2)[0], 7946, 0)]), ATTACKER, 1.0)
    assert ghost(2) not in core.members
    assert core.stats[DropReason.DEAD_STAYS_DEAD.value] == 1


def test_tombstones_are_capped_dropping_the_soonest_due() -> None:
    """LEAVEs from many sources must not grow the tombstones without bound."""
    core = lone(max_members=8)
    for i in range(40):
        core.receive(pkt(ghost(i), inc=1, ptype=codec.LEAVE2), ghost_addr(i), 1.0 + i / 100)
    kept = [i for i in range(40) if core.tombstone(ghost(i)) is not None]
    assert kept == list(range(32, 40))  # the newest kept


# --- numbers at their bounds ------------------------------------------------------------


def test_a_lamport_clock_far_ahead_is_not_adopted() -> None:
    net, a, b = pair()
    nb = b.me.node_id
    before = a.lc
    feed(net, 1, pkt(nb, lc=JS_SAFE), addr_of(2))
    assert a.lc == before
    assert a.stats[DropReason.LC_JUMP.value] == 1
    feed(net, 1, pkt(nb, lc=before + 50), addr_of(2))
    assert a.lc == before + 50


# --- the agent: saving what it refuted to -------------------------------------------------


def test_a_failed_identity_save_is_retried_and_reported_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The pending incarnation used to be cleared before the write and an
    OSError swallowed: a refutation was then never saved, and a restart came
    back below what peers hold."""
    node = uuid.uuid4()
    identity.save(tmp_path, identity.Identity(node, 1))
    ag = agent_mod.Agent(Config(data_dir=tmp_path), identity.Identity(node, 1))
    real = identity.save
    failing = True

    def save(path: Path, ident: identity.Identity) -> None:
        if failing:
            raise OSError("disk full")
        real(path, ident)

    monkeypatch.setattr(agent_mod.identity, "save", save)
    monkeypatch.setattr(agent_mod, "IDENTITY_SAVE_EVERY", 0.0)
    with caplog.at_level(logging.WARNING, logger="hs_gossip"):
        # A peer suspects us at our incarnation: the core refutes, the agent saves.
        ag.core.receive(pkt(X, [Suspect(node.bytes, 4, X)]), ATTACKER, 1.0)
        events = ag.core.take_events()
        assert events == [IncarnationRaised(5)]
        for ev in events:
            ag._on_event(ev)
        ag._save_identity()  # a tick while the disk is still full
    assert len([r for r in caplog.records if "cannot save" in r.getMessage()]) == 1
    assert identity.read(tmp_path) == identity.Identity(node, 1)
    failing = False
    ag._save_identity()  # the next tick
    assert identity.read(tmp_path) == identity.Identity(node, 5)


def test_an_out_of_range_saved_incarnation_restarts_the_count(tmp_path: Path) -> None:
    """An unusable saved incarnation used to stop the agent from starting."""
    node = uuid.uuid4()
    for bad in (2**53, JS_SAFE, -1):
        (tmp_path / identity.FILENAME).write_text(
            json.dumps({"node_id": str(node), "incarnation": bad}))
        ident = identity.load_for_start(tmp_path)
        assert ident == identity.Identity(node, 1)
    with pytest.raises(ValueError):
        identity.save(tmp_path, identity.Identity(node, 2**53))
    assert identity.read(tmp_path) == identity.Identity(node, 1)


# --- property: lies, then an honest agent joins ----------------------------------------------

TARGET = 1  # the harness index of the agent under attack
HONEST = 2  # the one that joins it afterwards; no lie names it
POOL = [node_id_of(100 + i) for i in range(6)]
SOURCES: list[Addr] = [("10.7.0.1", 7946), ("10.7.0.2", 7946), ("10.7.0.3", 1)]
BIG = st.sampled_from([0, 1, 2, 16, 17, JS_SAFE - 1, JS_SAFE]) | st.integers(0, JS_SAFE)


def lies(target: bytes) -> st.SearchStrategy[bytes]:
    who = st.sampled_from([*POOL, target])
    host = st.sampled_from(["", "10.7.0.1", "10.0.0.1", "::1", "255.255.255.255"])
    update = st.one_of(
        st.builds(Alive, who, BIG, host, st.sampled_from([0, 1, 7946, 65535]),
                  st.sampled_from([0, 65535]), st.sampled_from([0, 65535])),
        st.builds(Suspect, who, BIG, who),
        st.builds(Dead, who, BIG, who),
        st.builds(Left, who, BIG),
    )
    return st.builds(
        lambda t, card, inc, lc, ups: codec.encode_packet(Packet(
            t, Card(card, inc, lc, b"\x01" * 8), updates=tuple(ups), seq=1, target=target,
            target_addr=("10.7.0.9", 7946))),
        st.sampled_from(codec.TYPES), st.sampled_from(POOL), BIG, BIG,
        st.lists(update, max_size=8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_after_any_lies_an_honest_agent_still_joins(data: st.DataObject) -> None:
    net = Net(seed=11)
    target = net.add(TARGET)
    inc0 = target.me.incarnation
    steps = data.draw(st.lists(st.tuples(lies(target.me.node_id), st.sampled_from(SOURCES),
                                         st.floats(0, 2)), max_size=20))
    for datagram, src, dt in steps:
        feed(net, TARGET, datagram, src)
        net.run(dt)
    # Each plausible refutation raises by at most STEP + 1; nothing beyond what peers accept.
    assert inc0 <= target.me.incarnation <= inc0 + len(steps) * 8 * (INCARNATION_STEP + 1)
    assert target.me.incarnation < JS_SAFE and target.lc <= JS_SAFE
    honest = net.add(HONEST, seeds=[TARGET])
    net.run_until(lambda: sees(target, honest) and sees(honest, target), timeout=5)
