"""SWIM + Lifeguard core behaviours, driven only through the Swim API on the
small in-memory network of tests/swim_harness.py (seeded, no real time)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from agent.core import wire
from agent.core.addr import Addr
from agent.core.swim import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    DigestsChanged,
    IncarnationRaised,
    MemberExpired,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberRestarted,
    MemberSuspected,
    Params,
    SelfInfo,
    Swim,
    Timer,
    TimerKind,
    codec,
)
from agent.core.swim.codec import Alive, Card, Packet, Suspect
from agent.core.wire import Digest
from tests.swim_harness import Net, addr_of, joined, node_id_of

N = 8
ALL = list(range(1, N + 1))


def swarm(n: int = N, seed: int = 1, **params: object) -> Net:
    return joined(n, seed, **params)


def gossip_from(net: Net, i: int, *updates: codec.Update) -> bytes:
    """A GOSSIP datagram as core i would send it, carrying ``updates``."""
    me = net.core(i)
    card = Card(me.me.node_id, me.me.incarnation, me.lc, me.dhash)
    return codec.encode_packet(Packet(codec.GOSSIP, card, updates=updates))


def deliver(net: Net, to: int, data: bytes, frm: int) -> None:
    net.core(to).receive(data, addr_of(frm), net.now)
    net._drain(addr_of(to))


def events_of(net: Net, i: int, cls: type) -> list[object]:
    return [e for e in net.events[addr_of(i)] if isinstance(e, cls)]


def clear_events(net: Net) -> None:
    for evs in net.events.values():
        evs.clear()


# --- joining and steady state ------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_swarm_converges_through_one_seed(seed: int) -> None:
    net = Net(seed=seed)
    net.add(1)
    for i in range(2, N + 1):
        net.add(i, seeds=[1])
    took = net.run_until(lambda: net.converged(ALL), timeout=30)
    assert took < 10
    assert all(net.core(i).joined and net.core(i).seeds_reached for i in ALL[1:])


def test_idle_swarm_sends_only_probes() -> None:
    net = swarm(seed=4)
    net.run(20)  # let every broadcast run out
    since = net.now
    net.run(30)
    sent = [s for s in net.sent if s.at >= since]
    types = {s.data[1] for s in sent}
    assert types == {codec.PING, codec.ACK}
    assert max(len(s.data) for s in sent) < 100
    per_agent_s = sum(len(s.data) for s in sent) / N / 30
    assert per_agent_s < 268 / 2  # half of Serf's 268 B/s at 20 agents
    pings = sum(1 for s in sent if s.data[1] == codec.PING) / N / 30
    assert 0.9 <= pings <= 1.05
    assert not any(net.core(i).take_push_pulls() for i in ALL)


def test_join_retries_a_seed_that_was_down() -> None:
    net = Net(seed=3)
    net.add(1)
    net.kill(1)
    net.add(2, seeds=[1])
    net.run(5)
    assert not net.core(2).joined and not net.core(2).seeds_reached
    assert net.core(2).seeds_tried == (addr_of(1),)
    net.down.discard(addr_of(1))
    net.run_until(lambda: net.converged([1, 2]), timeout=20)
    assert net.core(2).seeds_reached


# --- failure detection ---------------------------------------------------------------


def test_crashed_member_is_suspected_declared_dead_then_expired() -> None:
    net = swarm(seed=5)
    clear_events(net)
    net.kill(3)
    others = [i for i in ALL if i != 3]
    took = net.run_until(lambda: all(net.status(i, 3) == DEAD for i in others), timeout=30)
    assert took < 15
    victim = net.core(3).me.node_id
    assert all(MemberSuspected(victim) in net.events[addr_of(i)] or
               MemberFailed(victim) in net.events[addr_of(i)] for i in others)
    assert not net.core(1).members[victim].healthy
    net.run_until(lambda: all(net.status(i, 3) is None for i in others), timeout=40)
    assert MemberExpired(victim) in net.events[addr_of(1)]
    assert net.core(1).tombstone(victim) is not None
    # No one else was ever suspected.
    assert all(isinstance(e, MemberSuspected) and e.node_id == victim
               for i in others for e in events_of(net, i, MemberSuspected))


def test_indirect_probe_saves_member_behind_lossy_direct_link() -> None:
    net = swarm(seed=6)
    clear_events(net)
    a1, a2 = addr_of(1), addr_of(2)
    net.drop = lambda s, d, _: {s, d} == {a1, a2}
    net.run(60)
    assert not any(events_of(net, i, MemberSuspected) for i in ALL)
    assert net.converged(ALL)
    assert net.core(1).stats["probes_failed"] == 0


def test_suspicion_confirmations_shorten_deadline() -> None:
    # memberlist's multiplier, 4: two confirmations expected (the default, 3,
    # expects one)
    net = swarm(n=10, seed=7, suspicion_mult=4)
    core = net.core(1)
    victim = net.core(3).me.node_id
    deliver(net, 1, gossip_from(net, 2, Suspect(victim, 0, net.core(2).me.node_id)), frm=2)
    core.take_timers()
    # The deadline core 1 asked for, as the harness keeps it.
    def deadline() -> float:
        due = [at for at, _, a, what in net._heap if a == addr_of(1)
               and what[1] == Timer(TimerKind.SUSPECT_TIMEOUT, victim)]  # type: ignore[index]
        return min(due)
    lone = deadline()
    deliver(net, 1, gossip_from(net, 4, Suspect(victim, 0, net.core(4).me.node_id)), frm=4)
    once = deadline()
    deliver(net, 1, gossip_from(net, 5, Suspect(victim, 0, net.core(5).me.node_id)), frm=5)
    twice = deadline()
    assert twice < once < lone
    # The same confirmer twice, or the accuser, does not count.
    deliver(net, 1, gossip_from(net, 4, Suspect(victim, 0, net.core(4).me.node_id)), frm=4)
    assert deadline() == twice
    assert core.stats["suspicion_confirmations"] == 2


def test_a_suspect_that_refutes_stays_alive() -> None:
    net = swarm(seed=8)
    clear_events(net)
    target = net.core(2).me.node_id
    deliver(net, 4, gossip_from(net, 3, Suspect(target, 0, net.core(3).me.node_id)), frm=3)
    assert net.status(4, 2) == SUSPECT
    net.run(30)
    assert net.converged(ALL)
    assert IncarnationRaised(1) in net.events[addr_of(2)]
    assert MemberRecovered(target) in net.events[addr_of(4)]
    assert all(net.core(i).members[target].incarnation == 1 for i in ALL if i != 2)
    assert not any(events_of(net, i, MemberFailed) for i in ALL)


def test_a_refutation_gossip_lost_on_its_way_is_found_by_the_last_check() -> None:
    # Member 1 hears that 2 is suspected; 2 refutes, but neither the refutation
    # gossip nor 2 itself gets through to 1 until 1's suspicion runs out (at
    # 20 % loss this happens to a few members in a thousand). Before its
    # verdict 1 checks the suspect directly: 2's answer carries its new
    # incarnation, and 2 is not declared dead.
    net = swarm(seed=31)
    a, x = addr_of(1), addr_of(2)
    victim = net.core(2).me.node_id

    def drop(src: Addr, dst: Addr, data: bytes) -> bool:
        p = codec.decode_packet(data)
        if {src, dst} == {a, x}:
            return p.seq not in net.core(1)._checks  # only the last check passes
        return dst == a and any(isinstance(u, Alive) and u.node_id == victim
                                for u in p.updates)

    net.drop = drop
    net.block_push_pull = lambda s, d: a in (s, d)
    deliver(net, 1, gossip_from(net, 3, Suspect(victim, 0, net.core(3).me.node_id)), frm=3)
    net.run_until(lambda: net.core(2).me.incarnation > 0, timeout=5)
    assert net.status(1, 2) == SUSPECT
    net.run(40)
    assert net.core(1).stats["suspect_checks"] >= 1
    assert not events_of(net, 1, MemberFailed)
    assert net.status(1, 2) == ALIVE and net.core(1).members[victim].incarnation > 0


def test_lifeguard_awareness_rises_when_we_are_the_sick_one() -> None:
    net = swarm(seed=9)
    sick = addr_of(5)
    net.drop = lambda s, d, _: sick in (s, d)
    net.block_push_pull = lambda a, b: sick in (a, b)  # cut off for TCP too
    net.run(8)
    assert net.core(5).health_score() >= 2
    assert all(net.core(i).health_score() == 0 for i in ALL if i != 5)
    # Its probe period is stretched by the score: fewer pings per second.
    # (Probes, not the last checks of its suspects before a verdict: one
    # probe number each, retries included.)
    since, checks = net.now, net.core(5).stats["suspect_checks"]
    net.run(10)
    seqs = {codec.decode_packet(s.data).seq for s in net.sent
            if s.at >= since and s.src == sick and s.data[1] == codec.PING}
    assert len(seqs) - (net.core(5).stats["suspect_checks"] - checks) < 10 / 2


# --- dissemination, card and push-pull -------------------------------------------------


def test_digest_change_reaches_member_that_never_probes_the_owner() -> None:
    net = swarm(seed=10)
    net.run(20)
    clear_events(net)
    a1, a5 = addr_of(1), addr_of(5)
    # Member 5 and the owner exchange nothing; the owner's bare probes (its
    # card alone) reach no one: only its broadcast can spread the change.
    net.drop = lambda s, d, data: {s, d} == {a1, a5} or (
        s == a1 and not codec.decode_packet(data).updates)
    digests = (Digest("items", b"x" * 32, 7, 0),)
    net.core(1).set_digests(digests)
    net._drain(a1)
    owner = net.core(1).me.node_id
    took = net.run_until(lambda: all(
        net.core(i).members[owner].digests == digests for i in ALL if i != 1), timeout=10)
    assert took < 0.8 * net.params.probe_interval
    assert DigestsChanged(owner) in net.events[a5]


def test_a_member_we_missed_is_learned_when_it_speaks_to_us() -> None:
    net = swarm(n=3, seed=19)
    net.run(20)
    a1 = addr_of(1)
    # Member 1 misses every piece of news about the newcomer (gossip, its
    # announcement, push-pulls); later only datagrams pass.
    net.drop = lambda s, d, data: d == a1 and bool(codec.decode_packet(data).updates)
    net.block_push_pull = lambda s, d: a1 in (s, d)
    net.add(4, seeds=[2])
    new = net.core(4).me.node_id
    net.run(3)
    assert new not in net.core(1).members
    net.drop = None
    took = net.run_until(lambda: new in net.core(1).members, timeout=15)
    # The newcomer's probe of 1 is answered with a request for its card.
    assert took < 2 * 3 * net.params.probe_interval
    assert net.core(1).members[new].addr == addr_of(4)


def test_card_mismatch_fetches_the_full_digest_list() -> None:
    net = swarm(seed=11)
    net.run(20)
    owner = net.core(1).me.node_id
    digests = (Digest("items", b"x" * 32, 7, 0),)
    # The change is made but its broadcast is lost everywhere (queue dropped).
    net.core(1).set_digests(digests)
    net.core(1)._bq = type(net.core(1)._bq)(4, 16)
    net._drain(addr_of(1))
    net.run_until(lambda: all(
        net.core(i).members[owner].digests == digests for i in ALL if i != 1), timeout=25)
    assert all(net.core(i).members[owner].dhash == net.core(1).dhash for i in ALL if i != 1)


def test_push_pull_repairs_missed_gossip() -> None:
    net = swarm(n=4, seed=12, push_pull_interval=5.0)
    # Member 4 hears no datagram at all; only the TCP exchange gets through.
    a4 = addr_of(4)
    net.drop = lambda s, d, _: a4 in (s, d)
    net.add(5, seeds=[1])
    new = net.core(5).me.node_id
    net.run_until(lambda: new in net.core(4).members, timeout=12)
    assert MemberJoined(new, addr_of(5)) in net.events[a4]


def test_leave_is_immediate() -> None:
    net = swarm(seed=13)
    clear_events(net)
    gone = net.core(3).me.node_id
    net.core(3).leave(net.now)
    net._drain(addr_of(3))
    net.kill(3)
    took = net.run_until(lambda: all(net.status(i, 3) == LEFT for i in ALL if i != 3),
                         timeout=1)
    assert took <= 2 * net.latency
    assert all(MemberLeft(gone) in net.events[addr_of(i)] for i in ALL if i != 3)
    net.run(30)
    assert not any(events_of(net, i, MemberSuspected) for i in ALL)


def test_restart_with_higher_incarnation_replaces_entry() -> None:
    net = swarm(seed=14)
    net.kill(3)
    net.run_until(lambda: all(net.status(i, 3) == DEAD for i in ALL if i != 3), timeout=30)
    clear_events(net)
    old = net.core(3).me.node_id
    net.add(3, seeds=[1], incarnation=1)
    net.run_until(lambda: net.converged(ALL), timeout=10)
    assert all(MemberRestarted(old, 1) in net.events[addr_of(i)] for i in ALL if i != 3)
    assert all(net.core(i).members[old].incarnation == 1 for i in ALL if i != 3)


def test_dead_member_is_not_revived_by_stale_alive() -> None:
    net = swarm(seed=15)
    net.kill(3)
    net.run_until(lambda: all(net.status(i, 3) == DEAD for i in ALL if i != 3), timeout=30)
    c3 = net.core(3)
    stale = Alive(c3.me.node_id, 0, addr_of(3)[0], 7946, 8003, 0, 0, "n3")
    stats = net.core(1).stats
    before = stats["dead_stays_dead"]
    deliver(net, 1, gossip_from(net, 2, stale), frm=2)
    assert net.status(1, 3) == DEAD
    assert stats["dead_stays_dead"] == before + 1
    # Reaped: the tombstone still refuses it.
    net.run_until(lambda: net.status(1, 3) is None, timeout=40)
    before = stats["dead_stays_dead"]
    deliver(net, 1, gossip_from(net, 2, stale), frm=2)
    assert net.status(1, 3) is None
    assert stats["dead_stays_dead"] == before + 1


# --- hostile input ------------------------------------------------------------------


def lone_core(**params: object) -> Swim:
    me = SelfInfo(node_id_of(1), 0, "n1", 7946, 8001, host="10.0.0.1")
    core = Swim(me, dataclasses.replace(Params.lan(), **params),  # type: ignore[arg-type]
                random.Random(1), 0.0)
    core.start(0.0, [])
    core.take_outgoing()
    return core


def ping_from(i: int, target: bytes) -> bytes:
    card = Card(node_id_of(i), 0, 0, codec.digest_hash(()))
    return codec.encode_packet(Packet(codec.PING, card, seq=1, target=target))


def test_sender_mismatch_is_dropped() -> None:
    core = lone_core()
    src: Addr = addr_of(2)
    core.receive(ping_from(2, core.me.node_id), src, 1.0, sender=node_id_of(3))
    assert core.stats["sender_mismatch"] == 1 and not core.take_outgoing()
    core.receive(ping_from(2, core.me.node_id), src, 1.0, sender=node_id_of(2))
    assert [s.addr for s in core.take_outgoing()] == [src]


def test_ping_for_someone_else_is_not_acked() -> None:
    core = lone_core()
    core.receive(ping_from(2, node_id_of(9)), addr_of(2), 1.0)
    assert core.stats["not_for_us"] == 1 and not core.take_outgoing()


@pytest.mark.parametrize(("data", "label"), [
    (b"\x01", "decode_truncated"),
    (b"\x07\x0a\x90", "decode_version"),
    (b"\x01\x63\x90", "decode_type"),
    (b"\x01\x0a" + b"\x00" * 1500, "decode_too_big"),
    (b"\x01\x0a\x93\x01\x02\x03", "decode_field"),
])
def test_hostile_datagrams_are_counted_by_drop_reason(data: bytes, label: str) -> None:
    core = lone_core()
    core.receive(data, addr_of(2), 1.0)
    assert core.stats[label] == 1
    assert not core.take_outgoing() and not core.take_events()


def test_flood_from_one_address_is_rate_limited() -> None:
    core = lone_core(max_datagrams_per_source=10)
    for _ in range(100):
        core.receive(b"\x01", addr_of(2), 1.0)
    assert core.stats["rate_limited"] == 80
    core.receive(b"\x01", addr_of(3), 1.0)  # another address is not starved
    assert core.stats["rate_limited"] == 80


def table(n: int, inc: int = 0) -> bytes:
    entries = []
    for i in range(2, n + 2):
        nid = node_id_of(i)
        entries.append(codec.Entry(Alive(nid, inc, addr_of(i)[0], 7946, 80, 0, 0, f"n{i}"),
                                   ALIVE, 0, codec.Digests(nid, inc, 0, codec.digest_hash(()),
                                                           (), None)))
    return codec.encode_state(codec.State(False, tuple(entries)), 10_000)


def test_table_is_capped_at_max_members() -> None:
    core = lone_core(max_members=5)
    core.receive_push_pull_reply(table(5), addr_of(2), 1.0)
    assert len(core.members) == 5
    # A larger peer's table: entries beyond the cap are counted, not held.
    assert core.handle_push_pull(table(20, inc=1), addr_of(2), 1.0) is not None
    assert len(core.members) == 5
    assert core.stats["table_full"] == 15
    assert core.stats["push_pull_merged"] == 2


def test_incarnation_jump_is_refused_unless_from_the_member_itself() -> None:
    core = lone_core()
    core.receive_push_pull_reply(table(3), addr_of(2), 1.0)
    far = Alive(node_id_of(3), 1000, addr_of(3)[0], 7946, 80, 0, 0, "n3")
    card = Card(node_id_of(2), 0, 0, codec.digest_hash(()))
    core.receive(codec.encode_packet(Packet(codec.GOSSIP, card, updates=(far,))),
                 addr_of(2), 2.0)
    assert core.members[node_id_of(3)].incarnation == 0
    assert core.stats["incarnation_jump"] == 1
    # Claims about ourselves far above our incarnation are not refuted to.
    sus = Suspect(node_id_of(1), 500, node_id_of(2))
    core.receive(codec.encode_packet(Packet(codec.GOSSIP, card, updates=(sus,))),
                 addr_of(2), 2.0)
    assert core.me.incarnation == 0
    assert not [e for e in core.take_events() if isinstance(e, IncarnationRaised)]


def test_numbers_we_send_stay_within_what_peers_accept() -> None:
    core = lone_core()
    core.lc = wire.JS_SAFE
    core.receive(ping_from(2, core.me.node_id), addr_of(2), 1.0)
    (ack,) = core.take_outgoing()
    assert codec.decode_packet(ack.data).card.lc == wire.JS_SAFE
    assert core.bump_lc() == wire.JS_SAFE


def test_joiner_is_known_to_every_member_of_a_small_swarm_at_once() -> None:
    net = swarm(seed=16)
    net.run(20)
    net.add(N + 1, seeds=[1])
    new = net.core(N + 1).me.node_id
    # Before the first gossip round: the joiner told every member itself.
    net.run(net.params.gossip_interval / 2)
    assert all(new in net.core(i).members for i in ALL)
    assert net.core(N + 1).stats["announced"] == 1


def test_joiner_of_a_large_swarm_tells_a_bounded_few_and_gossip_the_rest() -> None:
    # Above join_announce members the joiner sends its ALIVE to that many
    # (memberlist: none); the seed's gossip and its own carry it further, so
    # a swarm restarting at once costs O(N) datagrams to announce, not O(N^2).
    net = swarm(seed=16, join_announce=3)
    net.run(20)
    since = net.now
    net.add(N + 1, seeds=[1])
    joiner = addr_of(N + 1)
    new = net.core(N + 1).me.node_id
    net.run(net.params.gossip_interval / 2)
    assert len({s.dst for s in net.sent if s.at >= since and s.src == joiner}) <= 3
    assert not all(new in net.core(i).members for i in ALL)
    net.run_until(lambda: all(new in net.core(i).members for i in ALL), timeout=10.0)


def test_a_member_we_rarely_hear_from_directly_is_not_dead_when_first_suspected() -> None:
    # In a larger swarm we exchange datagrams with a given member only every
    # N periods or so: its last direct sign of life may be older than ttl
    # while everyone holds it ALIVE. A suspicion must still run its course.
    net = swarm(n=40, seed=17)
    net.run(net.params.ttl + 10)
    core = net.core(1)
    stale = min((m for m in core.members.values()), key=lambda m: m.last_alive)
    assert net.now - stale.last_alive > net.params.ttl
    i = next(i for i in range(2, 41) if net.core(i).me.node_id == stale.node_id)
    net.kill(i)  # it cannot refute
    accuser = 2 if i != 2 else 3
    deliver(net, 1, gossip_from(net, accuser, Suspect(stale.node_id, stale.incarnation,
                                                       net.core(accuser).me.node_id)),
            frm=accuser)
    assert net.status(1, i) == SUSPECT
    net.run(net.params.suspicion_min)
    assert net.status(1, i) == SUSPECT


def test_members_that_joined_together_catch_up_by_push_pull() -> None:
    net = Net(seed=18)
    net.add(1)
    # Probes get through, news does not: only a push-pull can tell 2 of 3.
    net.drop = lambda s, d, data: bool(codec.decode_packet(data).updates)
    net.add(2, seeds=[1])
    net.add(3, seeds=[1])  # 1's table already holds 2, so 3 knows 2; 2 misses 3
    late = net.core(3).me.node_id
    assert late not in net.core(2).members
    took = net.run_until(lambda: late in net.core(2).members, timeout=20)
    assert took <= net.params.join_catch_up + 0.1


def test_partition_heals_through_a_seed_retry_and_gossip() -> None:
    net = Net(seed=20, params=dataclasses.replace(Params.lan(), ttl=4.0, join_retry_max=5.0))
    side_a, side_b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for i in side_a:
        net.add(i, seeds=[] if i == 1 else [1])
    net.add(6, seeds=[1])
    for i in side_b[1:]:
        net.add(i, seeds=[6])  # their seed is on their own side
    everyone = side_a + side_b
    net.run_until(lambda: net.converged(everyone), timeout=30)
    a = {addr_of(i) for i in side_a}
    net.drop = lambda s, d, _: (s in a) != (d in a)
    net.block_push_pull = lambda s, d: (s in a) != (d in a)
    net.run(20)  # each side declared the other dead, reaped it, forgot the tombstones
    assert all(net.status(1, j) is None for j in side_b)
    net.drop = net.block_push_pull = None
    # Only 6 retries a seed across; the table it pulls is news to its side,
    # which it gossips on (as the seed gossips 6's table to side A).
    took = net.run_until(lambda: net.converged(everyone), timeout=60)
    assert took < net.params.join_retry_max + 3


def test_a_member_reaped_as_dead_learns_it_and_refutes_when_it_returns() -> None:
    net = swarm(n=4, seed=21, ttl=4.0, join_retry_max=2.0)
    cut = addr_of(4)
    net.drop = lambda s, d, _: cut in (s, d)
    net.block_push_pull = lambda s, d: cut in (s, d)
    back = net.core(4).me.node_id
    net.run_until(lambda: all(net.core(i).tombstone(back) for i in (1, 2, 3)), timeout=20)
    net.drop = net.block_push_pull = None
    # Its ALIVE at the incarnation it was declared dead at is refused; it is
    # told it is dead, refutes, and comes back at a higher incarnation.
    net.run_until(lambda: net.converged([1, 2, 3, 4]), timeout=10)
    assert net.core(4).me.incarnation == 1
    assert all(net.core(i).members[back].incarnation == 1 for i in (1, 2, 3))


def test_a_reaped_member_returning_through_push_pull_is_told_it_is_dead() -> None:
    net = swarm(n=4, seed=22, ttl=10.0, join_retry_max=2.0)
    cut = addr_of(4)
    net.drop = lambda s, d, _: cut in (s, d)  # datagrams stay cut off
    net.block_push_pull = lambda s, d: cut in (s, d)
    back = net.core(4).me.node_id
    net.run_until(lambda: all(net.core(i).tombstone(back) for i in (1, 2, 3))
                  and net.status(4, 1) is None, timeout=40)
    net.block_push_pull = None  # its seed retry gets through
    net.run_until(lambda: net.core(4).me.incarnation == 1, timeout=5)
    assert IncarnationRaised(1) in net.events[cut]


class Timers:
    """The timers one lone core asked for; runs only the kinds a test names."""

    def __init__(self, core: Swim) -> None:
        self.core, self.due, self.now = core, [], 0.0  # type: ignore[var-annotated]

    def run(self, kinds: set[TimerKind], until: float) -> float:
        while True:
            self.due = sorted(self.due + [(t.deadline, i, t.timer) for i, t in
                                          enumerate(self.core.take_timers(), len(self.due))])
            ready = [d for d in self.due if d[2].kind in kinds and d[0] <= until]
            if not ready:
                return self.now
            self.due.remove(ready[0])
            self.now = max(self.now, ready[0][0])
            self.core.handle_timer(ready[0][2], self.now)


def test_alive_news_at_the_incarnation_we_hold_dead_makes_us_gossip_the_death_again() -> None:
    core = lone_core()
    core.receive_push_pull_reply(table(4), addr_of(2), 0.0)
    victim = node_id_of(5)
    card = Card(node_id_of(2), 0, 0, codec.digest_hash(()))
    core.receive(codec.encode_packet(Packet(codec.GOSSIP, card, updates=(
        Suspect(victim, 0, node_id_of(2)),))), addr_of(2), 0.0)
    timers = Timers(core)
    now = timers.run({TimerKind.SUSPECT_TIMEOUT}, 60.0)
    assert core.members[victim].status == DEAD
    now = timers.run({TimerKind.GOSSIP}, now + 30)  # the death has been told: queue empty
    assert not core._bq
    core.take_outgoing()
    stale = Alive(victim, 0, addr_of(5)[0], 7946, 80, 0, 0, "n5")
    card3 = Card(node_id_of(3), 0, 0, codec.digest_hash(()))
    core.receive(codec.encode_packet(Packet(codec.GOSSIP, card3, updates=(stale,))),
                 addr_of(3), now)
    assert core.members[victim].status == DEAD
    timers.run({TimerKind.GOSSIP}, now + 1)
    told = [u for s in core.take_outgoing() for u in codec.decode_packet(s.data).updates
            if isinstance(u, codec.Dead) and u.node_id == victim]
    assert told


MANY = tuple(Digest(f"collection-{i:03d}" * 4, bytes([i]) * 32, 10**9, 0) for i in range(50))


def test_a_digest_list_larger_than_a_datagram_reaches_every_member() -> None:
    net = swarm(seed=23)
    net.run(20)
    a1 = addr_of(1)
    # Only its broadcast can carry the list: the owner's bare probes are lost.
    net.drop = lambda s, d, data: s == a1 and not codec.decode_packet(data).updates
    net.core(1).set_digests(MANY)
    net._drain(a1)
    owner = net.core(1).me.node_id
    took = net.run_until(lambda: all(net.core(i).members[owner].digests == MANY
                                     for i in ALL if i != 1), timeout=5)
    assert took < net.params.probe_interval
    assert all(DigestsChanged(owner) in net.events[addr_of(i)] for i in ALL if i != 1)


def test_a_large_digest_list_missed_by_gossip_is_fetched_in_parts() -> None:
    net = swarm(seed=24)
    net.run(20)
    net.core(1).set_digests(MANY)
    net.core(1)._bq = type(net.core(1)._bq)(4, 16)  # its broadcast is lost
    net._drain(addr_of(1))
    owner = net.core(1).me.node_id
    net.run_until(lambda: all(net.core(i).members[owner].digests == MANY
                              for i in ALL if i != 1), timeout=30)


# --- timers that no longer matter ----------------------------------------------------


def test_timers_that_no_longer_matter_say_so() -> None:
    net = swarm(seed=12)
    net.run(5)
    core = net.core(1)
    # An idle swarm: nothing queued, so a GOSSIP round would send nothing.
    assert not core.timer_pending(Timer(TimerKind.GOSSIP))
    assert core.timer_pending(Timer(TimerKind.PROBE))
    # A probe whose ACK came: its timeout and end do nothing.
    seen = len(net.sent)
    net.run_until(lambda: any(
        s.src == addr_of(1) and s.data[1] == codec.PING for s in net.sent[seen:]), timeout=5)
    seq = next(codec.decode_packet(s.data).seq for s in net.sent[seen:]
               if s.src == addr_of(1) and s.data[1] == codec.PING)
    assert core.timer_pending(Timer(TimerKind.PROBE_TIMEOUT, seq))
    net.run(0.05)
    assert not core.timer_pending(Timer(TimerKind.PROBE_TIMEOUT, seq))
    assert not core.timer_pending(Timer(TimerKind.PROBE_END, seq))
    # A suspicion that was refuted: its timeout does nothing.
    m = core.members[net.core(2).me.node_id]
    deliver(net, 1, gossip_from(net, 3, Suspect(m.node_id, m.incarnation, b"\x03" * 16)), 3)
    assert core.timer_pending(Timer(TimerKind.SUSPECT_TIMEOUT, m.node_id))
    assert core.timer_pending(Timer(TimerKind.GOSSIP))  # the suspicion is queued
    net.run_until(lambda: m.status == ALIVE, timeout=5)
    assert not core.timer_pending(Timer(TimerKind.SUSPECT_TIMEOUT, m.node_id))
    assert not core.timer_pending(Timer(TimerKind.REAP, m.node_id))


@pytest.mark.parametrize("seed", [1, 2])
def test_a_swarm_whose_shell_drops_moot_timers_behaves_the_same(seed: int) -> None:
    """Dropping every timer timer_pending calls moot loses nothing: joins,
    gossip after an idle spell, failure detection, and far fewer wakeups."""
    net = Net(seed=seed, drop_moot=True)
    net.add(1)
    for i in range(2, N + 1):
        net.add(i, seeds=[1])
    net.run_until(lambda: net.converged(ALL), timeout=30)
    net.run(30)  # idle: the broadcast queues drain
    fired, moot = net.fired, net.moot
    net.run(30)
    assert net.moot - moot > net.fired - fired  # most idle timers were moot
    digests = (Digest("items", b"y" * 32, 3, 0),)
    net.core(2).set_digests(digests)
    net._drain(addr_of(2))
    owner = net.core(2).me.node_id
    net.run_until(lambda: all(net.core(i).members[owner].digests == digests
                              for i in ALL if i != 2), timeout=5)
    net.kill(3)
    others = [i for i in ALL if i != 3]
    took = net.run_until(lambda: all(net.status(i, 3) == DEAD for i in others), timeout=30)
    assert took < 15
    assert net.converged(others)


# --- periodic push-pull by summary ----------------------------------------------------


def _solo(i: int, knows: list[int], seed: int = 1) -> Swim:
    a = addr_of(i)
    core = Swim(SelfInfo(node_id_of(i), 0, f"n{i}", a[1], 8000 + i, host=a[0]), Params.lan(),
                random.Random(seed), 0.0)
    core.start(0.0, [])
    for j in knows:
        card = Card(node_id_of(j), 0, 0, codec.digest_hash(()))
        hello = Alive(node_id_of(j), 0, addr_of(j)[0], addr_of(j)[1], 8000 + j)
        core.receive(codec.encode_packet(Packet(codec.GOSSIP, card, updates=(hello,))),
                     addr_of(j), 0.0, node_id_of(j))
    core.take_outgoing()
    return core


def _periodic_exchange(a: Swim, b: Swim, now: float = 1000.0) -> list[tuple[int, int]]:
    """a's periodic push-pull with b (and any follow-up); sizes of (request, reply)."""
    a.handle_timer(Timer(TimerKind.PUSH_PULL), now)
    sizes = []
    while pps := a.take_push_pulls():
        for pp in pps:
            assert pp.addr == (b.me.host, b.me.port)
            reply = b.handle_push_pull(pp.data, (a.me.host, a.me.port), now)
            assert reply is not None
            sizes.append((len(pp.data), len(reply)))
            a.receive_push_pull_reply(reply, pp.addr, now)
    return sizes


