"""Change-log streaming roles travel in gossip: every member lists each
agent as Leader, Follower or Edge in /api/swarm/peers, and sees it change."""

from __future__ import annotations

from tests.agents import Swarm, swarm, wait_for

__all__ = ["swarm"]


def _role_of(viewer_peers: dict[str, dict[str, object]], node_id: str) -> object:
    p = viewer_peers.get(node_id)
    return None if p is None else p.get("role")


def test_every_member_lists_the_streaming_roles_and_their_changes(swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader")
    follower = swarm.add([leader], HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    plain = swarm.add([leader])
    lid, fid = leader.node_id, follower.node_id
    wait_for(lambda: _role_of(plain.peers(), lid) == "Leader"
             and _role_of(plain.peers(), fid) == "Follower"
             and _role_of(leader.peers(), fid) == "Follower"
             and _role_of(follower.peers(), lid) == "Leader",
             timeout=20, what="Leader and Follower listed by every member")
    # The coordinator goes away: the follower turns Edge, and says so.
    leader.kill()
    wait_for(lambda: follower.get("/api/cluster/status")["role"] == "Edge",
             timeout=20, what="the follower to turn Edge")
    wait_for(lambda: _role_of(plain.peers(), fid) == "Edge",
             timeout=10, what="the plain agent to list the follower as Edge")
