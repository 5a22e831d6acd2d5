"""What users of the swarm rely on, checked on the SWIM core: how members are
found, kept, dropped and replaced, and what a member advertises. Driven only
through the Swim API on the in-memory network of tests/swim_harness.py
(seeded, no real time). The protocol mechanics (probes, suspicion, push-pull)
are in test_swim_protocol.py."""

from __future__ import annotations

from agent.core import wire
from agent.core.swim import (
    ALIVE,
    DEAD,
    LEFT,
    MemberFailed,
    MemberJoined,
    MemberRestarted,
    codec,
)
from agent.core.swim.codec import Alive, Card, Left, Packet
from agent.core.wire import Digest
from tests.swim_harness import PORT, Net, addr_of, joined

N = 8
ALL = list(range(1, N + 1))


def swarm(n: int = N, seed: int = 1, **params: object) -> Net:
    return joined(n, seed, **params)


def clear_events(net: Net) -> None:
    for evs in net.events.values():
        evs.clear()


def about(net: Net, viewer: int, node_id: bytes) -> list[object]:
    return [e for e in net.events[addr_of(viewer)] if getattr(e, "node_id", None) == node_id]


# --- finding the swarm --------------------------------------------------------------


def test_members_known_only_through_a_chain_of_seeds_all_meet() -> None:
    """Each agent is given only the previous one as its seed: everyone still
    ends up knowing everyone (news travels transitively)."""
    net = Net(seed=4)
    net.add(1)
    for i in range(2, 9):
        net.add(i, seeds=[i - 1])
    net.run_until(lambda: net.converged(list(range(1, 9))), timeout=15)


def test_the_swarm_keeps_together_after_its_seed_dies() -> None:
    """Everyone joined through agent 1; when it dies the others stay together,
    and a newcomer seeded with any survivor learns all of them."""
    net = swarm(seed=12)
    net.kill(1)
    rest = ALL[1:]
    net.run(net.params.ttl + 5)
    assert net.converged(rest)
    net.add(20, seeds=[7])
    net.run_until(lambda: net.converged([*rest, 20]), timeout=10)
    assert net.status(20, 1) in (None, DEAD)


def test_a_late_joiner_is_not_fed_dead_members() -> None:
    net = swarm(seed=13)
    dead = net.core(8).me.node_id
    net.kill(8)
    net.run(net.params.ttl * 0.8)
    assert all(net.status(i, 8) == DEAD for i in ALL[:-1])
    net.add(30, seeds=[1])
    net.run(3)
    m = net.core(30).members.get(dead)
    assert m is None or not m.healthy
    assert not any(isinstance(e, MemberJoined) for e in about(net, 30, dead))


# --- restarts and departures ------------------------------------------------------------


def test_a_quick_restart_replaces_the_entry_without_a_failure() -> None:
    """Restarted (a higher incarnation from disk) before anyone declared it
    dead: peers hold the new incarnation, in one entry, and never saw it
    joining or failing."""
    net = swarm(seed=9)
    nid, inc = net.core(5).me.node_id, net.core(5).me.incarnation
    net.kill(5)
    net.run(0.5)
    clear_events(net)
    net.add(5, seeds=[1], incarnation=inc + 1)
    others = [i for i in ALL if i != 5]
    net.run_until(lambda: all(net.core(i).members[nid].incarnation == inc + 1
                              for i in others), timeout=10)
    net.run(10)
    assert net.converged(ALL)
    for i in others:
        assert [m.node_id for m in net.core(i).members.values()
                if m.addr == addr_of(5)] == [nid]
        assert not [e for e in about(net, i, nid)
                    if isinstance(e, (MemberJoined, MemberFailed))]


def test_a_restart_after_leaving_comes_back_once() -> None:
    """A member leaves, then restarts at a higher incarnation. A lagging peer
    still relays its LEFT and its ALIVE at the old incarnation: neither may
    remove or roll back the new one, then or while the LEFT is remembered."""
    net = swarm(seed=10)
    c6 = net.core(6)
    nid, inc = c6.me.node_id, c6.me.incarnation
    others = [i for i in ALL if i != 6]
    c6.leave(net.now)
    net._drain(addr_of(6))
    net.kill(6)
    net.run_until(lambda: all(net.status(i, 6) == LEFT for i in others), timeout=2)
    clear_events(net)
    net.add(6, seeds=[1], incarnation=inc + 1)
    net.run_until(lambda: net.converged(ALL), timeout=10)
    relay = net.core(3)
    card = Card(relay.me.node_id, relay.me.incarnation, relay.lc, relay.dhash)
    for rumour in (Left(nid, inc), Alive(nid, inc, addr_of(6)[0], PORT, 8006, 0, 0, "n6")):
        data = codec.encode_packet(Packet(codec.GOSSIP, card, updates=(rumour,)))
        net.core(1).receive(data, addr_of(3), net.now)
        net._drain(addr_of(1))
        assert (net.status(1, 6), net.core(1).members[nid].incarnation) == (ALIVE, inc + 1)
    net.run(net.params.ttl + 5)
    assert net.converged(ALL)
    for i in others:
        assert net.core(i).members[nid].incarnation == inc + 1
        assert [type(e) for e in about(net, i, nid)] == [MemberRestarted]


# --- what a member advertises -------------------------------------------------------------


def test_every_collection_of_a_member_reaches_its_peers() -> None:
    """An agent with many collections (long names): peers learn every one of
    them, so Merkle sync covers them all (the list is larger than a datagram)."""
    net = swarm(n=4, seed=15)
    digests = tuple(Digest(f"collection-{i:03d}" * 4, bytes([i]) * 16, 10**9)
                    for i in range(50))
    net.core(1).set_digests(digests)
    net._drain(addr_of(1))
    owner = net.core(1).me.node_id
    net.run_until(lambda: all(set(net.core(i).members[owner].digests) == set(digests)
                              for i in (2, 3, 4)), timeout=60)


def test_datagrams_stay_within_the_budget_with_many_collections() -> None:
    net = swarm(n=4, seed=15)
    net.core(1).set_digests([Digest(f"collection-{i:03d}" * 4, bytes([i]) * 16, 10**9)
                             for i in range(50)])
    net._drain(addr_of(1))
    since = net.now
    net.run(10)
    sent = [s for s in net.sent if s.at >= since]
    assert sent and max(len(s.data) for s in sent) <= wire.PAYLOAD_BUDGET
    for s in sent:
        codec.decode_packet(s.data)


def test_bytes_per_agent_do_not_grow_with_swarm_size() -> None:
    """Once the news has spread, an agent sends about the same whatever the
    swarm's size: one probe (and the acks of others' probes) per period."""
    def per_agent(n: int) -> float:
        net = swarm(n=n, seed=16)
        net.run(20)  # broadcasts of the joins run out
        since = net.now
        net.run(20)
        return sum(len(s.data) for s in net.sent if s.at >= since) / n / 20

    small, large = per_agent(10), per_agent(40)
    assert large < small * 1.15
    assert large < 268  # HashiCorp Serf's bytes per agent per second at 20 agents

