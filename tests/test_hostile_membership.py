"""Hostile input to the membership core: forged, replayed and corrupted
datagrams, every field at its bounds. The core must never raise, never emit a
datagram its peers would refuse, never adopt a number it could not send on,
and stay joinable afterwards."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config
from agent.core import wire
from agent.core.addr import Addr
from agent.core.membership import (
    INCARNATION_STEP,
    IncarnationRaised,
    Membership,
    MemberUnhealthy,
    Params,
)
from agent.core.wire import ALIVE, JS_SAFE, LEFT, SUSPECT, Entry, Heartbeat
from agent.runtime import agent as agent_mod
from agent.runtime import identity
from tests.simnet import SimNet

ATTACKER: Addr = ("10.9.9.9", 7946)


def entry(m: Membership, *, incarnation: int | None = None, heartbeat: int | None = None,
          status: int = ALIVE, host: str | None = None, age_ms: int = 0) -> Entry:
    """``m``'s own entry, with some fields overridden."""
    me = m.me
    return Entry(me.node_id, me.incarnation if incarnation is None else incarnation,
                 m.heartbeat if heartbeat is None else heartbeat, status,
                 me.host if host is None else host, me.port, me.http_port, age_ms)


def heartbeat_from(sender: Entry, peers: list[Entry], lc: int = 0) -> bytes:
    return wire.encode(Heartbeat(sender, "x", lc, (), tuple(peers)))


def stranger(i: int = 7) -> Entry:
    return Entry(uuid.UUID(int=i, version=4).bytes, 1, 1, ALIVE, "10.8.0.1", 7946, 50050, 0)


def all_decode(m: Membership) -> None:
    for data, _ in m.take_outgoing():
        wire.decode(data)  # raises DecodeError if a peer would refuse it


def sees(a: Membership, b: Membership) -> bool:
    """``a`` lists ``b`` healthy at b's own incarnation."""
    m = a.members.get(b.me.node_id)
    return m is not None and m.healthy and m.incarnation == b.me.incarnation


def pair() -> tuple[SimNet, Membership, Membership]:
    net = SimNet(seed=3)
    a = net.add(1)
    b = net.add(2, seeds=[net.addr_of(1)])
    net.run_until(lambda: net.converged([1, 2]), timeout=10)
    return net, a, b


# --- regressions: each failed before bounds were enforced --------------------------


def test_a_suspicion_at_the_largest_incarnation_is_ignored_not_refuted() -> None:
    """One datagram calling us SUSPECT at 2**53-1 used to make us refute to
    2**53, which every peer's decoder refuses: the agent fell out for good."""
    net, a, _ = pair()
    before = a.me.incarnation
    a.receive(heartbeat_from(stranger(), [entry(a, incarnation=JS_SAFE, status=SUSPECT)]),
              ATTACKER, net.now)
    assert a.me.incarnation == before
    assert not any(isinstance(e, IncarnationRaised) for e in a.take_events())
    assert a.stats["drop_implausible_self"] == 1
    a.tick(net.now)
    all_decode(a)


def test_a_suspicion_far_above_our_incarnation_is_ignored() -> None:
    net, a, _ = pair()
    before = a.me.incarnation
    a.receive(heartbeat_from(stranger(), [
        entry(a, incarnation=before + INCARNATION_STEP + 1, status=LEFT)]), ATTACKER, net.now)
    assert a.me.incarnation == before
    assert a.stats["drop_implausible_self"] == 1


def test_a_plausible_suspicion_is_refuted_one_above_it() -> None:
    net, a, _ = pair()
    before = a.me.incarnation
    a.receive(heartbeat_from(stranger(), [entry(a, incarnation=before + 3, status=SUSPECT)]),
              ATTACKER, net.now)
    assert a.me.incarnation == before + 4
    assert IncarnationRaised(before + 4) in a.take_events()


@pytest.mark.parametrize("kind", ["incarnation", "heartbeat"])
def test_a_claim_that_would_beat_our_entry_is_refuted_even_when_alive(kind: str) -> None:
    """A corrupted copy of our entry that peers would prefer to our real one
    (higher incarnation, or higher counter at our incarnation) is refuted:
    otherwise peers ignore our real heartbeats until the claim expires."""
    net, a, _ = pair()
    before = a.me.incarnation
    claim = (entry(a, incarnation=before + 2) if kind == "incarnation"
             else entry(a, heartbeat=a.heartbeat + 1000))
    a.receive(heartbeat_from(stranger(), [claim]), ATTACKER, net.now)
    assert a.me.incarnation == claim.incarnation + 1


