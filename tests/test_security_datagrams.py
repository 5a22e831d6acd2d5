"""Datagram security in process: keys and key files, the sealed format, the
replay window, the boot epoch, sender binding in the core, and the keyless
seal. Every refusal is checked by its counter (agent.net.seal)."""

from __future__ import annotations

import base64
import random
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, load
from agent.core import wire
from agent.core.swim import Params, SelfInfo, Swim, codec
from agent.net import keyring
from agent.net.replay import ReplayTable
from agent.net.seal import HEADER, OVERHEAD, SEALED_VERSION, Cleartext, Kind, Sealed
from agent.runtime import epoch

K1, K2 = bytes(range(32)), bytes(range(1, 33))
A, B = uuid.uuid4().bytes, uuid.uuid4().bytes


def ring(*keys: bytes) -> keyring.Keyring:
    return keyring.build(list(keys), "test")


def pair(sender_keys: tuple[bytes, ...] = (K1,), receiver_keys: tuple[bytes, ...] = (K1,),
         cluster_a: str = "c", cluster_b: str = "c", epoch_a: int = 10,
         **kw: object) -> tuple[Sealed, Sealed]:
    return (Sealed(ring(*sender_keys), A, epoch_a, cluster_a),
            Sealed(ring(*receiver_keys), B, 20, cluster_b, **kw))  # type: ignore[arg-type]


# --- keys ---------------------------------------------------------------------------


def test_keygen_keys_parse_and_fingerprints_are_stable() -> None:
    text = keyring.generate()
    raw = keyring.parse_key(text)
    assert len(raw) == 32
    k = keyring.make_key(raw)
    assert k.key_id.hex() == k.fingerprint[:8] and len(k.fingerprint) == 16
    assert keyring.make_key(raw) == k and keyring.make_key(K1).key_id != k.key_id
    assert text not in repr(k) and "secret" not in repr(k)


def test_key_file_first_line_is_primary_comments_and_blanks_ignored(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# rotation step 2\n\n{base64.b64encode(K2).decode()}\n"
                 f"  {base64.b64encode(K1).decode()}  \n")
    r = keyring.load_file(f)
    assert [k.secret for k in r.keys] == [K2, K1] and r.primary.secret == K2


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_bad_key_file_line_names_file_and_line_not_the_key(tmp_path: Path,
                                                             bad: str) -> None:
    f = tmp_path / "keys"
    f.write_text(f"{base64.b64encode(K1).decode()}\n# ok\n{bad}\n")
    with pytest.raises(keyring.KeyringError) as e:
        keyring.load_file(f)
    assert str(f) in str(e.value) and "line 3" in str(e.value) and bad not in str(e.value)
    f.write_text("# nothing\n")
    with pytest.raises(keyring.KeyringError, match="no key"):
        keyring.load_file(f)
    with pytest.raises(keyring.KeyringError, match="cannot read"):
        keyring.load_file(tmp_path / "missing")


def test_config_key_fields_hide_the_key(tmp_path: Path) -> None:
    key = base64.b64encode(K1).decode()
    cfg, _ = load(environ={"HS_GOSSIP_KEY": f"{key},{base64.b64encode(K2).decode()}",
                           "HS_GOSSIP_CLUSTER": "lab"}, cwd=tmp_path)
    assert cfg.key == (K1, K2) and cfg.cluster == "lab" and key not in repr(cfg)
    with pytest.raises(ConfigError) as e:
        load(environ={"HS_GOSSIP_KEY": key[:-4]}, cwd=tmp_path)
    assert key[:-4] not in str(e.value) and "HS_GOSSIP_KEY" in str(e.value)
    with pytest.raises(keyring.KeyringError, match="not both"):
        keyring.from_settings((K1,), tmp_path / "k")
    assert keyring.from_settings((), None) is None


# --- sealing ------------------------------------------------------------------------


def test_round_trip_binds_sender_and_costs_the_stated_overhead() -> None:
    a, b = pair()
    for kind in Kind:
        d = a.seal(b"\x01\x01hello", kind)
        assert len(d) == len(b"\x01\x01hello") + OVERHEAD == 7 + 49
        assert d[0] == SEALED_VERSION and b"hello" not in d
        plain = b.open(d, kind)
        assert plain == b"\x01\x01hello"
        assert b.sender(plain) == A
    # sender() vouches only for the very bytes open() returned
    assert b.sender(b"\x01\x01hello") == b""
    assert OVERHEAD <= wire.AEAD_RESERVE and wire.PAYLOAD_BUDGET + OVERHEAD <= wire.MAX_DATAGRAM


