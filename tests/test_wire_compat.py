"""Wire compatibility: membership datagrams and a push-pull payload recorded
from the SWIM codec, kept as bytes (the Merkle sync frames have theirs in
test_merkle.py).

Agents of different versions share a swarm during a rolling upgrade, so what
goes on the wire may only change by the rules in ``agent.core.wire`` (fields
appended, never moved; TYPE numbers never reused). Each recorded message must
still decode to the same fields, and the encoder given those fields must still
produce the same bytes. If one of these tests fails, the wire format changed:
that is a protocol change to make on purpose, never a side effect of a
refactor.
"""

from __future__ import annotations

import random

import pytest

from agent.core import wire
from agent.core.swim import DropReason, Params, SelfInfo, Swim, codec
from agent.core.swim.codec import Alive, Card, Dead, Digests, Entry, Left, Packet, State, Suspect
from agent.core.wire import Digest

A = bytes(range(16))
B = bytes(range(16, 32))
C = bytes(range(32, 48))

DIGESTS = (
    Digest("vision", bytes.fromhex("00112233445566778899aabbccddeeff"), 54, 1767225600000),
    Digest("other", b"\xab" * 16, 0),
)
#: the card's short hash of DIGESTS: every agent compares it with its own
#: computation, so the hash function is part of the wire format too
DHASH = bytes.fromhex("f0c5fdc30492b239")
EMPTY_DHASH = bytes.fromhex("af1349b9f5f9a1a6")
CARD = Card(A, 3, 123456789, DHASH)

# --- every datagram type, every field set, recorded from the SWIM codec -------------

PACKETS: dict[str, tuple[Packet, str]] = {
    "ping": (Packet(codec.PING, CARD, seq=41, target=B), (
        "010a98c410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b239009029"
        "c410101112131415161718191a1b1c1d1e1f")),
    "ack": (Packet(codec.ACK, CARD, want_digests=True, seq=41), (
        "010b97c410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b239019029")),
    "ping_req": (Packet(codec.PING_REQ, CARD, seq=42, target=C,
                        target_addr=("2001:db8::5", 7000)), (
        "010c9ac410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b23900902a"
        "c410202122232425262728292a2b2c2d2e2fc41020010db8000000000000000000000005cd1b58")),
    "nack": (Packet(codec.NACK, CARD, seq=42), (
        "010d97c410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b23900902a")),
    "leave": (Packet(codec.LEAVE2, CARD, updates=(Left(A, 3),)), (
        "010e96c410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b239009193"
        "03c410000102030405060708090a0b0c0d0e0f03")),
    # a gossip datagram carrying one update of every kind
    "gossip": (Packet(codec.GOSSIP, CARD, updates=(
        Alive(B, 2, "192.0.2.7", 7946, 8080, 7947, 1, "edge-7"),
        Suspect(C, 1, A),
        Dead(B, 1, C),
        Left(C, 5),
        Digests(A, 3, 9, DHASH, DIGESTS, False),
    )), (
        "010f96c410000102030405060708090a0b0c0d0e0f03ce075bcd15c408f0c5fdc30492b239009599"
        "00c410101112131415161718191a1b1c1d1e1f02c404c0000207cd1f0acd1f90cd1f0b01a6656467"
        "652d379401c410202122232425262728292a2b2c2d2e2f01c410000102030405060708090a0b0c0d"
        "0e0f9402c410101112131415161718191a1b1c1d1e1f01c410202122232425262728292a2b2c2d2e"
        "2f9303c410202122232425262728292a2b2c2d2e2f059704c410000102030405060708090a0b0c0d"
        "0e0f0309c408f0c5fdc30492b2399294a6766973696f6ec41000112233445566778899aabbccddee"
        "ff36cf0000019b76daa80094a56f74686572c410abababababababababababababababab0000c2")),
}

# --- a push-pull payload: our own entry, then one member in each status shape ---------

STATE = State(True, (
    Entry(Alive(A, 3, "", 7946, 8080, 0, 0, "me"), 0, 123456789,
          Digests(A, 3, 9, DHASH, DIGESTS, True)),
    Entry(Alive(B, 2, "192.0.2.7", 7946, 8080, 7947, 2, "edge-7"), 1, 77,
          Digests(B, 2, 0, EMPTY_DHASH, (), None)),
    Entry(Alive(C, 1, "2001:db8::9", 7000, 0, 0, 0, ""), 3, 5,
          Digests(C, 1, 4, bytes.fromhex("53cb7fd38d89290d"), DIGESTS[:1], None)),
))
STATE_HEX = (
    "011492c3939bc410000102030405060708090a0b0c0d0e0f03c400cd1f0acd1f900000a26d6500ce"
    "075bcd159704c410000102030405060708090a0b0c0d0e0f0309c408f0c5fdc30492b2399294a676"
    "6973696f6ec41000112233445566778899aabbccddeeff36cf0000019b76daa80094a56f74686572"
    "c410abababababababababababababababab0000c39bc410101112131415161718191a1b1c1d1e1f"
    "02c404c0000207cd1f0acd1f90cd1f0b02a6656467652d37014d9704c41010111213141516171819"
    "1a1b1c1d1e1f0200c408af1349b9f5f9a1a690c09bc410202122232425262728292a2b2c2d2e2f01"
    "c41020010db8000000000000000000000009cd1b58000000a003059704c410202122232425262728"
    "292a2b2c2d2e2f0104c40853cb7fd38d89290d9194a6766973696f6ec41000112233445566778899"
    "aabbccddeeff36cf0000019b76daa800c0"
)

