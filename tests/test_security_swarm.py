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

from agent.core.swim import codec
from agent.net import keyring
from agent.net.seal import Kind, Sealed
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


def handshakes_refused(a: AgentProc) -> dict[str, int]:
    return dict(a.get("/api/cluster/status")["sync_handshake_failures"])


EMPTY = codec.digest_hash(())


def swim(ptype: int, sender: bytes, *updates: codec.Update, inc: int = 1, seq: int = 1,
         target: bytes = b"") -> bytes:
    """A well-formed membership datagram (cleartext) whose card says ``sender``."""
    card = codec.Card(sender, inc, 1, EMPTY)
    return codec.encode_packet(codec.Packet(ptype, card, updates=updates, seq=seq,
                                            target=target))


def alive(node: bytes, host: str = "127.0.0.1", port: int = 9, inc: int = 1) -> codec.Alive:
    return codec.Alive(node, inc, host, port, port, port, 0, "forged")


def sealer(node_id: bytes, key: str, cluster: str = "default") -> Sealed:
    """A stranger's seal for ``node_id``, first boot."""
    return Sealed(keyring.build([base64.b64decode(key)], "test"), node_id, 1, cluster)


def node(a: AgentProc) -> bytes:
    return uuid.UUID(a.node_id).bytes


class Relay:
    """An on-path observer between two agents: bound at the address one of
    them advertises (HS_GOSSIP_ADVERTISE), it forwards every datagram between
    them unchanged and keeps a copy of those ``near`` sent. What a stranger
    on the network can capture and replay, without any key."""

    def __init__(self, bind: tuple[str, int], near: tuple[str, int],
                 far: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.settimeout(0.1)
        self.near, self.far = near, far
        self.captured: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
                if src == self.near:
                    self.captured.append(data)
                    self.sock.sendto(data, self.far)
                elif src == self.far:
                    self.sock.sendto(data, self.near)
            except (TimeoutError, OSError):  # OSError: ICMP from a dead agent
                continue

    def capture(self, n: int, timeout: float = 10) -> list[bytes]:
        wait_for(lambda: len(self.captured) >= n, timeout=timeout, what=f"{n} datagrams")
        return self.captured[:n]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


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
        # Strangers meet over TCP first (joining is a push-pull with each
        # seed): a's stream handshake refuses each kind under its own cause.
        # Another key: unknown_key; keyless (cleartext push-pull): malformed;
        # same key, other cluster name: the stranger finds a's proof bad and
        # hangs up (closed).
        wait_for(lambda: all(handshakes_refused(a).get(cause, 0) > 0
                             for cause in ("unknown_key", "malformed", "closed")),
                 what="each kind of stranger refused by a's stream handshake")
        # Datagrams a stranger would send, a ping carrying its own card and
        # ALIVE, are refused by the seal under their own cause, counted, and
        # never answered.
        tx = udp(s.host(6))
        tx.settimeout(1)
        strangers = ((K2, "default", "unknown_key"), (K1, "elsewhere", "bad_tag"),
                     (None, "", "cleartext_refused"))
        before = refused(a)
        for key, cluster, _ in strangers:
            me = uuid.uuid4().bytes
            ping = swim(codec.PING, me, alive(me, s.host(6), tx.getsockname()[1]),
                        target=node(a))
            if key is not None:
                ping = sealer(me, key, cluster).seal(ping, Kind.GOSSIP)
            tx.sendto(ping, (a.host, a.gossip_port))
        wait_for(lambda: all(refused(a).get(cause, 0) > before.get(cause, 0)
                             for *_, cause in strangers), what="each stranger counted")
        with pytest.raises(TimeoutError):
            tx.recvfrom(65535)  # no ack
        # The same cleartext ping is answered by a keyless agent (the pings
        # are well formed: a's silence is its seal's), which in turn refuses
        # a ping sealed with the right key.
        me = uuid.uuid4().bytes
        tx.sendto(swim(codec.PING, me, seq=77, target=node(keyless)),
                  (keyless.host, keyless.gossip_port))
        ack = codec.decode_packet(tx.recvfrom(65535)[0])
        assert (ack.type, ack.seq, ack.card.node_id) == (codec.ACK, 77, node(keyless))
        sealed_before = refused(keyless).get("sealed_refused", 0)
        tx.sendto(sealer(me, K1).seal(swim(codec.PING, me, target=node(keyless)), Kind.GOSSIP),
                  (keyless.host, keyless.gossip_port))
        wait_for(lambda: refused(keyless).get("sealed_refused", 0) > sealed_before,
                 what="the keyless agent refusing a sealed datagram")
        tx.close()
        assert ids(a) == {b.node_id} and ids(keyless) == {keyless2.node_id}
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


def test_captured_datagrams_replayed_change_nothing(tmp_path: Path) -> None:
    """Real sealed datagrams of X (its pings and gossip to Y), captured on the
    path between them, replayed to Y at once, while X is dead (no revival)
    and after X restarted (an old epoch); forged datagrams from a keyless
    sender too."""
    s = Swarm(tmp_path, HS_GOSSIP_KEY=K1, HS_GOSSIP_TTL="30")
    # Y advertises the relay's address: X reaches Y through it.
    relay = Relay((s.host(7), s.port), near=(s.host(1), s.port), far=(s.host(0), s.port))
    try:
        y = s.add(HS_GOSSIP_ADVERTISE=s.host(7))
        x = s.add([y])
        caps = relay.capture(3)
        assert all(c[0] == 0xA1 for c in caps)  # sealed, never cleartext
        wait_for(lambda: healthy_mesh([x, y]), what="x and y joined")
        tx = udp(s.host(6))
        before = refused(y)

        def replays() -> int:
            now = refused(y)
            return sum(now.get(k, 0) - before.get(k, 0) for k in ("replay", "stale"))

        for c in caps * 3:
            tx.sendto(c, (y.host, y.gossip_port))
        # Y already opened each of them once (the relay delivered them): all
        # nine copies are refused.
        wait_for(lambda: replays() >= 9, what="replays counted")
        assert healthy_mesh([x, y])

        x.kill()
        wait_for(lambda: y.peers()[x.node_id]["healthy"] is False, timeout=10,
                 what="killed x unhealthy")
        # Replaying its datagrams, and forging in cleartext X's own word at a
        # higher incarnation (what would refute a suspicion), for 2 s revives
        # nothing.
        nx = node(x)
        cleartext = refused(y).get("cleartext_refused", 0)
        forged = [swim(codec.GOSSIP, nx, alive(nx, x.host, x.gossip_port, inc=10**6),
                       inc=10**6),
                  swim(codec.PING, nx, inc=10**6, target=node(y)),
                  swim(codec.ACK, nx, inc=10**6, seq=1)]
        sent = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for c in caps + forged:
                tx.sendto(c, (y.host, y.gossip_port))
            sent += len(forged)
            time.sleep(0.05)
            assert y.peers()[x.node_id]["healthy"] is False
        wait_for(lambda: refused(y).get("cleartext_refused", 0) >= cleartext + sent,
                 what="every forgery refused")

        inc_before = y.peers()[x.node_id]["incarnation"]
        x.start()
        wait_for(lambda: healthy_mesh([x, y]), what="x back")
        old_epoch = refused(y).get("old_epoch", 0)
        for c in caps:
            tx.sendto(c, (y.host, y.gossip_port))
        wait_for(lambda: refused(y).get("old_epoch", 0) >= old_epoch + 3,
                 what="old-epoch replays counted")
        assert y.peers()[x.node_id]["incarnation"] > inc_before
        assert inc_before < 10**6 and y.peers()[x.node_id]["incarnation"] < 10**6
        assert healthy_mesh([x, y])
        tx.close()
    finally:
        relay.close()
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
        na, nb = node(a), node(b)
        inc_a = a.get("/api/cluster/status")["incarnation"]
        inc_b = a.peers()[b.node_id]["incarnation"]
        # b's own word: a departure, and its death at a higher incarnation;
        # a's suspicion and death (it would refute); an invented member.
        for msg in (swim(codec.LEAVE2, nb, inc=inc_b),
                    swim(codec.PING, nb, codec.Dead(nb, inc_b + 1, nb), inc=inc_b + 1,
                         target=na),
                    swim(codec.GOSSIP, nb, codec.Suspect(na, inc_a, nb),
                         codec.Dead(na, inc_a, nb), inc=inc_b),
                    swim(codec.GOSSIP, (fake := uuid.uuid4().bytes), alive(fake))):
            tx.sendto(msg, (a.host, a.gossip_port))
            sent += 1
        # A flood of invented members, as many per datagram as fit, past the table cap.
        for i in range(40):
            n = uuid.uuid4().bytes
            invented = [alive(uuid.uuid4().bytes, port=1 + j) for j in range(30)]
            tx.sendto(swim(codec.GOSSIP, n, alive(n), *invented), (a.host, a.gossip_port))
            sent += 1
            if i % 10 == 9:
                time.sleep(0.05)
        wait_for(lambda: refused(a).get("cleartext_refused", 0) >= before + sent,
                 what="every forgery refused")
        assert ids(a) == {b.node_id, c.node_id} and healthy_mesh([a, b, c])
        assert a.get("/api/cluster/status")["incarnation"] == inc_a
        assert a.peers()[b.node_id]["incarnation"] == inc_b
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
    # a advertises the relay's address: b's datagrams to a cross it.
    relay = Relay((s.host(7), s.port), near=(s.host(1), s.port), far=(s.host(0), s.port))
    try:
        a = s.add(HS_GOSSIP_ADVERTISE=s.host(7))
        b = s.add([a])
        genuine = relay.capture(2)
        wait_for(lambda: healthy_mesh([a, b]), what="pair")
        inc_a = a.get("/api/cluster/status")["incarnation"]
        batch = {"items": {f"k{i}": {"v": i} for i in range(50)}}
        # Written on b: a (the flooded one) pulls it (b's syncs to a would go
        # to the relay's address, which carries datagrams only).
        assert b.request("POST", "/api/collections/flooded/items", batch)[0] == 200

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

        # Well-formed membership datagrams in cleartext, each of which would
        # change something if it got past the seal: a suspicion and a death
        # of a (it would refute), b's death and departure, invented members.
        na, nb = node(a), node(b)
        forged = [swim(codec.GOSSIP, uuid.uuid4().bytes, codec.Suspect(na, inc_a, nb)),
                  swim(codec.GOSSIP, uuid.uuid4().bytes, codec.Dead(na, inc_a, nb)),
                  swim(codec.PING, nb, codec.Dead(nb, 10**6, na), inc=10**6, target=na),
                  swim(codec.LEAVE2, nb, codec.Left(nb, 10**6), inc=10**6),
                  *(swim(codec.GOSSIP, n, alive(n, s.host(6), 9000 + i))
                    for i, n in enumerate(uuid.uuid4().bytes for _ in range(50)))]
        flood = [rng.randbytes(rng.randint(0, 1400)) for _ in range(2000)] + forged * 20
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
        assert r.get("cleartext_refused", 0) > 0
        assert a.is_up() and healthy_mesh([a, b])
        # Nothing got through to the membership core: no refutation, no
        # invented member, b alive at the incarnation it had.
        assert a.get("/api/cluster/status")["incarnation"] == inc_a
        assert ids(a) == {b.node_id}
        assert a.peers()[b.node_id]["incarnation"] < 10**6
        assert state(a) == before and state(b) == before
        assert a.request("GET", "/api/collections/flooded/items/forged")[0] == 404
        print(f"flood: {sent} datagrams, {counted} refused, {dropped} dropped by the kernel, "
              f"200 connections, {elapsed:.1f} s")
        tx.close()
    finally:
        relay.close()
        s.stop_all()