def _ids(core: Swim) -> set[bytes]:
    return set(core.members)


def _opener_picking_b(knows: list[int]) -> int:
    """A seed with which core 1's periodic push-pull goes to core 2."""
    for seed in range(1, 1000):
        a = _solo(1, knows, seed)
        a.handle_timer(Timer(TimerKind.PUSH_PULL), 1000.0)
        pps = a.take_push_pulls()
        if pps and pps[0].addr == addr_of(2):
            return seed
    raise AssertionError("no seed")


def test_periodic_push_pull_between_agreeing_members_sends_no_table() -> None:
    others = list(range(3, 43))
    a = _solo(1, [2, *others], _opener_picking_b([2, *others]))
    b = _solo(2, [1, *others])
    sizes = _periodic_exchange(a, b)
    assert len(sizes) == 1
    req, reply = sizes[0]
    full = len(codec.encode_state(codec.State(False, tuple(
        codec.Entry(Alive(node_id_of(j), 0, addr_of(j)[0], 7946, 1), ALIVE, 0,
                    codec.Digests(node_id_of(j), 0, 0, codec.digest_hash(()), ()))
        for j in range(42))), 4096))
    assert req + reply < full / 8
    assert b.stats["push_pull_same"] == 1


@pytest.mark.parametrize("who_lacks", ["opener", "answerer"])
def test_periodic_push_pull_repairs_either_side_when_tables_differ(who_lacks: str) -> None:
    a_knows, b_knows = ([2], [1, 3]) if who_lacks == "opener" else ([2, 3], [1])
    a, b = _solo(1, a_knows, _opener_picking_b(a_knows)), _solo(2, b_knows)
    sizes = _periodic_exchange(a, b)
    assert _ids(a) == {node_id_of(2), node_id_of(3)}
    assert _ids(b) == {node_id_of(1), node_id_of(3)}
    # the opener's table follows only when the answerer lacked something
    assert len(sizes) == (2 if who_lacks == "answerer" else 1)


