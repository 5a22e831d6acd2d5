"""Hostile input to the membership core: forged, replayed and corrupted
datagrams, every field at its bounds. The core must never raise, never emit a
datagram its peers would refuse, never adopt a number it could not send on,
and stay joinable afterwards."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import wire
from agent.core.addr import Addr
from agent.core.membership import (
    INCARNATION_STEP,
    IncarnationRaised,
    Membership,
    MemberUnhealthy,
)
from agent.core.wire import ALIVE, JS_SAFE, LEFT, SUSPECT, Entry, Heartbeat
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