def test_hearsay_far_above_a_members_incarnation_is_not_adopted() -> None:
    """A bit-flipped copy of b's entry, relayed by a third party, used to
    raise b's incarnation at a, which then ignored b's real heartbeats."""
    net, a, b = pair()
    known = a.members[b.me.node_id].incarnation
    a.receive(heartbeat_from(stranger(), [entry(b, incarnation=known + (1 << 40))]),
              ATTACKER, net.now)
    assert a.members[b.me.node_id].incarnation == known
    assert a.stats["drop_implausible_incarnation"] == 1
    net.run(8.0)  # past the unhealthy threshold: b's real heartbeats still count
    assert sees(a, b) and sees(b, a)


def test_a_jump_within_the_step_heals_by_refutation() -> None:
    """A forged raise small enough to be believed reaches b in gossip; b
    refutes, and its entry wins everywhere before anyone calls it unhealthy."""
    net = SimNet(seed=5)
    nodes = [net.add(1)] + [net.add(i, seeds=[net.addr_of(1)]) for i in (2, 3)]
    net.run_until(lambda: net.converged([1, 2, 3]), timeout=10)
    a, b = nodes[0], nodes[1]
    forged = b.me.incarnation + INCARNATION_STEP
    a.receive(heartbeat_from(stranger(), [entry(b, incarnation=forged)]), ATTACKER, net.now)
    assert a.members[b.me.node_id].incarnation == forged
    net.run(8.0)
    assert b.me.incarnation == forged + 1
    # healed by b's refutation, not by a's suspicion after its threshold
    assert MemberUnhealthy(b.me.node_id) not in [ev for evs in net.events.values() for ev in evs]
    assert all(sees(x, y) for x in nodes for y in nodes if x is not y)


def test_a_member_far_ahead_is_believed_from_its_own_address() -> None:
    """The exception that keeps real restarts working: a jump beyond the
    step from the member itself at the address we know is taken."""
    net, a, b = pair()
    jump = a.members[b.me.node_id].incarnation + 100
    a.receive(heartbeat_from(entry(b, incarnation=jump), []), net.addr_of(2), net.now)
    assert a.members[b.me.node_id].incarnation == jump


def test_a_stale_heartbeat_from_elsewhere_does_not_move_a_member() -> None:
    net, a, b = pair()
    old = entry(b, host="")  # b advertises no host: the source address is used
    net.run(3.0)
    a.receive(heartbeat_from(old, []), ATTACKER, net.now)
    assert a.members[b.me.node_id].addr == net.addr_of(2)
    assert a.stats["stale_address_ignored"] == 1
    # fresh evidence does move it: b's next counter from a new address
    a.receive(heartbeat_from(entry(b, heartbeat=b.heartbeat + 1, host=""), []),
              ("10.0.0.77", 7946), net.now)
    assert a.members[b.me.node_id].addr == ("10.0.0.77", 7946)


def test_a_member_behind_nat_is_believed_from_the_address_its_datagrams_come_from() -> None:
    """b advertises one address but its datagrams come from another (NAT,
    HS_GOSSIP_ADVERTISE). Its refutation above the step can reach peers that
    never heard the forged claim only directly; it used to be refused there
    because the source never equals the advertised address."""
    net, a, b = pair()
    nat: Addr = ("192.0.2.5", 40000)
    nb = b.me.node_id
    a.receive(heartbeat_from(entry(b, heartbeat=b.heartbeat + 1), []), nat, net.now)
    assert a.members[nb].addr == net.addr_of(2)  # the advertised address stays
    known = a.members[nb].incarnation
    jump = known + INCARNATION_STEP + 1
    # from anywhere else it is still refused
    a.receive(heartbeat_from(entry(b, incarnation=jump), []), ATTACKER, net.now)
    assert a.members[nb].incarnation == known
    assert a.stats["drop_implausible_incarnation"] == 1
    a.receive(heartbeat_from(entry(b, incarnation=jump), []), nat, net.now)
    assert a.members[nb].incarnation == jump


def test_a_forged_claim_of_exactly_the_step_is_refuted_and_heals() -> None:
    """Peers adopt hearsay up to the step, so we must refute up to it too:
    ignoring a claim peers hold would leave our real heartbeats refused as
    older everywhere it spread, until it expired twice over."""
    net, _, b = pair()
    forged = b.me.incarnation + INCARNATION_STEP
    b.receive(heartbeat_from(stranger(), [entry(b, incarnation=forged, status=SUSPECT)]),
              ATTACKER, net.now)
    assert b.me.incarnation == forged + 1
    assert b.stats["drop_implausible_self"] == 0


def replay(sender: Entry, sync_port: int, digest: bytes) -> bytes:
    return wire.encode(Heartbeat(sender, "forged", 0, (wire.Digest("c", digest, 1, 0),), (),
                                 sync_port=sync_port))


