"""Wire compatibility: gossip datagrams recorded from earlier encoders, kept
as bytes (the Merkle sync frames have theirs in test_merkle.py).

Agents of different versions share a swarm during a rolling upgrade, so what
goes on the wire may only change by the rules in ``agent.core.wire`` (fields
appended, never moved). Each recorded message must still decode to the same
fields, and the encoder given those fields must still produce the same bytes.
If one of these tests fails, the wire format changed: that is a protocol
change to make on purpose, never a side effect of a refactor.
"""

from __future__ import annotations

from agent.core import wire

A = bytes(range(16))
B = bytes(range(16, 32))
C = bytes(range(32, 48))

# --- every field set, recorded from the encoder as of commit ee8915a ---

HEARTBEAT_HEX = (
    "01019999c410000102030405060708090a0b0c0d0e0f03cd041200c404c0000207cd1f0acd1f900001"
    "a6656467652d37ce075bcd159294a6766973696f6ec41000112233445566778899aabbccddeeff36cf"
    "0000019b76daa80094a56f74686572c410abababababababababababababababab00009299c4101011"
    "12131415161718191a1b1c1d1e1f024d01c41020010db8000000000000000000000005cd1b58cd2328"
    "cd10e10099c410202122232425262728292a2b2c2d2e2f010502c400cd1f0a00ce0001117002c3c291"
    "c410101112131415161718191a1b1c1d1e1fcd1f0b"
)
HEARTBEAT = wire.Heartbeat(
    sender=wire.Entry(A, 3, 1042, wire.ALIVE, "192.0.2.7", 7946, 8080, 0, 1),
    name="edge-7",
    lc=123456789,
    digests=(
        wire.Digest("vision", bytes.fromhex("00112233445566778899aabbccddeeff"), 54,
                    1767225600000),
        wire.Digest("other", b"\xab" * 16, 0),
    ),
    peers=(
        wire.Entry(B, 2, 77, wire.SUSPECT, "2001:db8::5", 7000, 9000, 4321, 0),
        wire.Entry(C, 1, 5, wire.LEFT, "", 7946, 0, 70000, 2),
    ),
    want_state=True,
    app_healthy=False,
    wants=(B,),
    sync_port=7947,
)

LEAVE_HEX = (
    "01029199c410000102030405060708090a0b0c0d0e0f04cd044c02c404c0000207cd1f0acd1f900000"
)
LEAVE = wire.Leave(wire.Entry(A, 4, 1100, wire.LEFT, "192.0.2.7", 7946, 8080, 0, 0))

STATE_HEX = (
    "010392c410000102030405060708090a0b0c0d0e0f9199c410101112131415161718191a1b1c1d1e1f"
    "024d01c41020010db8000000000000000000000005cd1b58cd2328cd10e100"
)
STATE = wire.State(A, (HEARTBEAT.peers[0],))

# --- a heartbeat from the first release (commit ac3d256): seven fields, no
# ``wants`` or ``sync_port`` yet, digests without a horizon ---

FIRST_RELEASE_HEX = (
    "01019799c410000102030405060708090a0b0c0d0e0f022800c400cd1f0acd1f900000a566697273"
    "744d9193a6766973696f6ec41011111111111111111111111111111111039199c410101112131415"
    "161718191a1b1c1d1e1f010c01c404c0000209cd1f0acd1f91cd05dc00c3c3"
)
FIRST_RELEASE = wire.Heartbeat(
    sender=wire.Entry(A, 2, 40, wire.ALIVE, "", 7946, 8080, 0, 0),
    name="first",
    lc=77,
    digests=(wire.Digest("vision", b"\x11" * 16, 3),),
    peers=(wire.Entry(B, 1, 12, wire.SUSPECT, "192.0.2.9", 7946, 8081, 1500, 0),),
    want_state=True,
    app_healthy=True,
)


def test_recorded_heartbeat_decodes_and_encodes_byte_for_byte() -> None:
    data = bytes.fromhex(HEARTBEAT_HEX)
    assert wire.decode(data) == HEARTBEAT
    assert wire.encode(HEARTBEAT) == data
    # and nothing was cut to fit: both digests and both peers travel
    assert wire.encode_heartbeat(HEARTBEAT)[1:] == (2, 2)


def test_recorded_leave_and_state_decode_and_encode_byte_for_byte() -> None:
    assert wire.decode(bytes.fromhex(LEAVE_HEX)) == LEAVE
    assert wire.encode(LEAVE) == bytes.fromhex(LEAVE_HEX)
    assert wire.decode(bytes.fromhex(STATE_HEX)) == STATE
    assert wire.encode(STATE) == bytes.fromhex(STATE_HEX)


def test_a_first_release_heartbeat_still_decodes() -> None:
    # Fields added since are absent, so they take their defaults.
    msg = wire.decode(bytes.fromhex(FIRST_RELEASE_HEX))
    assert msg == FIRST_RELEASE
    assert isinstance(msg, wire.Heartbeat) and msg.wants == () and msg.sync_port == 0
