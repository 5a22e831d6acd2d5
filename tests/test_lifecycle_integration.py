"""The agent under a supervisor: sd_notify over a real AF_UNIX socket, the
watchdog, graceful SIGTERM, SIGHUP reload, rejoin from saved peers, health
checks in heartbeats and /metrics, all with real agent processes."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import AgentProc, Swarm, wait_for

pytestmark = pytest.mark.integration


class NotifyListener:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def lines(self) -> list[str]:
        return [line for _, msg in list(self.messages) for line in msg]

    def times_of(self, line: str) -> list[float]:
        return [t for t, msg in list(self.messages) if line in msg]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be long.
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="hsg-")) / "n.sock"
    listener = NotifyListener(path)
    try:
        yield listener
    finally:
        listener.close()


def test_notify_ready_watchdog_status_stopping_in_order(
        swarm: Swarm, notify_socket: NotifyListener) -> None:
    seed = swarm.add()
    a = swarm.add([seed], NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="600000")
    # READY=1 means the API and the UDP socket are bound: the API answered
    # (start() polled it), and READY must have been the first message.
    wait_for(lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 3, timeout=10,
             what="three watchdog pings")
    first = notify_socket.messages[0][1]
    assert "READY=1" in first
    assert any(line.startswith("STATUS=") for line in first)
    wait_for(lambda: any(line.startswith("STATUS=1 peers") for line in notify_socket.lines()),
             timeout=10, what="STATUS line counting the seed")
    assert any("collections, role Edge" in line for line in notify_socket.lines())

    assert a.terminate() == 0
    stopping = notify_socket.times_of("STOPPING=1")
    assert len(stopping) == 1
    ready = notify_socket.times_of("READY=1")[0]
    pings = notify_socket.times_of("WATCHDOG=1")
    assert ready <= pings[0] and pings[-1] <= stopping[0]


def test_watchdog_pings_stop_when_gossip_loop_hangs(
        swarm: Swarm, notify_socket: NotifyListener) -> None:
    a = swarm.add(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="600000",
                  HS_GOSSIP_FAULT_STALL_TICK_AFTER="1.5")
    wait_for(lambda: notify_socket.times_of("WATCHDOG=1"), what="first watchdog ping")

    def silent_for_2s() -> bool:
        pings = notify_socket.times_of("WATCHDOG=1")
        return time.monotonic() - pings[-1] > 2.0

    wait_for(silent_for_2s, timeout=15, what="watchdog pings to stop")
    # The process is alive and its API answers: only the gossip loop is hung,
    # which is exactly what the watchdog must catch.
    assert a.proc is not None and a.proc.poll() is None
    assert a.get("/healthz")["status"] == "ok"
    assert "withholding the systemd watchdog ping" in a.log()
    # The variable reached the agent as its Faults (read once, by the run command).
    assert "fault injection: the gossip loop will hang after 1.5s" in a.log()


def test_sigterm_leaves_at_once_and_loses_no_acknowledged_write(swarm: Swarm) -> None:
    swarm.env["HS_GOSSIP_TTL"] = "120"  # disappearing must come from the LEAVE
    seed = swarm.add()
    b = swarm.add([seed])
    wait_for(lambda: b.node_id in seed.peers(), what="b joins")

    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            key = f"k{i:06d}"
            try:
                status, _ = b.request("PUT", f"/api/collections/c/items/{key}", {"value": i})
            except OSError:
                return  # the agent stopped listening
            if status == 200:
                acked.append(key)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    wait_for(lambda: len(acked) >= 50, what="some acknowledged writes")
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_for(lambda: b.node_id not in seed.peers(), timeout=5, what="seed to drop b")
    assert time.monotonic() - t0 < 5
    assert b.proc.wait(15) == 0
    stop.set()
    t.join(10)

    b.env.pop("HS_GOSSIP_PEERS", None)
    b.start()
    status, body = b.request("GET", "/api/collections")
    assert status == 200
    have = {c["name"]: c["vector_count"] for c in body}
    assert have.get("c", 0) >= len(acked)
    for key in (acked[0], acked[len(acked) // 2], acked[-1]):
        assert b.request("GET", f"/api/collections/c/items/{key}")[0] == 200


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_restart_rejoins_through_saved_peers_when_seeds_are_gone(swarm: Swarm,
                                                                  stop: str) -> None:
    seed = swarm.add()
    b = swarm.add([seed])
    c = swarm.add([seed])
    wait_for(lambda: b.node_id in c.peers() and c.node_id in b.peers(), what="full mesh")
    if stop == "sigterm":
        assert c.terminate() == 0  # saves its peers on the way out
    else:
        # A crash: only the periodic save (every 30 intervals) can have run.
        snap = c.data_dir / "peers.json"
        wait_for(lambda: b.host in snap.read_text(), timeout=20, what="periodic peer snapshot")
        c.kill()
    seed.kill()
    assert c.proc is not None
    c.start()  # still seeded only with the dead seed

    def rejoined() -> bool:
        peer = c.peers().get(b.node_id)
        back = b.peers().get(c.node_id)
        return bool(peer and peer["healthy"] and back and back["healthy"])

    wait_for(rejoined, timeout=15, what="c to rejoin b through its saved peers")
    assert "rejoin candidates from the peer snapshot" in c.log()


def test_sighup_reloads_log_level_and_refuses_bad_values(swarm: Swarm, tmp_path: Path) -> None:
    env_file = tmp_path / "agent.env"
    env_file.write_text("HS_GOSSIP_LOG_LEVEL=info\n")
    a = swarm.add(HS_GOSSIP_ENV_FILE=str(env_file), HS_GOSSIP_LOG_LEVEL="info")
    assert a.proc is not None
    env_file.write_text("HS_GOSSIP_LOG_LEVEL=warning\n")
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "log level warning" in a.log(), what="reload of the log level")
    env_file.write_text("HS_GOSSIP_LOG_LEVEL=loud\n")
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in a.log(), what="bad value refused")
    assert "HS_GOSSIP_LOG_LEVEL" in a.log().split("reload refused", 1)[1]
    assert a.proc.poll() is None
    assert a.get("/healthz")["status"] == "ok"


def test_application_health_travels_to_peers(swarm: Swarm, tmp_path: Path) -> None:
    flag = tmp_path / "app-ok"
    seed = swarm.add()
    b = swarm.add([seed], HS_GOSSIP_HEALTH_CMD=f"test -f {flag}",
                  HS_GOSSIP_HEALTH_INTERVAL="0.2")
    c = swarm.add([seed], HS_GOSSIP_HEALTH_URL=f"{seed.api}/healthz",
                  HS_GOSSIP_HEALTH_INTERVAL="0.2")

    def app_healthy(of: AgentProc) -> object:
        return seed.peers().get(of.node_id, {}).get("app_healthy", "absent")

    wait_for(lambda: app_healthy(b) is False, what="b's failing application")
    wait_for(lambda: app_healthy(c) is True, what="c's healthy application")
    flag.touch()
    wait_for(lambda: app_healthy(b) is True, what="b's application recovering")
    # An agent without a health check reports null, not a guess.
    assert b.peers()[seed.node_id]["app_healthy"] is None


def _metrics(a: AgentProc) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(a.api + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_metrics_parse_and_counters_move(swarm: Swarm) -> None:
    seed = swarm.add()
    b = swarm.add([seed])
    wait_for(lambda: b.node_id in seed.peers(), what="join")
    first = _metrics(b)
    assert b.request("PUT", "/api/collections/m/items/k", {"value": 1})[0] == 200
    wait_for(lambda: _metrics(seed).get("hs_gossip_collections") == 1, what="sync to seed")

    def moved() -> dict[str, float] | None:
        m = _metrics(b)
        return m if m["hs_gossip_probes_total"] > first["hs_gossip_probes_total"] else None

    later = wait_for(moved, what="probe counter to grow")
    assert later["hs_gossip_peers{state=healthy}"] == 1
    assert later["hs_gossip_members{status=alive}"] == 2  # itself and the seed
    assert later["hs_gossip_members{status=suspect}"] == 0
    assert later["hs_gossip_udp_sent_datagrams_total"] > first["hs_gossip_udp_sent_datagrams_total"]
    # A healthy pair on loopback: every probe answered, nothing refuted.
    assert later["hs_gossip_probes_failed_total"] == 0
    assert later["hs_gossip_refutations_total"] == 0
    # Every cause of refusal is exported, at zero before its first drop.
    assert later["hs_gossip_dropped_datagrams_total{cause=sender_mismatch}"] == 0
    assert later["hs_gossip_push_pull_started_total"] >= 1  # b joined through its seed
    assert later["hs_gossip_push_pull_merged_total"] >= 1
    assert later["hs_gossip_udp_sent_bytes_total"] > first["hs_gossip_udp_sent_bytes_total"]
    assert later["hs_gossip_udp_received_bytes_total"] > 0
    assert later["hs_gossip_store_write_seconds_count"] >= 1
    assert later["hs_gossip_store_write_seconds_sum"] > 0
    assert later["hs_gossip_event_loop_lag_seconds"] >= 0

    def synced() -> bool:
        # Either side may have started the session that carried the item.
        ms = [_metrics(seed), _metrics(b)]
        runs = sum(m["hs_gossip_sync_runs_total"] for m in ms)
        items = sum(m["hs_gossip_sync_items_total{direction=in}"]
                    + m["hs_gossip_sync_items_total{direction=out}"] for m in ms)
        durations = sum(m["hs_gossip_sync_duration_seconds_count"] for m in ms)
        return runs >= 1 and items >= 1 and durations == runs

    wait_for(synced, what="sync counters")
