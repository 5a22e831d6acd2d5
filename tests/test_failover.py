"""Automatic failover through a real etcd on loopback (skipped, saying why,
where the ``etcd`` binary is absent): two candidates and a follower; the
leader is killed while writes go on, the other candidate takes over within
the lease TTL + 1 s, the follower switches to it, and once the old leader is
back every acknowledged write is on every agent. Also the configuration
rules of HS_GOSSIP_ROLE=candidate."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, check_replication, load
from tests.agents import AgentProc, Swarm, wait_for
from tests.test_etcd_election import etcd

__all__ = ["etcd"]  # the fixture, shared with the election tests

COLL = "orders"
TTL = 2


@pytest.mark.parametrize(("env", "ok"), [
    ({"HS_GOSSIP_ROLE": "candidate", "HS_GOSSIP_ETCD": "http://127.0.0.1:2379"}, True),
    ({"HS_GOSSIP_ETCD": "http://127.0.0.1:2379"}, True),
    ({"HS_GOSSIP_ROLE": "candidate"}, False),  # nothing to campaign in
    ({"HS_GOSSIP_ROLE": "leader", "HS_GOSSIP_ETCD": "http://127.0.0.1:2379"}, False),
    ({"HS_GOSSIP_COORDINATOR": "10.0.0.2:7946", "HS_GOSSIP_ETCD": "http://127.0.0.1:2379"},
     False),
])
def test_candidate_configuration(env: dict[str, str], ok: bool) -> None:
    if ok:
        check_replication(load(environ=env)[0])
    else:
        with pytest.raises(ConfigError):
            load(environ=env)


def status(a: AgentProc) -> dict[str, Any]:
    return a.get("/api/cluster/status")  # type: ignore[no-any-return]


def role(a: AgentProc) -> str:
    try:
        return str(status(a)["role"])
    except (OSError, AssertionError):
        return "down"


def items(a: AgentProc) -> dict[str, Any]:
    page = a.get(f"/api/collections/{COLL}/items?limit=1000")
    return {i["key"]: i["value"] for i in page["items"]}


@pytest.mark.integration
def test_leader_killed_another_candidate_takes_over_and_nothing_acknowledged_is_lost(
        etcd: str, tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, HS_GOSSIP_ETCD=etcd, HS_GOSSIP_ETCD_TTL=str(TTL),
                  HS_GOSSIP_CLUSTER=f"failover-{uuid.uuid4().hex[:8]}")
    try:
        c1 = swarm.add(HS_GOSSIP_ROLE="candidate")
        wait_for(lambda: role(c1) == "Leader", timeout=20, what="the first candidate leading")
        c2 = swarm.add(HS_GOSSIP_ROLE="candidate")
        follower = swarm.add()  # no coordinator: it finds the leader in etcd
        wait_for(lambda: role(c2) == role(follower) == "Follower", timeout=20,
                 what="the others following")
        first = status(c1)
        assert first["epoch"] > 0
        assert status(follower)["upstream_peer"] == f"{c1.host}:{c1.gossip_port}"
        assert status(follower)["epoch"] == first["epoch"]

        acked: dict[str, int] = {}

        def write(a: AgentProc, key: str, value: int) -> bool:
            try:
                code, _ = a.request("PUT", f"/api/collections/{COLL}/items/{key}",
                                       {"value": value})
            except OSError:
                return False
            if code == 200:
                acked[key] = value
            return code == 200

        for i in range(20):
            assert write(c1, f"leader-{i}", i)
            assert write(follower, f"follower-{i}", i)  # forwarded to c1
        assert all(k in items(c1) for k in acked)

        # Writes go on through the follower while the leader dies: each is
        # either forwarded (to the old leader, then the new one) or kept
        # locally while no leader answers; every one acknowledged must survive.
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                write(follower, f"during-{i}", i)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            time.sleep(0.3)
            c1.kill()
            killed = time.monotonic()
            took_over = wait_for(lambda: role(c2) == "Leader" and time.monotonic(), timeout=20,
                                 interval=0.02, what="the other candidate leading")
            time.sleep(1.0)
        finally:
            stop.set()
            t.join()
        assert any(k.startswith("during-") for k in acked)
        assert took_over - killed < TTL + 1, f"took over after {took_over - killed:.2f}s"
        assert status(c2)["epoch"] > first["epoch"]
        wait_for(lambda: status(follower)["upstream_peer"] == f"{c2.host}:{c2.gossip_port}"
                 and role(follower) == "Follower", timeout=20,
                 what="the follower on the new leader")
        for i in range(20):
            assert write(follower, f"after-{i}", i)
            assert write(c2, f"new-leader-{i}", i)
        # The old leader comes back as a candidate: it follows the new one and
        # what only it had (acknowledged, not yet streamed) is merged back.
        c1.start()
        wait_for(lambda: role(c1) == "Follower", timeout=30, what="the old leader following")
        wait_for(lambda: items(c1) == items(c2) == items(follower) == acked, timeout=60,
                 what="every acknowledged write on every agent")
        assert role(c2) == "Leader"
    finally:
        swarm.stop_all()


@pytest.mark.integration
def test_clean_shutdown_resigns_at_once(etcd: str, tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, HS_GOSSIP_ETCD=etcd, HS_GOSSIP_ETCD_TTL="30",
                  HS_GOSSIP_CLUSTER=f"resign-{uuid.uuid4().hex[:8]}")
    try:
        c1 = swarm.add(HS_GOSSIP_ROLE="candidate")
        wait_for(lambda: role(c1) == "Leader", timeout=20, what="the first candidate leading")
        c2 = swarm.add(HS_GOSSIP_ROLE="candidate")
        wait_for(lambda: role(c2) == "Follower", timeout=20, what="the second following")
        assert c1.terminate() == 0
        stopped = time.monotonic()
        # Far sooner than the 30 s lease: the key was deleted on the way out.
        wait_for(lambda: role(c2) == "Leader", timeout=10, interval=0.05,
                 what="the second candidate leading")
        assert time.monotonic() - stopped < 10
    finally:
        swarm.stop_all()
