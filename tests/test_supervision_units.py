"""sd_notify, the peer snapshot, SIGHUP settings and the discovery beacon,
each on its own, without an agent."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from agent.config import ConfigError, load_reloadable
from agent.net import discovery
from agent.runtime import snapshot
from agent.runtime.sdnotify import Notifier
from agent.runtime.supervision import tick_is_recent


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
