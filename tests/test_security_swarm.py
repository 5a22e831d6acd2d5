"""Datagram security against real agents on loopback: swarms with different
keys, keyless and wrong-key agents, captured datagrams replayed (at once,
after the sender is SIGKILLed, after it restarted), forgeries from a keyless
sender, key rotation through key files and SIGHUP while every peer stays
healthy, and a flood of random and mutated datagrams with garbage TCP
connections to the sync port."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.core import wire
from agent.net import keyring
from tests.agents import AgentProc, Swarm, run_cli, wait_for

pytestmark = pytest.mark.integration

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(100, 132))).decode()
K3 = base64.b64encode(bytes(range(200, 232))).decode()


def fingerprint(key: str) -> str:
    return keyring.make_key(base64.b64decode(key)).fingerprint


def ids(a: AgentProc) -> set[str]:
    return set(a.peers())


def healthy_mesh(agents: list[AgentProc]) -> bool:
    want = {a.node_id for a in agents}
    for a in agents:
        peers = a.peers()
        if set(peers) != want - {a.node_id} or not all(p["healthy"] for p in peers.values()):
            return False
    return True


def refused(a: AgentProc) -> dict[str, int]:
    return dict(a.get("/api/cluster/status")["datagrams_refused"])


def udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def entry(node: bytes, hb: int = 10**6, inc: int = 10**6, status: int = wire.ALIVE,
          host: str = "127.0.0.1", port: int = 9) -> wire.Entry:
    return wire.Entry(node, inc, hb, status, host, port, 9, 0)


def test_keyed_swarms_never_list_strangers(tmp_path: Path) -> None:
    """Key K1 swarm; another swarm with K2 and one with K1 but another cluster
    name, all seeded with the K1 agents; a keyless agent and a wrong-key agent
    seeded with them too. Every group lists only its own members."""
    s = Swarm(tmp_path)
    try:
        a = s.add(HS_GOSSIP_KEY=K1)
        b = s.add([a], HS_GOSSIP_KEY=K1)
        c = s.add([a, b], HS_GOSSIP_KEY=K2)
        d = s.add([a, b, c], HS_GOSSIP_KEY=K2)
        keyless = s.add([a, b, c])
        keyless2 = s.add([keyless, a])
        e = s.add([a, b, keyless], HS_GOSSIP_KEY=K1, HS_GOSSIP_CLUSTER="elsewhere")
        wait_for(lambda: healthy_mesh([a, b]) and healthy_mesh([c, d])
                 and healthy_mesh([keyless, keyless2]), timeout=15, what="each swarm formed")
        # Give the strangers many intervals to leak into each other.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert ids(a) == {b.node_id} and ids(b) == {a.node_id}
            assert ids(c) == {d.node_id} and ids(d) == {c.node_id}
            assert ids(e) == set()
            assert ids(keyless) == {keyless2.node_id}
            time.sleep(0.2)
        st = a.get("/api/cluster/status")
        assert st["encrypted"] is True and keyless.get("/api/cluster/status")["encrypted"] is False
        assert [k["fingerprint"] for k in st["keys"]] == [fingerprint(K1)]
        assert st["keys"][0]["primary"] and st["keys"][0]["peers"] == [b.node_id]
        # Each kind of stranger shows up under its own cause, counted.
        assert refused(a)["unknown_key"] > 0 and refused(a)["cleartext_refused"] > 0
        assert refused(a)["bad_tag"] > 0  # same key, other cluster name: fails authentication
        assert refused(keyless)["sealed_refused"] > 0
        metrics = run_cli("keys", "--api", f"127.0.0.1:{a.api_port}")
        assert metrics.returncode == 0 and fingerprint(K1) in metrics.stdout
        assert "primary" in metrics.stdout and b.node_id[:8] in metrics.stdout
        import urllib.request
        with urllib.request.urlopen(a.api + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'hs_gossip_dropped_datagrams_total{cause="seal_unknown_key"}' in text
        assert "no cluster key" in keyless.log()
        assert "no cluster key" not in a.log()
    finally:
        s.stop_all()


def capture(sniffer: socket.socket, n: int, timeout: float = 10) -> list[bytes]:
    sniffer.settimeout(timeout)
    return [sniffer.recvfrom(65535)[0] for _ in range(n)]


def test_captured_datagrams_replayed_change_nothing(tmp_path: Path) -> None:
    """A real sealed heartbeat of X, captured by pointing X's seeds at a test
    socket, replayed to Y at once, while X is dead (no revival) and after X
    restarted (an old epoch); forged datagrams from a keyless sender too."""
    s = Swarm(tmp_path, HS_GOSSIP_KEY=K1, HS_GOSSIP_TTL="30")
    sniffer = udp(s.host(7))
    try:
        y = s.add()
        x = s.add([y], HS_GOSSIP_PEERS=f"{s.host(7)}:{sniffer.getsockname()[1]},{y.gossip_addr}")
        caps = capture(sniffer, 3)
        assert all(c[0] == 0xA1 for c in caps)  # sealed, never cleartext
        wait_for(lambda: healthy_mesh([x, y]), what="x and y joined")
        tx = udp(s.host(6))
        for c in caps * 3:
            tx.sendto(c, (y.host, y.gossip_port))
        wait_for(lambda: sum(refused(y).get(k, 0) for k in ("replay", "stale")) >= 6,
                 what="replays counted")
        assert healthy_mesh([x, y])

        x.kill()
        wait_for(lambda: y.peers()[x.node_id]["healthy"] is False, timeout=10,
                 what="killed x unhealthy")
        # Replaying its datagrams (and forging in cleartext) for 2 s revives nothing.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for c in caps:
                tx.sendto(c, (y.host, y.gossip_port))
            forged = wire.encode(wire.Heartbeat(entry(uuid.UUID(x.node_id).bytes), "x", 10**9,
                                                (), ()))
            tx.sendto(forged, (y.host, y.gossip_port))
            time.sleep(0.05)
            assert y.peers()[x.node_id]["healthy"] is False

        inc_before = y.peers()[x.node_id]["incarnation"]
        x.start()
        wait_for(lambda: healthy_mesh([x, y]), what="x back")
        old_epoch = refused(y).get("old_epoch", 0)
        for c in caps:
            tx.sendto(c, (y.host, y.gossip_port))
        wait_for(lambda: refused(y).get("old_epoch", 0) >= old_epoch + 3,
                 what="old-epoch replays counted")
        assert y.peers()[x.node_id]["incarnation"] > inc_before
        assert healthy_mesh([x, y])
        tx.close()
    finally:
        sniffer.close()
        s.stop_all()


def test_forgeries_from_a_keyless_sender_change_nothing(tmp_path: Path) -> None:
    s = Swarm(tmp_path, HS_GOSSIP_KEY=K1)
    try:
        a = s.add()
        b = s.add([a])
        c = s.add([a])
        wait_for(lambda: healthy_mesh([a, b, c]), what="swarm")
        tx = udp(s.host(6))
        before = refused(a).get("cleartext_refused", 0)
        sent = 0
        nb = uuid.UUID(b.node_id).bytes
        # LEAVE for a live member, heartbeats for an existing and an invented one
        for msg in (wire.encode(wire.Leave(entry(nb, status=wire.LEFT, host=b.host,
                                                 port=b.gossip_port))),
                    wire.encode(wire.Heartbeat(entry(nb, host=b.host), "b", 10**9, (), ())),
                    wire.encode(wire.Heartbeat(entry(uuid.uuid4().bytes), "fake", 1, (), ()))):
            tx.sendto(msg, (a.host, a.gossip_port))
            sent += 1
        # A flood of invented members, 30 per datagram, past the table cap.
        for i in range(40):
            peers = tuple(entry(uuid.uuid4().bytes) for _ in range(30))
            data = wire.encode_heartbeat(wire.Heartbeat(entry(uuid.uuid4().bytes), "f", 1, (),
                                                        peers))[0]
            tx.sendto(data, (a.host, a.gossip_port))
            sent += 1
            if i % 10 == 9:
                time.sleep(0.05)
        wait_for(lambda: refused(a).get("cleartext_refused", 0) >= before + sent,
                 what="every forgery refused")
        assert ids(a) == {b.node_id, c.node_id} and healthy_mesh([a, b, c])
        tx.close()
    finally:
        s.stop_all()


def write_keys(path: Path, *keys: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# cluster keys, first = primary\n" + "".join(k + "\n" for k in keys))
    os.replace(tmp, path)


def test_key_rotation_across_live_agents_never_makes_a_peer_unhealthy(tmp_path: Path) -> None:
    s = Swarm(tmp_path)
    files = [tmp_path / f"keys{i}" for i in range(3)]
    for f in files:
        write_keys(f, K1)
    agents: list[AgentProc] = []
    try:
        for i, f in enumerate(files):
            agents.append(s.add(agents[:1] if i else None, HS_GOSSIP_KEYFILE=str(f)))
        wait_for(lambda: healthy_mesh(agents), what="keyed swarm")

        problems: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for a in agents:
                    try:
                        peers = a.peers()
                    except (OSError, ValueError) as e:
                        problems.append(f"{a.name}: {e}")
                        continue
                    if len(peers) != 2 or not all(p["healthy"] for p in peers.values()):
                        problems.append(f"{a.name}: {peers}")
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            def step(*keys: str, via_api: bool = False) -> None:
                for a, f in zip(agents, files, strict=True):
                    write_keys(f, *keys)
                    if via_api:
                        assert a.request("POST", "/api/keyring/reload")[0] == 200
                    else:
                        assert a.proc is not None
                        a.proc.send_signal(signal.SIGHUP)
                want = [fingerprint(k) for k in keys]
                wait_for(lambda: all([k["fingerprint"] for k in a.get("/api/cluster/status")
                                      ["keys"]] == want for a in agents),
                         what=f"keyring {want}")

            step(K1, K2)                 # 1: the new key accepted everywhere
            step(K2, K1, via_api=True)   # 2: the new key primary everywhere
            new = fingerprint(K2)

            def all_peers_on_new_key() -> bool:
                for a in agents:
                    keys = {k["fingerprint"]: k for k in a.get("/api/cluster/status")["keys"]}
                    if set(keys[new]["peers"]) < {b.node_id for b in agents if b is not a}:
                        return False
                return True

            wait_for(all_peers_on_new_key, what="every peer sealing with the new key")
            step(K2)                     # 3: the old key removed
            time.sleep(2)                # several suspect periods on the new key alone
        finally:
            stop.set()
            watcher.join()
        assert not problems, problems[:5]
        assert healthy_mesh(agents)

        # A bad file on reload keeps the old keys, says why, and changes nothing.
        files[0].write_text(K3 + "\nnot a key\n")
        code, body = agents[0].request("POST", "/api/keyring/reload")
        assert code == 409 and "line 2" in body["error"] and "not a key" not in body["error"]
        agents[0].proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: agents[0].log().count("key reload refused") >= 2, what="logged")
        st = agents[0].get("/api/cluster/status")
        assert [k["fingerprint"] for k in st["keys"]] == [fingerprint(K2)]
        time.sleep(1)
        assert healthy_mesh(agents)
        assert K1 not in agents[0].log() and K2 not in agents[0].log()
    finally:
        s.stop_all()


def udp_queue(host: str, port: int) -> tuple[int, int]:
    """Bytes waiting in the receive queue of the UDP socket bound to
    host:port, and the datagrams the kernel dropped for it (/proc/net/udp)."""
    local = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == local:
            return int(f[4].split(":")[1], 16), int(f[-1])
    raise AssertionError(f"no UDP socket bound to {host}:{port}")


def garbage_connections(a: AgentProc, rng: random.Random) -> int:
    """Unauthenticated TCP connections to the sync port: random bytes,
    truncated handshakes, a handshake under another key, cleartext sync
    frames. Each one sends, half-closes and waits for the agent to close."""
    from agent.net import handshake
    from agent.net.handshake import StreamKeys
    from merkle import frames
    from merkle.reconcile import Session
    from merkle.tree import Item, MemoryTree

    m1 = handshake.Initiator(StreamKeys.from_keys([base64.b64decode(K1)], "test")).start()
    other = handshake.Initiator(StreamKeys.from_keys([base64.b64decode(K2)], "test")).start()
    hello = frames.encode(Session(b"attacker").hello(MemoryTree(), "flooded", 0))
    forged = frames.encode(frames.Items((Item("forged", 1 << 40, b"\x01" * 16, False, b"1"),)))
    kinds = [
        lambda: rng.randbytes(rng.randint(0, 300)),
        lambda: m1[:rng.randrange(len(m1))],
        lambda: other,
        lambda: m1[:4] + rng.randbytes(len(m1) - 4),
        lambda: len(hello).to_bytes(4, "big") + hello,
        lambda: len(forged).to_bytes(4, "big") + forged,
    ]
    n = 0
    for i in range(200):
        with socket.create_connection((a.host, a.gossip_port), timeout=10) as c:
            c.sendall(kinds[i % len(kinds)]())
            c.shutdown(socket.SHUT_WR)
            try:
                while c.recv(4096):  # the agent closes it (after its m2 at most)
                    pass
            except ConnectionResetError:  # closed with our bytes unread
                pass
        n += 1
    return n


def test_a_flood_of_random_and_mutated_datagrams(tmp_path: Path) -> None:
    """100,000 datagrams sent as fast as the agent's receive queue takes them:
    random bytes, and genuine sealed ones with bytes flipped, cut or
    extended; meanwhile 200 garbage TCP connections to the sync port. The
    agent stays up, its peer stays healthy, a collection written before has
    the same state and items on both agents, and the refusal counters account
    for every datagram the kernel delivered and every connection."""
    s = Swarm(tmp_path, HS_GOSSIP_KEY=K1)
    sniffer = udp(s.host(7))
    try:
        a = s.add()
        b = s.add([a], HS_GOSSIP_PEERS=f"{a.gossip_addr},{s.host(7)}:{sniffer.getsockname()[1]}")
        genuine = capture(sniffer, 2)
        wait_for(lambda: healthy_mesh([a, b]), what="pair")
        batch = {"items": {f"k{i}": {"v": i} for i in range(50)}}
        assert a.request("POST", "/api/collections/flooded/items", batch)[0] == 200

        def state(x: AgentProc) -> tuple[Any, Any]:
            coll = next((c for c in x.get("/api/collections") if c["name"] == "flooded"),
                        {"state_hash": None})
            items = x.get("/api/collections/flooded/items?limit=1000")["items"]
            return coll["state_hash"], items

        before = wait_for(lambda: state(a) == state(b) and state(a), timeout=30,
                          what="the collection on both agents")
        rng = random.Random(7)
        tx = udp(s.host(6))

        def total() -> int:
            return sum(refused(a).values())

        def handshakes_refused() -> int:
            return sum(a.get("/api/cluster/status")["sync_handshake_failures"].values())

        def mutate(d: bytes) -> bytes:
            op = rng.randrange(4)
            if op == 0:
                bad = bytearray(d)
                for _ in range(rng.randint(1, 3)):
                    bad[rng.randrange(len(bad))] ^= rng.randint(1, 255)
                return bytes(bad)
            if op == 1:
                return d[:rng.randrange(len(d))]
            if op == 2:
                return d + rng.randbytes(rng.randint(1, 64))
            return d[:1] + rng.randbytes(len(d) - 1)

        flood = [rng.randbytes(rng.randint(0, 1400)) for _ in range(2000)]
        flood += [m for m in (mutate(rng.choice(genuine)) for _ in range(2000))
                  if m not in genuine]
        conn_before = handshakes_refused()
        tcp: list[int] = []
        garbage = threading.Thread(target=lambda: tcp.append(
            garbage_connections(a, random.Random(8))))
        start, (_, dropped_before) = total(), udp_queue(a.host, a.gossip_port)
        t0 = time.monotonic()
        garbage.start()
        sent = 0
        dest = (a.host, a.gossip_port)
        while sent < 100_000:
            # As fast as the agent drains its queue: keep it under ~64 KiB so
            # the kernel drops little (what it drops is read back below).
            for _ in range(50):
                tx.sendto(flood[rng.randrange(len(flood))], dest)
            sent += 50
            while udp_queue(*dest)[0] > 65536 and time.monotonic() - t0 < 60:
                time.sleep(0.0005)
        wait_for(lambda: udp_queue(*dest)[0] == 0, timeout=20, interval=0.01,
                 what="the receive queue drained")
        garbage.join(60)
        elapsed = time.monotonic() - t0
        dropped = udp_queue(*dest)[1] - dropped_before  # may include the peer's own
        counted = wait_for(lambda: total() - start >= sent - dropped and total() - start,
                           timeout=20, what=f"{sent} datagrams counted or dropped")
        assert sent - dropped <= counted <= sent and counted >= 0.8 * sent, (counted, dropped)
        assert tcp == [200] and not garbage.is_alive()
        assert a.is_up() and b.is_up() and healthy_mesh([a, b])
        wait_for(lambda: handshakes_refused() >= conn_before + 200, what="connections counted")
        r: dict[str, Any] = refused(a)
        assert r.get("malformed", 0) > 0 and r.get("bad_tag", 0) > 0
        assert a.is_up() and healthy_mesh([a, b])
        assert state(a) == before and state(b) == before
        assert a.request("GET", "/api/collections/flooded/items/forged")[0] == 404
        print(f"flood: {sent} datagrams, {counted} refused, {dropped} dropped by the kernel, "
              f"200 connections, {elapsed:.1f} s")
        tx.close()
    finally:
        sniffer.close()
        s.stop_all()