def test_tampering_any_byte_is_refused() -> None:
    a, b = pair()
    d = a.seal(b"\x01\x01" + bytes(40), Kind.GOSSIP)
    for i in range(len(d)):
        bad = bytearray(d)
        bad[i] ^= 0x01
        assert b.open(bytes(bad), Kind.GOSSIP) is None, i
    assert sum(b.refused.values()) == len(d)
    assert b.open(d, Kind.GOSSIP) is not None  # the genuine one still opens afterwards


def test_wrong_cluster_wrong_kind_and_wrong_key_fail_authentication() -> None:
    a, b = pair(cluster_b="other")
    assert b.open(a.seal(b"x", Kind.GOSSIP), Kind.GOSSIP) is None
    assert b.refused["bad_tag"] == 1
    a, b = pair()
    assert b.open(a.seal(b"x", Kind.DISCOVERY), Kind.GOSSIP) is None
    assert b.refused["bad_tag"] == 1
    # Same key id in the header, other key: forged with a guessed key.
    a, b = pair()
    d = a.seal(b"x", Kind.GOSSIP)
    forged = Sealed(ring(K2), A, 10, "c")
    forged._send_key_id = a.keyring.primary.key_id
    assert b.open(forged.seal(b"x", Kind.GOSSIP), Kind.GOSSIP) is None
    assert b.refused["bad_tag"] == 1 and b.open(d, Kind.GOSSIP) == b"x"


def test_unknown_key_id_is_refused_without_trial() -> None:
    a, b = pair(sender_keys=(K2,))
    assert b.open(a.seal(b"x", Kind.GOSSIP), Kind.GOSSIP) is None
    assert dict(b.refused) == {"unknown_key": 1}


def test_cleartext_and_sealed_never_mix() -> None:
    a, b = pair()
    plain = Cleartext()
    hb = b"\x01\x01" + bytes(30)
    assert b.open(hb, Kind.GOSSIP) is None
    assert b.open(b"HSG1" + bytes(18), Kind.DISCOVERY) is None
    assert b.refused["cleartext_refused"] == 2
    assert plain.open(a.seal(hb, Kind.GOSSIP), Kind.GOSSIP) is None
    assert plain.refused["sealed_refused"] == 1 and plain.open(hb, Kind.GOSSIP) == hb
    assert b.open(b"\xa1" + bytes(10), Kind.GOSSIP) is None
    assert b.open(b"", Kind.GOSSIP) is None
    assert b.open(b"\xa1" + bytes(2000), Kind.GOSSIP) is None
    assert b.refused["malformed"] == 3


def test_rotation_accepts_both_keys_and_seals_with_the_primary() -> None:
    a, b = pair(sender_keys=(K1,), receiver_keys=(K1,))
    b.install(ring(K1, K2))  # step 1: new key accepted
    assert b.open(a.seal(b"1", Kind.GOSSIP), Kind.GOSSIP) == b"1"
    a.install(ring(K2, K1))  # step 2: new key primary on the sender
    d = a.seal(b"2", Kind.GOSSIP)
    assert d[1:5] == keyring.make_key(K2).key_id
    assert b.open(d, Kind.GOSSIP) == b"2" and b.last_key[A] == keyring.make_key(K2).key_id
    b.install(ring(K2))  # step 3: old key removed
    old = Sealed(ring(K1), A, 10, "c")
    assert b.open(old.seal(b"3", Kind.GOSSIP), Kind.GOSSIP) is None
    assert b.refused["unknown_key"] == 1


# --- replay -------------------------------------------------------------------------


def test_replays_are_refused() -> None:
    a, b = pair()
    d = a.seal(b"x", Kind.GOSSIP)
    assert b.open(d, Kind.GOSSIP) == b"x"
    assert b.open(d, Kind.GOSSIP) is None
    assert b.refused["replay"] == 1


