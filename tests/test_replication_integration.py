"""Change-log streaming between real agent processes: a leader and three
followers that share no gossip peers (so streaming is the only way data
reaches them), a follower killed mid-stream resuming from its persisted
position, a follower turning Edge when its leader stops, a follower behind
compaction getting a snapshot (resumed after a kill), and a tampered entry
turning into a snapshot."""

from __future__ import annotations

import base64
import os
import re
import sqlite3
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.core import changelog
from agent.store.schema import DB_FILE
from tests import storehelp
from tests.agents import AgentProc, Swarm, wait_for

pytestmark = pytest.mark.integration

COLL = "sensors"


def status(a: AgentProc) -> dict[str, Any]:
    return a.get("/api/cluster/status")  # type: ignore[no-any-return]


def write_batches(leader: AgentProc, start: int, n: int, per: int = 1000) -> None:
    for base in range(start, start + n, per):
        items = {f"k{i:06d}": {"i": i, "pad": "x" * 20} for i in range(base, base + per)}
        code, body = leader.request("POST", f"/api/collections/{COLL}/items", {"items": items})
        assert code == 200 and body["written"] == per, body


def all_items(a: AgentProc) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    after = ""
    while True:
        page = a.get(f"/api/collections/{COLL}/items?limit=1000&after={after}")
        out += [(i["key"], i["value"], i.get("hlc", i.get("version"))) for i in page["items"]]
        if page["next_after"] is None:
            return out
        after = page["next_after"]


def roots(a: AgentProc) -> dict[str, Any]:
    return {c["name"]: c["state_hash"] for c in a.get("/api/collections")}


def metric(a: AgentProc, name: str) -> float:
    with urllib.request.urlopen(a.api + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M)
    assert m is not None, name
    return float(m.group(1))


def caught_up(leader: AgentProc, followers: list[AgentProc]) -> bool:
    head = status(leader)["applied_seq"]
    return all(status(f)["applied_seq"] == head for f in followers)


def test_three_followers_stream_10000_writes_and_one_resumes_after_kill(swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader")
    # No gossip peers: nothing but the stream brings them the leader's data.
    followers = [swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr) for _ in range(3)]
    wait_for(lambda: all(status(f)["role"] == "Follower" for f in followers), timeout=20,
             what="three followers streaming")
    assert status(leader)["role"] == "Leader"
    write_batches(leader, 0, 10_000)
    assert status(leader)["applied_seq"] == 10_000
    wait_for(lambda: caught_up(leader, followers), timeout=60, what="followers at the head")

    want = all_items(leader)
    assert len(want) == 10_000
    for f in followers:
        assert roots(f) == roots(leader)
        assert all_items(f) == want
        assert metric(f, "hs_gossip_replication_entries_applied") == 10_000
    assert len(status(leader)["downstream_peers"]) == 3
    wait_for(lambda: all(d["lag"] == 0 for d in status(leader)["downstream_peers"]),
             timeout=10, what="every follower acknowledged the head")
    assert all(d["acked"]["seq"] == 10_000 for d in status(leader)["downstream_peers"])
    assert metric(leader, "hs_gossip_replication_entries_streamed") == 30_000

    # Kill one follower mid-stream, then restart it: it resumes from the
    # position it persisted with the data, not from zero.
    victim = followers[0]
    write_batches(leader, 10_000, 3_000)
    wait_for(lambda: status(victim)["applied_seq"] > 10_000, timeout=30,
             what="the victim streaming the new writes")
    write_batches(leader, 13_000, 3_000)
    victim.kill()
    victim.start()
    resumed = wait_for(
        lambda: [d for d in status(leader)["downstream_peers"] if d["start_seq"] > 0
                 and d["node_id"] == victim.node_id],
        timeout=20, what="the restarted follower back on the leader")
    assert resumed[0]["start_seq"] >= 10_000  # its HELLO named its persisted position
    wait_for(lambda: caught_up(leader, followers), timeout=60, what="all at the head again")
    # after the restart it applied only what it lacked
    assert metric(victim, "hs_gossip_replication_entries_applied") == \
        16_000 - resumed[0]["start_seq"] < 16_000
    want = all_items(leader)
    assert len(want) == 16_000
    for f in followers:
        assert roots(f) == roots(leader)
        assert all_items(f) == want