# --- datagrams of the retired heartbeat protocol (HEARTBEAT, as of commit ee8915a,
# and LEAVE): an agent of that protocol still in the swarm during an upgrade ---

RETIRED_HEX = (
    "01019999c410000102030405060708090a0b0c0d0e0f03cd041200c404c0000207cd1f0acd1f900001"
    "a6656467652d37ce075bcd159294a6766973696f6ec41000112233445566778899aabbccddeeff36cf"
    "0000019b76daa80094a56f74686572c410abababababababababababababababab00009299c4101011"
    "12131415161718191a1b1c1d1e1f024d01c41020010db8000000000000000000000005cd1b58cd2328"
    "cd10e10099c410202122232425262728292a2b2c2d2e2f010502c400cd1f0a00ce0001117002c3c291"
    "c410101112131415161718191a1b1c1d1e1fcd1f0b",
    "01029199c410000102030405060708090a0b0c0d0e0f04cd044c02c404c0000207cd1f0acd1f900000",
)


def test_the_card_hash_of_digests_is_unchanged() -> None:
    assert codec.digest_hash(DIGESTS) == DHASH
    assert codec.digest_hash(()) == EMPTY_DHASH
    assert codec.digest_hash(DIGESTS[:1]) == STATE.entries[2].digests.dhash


@pytest.mark.parametrize("name", sorted(PACKETS))
def test_recorded_datagram_decodes_and_encodes_byte_for_byte(name: str) -> None:
    packet, recorded = PACKETS[name]
    data = bytes.fromhex(recorded)
    assert codec.decode_packet(data) == packet
    assert codec.encode_packet(packet) == data
    assert len(data) <= wire.PAYLOAD_BUDGET


def test_the_recordings_cover_every_datagram_type() -> None:
    assert {p.type for p, _ in PACKETS.values()} == set(codec.TYPES)


def test_recorded_push_pull_payload_decodes_and_encodes_byte_for_byte() -> None:
    data = bytes.fromhex(STATE_HEX)
    assert codec.decode_state(data, max_members=4096) == STATE
    assert codec.encode_state(STATE, max_members=4096) == data


@pytest.mark.parametrize("recorded", RETIRED_HEX, ids=["heartbeat", "leave"])
def test_a_retired_protocols_datagram_is_refused_as_an_unknown_type(recorded: str) -> None:
    """Same envelope version, retired TYPE: counted and dropped, never misread."""
    data = bytes.fromhex(recorded)
    assert data[0] == wire.VERSION and data[1] in wire.RETIRED_TYPES
    with pytest.raises(codec.SwimDecodeError) as err:
        codec.decode_packet(data)
    assert err.value.reason == DropReason.DECODE_TYPE
    core = Swim(SelfInfo(C, 0, "c", 7946, 0), Params(), random.Random(1), 0.0)
    core.receive(data, ("192.0.2.7", 7946), 1.0)
    assert core.stats[DropReason.DECODE_TYPE.value] == 1
    assert not core.members and not core.take_outgoing()


#: a periodic push-pull opened by summary: the sender's own entry and the hash
#: of its table as a third field (a decoder that does not know it reads a
#: one-entry table and answers with its whole table)
SUMMARY = State(False, STATE.entries[:1], table_hash=bytes(range(100, 116)))
SUMMARY_HEX = (
    "011493c2919bc410000102030405060708090a0b0c0d0e0f03c400cd1f0acd1f900000a26d6500ce075b"
    "cd159704c410000102030405060708090a0b0c0d0e0f0309c408f0c5fdc30492b2399294a6766973696f"
    "6ec41000112233445566778899aabbccddeeff36cf0000019b76daa80094a56f74686572c410abababab"
    "abababababababababababab0000c3c4106465666768696a6b6c6d6e6f70717273"
)


def test_recorded_push_pull_summary_decodes_and_encodes_byte_for_byte() -> None:
    data = bytes.fromhex(SUMMARY_HEX)
    assert codec.decode_state(data, max_members=4096) == SUMMARY
    assert codec.encode_state(SUMMARY, max_members=4096) == data
    # the full payload is the summary's prefix with two fields: no third
    assert codec.decode_state(bytes.fromhex(STATE_HEX), max_members=4096).table_hash is None
