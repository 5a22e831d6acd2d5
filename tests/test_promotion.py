"""Promotion and fencing between real agent processes: a follower promoted
while its leader is frozen, the old leader's late answer refused for its
lower epoch, the old leader stepping down and its unreplicated write reaching
the new leader; promotion refused without --force while a reachable follower
is further in the leader's log."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.agents import AgentProc, Swarm, run_cli, wait_for
from tests.test_replication_integration import COLL, caught_up, metric, status

pytestmark = pytest.mark.integration


def item(a: AgentProc, key: str) -> Any:
    code, body = a.request("GET", f"/api/collections/{COLL}/items/{key}")
    return body["value"] if code == 200 else None


def put(a: AgentProc, key: str, value: Any) -> None:
    code, body = a.request("PUT", f"/api/collections/{COLL}/items/{key}", {"value": value})
    assert code == 200, body


def test_promotion_fences_the_old_leader_which_steps_down_and_merges(swarm: Swarm) -> None:
    a = swarm.add(HS_GOSSIP_ROLE="leader")
    # B and C are a swarm of their own; A is only their coordinator, so
    # nothing but A's stepping down can bring A's own writes to B.
    b = swarm.add(HS_GOSSIP_COORDINATOR=a.gossip_addr)
    c = swarm.add([b], HS_GOSSIP_COORDINATOR=a.gossip_addr)
    put(a, "w1", 1)
    wait_for(lambda: caught_up(a, [b, c]), timeout=20, what="B and C streaming from A")
    wait_for(lambda: len(b.peers()) == 1, timeout=20, what="B and C in one swarm")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)  # the old leader, cut off
    try:
        code, body = b.request("POST", "/api/cluster/promote")
        assert code == 200 and body == {"role": "Leader", "epoch": 2}, body
        assert status(b)["role"] == "Leader" and status(b)["epoch"] == 2
        # B announced itself to its swarm: C follows B at epoch 2
        wait_for(lambda: status(c)["upstream_peer"] == b.gossip_addr
                 and status(c)["epoch"] == 2, timeout=20, what="C following B")
        put(b, "w3", 3)
        wait_for(lambda: item(c, "w3") == 3, timeout=20, what="B's write on C")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # A comes back believing it leads epoch 1 and takes a write nobody has.
    assert status(a)["role"] == "Leader" and status(a)["epoch"] == 1
    put(a, "w2", 2)
    # C restarts with A as its configured coordinator: A's epoch-1 answer is
    # refused (C persisted epoch 2 and B as its leader), C goes back to B,
    # and A hears epoch 2 in C's HELLO and steps down to follow B.
    c.kill()
    c.start()
    wait_for(lambda: status(a)["role"] in ("Follower", "Edge")
             and status(a)["upstream_peer"] == b.gossip_addr, timeout=20,
             what="A stepped down to follow B")
    assert metric(c, "hs_gossip_replication_epoch_refused") >= 1
    assert metric(a, "hs_gossip_replication_stepped_down") == 1
    assert "refused a Diverged answer of epoch 1" in c.log()
    wait_for(lambda: status(c)["upstream_peer"] == b.gossip_addr
             and status(c)["role"] == "Follower", timeout=20, what="C back on B")
    # A's unreplicated write survives: merged into B (last writer wins)
    wait_for(lambda: item(b, "w2") == 2, timeout=30, what="A's write on B")
    wait_for(lambda: item(a, "w3") == 3 and item(c, "w2") == 2, timeout=30,
             what="everyone has everything")
    assert status(a)["epoch"] == 2 and status(b)["epoch"] == 2
    assert metric(b, "hs_gossip_replication_promotions") == 1


def test_promotion_without_force_is_refused_when_another_follower_is_further(
        swarm: Swarm) -> None:
    a = swarm.add(HS_GOSSIP_ROLE="leader")
    c = swarm.add(HS_GOSSIP_COORDINATOR=a.gossip_addr)
    b = swarm.add([c], HS_GOSSIP_COORDINATOR=a.gossip_addr)
    put(a, "w1", 1)
    wait_for(lambda: caught_up(a, [b, c]), timeout=20, what="streaming")
    b.kill()
    for i in range(20):
        put(a, f"late{i}", i)
    wait_for(lambda: caught_up(a, [c]), timeout=20, what="C at the head")
    a.kill()
    b.start()  # B is behind C in A's log, and A is gone
    wait_for(lambda: c.node_id in b.peers(), timeout=20, what="B reaching C")
    code, body = b.request("POST", "/api/cluster/promote")
    assert code == 409, body
    assert c.gossip_addr in body["error"] and "further" in body["error"], body
    assert metric(b, "hs_gossip_replication_promotions_refused") == 1
    api = ["--api", b.api.removeprefix("http://")]
    refused = run_cli("promote", *api)
    assert refused.returncode == 1 and "further" in refused.stderr, refused
    assert "--force" in refused.stderr
    forced = run_cli("promote", "--force", *api)
    assert forced.returncode == 0 and "leader at epoch 2" in forced.stdout, forced
    assert status(b)["role"] == "Leader"
    code, body = b.request("POST", "/api/cluster/promote")
    assert code == 409 and "already the leader" in body["error"]