@pytest.mark.parametrize("kind", ["older_heartbeat", "older_incarnation", "implausible"])
def test_a_refused_heartbeat_changes_nothing_of_the_member(kind: str) -> None:
    """A replayed or forged heartbeat refused as older or implausible used
    to set sync port, digests and name all the same."""
    net, a, b = pair()
    nb = b.me.node_id
    net.run(3.0)
    m = a.members[nb]
    before = (m.sync_port, m.digests, m.name, m.last_direct)
    known = m.incarnation
    if kind == "older_heartbeat":
        sender, src = entry(b, heartbeat=1), net.addr_of(2)
    elif kind == "older_incarnation":
        sender, src = entry(b, incarnation=known - 1), net.addr_of(2)
    else:
        sender, src = entry(b, incarnation=known + INCARNATION_STEP + 1), ATTACKER
    a.receive(replay(sender, 1, b"\xee" * 16), src, net.now)
    m = a.members[nb]
    assert (m.sync_port, m.digests, m.name, m.last_direct) == before
    # b's own next heartbeat still sets them
    a.receive(replay(entry(b, heartbeat=b.heartbeat + 1), 4242, b"\x01" * 16),
              net.addr_of(2), net.now)
    assert a.members[nb].sync_port == 4242 and a.members[nb].name == "forged"


def test_a_departure_at_a_higher_incarnation_is_not_undone_by_older_gossip() -> None:
    """The tombstone used to keep b's old incarnation, so gossip at one in
    between brought the departed member back."""
    net, a, b = pair()
    known = a.members[b.me.node_id].incarnation
    a.receive(wire.encode_leave(wire.Leave(entry(b, incarnation=known + 5, status=LEFT))),
              net.addr_of(2), net.now)
    assert b.me.node_id not in a.members
    a.receive(heartbeat_from(stranger(), [entry(b, incarnation=known + 2)]), ATTACKER, net.now)
    assert b.me.node_id not in a.members
    assert a.stats["stale_entry_ignored"] == 1


def ghost(i: int) -> Entry:
    return Entry(uuid.UUID(int=1000 + i, version=4).bytes, 1, 1, LEFT, "10.8.1.1", 7946, 0, 0)


def test_hearsay_of_an_unknown_members_departure_leaves_no_tombstone() -> None:
    """Anyone could fill the tombstones with departures of nobody by gossip;
    only a member's own word records its departure before we know it."""
    net, a, _ = pair()
    a.receive(heartbeat_from(stranger(), [ghost(1)]), ATTACKER, net.now)
    alive = replace(ghost(1), status=ALIVE)
    a.receive(heartbeat_from(stranger(), [alive]), ATTACKER, net.now)
    assert alive.node_id in a.members  # nothing recorded blocks it
    # its own LEAVE is recorded
    a.receive(wire.encode_leave(wire.Leave(ghost(2))), ("10.8.1.1", 7946), net.now)
    a.receive(heartbeat_from(stranger(), [replace(ghost(2), status=ALIVE)]), ATTACKER, net.now)
    assert ghost(2).node_id not in a.members


def test_tombstones_are_capped_dropping_the_soonest_due() -> None:
    """Spoofed LEAVEs from many sources must not grow the table without bound."""
    net = SimNet(seed=3, params=Params(max_peers=8))
    a = net.add(1)
    for i in range(40):
        net.now += 0.01
        a.receive(wire.encode_leave(wire.Leave(ghost(i))), (f"10.8.2.{i + 1}", 7946), net.now)
    assert len(a._tombs) == 8
    assert set(a._tombs) == {ghost(i).node_id for i in range(32, 40)}  # the newest kept


def test_a_real_departure_is_relayed_past_many_others() -> None:
    """Heartbeats used to carry the first four departures in insertion order:
    earlier ones (forged or not) crowded out a real one for a whole TTL."""
    net = SimNet(seed=3)
    nodes = [net.add(1)] + [net.add(i, seeds=[net.addr_of(1)]) for i in (2, 3)]
    net.run_until(lambda: net.converged([1, 2, 3]), timeout=10)
    a, b, c = nodes
    for i in range(12):
        a.receive(wire.encode_leave(wire.Leave(ghost(i))), (f"10.8.2.{i + 1}", 7946), net.now)
    a.receive(wire.encode_leave(wire.Leave(entry(b, status=LEFT))), net.addr_of(2), net.now)
    relayed = False
    for _ in range(8):
        a.tick(net.now)
        for data, _to in a.take_outgoing():
            msg = wire.decode(data)
            if isinstance(msg, Heartbeat):
                relayed |= any(e.node_id == b.me.node_id and e.status == LEFT
                               for e in msg.peers)
    assert relayed
    assert c.members  # a third member, so the table has more than b to relay


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
        ag._on_event(IncarnationRaised(5))
        ag._save_identity()  # a tick while the disk is still full
    assert len([r for r in caplog.records if "cannot save" in r.getMessage()]) == 1
    assert identity.read(tmp_path) == identity.Identity(node, 1)
    failing = False
    ag._save_identity()  # the next tick
    assert identity.read(tmp_path) == identity.Identity(node, 5)