def test_out_of_order_within_the_window_is_fine_older_is_refused() -> None:
    a, b = pair()
    ds = [a.seal(bytes([i % 256]), Kind.GOSSIP) for i in range(1100)]
    assert b.open(ds[1099], Kind.GOSSIP) is not None
    assert b.open(ds[500], Kind.GOSSIP) is not None  # 599 behind: inside 1024
    assert b.open(ds[50], Kind.GOSSIP) is None       # 1049 behind: outside
    assert b.refused["stale"] == 1
    assert b.open(ds[500], Kind.GOSSIP) is None and b.refused["replay"] == 1


def test_older_epoch_is_refused_newer_epoch_resets() -> None:
    old = Sealed(ring(K1), A, 10, "c")
    new = Sealed(ring(K1), A, 11, "c")
    b = Sealed(ring(K1), B, 20, "c")
    captured = old.seal(b"before restart", Kind.GOSSIP)
    for _ in range(5):
        old.seal(b"", Kind.GOSSIP)
    assert b.open(old.seal(b"x", Kind.GOSSIP), Kind.GOSSIP) == b"x"
    assert b.open(new.seal(b"y", Kind.GOSSIP), Kind.GOSSIP) == b"y"  # counter 1 again
    assert b.open(captured, Kind.GOSSIP) is None
    assert b.refused["old_epoch"] == 1
    assert b.replay.newest_epoch(A) == 11


def test_forgeries_take_no_table_space_and_the_table_is_bounded() -> None:
    table = ReplayTable(window=64, max_senders=8)
    b = Sealed(ring(K1), B, 20, "c", replay=table, max_aeads=8)
    key_id = keyring.make_key(K1).key_id
    for i in range(100):
        fake = HEADER.pack(SEALED_VERSION, key_id, uuid.uuid4().bytes, 1, i) + bytes(20)
        assert b.open(fake, Kind.GOSSIP) is None
    assert len(table) == 0 and len(b._aeads) == 0 and b.refused["bad_tag"] == 100
    for _ in range(50):
        s = Sealed(ring(K1), uuid.uuid4().bytes, 1, "c")
        assert b.open(s.seal(b"x", Kind.GOSSIP), Kind.GOSSIP) == b"x"
    assert len(table) == 8 and len(b._aeads) == 8 and len(b.last_key) == 8


def test_replay_table_semantics() -> None:
    t = ReplayTable(window=8)
    assert t.check(A, 5, 3) is None
    t.accept(A, 5, 3)
    assert t.check(A, 5, 3) == "replay"
    for c in (1, 2, 4, 10):
        assert t.check(A, 5, c) is None
        t.accept(A, 5, c)
    assert t.check(A, 5, 2) == "stale"  # 8 behind 10
    assert t.check(A, 5, 4) == "replay" and t.check(A, 5, 5) is None
    assert t.check(A, 4, 100) == "old_epoch" and t.check(A, 6, 1) is None
    t.accept(A, 5, 10_000)  # a jump beyond the window clears it
    assert t.check(A, 5, 9_999) is None and t.check(A, 5, 10_000) == "replay"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1500), st.sampled_from(list(Kind)))
def test_open_never_raises_on_arbitrary_bytes(data: bytes, kind: Kind) -> None:
    b = Sealed(ring(K1), B, 20, "c")
    assert b.open(data, kind) is None
    assert Cleartext().open(data, kind) in (None, data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16),
       st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_open_never_raises_on_wellformed_headers(counter: int, sender: bytes, ep: int,
                                                 body: bytes) -> None:
    b = Sealed(ring(K1), B, 20, "c")
    head = HEADER.pack(SEALED_VERSION, keyring.make_key(K1).key_id, sender, ep, counter)
    assert b.open(head + body + bytes(16), Kind.GOSSIP) is None


# --- boot epoch ---------------------------------------------------------------------


def test_boot_epoch_grows_on_every_start_and_is_saved_first(tmp_path: Path) -> None:
    e1 = epoch.next_for_start(tmp_path, 1000.0)
    assert e1 == 1000 and epoch.read(tmp_path) == 1000
    e2 = epoch.next_for_start(tmp_path, 1000.0)  # same second, or the clock went back
    e3 = epoch.next_for_start(tmp_path, 10.0)
    assert e1 < e2 < e3 and epoch.read(tmp_path) == e3
    assert epoch.next_for_start(tmp_path, 5000.0) == 5000
    (tmp_path / epoch.FILENAME).write_text("garbage")
    with pytest.raises(epoch.EpochError):
        epoch.next_for_start(tmp_path, 1.0)


