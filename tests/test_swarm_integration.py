"""Five real agents on loopback, through the CLI and the HTTP API."""

from __future__ import annotations

import time

import pytest

from tests.agents import AgentProc, Swarm, run_cli, wait_for

pytestmark = pytest.mark.integration


def all_see_each_other(agents: list, healthy: bool = True) -> bool:
    ids = {a.node_id for a in agents}
    for a in agents:
        peers = a.peers()
        if set(peers) != ids - {a.node_id}:
            return False
        if healthy and not all(p["healthy"] for p in peers.values()):
            return False
    return True


def test_five_agents_find_each_other_lose_and_regain_members(swarm: Swarm) -> None:
    swarm.env["HS_GOSSIP_TTL"] = "4"
    seed = swarm.add()
    agents = [seed] + [swarm.add(seeds=[seed]) for _ in range(4)]
    wait_for(lambda: all_see_each_other(agents), timeout=10, what="full membership")

    # The peers API has the documented shape.
    body = agents[1].get("/api/swarm/peers")
    assert body["gossip_enabled"] is True and body["peer_count"] == 4
    p = next(p for p in body["peers"] if p["node_id"] == seed.node_id)
    assert p["name"] == "agent0"  # heard directly: agent1 was seeded with it
    assert p["addr"] == f"{seed.host}:{seed.api_port}"
    assert p["http_port"] == seed.api_port and p["role"] == "Edge"
    assert isinstance(p["logical_clock"], int) and 0 < p["logical_clock"] < 2**53
    assert p["collections"] == [] or all(
        {"name", "state_hash", "vector_count"} <= set(c) for c in p["collections"])
    assert abs(p["last_seen_secs"] - time.time()) < 5 and p["healthy"] is True
    status = agents[2].get("/api/cluster/status")
    assert {"node_id", "role", "upstream_peer", "downstream_peers", "logical_clock"} <= set(status)
    assert status["role"] == "Edge"

    # SIGKILL. The documented timing of the membership protocol (interval
    # 0.2 s, HS_GOSSIP_TTL 4 s, 5 members):
    # * suspected (healthy false) once a probe of it goes unanswered: each
    #   member probes every other one within two rounds of 4 probes, one per
    #   interval, and gossips the suspicion: every agent within ~2 s;
    # * declared dead (failed) when the suspicion runs out: not before its
    #   minimum (max(2 s, 5 x log10(5) x 0.2 s) = 2 s), and before TTL passes
    #   without a sign of life (the suspicion is cut to TTL - interval);
    # * listed, unhealthy, until dropped TTL after its last sign of life
    #   (each member heard from it at most two probe rounds before the kill).
    ttl, suspicion_min = 4.0, 2.0
    victim = agents[3]
    rest = [a for a in agents if a is not victim]

    def status(a: AgentProc) -> str | None:
        return next((m["status"] for m in a.get("/api/swarm/members")["members"]
                     if m["node_id"] == victim.node_id), None)

    t0 = time.monotonic()
    victim.kill()
    wait_for(lambda: all(a.peers()[victim.node_id]["healthy"] is False for a in rest),
             timeout=3, what="killed agent marked unhealthy")
    wait_for(lambda: any(status(a) == "dead" for a in rest), timeout=ttl + 1,
             what="killed agent declared dead")
    assert time.monotonic() - t0 >= suspicion_min
    wait_for(lambda: all(victim.node_id not in a.peers() for a in rest),
             timeout=t0 + ttl + 3 - time.monotonic(),
             what="killed agent dropped after TTL")
    assert time.monotonic() - t0 >= ttl - 2 * 4 * 0.2

    # SIGTERM: it says goodbye; peers drop it at once, long before the TTL.
    leaver = agents[4]
    leaver_status = leaver.get("/api/cluster/status")
    assert leaver.terminate() == 0
    t0 = time.monotonic()
    wait_for(lambda: all(leaver.node_id not in a.peers() for a in rest[:3]), timeout=3,
             what="leave seen")
    assert time.monotonic() - t0 < 2

    # Restart: it comes back, once, with the same node_id and a higher incarnation.
    old_inc = leaver_status["incarnation"]
    leaver.start()
    new = leaver.get("/api/cluster/status")
    assert new["node_id"] == leaver_status["node_id"] and new["incarnation"] > old_inc

    def back(a: AgentProc) -> bool:
        p = a.peers().get(leaver.node_id)
        return p is not None and p["incarnation"] == new["incarnation"]

    wait_for(lambda: all(back(a) for a in rest[:3]), timeout=10, what="restarted agent back")
    for a in rest[:3]:
        # The raw list, not a dict built from it: one record at the leaver's
        # address, the new incarnation, and nothing else grew.
        body = a.get("/api/swarm/peers")
        at_addr = [p for p in body["peers"] if p["gossip_addr"] == leaver.gossip_addr]
        assert [(p["node_id"], p["incarnation"]) for p in at_addr] == \
            [(leaver.node_id, new["incarnation"])]
        assert body["peer_count"] == len(body["peers"]) == 3


