"""sd_notify, the watchdog loop, the agent's view, the peer snapshot, SIGHUP
settings and the discovery beacon, each on its own, without a running agent."""

from __future__ import annotations

import gc
import json
import os
import random
import socket
import time
import uuid
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import anyio
import pytest
import trio.testing

from agent.config import Config, ConfigError, load_reloadable
from agent.core.swim import ALIVE, DEAD, LEFT, SUSPECT, Member, Params, SelfInfo, Swim, codec
from agent.face import api, metrics
from agent.net import discovery
from agent.runtime import snapshot, supervision
from agent.runtime.agent import Agent
from agent.runtime.identity import Identity
from agent.runtime.sdnotify import Notifier
from agent.runtime.supervision import systemd_loop, tick_is_recent
from agent.runtime.view import AgentView, build_view, member_rows


def test_notifier_abstract_socket_and_watchdog_settings() -> None:
    name = f"hsg-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_s == 3.0
        assert n.notify("READY=1", "STATUS=ok")
        assert server.recv(100) == b"READY=1\nSTATUS=ok"
        n.close()
    finally:
        server.close()


def test_notifier_ignores_watchdog_meant_for_another_process() -> None:
    other = str(os.getpid() + 1)
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": other})
    assert n.watchdog_s is None
    # A socket that is gone must not raise: systemd restarting is not our crash.
    assert n.notify("WATCHDOG=1") is False


def test_notifier_disabled_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.notify("READY=1") is False


def test_tick_recent_uses_interval_grace() -> None:
    assert tick_is_recent(last_tick=10.0, now=12.9, interval=1.0)
    assert not tick_is_recent(last_tick=10.0, now=13.1, interval=1.0)
    # Very short intervals still get a second of grace.
    assert tick_is_recent(last_tick=10.0, now=10.9, interval=0.05)


def test_snapshot_round_trip_expiry_and_clock(tmp_path: Path) -> None:
    now = time.time()
    snapshot.save(tmp_path, [("aa", "10.0.0.1", 7946, now - 10),
                             ("bb", "10.0.0.2", 7946, now - 5000)], lc=42)
    fresh = snapshot.load(tmp_path, max_age=3600)
    assert fresh.peers == [("10.0.0.1", 7946)]
    assert fresh.lc == 42
    assert len(snapshot.load(tmp_path, max_age=86400).peers) == 2
    assert not (tmp_path / "peers.tmp").exists()


def test_snapshot_corrupt_or_missing_is_empty_not_fatal(tmp_path: Path) -> None:
    assert snapshot.load(tmp_path, 60).peers == []
    (tmp_path / "peers.json").write_text("{not json")
    assert snapshot.load(tmp_path, 60).peers == []
    (tmp_path / "peers.json").write_text(json.dumps({"peers": [{"host": 1}]}))
    assert snapshot.load(tmp_path, 60).peers == []


