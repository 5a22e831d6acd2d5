"""Codec properties: every message round-trips; any bytes decode to a message
or a DecodeError with a reason, never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import wire

node_ids = st.binary(min_size=16, max_size=16)
small = st.integers(min_value=0, max_value=2**53 - 1)
hosts = st.one_of(
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str),
)
entries = st.builds(
    wire.Entry,
    node_id=node_ids, incarnation=small, heartbeat=small,
    status=st.sampled_from([wire.ALIVE, wire.SUSPECT, wire.LEFT]),
    host=hosts, port=st.integers(0, 65535), http_port=st.integers(0, 65535),
    age_ms=st.integers(0, 2**32 - 1), role=st.integers(0, 2),
)
digests = st.builds(
    wire.Digest,
    name=st.text(alphabet="abcxyz0123._-", min_size=1, max_size=40),
    state_hash=st.binary(min_size=16, max_size=16), count=small,
)
heartbeats = st.builds(
    wire.Heartbeat,
    sender=entries, name=st.text(max_size=20), lc=small,
    digests=st.lists(digests, max_size=5).map(tuple),
    peers=st.lists(entries, max_size=10).map(tuple),
    want_state=st.booleans(), app_healthy=st.sampled_from([None, True, False]),
    wants=st.lists(node_ids, max_size=8).map(tuple),
    sync_port=st.integers(0, 65535),
)


@given(heartbeats)
def test_heartbeat_round_trips(hb: wire.Heartbeat) -> None:
    data = wire.encode(hb)
    assert len(data) <= wire.PAYLOAD_BUDGET
    assert wire.decode(data) == hb


@given(entries)
def test_leave_round_trips(e: wire.Entry) -> None:
    assert wire.decode(wire.encode(wire.Leave(e))) == wire.Leave(e)


@given(node_ids, st.lists(entries, max_size=200))
def test_state_splits_into_datagrams_that_round_trip(sender: bytes, es: list[wire.Entry]) -> None:
    chunks = wire.encode_state(sender, es)
    got: list[wire.Entry] = []
    for c in chunks:
        assert len(c) <= wire.PAYLOAD_BUDGET
        msg = wire.decode(c)
        assert isinstance(msg, wire.State) and msg.sender_id == sender
        got.extend(msg.peers)
    assert got == es


@given(heartbeats, st.lists(entries, min_size=60, max_size=80))
def test_heartbeat_is_cut_to_the_budget_not_over_it(hb: wire.Heartbeat,
                                                    many: list[wire.Entry]) -> None:
    full = wire.Heartbeat(hb.sender, hb.name, hb.lc, hb.digests, tuple(many))
    data, _, n_peers = wire.encode_heartbeat(full)
    assert len(data) <= wire.PAYLOAD_BUDGET
    msg = wire.decode(data)
    assert isinstance(msg, wire.Heartbeat)
    assert msg.peers == tuple(many[:n_peers]) and 0 < n_peers < len(many)


@settings(max_examples=500)
@given(st.binary(max_size=1600))
def test_any_bytes_decode_or_reject_with_a_reason(data: bytes) -> None:
    try:
        wire.decode(data)
    except wire.DecodeError as e:
        assert e.reason


@settings(max_examples=300)
@given(heartbeats, st.data())
def test_mutated_heartbeats_decode_or_reject(hb: wire.Heartbeat, data: st.DataObject) -> None:
    raw = bytearray(wire.encode(hb))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            wire.decode(candidate)
        except wire.DecodeError as e:
            assert e.reason


def test_unknown_trailing_fields_are_ignored() -> None:
    import msgpack

    e = wire.Entry(b"x" * 16, 1, 2, wire.ALIVE, "10.1.2.3", 7946, 50050, 5)
    fields = [*wire.entry_fields(e), "future-field", {"k": 1}]
    data = wire.envelope(wire.LEAVE) + msgpack.packb([fields, "more"], use_bin_type=True)
    assert wire.decode(data) == wire.Leave(e)


def test_unknown_version_and_type_are_rejected() -> None:
    good = wire.encode(wire.Leave(wire.Entry(b"x" * 16, 1, 2, 0, "", 1, 2, 3)))
    for bad, reason in ((b"\x02" + good[1:], "unknown_version"),
                        (good[:1] + b"\x7f" + good[2:], "unknown_type")):
        try:
            wire.decode(bad)
        except wire.DecodeError as e:
            assert e.reason == reason
        else:
            raise AssertionError("accepted")


def test_integers_beyond_javascript_range_are_rejected() -> None:
    import msgpack

    fields = wire.entry_fields(wire.Entry(b"x" * 16, 1, 2, 0, "", 1, 2, 3))
    fields[1] = 2**53
    data = wire.envelope(wire.LEAVE) + msgpack.packb([fields], use_bin_type=True)
    try:
        wire.decode(data)
    except wire.DecodeError as e:
        assert e.reason == "bad_field"
    else:
        raise AssertionError("accepted")