def test_join_push_pulls_stay_whole_tables() -> None:
    a = _solo(1, [3, 4, 5])
    a.join([addr_of(2)], 1.0)
    (pp,) = a.take_push_pulls()
    state = codec.decode_state(pp.data, 4096)
    assert state.table_hash is None and len(state.entries) == 4


def test_a_seed_whose_answer_is_awaited_is_not_asked_again() -> None:
    """A swarm starting at once makes its seed slow: retrying while the first
    exchange is in flight would pile exchanges on it and slow every join."""
    a = addr_of(1)
    core = Swim(SelfInfo(node_id_of(1), 0, "n1", a[1], 8001, host=a[0]), Params.lan(),
                random.Random(1), 0.0)
    seed = addr_of(2)
    core.start(0.0, [seed])
    assert [pp.addr for pp in core.take_push_pulls()] == [seed]
    p = core.params
    now = 0.0
    sent = 0
    while now < p.push_pull_timeout - 0.5:  # every JOIN retry while it is in flight
        now += 0.25
        core.handle_timer(Timer(TimerKind.JOIN), now)
        sent += len(core.take_push_pulls())
    assert sent == 0 and core.stats["join_in_flight"] > 0
    core.push_pull_failed(seed, now)  # the answer never came: the next retry asks again
    for _ in range(200):
        now += 0.25
        core.handle_timer(Timer(TimerKind.JOIN), now)
        if core.take_push_pulls():
            break
    else:
        raise AssertionError("never retried")
    # a shell that never reports: asked again once push_pull_timeout has passed
    later = now + p.push_pull_timeout + p.join_retry_max
    core.handle_timer(Timer(TimerKind.JOIN), later)
    assert [pp.addr for pp in core.take_push_pulls()] == [seed]