def test_reload_prefers_env_file_and_names_bad_variable(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("HS_GOSSIP_LOG_LEVEL=debug\nHS_GOSSIP_PORT=1\n")
    env = {"HS_GOSSIP_ENV_FILE": str(f), "HS_GOSSIP_LOG_LEVEL": "info",
           "HS_GOSSIP_LOG_FORMAT": "json"}
    assert load_reloadable(env) == {"log_level": "DEBUG", "log_format": "json"}
    f.write_text("HS_GOSSIP_LOG_FORMAT=xml\n")
    with pytest.raises(ConfigError, match="HS_GOSSIP_LOG_FORMAT"):
        load_reloadable(env)


def test_discovery_beacon_round_trip_and_rejects_noise() -> None:
    nid = bytes(range(16))
    assert discovery.decode(discovery.encode(7946, nid)) == (7946, nid)
    for junk in (b"", b"HSG1", b"HSG2" + bytes(18), discovery.encode(1, nid) + b"x"):
        assert discovery.decode(junk) is None


# --- the watchdog loop ----------------------------------------------------------


class RecordingNotifier(Notifier):
    def __init__(self, watchdog_s: float) -> None:
        super().__init__({})
        self.watchdog_s = watchdog_s
        self.sent: list[tuple[float, tuple[str, ...]]] = []

    def notify(self, *lines: str) -> bool:
        self.sent.append((anyio.current_time(), lines))
        return True


def test_watchdog_pings_from_the_start_and_stop_when_ticks_stop() -> None:
    """The agent has not ticked yet when the loop starts (last tick 0.0 on a
    monotonic clock far from 0): that is not a stall. A tick loop that then
    never ticks loses the pings after the grace of 3 intervals."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    n = RecordingNotifier(watchdog_s=3.0)  # pings every second

    async def main() -> None:
        clock.jump(10_000)
        start = anyio.current_time()
        with anyio.move_on_after(6.5):
            await systemd_loop(n, lambda: "ok", lambda: 0.0, interval=1.0)
        n.sent = [(t - start, lines) for t, lines in n.sent]

    anyio.run(main, backend="trio", backend_options={"clock": clock})
    pinged = [t for t, lines in n.sent if "WATCHDOG=1" in lines]
    assert pinged == [0.0, 1.0, 2.0, 3.0]


# --- the agent's view -------------------------------------------------------------


def member(i: int, status: int, since: float = 90.0) -> Member:
    nid = bytes([i]) * 16
    empty = codec.digest_hash(())
    return Member(nid, incarnation=1, status=status, host=f"10.0.0.{i}", port=7946,
                  http_port=50050, sync_port=7946, role=0, name=f"n{i}", lc=0, dhash=empty,
                  digests=(), app_healthy=None, status_since=since, last_alive=since)


def one_healthy_one_not(core: Swim) -> None:
    for i, status in ((1, ALIVE), (2, SUSPECT)):
        m = member(i, status)
        core.members[m.node_id] = m


def a_core() -> Swim:
    me = SelfInfo(node_id=bytes(16), incarnation=3, name="me", port=7946, http_port=50050)
    core = Swim(me, Params(), random.Random(1), now=100.0)
    one_healthy_one_not(core)
    return core


def test_view_is_a_frozen_snapshot() -> None:
    core = a_core()
    v = build_view(core, started_wall=1000.0, wall_now=1010.0, mono_now=100.0)
    with pytest.raises(FrozenInstanceError):
        v.healthy_peers = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        v.peers[1].healthy = True  # type: ignore[misc]
    assert isinstance(v.peers, tuple) and isinstance(v.counters, tuple)
    # What happens to the agent afterwards does not show in a view taken before.
    core.members[bytes([2]) * 16].status = ALIVE
    del core.members[bytes([1]) * 16]
    core.stats["probes"] += 1
    assert (v.peer_count, v.healthy_peers) == (2, 1)
    assert [p.healthy for p in v.peers] == [True, False]
    assert v.counters == ()
    # Last seen: monotonic 90 is 10 s before monotonic 100, i.e. wall 1010.
    assert v.peers[0].last_seen_secs == 1000 and v.uptime == 10.0


def test_peers_list_alive_suspect_and_dead_members_not_left_ones() -> None:
    """/api/swarm/peers: healthy only while ALIVE; a member that left is gone
    at once; suspect and dead ones stay listed, unhealthy, until dropped."""
    core = a_core()
    for m in (member(3, DEAD), member(4, LEFT)):
        core.members[m.node_id] = m
    v = build_view(core, started_wall=0.0, wall_now=0.0, mono_now=100.0)
    assert [(p.name, p.healthy) for p in v.peers] == [
        ("n1", True), ("n2", False), ("n3", False)]
    assert (v.peer_count, v.healthy_peers) == (3, 1)


def test_members_list_everyone_in_their_status_ourselves_first() -> None:
    """/api/swarm/members and `hs-gossip members`, as `serf members` does:
    every member including this agent and those that left, with status,
    address, incarnation, role and how long it has been in that status."""
    core = a_core()
    for m in (member(3, DEAD, since=70.0), member(4, LEFT, since=95.0)):
        core.members[m.node_id] = m
    rows = member_rows(core, 100.0, self_host="10.0.0.9", http_port=50050, uptime=42.0)
    assert [(r.name, r.status, r.addr, r.age_secs, r.is_self) for r in rows] == [
        ("me", "alive", "10.0.0.9:7946", 42.0, True),
        ("n1", "alive", "10.0.0.1:7946", 10.0, False),
        ("n2", "suspect", "10.0.0.2:7946", 10.0, False),
        ("n3", "dead", "10.0.0.3:7946", 30.0, False),
        ("n4", "left", "10.0.0.4:7946", 5.0, False),
    ]
    assert (rows[0].incarnation, rows[1].incarnation, rows[1].role) == (3, 1, "Edge")
    core.leave(100.0)
    assert member_rows(core, 100.0, self_host="10.0.0.9", http_port=50050,
                       uptime=42.0)[0].status == "left"


def test_peers_json_keeps_its_shape() -> None:
    v = build_view(a_core(), started_wall=1000.0, wall_now=1010.0, mono_now=100.0)
    assert json.dumps(api.peers_json(v)["peers"][1], separators=(",", ":")) == (
        '{"node_id":"02020202-0202-0202-0202-020202020202","name":"n2",'
        '"addr":"10.0.0.2:50050","gossip_addr":"10.0.0.2:7946","http_port":50050,'
        '"role":"Edge","incarnation":1,"logical_clock":0,"collections":[],'
        '"last_seen_secs":1000,"healthy":false,"app_healthy":null}')


def healthy_as_shown(v: AgentView) -> tuple[int, float, float, str]:
    """The healthy-peer figure as the API, the metrics and systemd show it."""
    gauge = {s.labels["state"]: s.value
             for fam in metrics.collect(v) if fam.name == "hs_gossip_peers"
             for s in fam.samples}
    return (api.cluster_status_json(v)["healthy_peers"], gauge["healthy"], gauge["unhealthy"],
            v.status_line)


def test_api_metrics_and_status_line_read_the_one_healthy_count() -> None:
    v = build_view(a_core(), started_wall=0.0, wall_now=0.0, mono_now=0.0)
    assert healthy_as_shown(v) == (1, 1, 1, "2 peers (1 healthy), 0 collections, role Edge")
    # None of them counts again: a view that says otherwise is what they show.
    forged = replace(v, healthy_peers=2)
    assert healthy_as_shown(forged) == (2, 2, 0, "2 peers, 0 collections, role Edge")


def test_agent_status_line_is_read_from_its_view() -> None:
    agent = Agent(Config(), Identity(uuid.UUID(int=7), 1))
    one_healthy_one_not(agent.core)

    async def main() -> tuple[AgentView, str]:
        return agent.view(), agent.status_line()

    v, line = anyio.run(main, backend="trio")
    assert (v.peer_count, v.healthy_peers) == (2, 1)
    assert line == v.status_line == "2 peers (1 healthy), 0 collections, role Edge"


def test_taken_api_port_is_a_startup_error_not_a_traceback(tmp_path: Path) -> None:
    from agent.config import HostPort
    from agent.runtime.errors import StartupError
    from agent.store import Store

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cfg = Config(api=HostPort("127.0.0.1", taken.getsockname()[1]))
    view = build_view(a_core(), started_wall=0.0, wall_now=0.0, mono_now=0.0)

    async def main() -> None:
        store = await Store.open(tmp_path, bytes(16), cfg.max_value, cfg.max_skew)
        try:
            await api.serve_api(cfg, lambda: view, store, anyio.sleep_forever,
                                task_status=anyio.TASK_STATUS_IGNORED)
        finally:
            await store.close()

    try:
        with pytest.raises(StartupError, match=r"cannot bind HTTP API 127\.0\.0\.1:"):
            anyio.run(main, backend="trio")
    finally:
        taken.close()


def test_start_up_is_frozen_and_young_objects_are_collected_less_often() -> None:
    """Once started, the agent's start-up objects are out of the collector's
    way and a batch's objects are not walked every 700 allocations."""
    before = gc.get_threshold()
    try:
        supervision.freeze_startup()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (supervision.GC_YOUNG, *before[1:])
        assert supervision.GC_YOUNG > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