# --- sender binding in the core ---------------------------------------------------


def _core(node: bytes) -> Swim:
    return Swim(SelfInfo(node_id=node, incarnation=1, name="n", port=7000, http_port=0),
                Params(max_members=64), random.Random(1), now=0.0)


def _datagram(ptype: int, card: bytes, *news: bytes) -> bytes:
    """A datagram whose card names ``card``, carrying ALIVE news of ``news``."""
    return codec.encode_packet(codec.Packet(
        ptype, codec.Card(card, 1, 1, codec.digest_hash(())),
        updates=tuple(codec.Alive(n, 1, "127.0.0.9", 7000, 8000) for n in news)))


def test_core_refuses_a_message_speaking_for_another_node() -> None:
    core = _core(B)
    other = uuid.uuid4().bytes
    src = ("127.0.0.9", 7000)
    core.receive(_datagram(codec.GOSSIP, other, other, uuid.uuid4().bytes), src, 1.0, sender=A)
    assert core.stats["sender_mismatch"] == 1 and not core.members
    core.receive(_datagram(codec.LEAVE2, other), src, 1.0, sender=A)
    assert core.stats["sender_mismatch"] == 2 and not core.members
    # Its own datagram, carrying news of others: accepted, others are gossip.
    third = uuid.uuid4().bytes
    core.receive(_datagram(codec.GOSSIP, A, A, third), src, 1.0, sender=A)
    assert set(core.members) == {A, third}
    # Keyless: nothing is authenticated, nothing is bound.
    keyless = _core(B)
    keyless.receive(_datagram(codec.GOSSIP, other, other), src, 1.0)
    assert set(keyless.members) == {other}


# --- visibility and cost ------------------------------------------------------------


def test_a_sealed_beacon_naming_another_node_is_dropped() -> None:
    """A key holder's discovery beacon that names another node_id than the
    one that sealed it is dropped and counted; its own beacon is reported."""
    import anyio
    import anyio.abc

    from agent.net import discovery

    sealer, receiver = pair()
    found: list[tuple[str, int]] = []
    stats: dict[str, int] = {}

    async def main() -> None:
        udp = await anyio.create_udp_socket(local_host="127.0.0.1")
        port = udp.extra(anyio.abc.SocketAttribute.local_port)
        sock = discovery.DiscoverySocket(udp, "127.0.0.1", port, receiver)
        peer = await anyio.create_udp_socket(local_host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(discovery.serve, sock, 7946, B, found.append)
            for port_, node in ((7001, uuid.uuid4().bytes), (7000, A)):  # spoofed, then own
                beacon = sealer.seal(discovery.encode(port_, node), Kind.DISCOVERY)
                await peer.sendto(beacon, "127.0.0.1", port)
            with anyio.fail_after(5):
                while not found:
                    await anyio.sleep(0.01)
            stats.update(sock.stats)
            tg.cancel_scope.cancel()
        await peer.aclose()

    anyio.run(main, backend="trio")
    assert found == [("127.0.0.1", 7000)]
    assert stats.get("drop_sender_mismatch") == 1 and not stats.get("drop_unopened")


def test_one_log_line_per_cause_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    b = Sealed(ring(K1), B, 20, "c", clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="hs_gossip.seal"):
        for _ in range(1000):
            b.open(b"\x01\x01cleartext", Kind.GOSSIP)
            b.open(b"\xff", Kind.GOSSIP)
        now[0] = 5.0
        b.open(b"\xff", Kind.GOSSIP)
        now[0] = 10.5
        b.open(b"\xff", Kind.GOSSIP)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "refused 1001 datagrams: malformed" in lines[2]
    assert b.refused == {"cleartext_refused": 1000, "malformed": 1002}


def test_a_keyless_agent_does_not_import_cryptography() -> None:
    import subprocess
    import sys

    code = ("import sys, agent.runtime.agent, agent.face.cli, agent.face.api; "
            "from agent.net.seal import Cleartext; Cleartext(); "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