def test_datagrams_received_are_counted_by_type() -> None:
    net = swarm(seed=13)
    net.kill(4)  # indirect probes and nacks too
    net.run(10)
    net.core(5).leave(net.now)
    net._drain(addr_of(5))
    net.run(1)
    names = {codec.PING: "pings_in", codec.ACK: "acks_in", codec.PING_REQ: "ping_reqs_in",
             codec.NACK: "nacks_in", codec.GOSSIP: "gossip_in", codec.LEAVE2: "leaves_in"}
    delivered = {t: 0 for t in names}
    for s in net.sent:
        if s.dst == addr_of(1):
            delivered[s.data[1]] += 1
    stats = net.core(1).stats
    for t, name in names.items():
        # everything sent to 1 was delivered except what is still in flight
        assert delivered[t] - 3 <= stats[name] <= delivered[t], (name, stats[name], delivered[t])
    assert all(stats[n] > 0 for n in ("pings_in", "acks_in", "gossip_in", "leaves_in"))


def test_periodic_push_pull_goes_to_the_members_sync_port() -> None:
    """A member that serves sync (and so push-pull) on its own TCP port is
    reached there: the core names the port, the shell does not look it up."""
    net = Net(seed=3, params=Params.lan())
    net.add(1, sync_port=9001)
    net.add(2, seeds=[1])
    net.run_until(lambda: net.converged([1, 2]), timeout=30)
    net.push_pulls.clear()
    net.run_until(lambda: any(a == addr_of(2) for a, _ in net.push_pulls), timeout=120)
    periodic = [pp for a, pp in net.push_pulls if a == addr_of(2)]
    assert periodic and all(pp.addr == addr_of(1) and pp.tcp_port == 9001 for pp in periodic)