def test_a_refuted_suspicion_is_saved_and_a_restart_starts_above_it(swarm: Swarm) -> None:
    """A wrongly suspected agent raises its incarnation; peers then hold that
    number, so it must be on disk: a restart that went back to the number
    saved at start-up would not be taken for a restart by anyone."""
    import socket
    import uuid

    from agent.core.swim import codec
    from agent.runtime import identity

    a = swarm.add()
    b = swarm.add(seeds=[a])
    wait_for(lambda: all_see_each_other([a, b]), timeout=10, what="a and b see each other")
    inc = a.get("/api/cluster/status")["incarnation"]
    assert identity.read(a.data_dir) == identity.Identity(uuid.UUID(a.node_id), inc)

    # Someone reports a as suspect at its current incarnation: a gossip
    # datagram from a stranger (not a member: its card adds nothing) carries
    # the rumour.
    na, stranger = uuid.UUID(a.node_id).bytes, uuid.uuid4().bytes
    rumour = codec.Suspect(na, inc, stranger)
    datagram = codec.encode_packet(codec.Packet(
        codec.GOSSIP, codec.Card(stranger, 1, 0, codec.digest_hash(())), updates=(rumour,)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(datagram, (a.host, a.gossip_port))
    wait_for(lambda: a.get("/api/cluster/status")["incarnation"] == inc + 1,
             timeout=5, what="a to refute with a higher incarnation")
    wait_for(lambda: identity.read(a.data_dir).incarnation == inc + 1,  # type: ignore[union-attr]
             timeout=5, what="the raised incarnation saved")
    wait_for(lambda: b.peers()[a.node_id]["incarnation"] == inc + 1, timeout=5,
             what="b to hold the raised incarnation")

    assert a.terminate() == 0
    a.start()
    restarted = a.get("/api/cluster/status")["incarnation"]
    assert restarted == inc + 2  # above what peers last saw, not back at inc + 1
    wait_for(lambda: b.peers().get(a.node_id, {}).get("incarnation") == restarted,
             timeout=10, what="b to take the restarted a")
    assert a.peers()[b.node_id]["healthy"] and b.peers()[a.node_id]["healthy"]
    assert b.node_id not in {m["node_id"] for m in a.get("/api/swarm/members")["members"]
                             if m["status"] != "alive"}


def test_cli_peers_and_status_read_the_local_api(swarm: Swarm) -> None:
    a = swarm.add()
    b = swarm.add(seeds=[a])
    wait_for(lambda: b.node_id in a.peers(), timeout=10, what="b known to a")
    env = {"HS_GOSSIP_API": f"127.0.0.1:{a.api_port}"}
    out = run_cli("peers", env=env)
    assert out.returncode == 0, out.stderr
    assert "agent1" in out.stdout and b.gossip_addr in out.stdout  # the gossip address
    out = run_cli("peers", "--json", "--api", f"127.0.0.1:{b.api_port}")
    assert out.returncode == 0 and '"peer_count": 1' in out.stdout
    out = run_cli("status", env=env)
    assert out.returncode == 0 and a.node_id in out.stdout


def test_cli_reports_an_unreachable_agent_in_one_line() -> None:
    out = run_cli("peers", "--api", "127.0.0.1:9")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "cannot reach the agent" in out.stderr


def test_dual_stack_socket_talks_to_ipv4_and_ipv6_peers(tmp_path) -> None:
    import socket as so

    from tests.agents import AgentProc, free_port

    if not so.has_ipv6:
        pytest.skip("IPv6 is not available on this machine")
    try:
        with so.socket(so.AF_INET6, so.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 loopback address")
    port = free_port(kind=so.SOCK_DGRAM)
    env = {"HS_GOSSIP_INTERVAL": "0.2"}
    hub = AgentProc("hub", "0.0.0.0", port, tmp_path / "hub", dict(env))
    v6 = AgentProc("v6", "::1", free_port(kind=so.SOCK_DGRAM), tmp_path / "v6",
                   {**env, "HS_GOSSIP_PEERS": f"[::1]:{port}"})
    v4 = AgentProc("v4", "127.0.0.1", free_port(kind=so.SOCK_DGRAM), tmp_path / "v4",
                   {**env, "HS_GOSSIP_PEERS": f"127.0.0.1:{port}"})
    agents = [hub, v6, v4]
    try:
        for a in agents:
            a.start()
        # v4 and v6 cannot reach each other directly; the dual-stack hub
        # spreads their news and answers their indirect probes of each other
        # (PING_REQ), so they still see each other healthy.
        wait_for(lambda: all_see_each_other(agents), timeout=10, what="mixed-family swarm")
        by_id = v4.peers()
        assert by_id[hub.node_id]["gossip_addr"] == f"127.0.0.1:{port}"
        assert by_id[v6.node_id]["gossip_addr"] == f"[::1]:{v6.gossip_port}"
        by_id = v6.peers()
        assert by_id[hub.node_id]["gossip_addr"] == f"[::1]:{port}"
        wait_for(lambda: v4.get("/api/swarm/stats")["counters"].get("send_family_unreachable"),
                 what="v4 counting sends it cannot make")
        for a in agents:
            assert a.proc is not None and a.proc.poll() is None
    finally:
        for a in agents:
            a.stop()