def test_a_lamport_clock_far_ahead_is_not_adopted() -> None:
    net, a, b = pair()
    before = a.lc
    a.receive(heartbeat_from(entry(b, heartbeat=b.heartbeat + 1), [], lc=JS_SAFE),
              net.addr_of(2), net.now)
    assert a.lc == before
    a.receive(heartbeat_from(entry(b, heartbeat=b.heartbeat + 2), [], lc=before + 50),
              net.addr_of(2), net.now)
    assert a.lc == before + 50


def test_our_counters_never_pass_what_peers_accept() -> None:
    net, a, _ = pair()
    a.heartbeat = a.lc = JS_SAFE
    a.tick(net.now)
    assert a.heartbeat == a.lc == JS_SAFE
    all_decode(a)


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


# --- property: any sequence of valid-but-hostile datagrams --------------------------

POOL = [uuid.UUID(int=i, version=4).bytes for i in range(1, 9)]
SOURCES: list[Addr] = [("10.7.0.1", 7946), ("10.7.0.2", 7946), ("10.0.0.1", 7946),
                       ("10.7.0.3", 1)]
TARGET = 1  # the simnet index of the agent under attack
BIG = [0, 1, 2, JS_SAFE - 1, JS_SAFE]


def hostile_entries(target_id: bytes) -> st.SearchStrategy[Entry]:
    return st.builds(
        Entry,
        node_id=st.sampled_from([*POOL, target_id]),
        incarnation=st.sampled_from(BIG) | st.integers(0, JS_SAFE),
        heartbeat=st.sampled_from(BIG) | st.integers(0, JS_SAFE),
        status=st.sampled_from([ALIVE, SUSPECT, LEFT]),
        host=st.sampled_from(["", "10.7.0.1", "10.0.0.1", "::1", "255.255.255.255"]),
        port=st.sampled_from([0, 1, 7946, 65535]),
        http_port=st.sampled_from([0, 65535]),
        age_ms=st.sampled_from([0, 1, 30_000, wire.MAX_AGE_MS]),
        role=st.sampled_from([0, 255]),
    )


def hostile_datagrams(target_id: bytes) -> st.SearchStrategy[bytes]:
    entries = hostile_entries(target_id)
    hb = st.builds(
        Heartbeat, sender=entries, name=st.text(max_size=8),
        lc=st.sampled_from(BIG), digests=st.just(()),
        peers=st.lists(entries, max_size=20).map(tuple), want_state=st.booleans(),
        app_healthy=st.sampled_from([None, True, False]),
        wants=st.lists(st.sampled_from([*POOL, target_id]), max_size=8).map(tuple),
        sync_port=st.sampled_from([0, 65535]))
    leave = entries.map(lambda e: wire.encode_leave(wire.Leave(e)))
    state = st.lists(entries, min_size=1, max_size=20).map(
        lambda es: wire.encode_state(POOL[0], es)[0])
    return hb.map(wire.encode) | leave | state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hostile_sequences_leave_the_core_sound_and_joinable(data: st.DataObject) -> None:
    net = SimNet(seed=11)
    target = net.add(TARGET)
    inc0 = target.me.incarnation
    steps = data.draw(st.lists(st.tuples(hostile_datagrams(target.me.node_id),
                                         st.sampled_from(SOURCES), st.booleans()),
                               max_size=25))
    for datagram, src, tick in steps:
        target.receive(datagram, src, net.now)  # never raises
        target.push(net.now)
        if tick:
            net.now += 0.5
            target.tick(net.now)
        all_decode(target)
        target.take_events()
    # Each plausible refutation raises by at most STEP + 1.
    assert inc0 <= target.me.incarnation <= inc0 + len(steps) * (INCARNATION_STEP + 1)
    assert target.lc <= JS_SAFE and target.heartbeat <= JS_SAFE
    # A fresh honest peer joins it, and both list each other, within a few rounds.
    honest = net.add(2, seeds=[net.addr_of(TARGET)])
    net.run_until(lambda: (target.members.get(honest.me.node_id) is not None
                           and target.members[honest.me.node_id].healthy
                           and target.me.node_id in honest.members
                           and honest.members[target.me.node_id].healthy), timeout=5)
    for m in (target, honest):
        m.tick(net.now)
        all_decode(m)