def test_a_first_join_asks_one_seed_then_the_next_when_it_fails() -> None:
    """Every seed answers a join with its whole table: asking all k at once
    costs a swarm (re)starting together k * N^2 entries, of which one table
    per joiner is used. One random seed first; the next only on failure."""
    a = addr_of(1)
    core = Swim(SelfInfo(node_id_of(1), 0, "n1", a[1], 8001, host=a[0]), Params.lan(),
                random.Random(1), 0.0)
    seeds = [addr_of(2), addr_of(3), addr_of(4)]
    core.start(0.0, seeds)
    (first,) = [pp.addr for pp in core.take_push_pulls()]
    assert first in seeds
    core.push_pull_failed(first, 0.01)
    (second,) = [pp.addr for pp in core.take_push_pulls()]
    assert second in seeds and second != first
    core.push_pull_failed(second, 0.02)
    (third,) = [pp.addr for pp in core.take_push_pulls()]
    assert {first, second, third} == set(seeds)
    core.push_pull_failed(third, 0.03)
    assert core.take_push_pulls() == []  # every seed tried: the JOIN timer retries
    core.handle_timer(Timer(TimerKind.JOIN), core.params.join_retry + 0.01)
    assert sorted(pp.addr for pp in core.take_push_pulls()) == sorted(seeds)


def test_seed_retries_once_joined_open_with_a_summary() -> None:
    """While a partition lasts every member retries the seeds on the other
    side: a whole table per retry would cost O(N) for a connect that fails."""
    net = swarm(seed=2)
    core = net.core(2)
    far = addr_of(99)
    core.join([far], net.now)
    core.take_push_pulls()
    core.push_pull_failed(far, net.now)
    now = net.now + core.params.join_retry_max + 1
    core.handle_timer(Timer(TimerKind.JOIN), now)
    pps = [pp for pp in core.take_push_pulls() if pp.addr == far]
    assert pps
    state = codec.decode_state(pps[0].data, 4096)
    assert state.table_hash is not None and len(state.entries) == 1