def test_a_follower_whose_leader_stops_turns_edge_and_accepts_writes(swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader")
    follower = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    wait_for(lambda: status(follower)["role"] == "Follower", timeout=20, what="streaming")
    st = status(follower)
    assert st["upstream_peer"] == leader.gossip_addr
    assert leader.request("PUT", f"/api/collections/{COLL}/items/a", {"value": 1})[0] == 200
    wait_for(lambda: follower.request("GET", f"/api/collections/{COLL}/items/a")[0] == 200,
             timeout=10, what="a streamed write")
    leader.kill()
    # 3 x interval (0.2 s) + the 5 s connect timeout without an answer
    wait_for(lambda: status(follower)["role"] == "Edge", timeout=15, what="role Edge")
    assert follower.request("PUT", f"/api/collections/{COLL}/items/b", {"value": 2})[0] == 200
    assert follower.get(f"/api/collections/{COLL}/items/b")["value"] == 2
    assert metric(follower, "hs_gossip_replication_entries_applied") == 1


def test_streams_are_keyed_when_the_swarm_has_a_key(tmp_path: Path) -> None:
    """With a cluster key the stream runs the PSK handshake: a keyed follower
    streams, a follower with another key never gets a frame."""
    key = base64.b64encode(os.urandom(32)).decode()
    swarm = Swarm(tmp_path, HS_GOSSIP_KEY=key)
    try:
        leader = swarm.add(HS_GOSSIP_ROLE="leader")
        # a gossip member too: the leader names it by its membership entry
        follower = swarm.add(seeds=[leader], HS_GOSSIP_COORDINATOR=leader.gossip_addr)
        stranger = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr,
                             HS_GOSSIP_KEY=base64.b64encode(os.urandom(32)).decode())
        write_batches(leader, 0, 100, per=100)
        wait_for(lambda: caught_up(leader, [follower]), timeout=20, what="keyed streaming")
        assert status(follower)["role"] == "Follower"
        st = status(leader)
        [down] = st["downstream_peers"]
        assert down["node_id"] == follower.node_id
        host, port = down["addr"].rsplit(":", 1)  # the stream's source: host:port
        assert host.startswith("127.") and int(port) > 0
        assert st["sync_handshake_failures"]  # the stranger's attempts, refused
        wait_for(lambda: [(d["gossip_addr"], d["name"]) for d in
                          status(leader)["downstream_peers"]] == [(follower.gossip_addr,
                                                                   follower.name)],
                 timeout=15, what="the follower named by its membership entry")
        assert status(stranger)["role"] == "Edge" and status(stranger)["applied_seq"] == 0
    finally:
        swarm.stop_all()


def _compacted(a: AgentProc) -> bool:
    return bool(storehelp.query(a.data_dir, "SELECT v FROM meta WHERE k='log_floor'"))


def write_padded(leader: AgentProc, n: int, pad: int = 1000) -> None:
    for base in range(0, n, 500):
        items = {f"k{i:06d}": {"i": i, "pad": "x" * pad} for i in range(base, base + 500)}
        code, body = leader.request("POST", f"/api/collections/{COLL}/items", {"items": items})
        assert code == 200, body


def test_a_follower_behind_compaction_gets_a_snapshot_and_resumes_it_after_a_kill(
        swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader", HS_GOSSIP_LOG_RETAIN="100")
    write_padded(leader, 10_000)  # ~40 chunks of 256 KiB
    wait_for(lambda: _compacted(leader), timeout=20, what="the leader's log compacted")
    follower = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    # killed mid-snapshot: the chunks it kept are recorded with their items
    wait_for(lambda: status(follower)["replication"].get("snapshot_chunks", 0) >= 3,
             timeout=20, interval=0.01, what="the first chunks of the snapshot")
    follower.kill()
    kept = storehelp.query(follower.data_dir, "SELECT count(*) FROM items")[0][0]
    assert 0 < kept < 10_000
    assert storehelp.query(follower.data_dir, "SELECT count(*) FROM snapshot_progress") == [(1,)]
    follower.start()
    wait_for(lambda: caught_up(leader, [follower]), timeout=60, what="the snapshot resumed")
    st = status(follower)["replication"]
    assert st["snapshots_resumed"] == 1 and st["snapshots_installed"] == 1
    assert "snapshots" not in st  # no new snapshot from the start
    assert st["snapshot_items"] <= 10_000 - kept + 256  # only the rest was sent
    assert metric(follower, "hs_gossip_replication_snapshots") == 1
    assert metric(leader, "hs_gossip_replication_snapshots") == 2  # the first and the rest
    assert storehelp.query(follower.data_dir, "SELECT count(*) FROM snapshot_progress") == [(0,)]
    # then it streams from the snapshot's position
    write_batches(leader, 20_000, 100, per=100)
    wait_for(lambda: caught_up(leader, [follower]), timeout=20, what="streaming after it")
    assert roots(follower) == roots(leader)
    assert all_items(follower) == all_items(leader)


def test_a_tampered_entry_is_refused_and_turns_into_a_snapshot(swarm: Swarm) -> None:
    leader = swarm.add(HS_GOSSIP_ROLE="leader")
    follower = swarm.add(HS_GOSSIP_COORDINATOR=leader.gossip_addr)
    write_batches(leader, 0, 100, per=100)
    wait_for(lambda: caught_up(leader, [follower]), timeout=20, what="streaming")
    follower.kill()
    write_batches(leader, 100, 200, per=100)
    # Alter one entry of the leader's log the follower has not had yet (its
    # own canonical encoding, another value): the chain breaks after it. The
    # leader is restarted so that it reads the entry from its file (a running
    # leader streams its newest commits from memory).
    leader.kill()
    [(data,)] = storehelp.query(leader.data_dir, "SELECT entry FROM log WHERE seq=150")
    e = changelog.decode(bytes(data))
    forged = changelog.encode(e.epoch, e.seq, e.prev_hash, e.origin, e.hlc, e.collection,
                              e.key, e.op, msgpack.packb("forged"))
    with closing(sqlite3.connect(leader.data_dir / DB_FILE, timeout=10)) as db:
        db.execute("UPDATE log SET entry=? WHERE seq=150", (forged,))
        db.commit()
    leader.start()
    follower.start()
    wait_for(lambda: caught_up(leader, [follower]), timeout=30, what="caught up after it")
    assert metric(follower, "hs_gossip_replication_chain_refused") == 1
    assert metric(follower, "hs_gossip_replication_snapshots") == 1
    assert metric(follower, "hs_gossip_replication_snapshots_installed") == 1
    assert metric(leader, "hs_gossip_replication_snapshots") == 1
    assert "refused a batch" in follower.log()
    assert all_items(follower) == all_items(leader) and roots(follower) == roots(leader)
    assert follower.get(f"/api/collections/{COLL}/items/k000149")["value"] != "forged"
