"""Sync streams with cluster keys: the handshake (agent.net.handshake), the
frame cipher, connect/listen in agent.net.stream, and real keyed agents."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.net import handshake, stream
from agent.net.handshake import (
    FrameAuthError,
    HandshakeError,
    Initiator,
    Responder,
    StreamKeys,
    key_id,
)
from agent.net.stream import SyncError, connect, listen
from agent.runtime.sync_service import RefusalLog
from tests.agents import Swarm, wait_for

K1 = bytes(range(32))
K2 = bytes(range(1, 33))


def keys(*ks: bytes, cluster: str = "test") -> StreamKeys:
    return StreamKeys.from_keys(list(ks), cluster)


def run(a: StreamKeys, b: StreamKeys) -> tuple[handshake.Session, handshake.Session]:
    ini, resp = Initiator(a), Responder(b)
    m2 = resp.answer(ini.start())
    m3, s_i = ini.finish(m2)
    return s_i, resp.finish(m3)


# --- handshake, sans I/O ----------------------------------------------------------


def test_same_key_gives_matching_fresh_session_keys() -> None:
    s_i, s_r = run(keys(K1), keys(K1))
    assert s_i.send.key == s_r.recv.key and s_i.recv.key == s_r.send.key
    assert s_i.send.key != s_i.recv.key
    t_i, _ = run(keys(K1), keys(K1))
    assert t_i.send.key != s_i.send.key  # fresh per session
    assert s_r.recv.open(s_i.send.seal(b"hello")) == b"hello"
    assert s_i.recv.open(s_r.send.seal(b"back")) == b"back"


def test_message_sizes_are_fixed() -> None:
    ini, resp = Initiator(keys(K1)), Responder(keys(K1))
    m1 = ini.start()
    m2 = resp.answer(m1)
    m3, _ = ini.finish(m2)
    assert (len(m1), len(m2), len(m3)) == (handshake.M1_LEN, handshake.M2_LEN,
                                           handshake.M3_LEN) == (76, 108, 32)


def test_responder_accepts_any_of_its_keys_and_answers_with_the_same() -> None:
    s_i, s_r = run(keys(K2), keys(K1, K2))
    assert s_i.key_id == s_r.key_id == key_id(K2)
    assert s_r.recv.open(s_i.send.seal(b"x")) == b"x"


def test_unknown_key_id_is_refused_before_any_proof() -> None:
    with pytest.raises(HandshakeError) as e:
        Responder(keys(K1)).answer(Initiator(keys(K2)).start())
    assert e.value.cause == "unknown_key"


def test_same_key_id_but_other_key_or_cluster_fails_the_proof() -> None:
    # an attacker can copy a key id off the wire; without the key it gets nowhere
    forged = StreamKeys(K2, {key_id(K1): K2}, b"test")
    ini = Initiator(StreamKeys(K2, {}, b"test"))
    ini.kid = key_id(K1)
    resp = Responder(keys(K1))
    m2 = resp.answer(ini.start())
    with pytest.raises(HandshakeError) as e:
        ini.finish(m2)
    assert e.value.cause == "bad_proof"
    # and the responder refuses the initiator's proof made with the wrong key
    ini2, resp2 = Initiator(keys(K1)), Responder(forged)
    resp2.keys = StreamKeys(K1, {key_id(K1): K2}, b"test")
    with pytest.raises(HandshakeError) as e:
        ini2.finish(resp2.answer(ini2.start()))
    assert e.value.cause == "bad_proof"
    with pytest.raises(HandshakeError) as e:
        run(keys(K1, cluster="a"), keys(K1, cluster="b"))
    assert e.value.cause == "bad_proof"


def test_responder_refuses_an_initiator_proof_it_cannot_verify() -> None:
    ini, resp = Initiator(keys(K1)), Responder(keys(K1))
    m3, _ = ini.finish(resp.answer(ini.start()))
    with pytest.raises(HandshakeError, match="bad_proof"):
        resp.finish(bytes(32))
    with pytest.raises(HandshakeError):
        resp.finish(m3)  # one attempt only


@pytest.mark.parametrize("which", ["m1", "m2", "m3"])
def test_every_byte_of_every_message_tampered_fails(which: str) -> None:
    size = {"m1": handshake.M1_LEN, "m2": handshake.M2_LEN, "m3": handshake.M3_LEN}[which]
    for i in range(size):
        ini, resp = Initiator(keys(K1, K2)), Responder(keys(K1, K2))
        m1 = ini.start()
        if which == "m1":
            m1 = m1[:i] + bytes([m1[i] ^ 0x01]) + m1[i + 1:]
        try:
            m2 = resp.answer(m1)
            if which == "m2":
                m2 = m2[:i] + bytes([m2[i] ^ 0x01]) + m2[i + 1:]
            m3, _ = ini.finish(m2)
            if which == "m3":
                m3 = m3[:i] + bytes([m3[i] ^ 0x01]) + m3[i + 1:]
            resp.finish(m3)
        except HandshakeError:
            continue
        raise AssertionError(f"{which} with byte {i} flipped was accepted")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_handshake_error(m1: bytes, later: bytes) -> None:
    resp = Responder(keys(K1))
    try:
        resp.answer(m1)
        resp.finish(later)
    except HandshakeError:
        pass
    ini = Initiator(keys(K1))
    ini.start()
    with contextlib.suppress(HandshakeError):
        ini.finish(later)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=handshake.M1_LEN - 72, max_size=72))
def test_wellformed_m1_with_random_key_material_never_crashes(tail: bytes) -> None:
    m1 = handshake.MAGIC + key_id(K1) + tail.ljust(64, b"\x00")
    with contextlib.suppress(HandshakeError):
        Responder(keys(K1)).answer(m1)


def test_frames_tampered_replayed_reordered_or_dropped_fail() -> None:
    s_i, s_r = run(keys(K1), keys(K1))
    f0, _f1, _f2 = (s_i.send.seal(b) for b in (b"zero", b"one", b"two"))
    assert s_r.recv.open(f0) == b"zero"
    with pytest.raises(FrameAuthError):
        s_r.recv.open(f0)  # replay
    s_i, s_r = run(keys(K1), keys(K1))
    f0, f1, _f2 = (s_i.send.seal(b) for b in (b"zero", b"one", b"two"))
    with pytest.raises(FrameAuthError):
        s_r.recv.open(f1)  # reordered / f0 dropped
    s_i, s_r = run(keys(K1), keys(K1))
    f0 = s_i.send.seal(b"zero")
    for i in range(len(f0)):
        r = handshake.FrameCipher(s_r.recv.key)
        with pytest.raises(FrameAuthError):
            r.open(f0[:i] + bytes([f0[i] ^ 0x80]) + f0[i + 1:])
    with pytest.raises(FrameAuthError):
        handshake.FrameCipher(s_r.recv.key).open(b"short")
    # a frame sealed for the other direction does not open either
    with pytest.raises(FrameAuthError):
        handshake.FrameCipher(s_r.send.key).open(f0)


def test_refusals_are_counted_and_logged_once_per_cause_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    stats: dict[str, int] = {}
    now = [0.0]
    log = RefusalLog(stats, interval=60.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="hs_gossip.sync"):
        for _ in range(100):
            log("timeout", "1.2.3.4:5")
        log("cap", "1.2.3.4:6")
        now[0] = 61.0
        log("timeout", "1.2.3.4:7")
    assert stats == {"handshake_failed_timeout": 101, "handshake_failed_cap": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "100 sync connection(s) (timeout)" in lines[2]


# --- connect/listen over real TCP ---------------------------------------------


async def _echo_server(k: StreamKeys | None, refused: list[str],
                       body: Callable[[int], object]) -> None:
    listener = await listen("127.0.0.1", 0, 1 << 16, lambda: k,
                            lambda cause, peer: refused.append(cause))
    port = listener.listener.extra(anyio.abc.SocketAttribute.local_port)

    async def echo(conn: stream.Framed) -> None:
        try:
            while True:
                await conn.send(await conn.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, SyncError, OSError):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        await body_async(body, port)
        tg.cancel_scope.cancel()


async def body_async(body: Callable[[int], object], port: int) -> None:
    result = body(port)
    if hasattr(result, "__await__"):
        await result  # type: ignore[misc]


def test_keyed_streams_carry_frames_encrypted() -> None:
    refused: list[str] = []

    async def client(port: int) -> None:
        async with await connect("127.0.0.1", port, 1 << 16, keys(K1)) as conn:
            assert conn.encrypted
            for i in range(5):
                msg = f"frame {i}".encode() * 100
                await conn.send(msg)
                assert await conn.receive() == msg
            assert conn.bytes_out > 5 * 700 + 5 * 16  # the tags are on the wire

    anyio.run(_echo_server, keys(K1, K2), refused, client, backend="trio")
    assert refused == []


@pytest.mark.parametrize(("server", "client", "cause"), [
    (keys(K1), keys(K2), "unknown_key"),
    # the client sees the bad proof first and hangs up: "closed" for the server
    (keys(K1), keys(K1, cluster="other"), "closed"),
    (keys(K1), None, "malformed"),
])
def test_mismatched_sides_never_exchange_a_frame(server: StreamKeys, client: StreamKeys | None,
                                                 cause: str) -> None:
    refused: list[str] = []

    async def go(port: int) -> None:
        with pytest.raises((SyncError, anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
            async with await connect("127.0.0.1", port, 1 << 16, client) as conn:
                # a keyless client sends a cleartext frame; nothing comes back
                await conn.send(b"x" * 100)
                await conn.receive()
        await wait(lambda: refused)

    anyio.run(_echo_server, server, refused, go, backend="trio")
    assert refused == [cause]


def test_keyed_client_and_keyless_server_fail() -> None:
    async def go(port: int) -> None:
        with pytest.raises(stream.StreamHandshakeError):
            await connect("127.0.0.1", port, 1 << 16, keys(K1))

    anyio.run(_echo_server, None, [], go, backend="trio")


async def wait(cond: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.01)


def test_stalled_handshakes_time_out_and_the_cap_closes_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "HANDSHAKE_TIMEOUT", 0.5)
    refused: list[str] = []

    async def go(port: int) -> None:
        stalled = [await anyio.connect_tcp("127.0.0.1", port)
                   for _ in range(stream.MAX_UNAUTHENTICATED + 4)]
        await stalled[0].send(b"HSS1")  # a partial m1
        await wait(lambda: refused.count("cap") >= 4)
        t0 = time.monotonic()
        await wait(lambda: refused.count("timeout") >= stream.MAX_UNAUTHENTICATED)
        assert time.monotonic() - t0 < 2.0
        for s in stalled:
            await s.aclose()
        # once they are gone a real client gets through
        async with await connect("127.0.0.1", port, 1 << 16, keys(K1)) as conn:
            await conn.send(b"ok")
            assert await conn.receive() == b"ok"

    anyio.run(_echo_server, keys(K1), refused, go, backend="trio")
    assert sorted(set(refused)) == ["cap", "timeout"]


# --- real agents ------------------------------------------------------------------


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _coll(a: object, name: str) -> dict[str, object]:
    return next((dict(c) for c in a.get("/api/collections")  # type: ignore[attr-defined]
                 if c["name"] == name), {})


def test_two_keyed_agents_sync_and_a_keyless_client_gets_nothing(tmp_path: Path) -> None:
    from merkle import frames
    from merkle.reconcile import Session
    from merkle.tree import Item, MemoryTree

    key = _key()
    swarm = Swarm(tmp_path, HS_GOSSIP_KEY=key)
    try:
        a = swarm.add()
        b = swarm.add(seeds=[a])
        batch = {"items": {f"k{i}": i for i in range(40)}}
        assert a.request("POST", "/api/collections/locked/items", batch)[0] == 200
        wait_for(lambda: _coll(b, "locked").get("vector_count") == 40, timeout=30,
                 what="the keyed agents to sync")
        before = _coll(a, "locked")

        async def read_attempt() -> int:
            shipped = 0
            empty = MemoryTree()
            try:
                async with await connect(a.host, a.gossip_port, 1 << 22) as conn:
                    session = Session(b"attacker")
                    await conn.send(frames.encode(session.hello(empty, "locked", 0)))
                    while True:
                        msg = frames.decode(await conn.receive())
                        if isinstance(msg, frames.Items):
                            shipped += len(msg.items)
            except (SyncError, anyio.EndOfStream, anyio.BrokenResourceError, OSError,
                    frames.ProtocolError):
                pass
            return shipped

        async def write_attempt() -> None:
            item = Item("forged", 1 << 40, b"\x01" * 16, False, b"\x01")
            try:
                async with await connect(a.host, a.gossip_port, 1 << 22) as conn:
                    await conn.send(frames.encode(frames.Items((item,))))
                    await conn.receive()
            except (SyncError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass

        assert anyio.run(read_attempt, backend="trio") == 0
        anyio.run(write_attempt, backend="trio")
        status, _ = a.request("GET", "/api/collections/locked/items/forged")
        assert status == 404
        after = _coll(a, "locked")
        assert (after["state_hash"], after["vector_count"]) == (before["state_hash"], 40)
        # a short HELLO leaves the agent waiting for the rest of m1 (timeout),
        # a long one is not a handshake message (malformed)
        failed = wait_for(lambda: sum(
            a.get("/api/cluster/status")["sync_handshake_failures"].values()) >= 2,
            what="the refusals to be counted")
        assert failed
        assert 'hs_gossip_sync_handshake_failures_total{cause=' in _metrics(a)
    finally:
        swarm.stop_all()


def _metrics(a: object) -> str:
    import urllib.request

    with urllib.request.urlopen(a.api + "/metrics", timeout=5) as r:  # type: ignore[attr-defined]
        return str(r.read().decode())


def test_stalled_clients_are_cut_off_and_do_not_stop_a_real_peer(tmp_path: Path) -> None:
    key = _key()
    swarm = Swarm(tmp_path, HS_GOSSIP_KEY=key)
    stalled: list[socket.socket] = []
    try:
        a = swarm.add()
        for _ in range(50):
            s = socket.create_connection((a.host, a.gossip_port), timeout=5)
            s.sendall(b"HSS1")  # a handshake begun and never finished
            stalled.append(s)
        b = swarm.add(seeds=[a])
        batch = {"items": {f"k{i}": i for i in range(20)}}
        assert a.request("POST", "/api/collections/busy/items", batch)[0] == 200
        wait_for(lambda: _coll(b, "busy").get("vector_count") == 20, timeout=40,
                 what="a real peer to sync past 50 stalled connections")
        # the first 16 were cut off after the handshake timeout, the rest at once
        t0 = time.monotonic()
        for s in stalled[:16]:
            s.settimeout(stream.HANDSHAKE_TIMEOUT + 5)
            assert s.recv(1) == b""  # closed by the agent
        assert time.monotonic() - t0 < stream.HANDSHAKE_TIMEOUT + 5
        counts = a.get("/api/cluster/status")["sync_handshake_failures"]
        assert counts.get("timeout", 0) >= 1 and counts.get("cap", 0) >= 1, counts
    finally:
        for s in stalled:
            s.close()
        swarm.stop_all()
