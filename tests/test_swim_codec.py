"""SWIM datagram and push-pull codec: round trips, sizes, bounds, hostile bytes."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from agent.core import wire
from agent.core.swim import DropReason, codec
from agent.core.swim.codec import (
    ACK,
    GOSSIP,
    PING,
    PING_REQ,
    Alive,
    Card,
    Dead,
    Digests,
    Left,
    Packet,
    Suspect,
    SwimDecodeError,
)
from agent.core.wire import Digest

A = b"a" * 16
B = b"b" * 16
CARD = Card(A, 3, 123456, b"h" * 8)
DIG = (Digest("items", b"x" * 32, 1000, 1_700_000_000_000),)


def updates() -> tuple[codec.Update, ...]:
    return (
        Alive(B, 2, "10.0.0.2", 7946, 8080, 7947, 1, "node-2"),
        Suspect(B, 2, A),
        Dead(B, 2, A),
        Left(B, 2),
        Digests(B, 2, 5, codec.digest_hash(DIG), DIG, True),
    )


@pytest.mark.parametrize("ptype", codec.TYPES)
def test_every_packet_type_round_trips_with_its_updates(ptype: int) -> None:
    p = Packet(ptype, CARD, True, updates(), seq=9 if ptype in (PING, ACK, PING_REQ, 13) else 0,
               target=B if ptype in (PING, PING_REQ) else b"",
               target_addr=("10.0.0.2", 7946) if ptype == PING_REQ else None)
    assert codec.decode_packet(codec.encode_packet(p)) == p


def test_idle_ping_and_ack_are_well_under_100_bytes() -> None:
    big = Card(A, wire.JS_SAFE, wire.JS_SAFE, b"h" * 8)
    ping = codec.encode_packet(Packet(PING, big, seq=2**32 - 1, target=B))
    ack = codec.encode_packet(Packet(ACK, big, seq=2**32 - 1))
    assert len(ping) < 80 and len(ack) < 60


def test_encoders_clamp_numbers_to_what_decoders_accept() -> None:
    p = Packet(GOSSIP, Card(A, 2**64, -5, b"h" * 8),
               updates=(Alive(B, 2**70, "10.0.0.2", 99999, -1, 0, 999, "n" * 500),))
    got = codec.decode_packet(codec.encode_packet(p))
    assert got.card.incarnation == wire.JS_SAFE and got.card.lc == 0
    u = got.updates[0]
    assert isinstance(u, Alive)
    assert (u.incarnation, u.port, u.http_port, u.role) == (wire.JS_SAFE, 65535, 0, 255)
    assert len(u.name) == wire.MAX_NAME


def test_assemble_fills_the_budget_and_never_exceeds_it() -> None:
    items = [codec.encode_update(Alive(bytes([i]) * 16, i, "10.0.0.9", 7946, 80, 0, 0, "x"))
             for i in range(1, 200)]
    taken: list[int] = []

    def take(room: int) -> list[bytes]:
        out = []
        for b in items:
            if len(b) > room:
                break
            out.append(b)
            room -= len(b)
        taken.append(len(out))
        return out

    data = codec.assemble(Packet(PING, CARD, seq=1, target=B), take)
    assert len(data) <= wire.PAYLOAD_BUDGET
    assert wire.PAYLOAD_BUDGET - len(data) < len(items[0])  # full
    assert len(codec.decode_packet(data).updates) == taken[0] > 20


def test_digests_update_is_cut_to_its_budget() -> None:
    many = tuple(Digest(f"c{i:03}", b"y" * 32, i, 0) for i in range(100))
    b = codec.encode_update(Digests(B, 1, 1, codec.digest_hash(many), many, None), budget=500)
    assert len(b) <= 500
    got = codec.decode_packet(codec.assemble(Packet(GOSSIP, CARD), first=[b])).updates[0]
    assert isinstance(got, Digests) and 0 < len(got.digests) < 100


def test_digest_hash_ignores_order_and_sees_changes() -> None:
    d2 = (*DIG, Digest("other", b"z" * 32, 1, 0))
    assert codec.digest_hash(d2) == codec.digest_hash(tuple(reversed(d2)))
    assert codec.digest_hash(d2) != codec.digest_hash(DIG)
    assert len(codec.digest_hash(())) == codec.DHASH_LEN


def body(fields: list[object], ptype: int = PING) -> bytes:
    return bytes([wire.VERSION, ptype]) + msgpack.packb(fields, use_bin_type=True)


GOOD = [A, 1, 2, b"h" * 8, 0, [], 7, B]


@pytest.mark.parametrize(("data", "reason"), [
    (b"", DropReason.DECODE_TRUNCATED),
    (b"\x01\x0a", DropReason.DECODE_TRUNCATED),
    (b"\x09" + body(GOOD)[1:], DropReason.DECODE_VERSION),
    (body(GOOD, ptype=99), DropReason.DECODE_TYPE),
    (body(GOOD, ptype=wire.RETIRED_TYPES[0]), DropReason.DECODE_TYPE),
    (body(GOOD) + b"\x00" * 2000, DropReason.DECODE_TOO_BIG),
    (body(GOOD) + b"\x00", DropReason.DECODE_FIELD),  # trailing bytes
    (b"\x01\x0a\xc1\xc1\xc1", DropReason.DECODE_FIELD),  # not msgpack
    (body([A, 1, 2]), DropReason.DECODE_FIELD),  # too few fields
    (body([b"short", 1, 2, b"h" * 8, 0, [], 7, B]), DropReason.DECODE_FIELD),
    (body([A, 2**53, 2, b"h" * 8, 0, [], 7, B]), DropReason.DECODE_FIELD),  # > JS_SAFE
    (body([A, -1, 2, b"h" * 8, 0, [], 7, B]), DropReason.DECODE_FIELD),
    (body([A, 1, 2, b"h" * 8, 0, [], 7]), DropReason.DECODE_FIELD),  # PING without target
    (body([A, 1, 2, b"h" * 8, 0, [[9, A]], 7, B]), DropReason.DECODE_FIELD),  # unknown update
    (body([A, 1, 2, b"h" * 8, 0, [[0, A, 1]], 7, B]), DropReason.DECODE_FIELD),  # short ALIVE
    (body([A, 1, 2, b"h" * 8, 0, [[0, A, 1, b"\x01\x02", 1, 1, 1, 0, ""]], 7, B]),
     DropReason.DECODE_FIELD),  # a 2-byte address
    (body([A, 1, 2, b"h" * 8, 0, [[0, A, 1, b"", 70000, 1, 1, 0, ""]], 7, B]),
     DropReason.DECODE_FIELD),  # port > 65535
    (body([A, 1, 2, b"h" * 8, 0, [0] * 300, 7, B]), DropReason.DECODE_FIELD),
    (body([A, 1, 2, b"h" * 8, 0, [], 7, B, b"", 7946], ptype=PING_REQ),
     DropReason.DECODE_FIELD),  # PING_REQ without a target address
    (bytes([wire.VERSION, PING]) + b"\x81\xa1k\x01", DropReason.DECODE_FIELD),  # a map
])
def test_hostile_datagrams_raise_one_error_with_a_reason(data: bytes, reason: DropReason) -> None:
    with pytest.raises(SwimDecodeError) as e:
        codec.decode_packet(data)
    assert e.value.reason == reason


def test_trailing_unknown_fields_are_ignored() -> None:
    assert codec.decode_packet(body([*GOOD, "future", 1])).seq == 7


def test_random_bytes_raise_only_decode_errors() -> None:
    rng = random.Random(5)
    good = codec.encode_packet(Packet(PING_REQ, CARD, True, updates(), 5, B, ("10.0.0.2", 1)))
    reasons: set[DropReason] = set()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        try:
            codec.decode_packet(bytes(data))
        except SwimDecodeError as e:
            reasons.add(e.reason)
    assert DropReason.DECODE_FIELD in reasons


def entry(i: int) -> codec.Entry:
    nid = i.to_bytes(16, "big")
    return codec.Entry(Alive(nid, 1, "10.0.0.1", 7946, 80, 0, 0, f"n{i}"), 0, 5,
                       Digests(nid, 1, 1, codec.digest_hash(DIG), DIG, None))


def test_push_pull_round_trips_and_is_capped_to_max_members() -> None:
    s = codec.State(True, tuple(entry(i) for i in range(1, 11)))
    assert codec.decode_state(codec.encode_state(s, 100), 100) == s
    capped = codec.decode_state(codec.encode_state(s, 4), 100)
    assert len(capped.entries) == 5  # the sender's own + max_members
    # A peer with a larger table: we read our cap's worth and count the rest.
    got = codec.decode_state(codec.encode_state(s, 100), 4)
    assert got.entries == s.entries[:5] and got.truncated == 5


def test_push_pull_payload_stays_under_its_limit() -> None:
    s = codec.State(False, tuple(entry(i) for i in range(1, 2000)))
    data = codec.encode_state(s, 4096, limit=50_000)
    assert len(data) <= 50_000
    assert 0 < len(codec.decode_state(data, 4096).entries) < 1999
    with pytest.raises(SwimDecodeError) as e:
        codec.decode_state(b"\x01\x14" + b"\x00" * codec.MAX_PUSH_PULL, 4096)
    assert e.value.reason == DropReason.DECODE_TOO_BIG
    with pytest.raises(SwimDecodeError) as e:
        codec.decode_state(codec.encode_packet(Packet(ACK, CARD, seq=1)), 4096)
    assert e.value.reason == DropReason.DECODE_TYPE


def test_an_entry_heard_again_is_not_decoded_again() -> None:
    """Whole tables arrive at every exchange, mostly byte for byte what an
    earlier one carried: each distinct entry is validated once."""
    s = codec.State(False, tuple(entry(i) for i in range(1, 6)))
    first = codec.decode_state(codec.encode_state(s, 100), 100)
    again = codec.decode_state(codec.encode_state(s, 100), 100)
    assert again == s and all(a is b for a, b in zip(first.entries, again.entries, strict=True))
    data = codec.encode_state(s, 100)
    for bad in (data + b"\x00", data[:-1], data[:2] + b"\x92\xc3\x90"):
        with pytest.raises(SwimDecodeError):  # trailing, truncated, no entries
            codec.decode_state(bad, 100)


def test_a_digest_list_larger_than_a_datagram_goes_in_parts() -> None:
    many = tuple(Digest(f"collection-{i:03d}" * 4, bytes([i]) * 32, 10**9, 0) for i in range(50))
    u = Digests(B, 1, 3, codec.digest_hash(many), many, True)
    parts = codec.digests_parts(u)
    assert 1 < len(parts) <= codec.MAX_PARTS
    got = []
    for p in parts:
        data = codec.assemble(Packet(PING, CARD, seq=1, target=B), first=[codec.encode_update(p)])
        assert len(data) <= wire.PAYLOAD_BUDGET
        (d,) = codec.decode_packet(data).updates
        assert isinstance(d, Digests) and (d.part, d.parts) == (p.part, len(parts))
        got.extend(d.digests)
    assert tuple(got) == many
    # A small list stays one update, encoded as before (no part fields).
    (one,) = codec.digests_parts(dataclasses.replace(u, digests=DIG))
    assert one.parts == 1 and len(msgpack.unpackb(codec.encode_update(one))) == 7


@pytest.mark.parametrize(("part", "parts"), [(3, 3), (0, 17), (-1, 2)])
def test_digest_parts_out_of_range_are_refused(part: int, parts: int) -> None:
    bad = [codec.U_DIGESTS, B, 1, 1, b"h" * 8, [], None, part, parts]
    with pytest.raises(SwimDecodeError):
        codec.decode_packet(body([A, 1, 2, b"h" * 8, 0, [bad], 7, B]))
