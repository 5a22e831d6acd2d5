"""Reconciliation properties on in-memory replicas, and the frame codec."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from typing import Any

import msgpack
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from merkle import frames
from merkle.frames import (
    HASH_LEN,
    MAX_HORIZON_MS,
    SALT_LEN,
    Done,
    Hello,
    Items,
    Leaf,
    Node,
    ProtocolError,
    Step,
    Want,
)
from merkle.loopback import run_pair
from merkle.reconcile import Session
from merkle.tree import FANOUT, MAX_LEVEL, Item, MemoryTree, state_hash

ORIGINS = [bytes([i]) * 16 for i in range(5)]
SALT = bytes(range(1, 9))


def mk(key: str, hlc: int, origin: int, value: int | None) -> Item:
    return Item(key, hlc, ORIGINS[origin], value is None,
                None if value is None else value.to_bytes(4, "big"))


def sync(a: MemoryTree, b: MemoryTree, cut_after: int | None = None,
         salt: bytes = SALT):  # type: ignore[no-untyped-def]
    def apply_to(t: MemoryTree):  # type: ignore[no-untyped-def]
        return lambda items: [t.apply(i) for i in items]

    return run_pair(a, apply_to(a), b, apply_to(b), cut_after=cut_after, salt=salt)


def test_an_item_gets_the_digest_and_position_its_rules_define() -> None:
    """digest = blake3(packb([key, hlc, origin, deleted, value])), position =
    the first 8 bytes of blake3(key) as a number; given ones are kept (rows
    as stored); the item is immutable and its equality ignores both."""
    cases = [("k", False, b"\x01"), ("κλειδί", True, None), ("k" * 300, False, b"")]
    for key, deleted, value in cases:
        it = Item(key, 7 << 16, ORIGINS[1], deleted, value)
        assert (it.key, it.hlc, it.origin, it.deleted, it.value) == \
            (key, 7 << 16, ORIGINS[1], deleted, value)
        assert it.digest == blake3(msgpack.packb([key, 7 << 16, ORIGINS[1], deleted, value],
                                                 use_bin_type=True)).digest()
        assert it.pos == int.from_bytes(blake3(key.encode()).digest()[:8], "big")
        stored = Item(key, 7 << 16, ORIGINS[1], deleted, value, b"d" * 32, 5)
        assert (stored.digest, stored.pos) == (b"d" * 32, 5)
        assert stored == it and hash(stored) == hash(it)
        assert dataclasses.replace(it, hlc=8 << 16).digest == it.digest  # fields as given
        with pytest.raises(dataclasses.FrozenInstanceError):
            it.key = "other"  # type: ignore[misc]


def test_equal_replicas_settle_in_one_round_trip() -> None:
    a, b = MemoryTree(), MemoryTree()
    for i in range(100):
        a.apply(mk(f"k{i}", i, 0, i))
        b.apply(mk(f"k{i}", i, 0, i))
    stats = sync(a, b)
    assert stats.messages == 2 and stats.items_a_to_b == stats.items_b_to_a == 0


def test_differences_cross_both_ways_and_only_them() -> None:
    rng = random.Random(1)
    a, b = MemoryTree(), MemoryTree()
    for i in range(5000):
        it = mk(f"k{i}", i, 0, i)
        a.apply(it)
        b.apply(it)
    for i in rng.sample(range(5000), 10):
        a.apply(mk(f"k{i}", 10_000 + i, 1, 7))
    for i in range(3):
        b.apply(mk(f"new{i}", 20_000 + i, 2, i))
    stats = sync(a, b)
    assert a.root() == b.root() and len(a.items) == 5003
    # Only differing items cross: b's 3 new ones and, at most, b's older
    # versions of the 10 keys a changed (digest lists cannot tell which is newer).
    assert stats.items_a_to_b == 10 and 3 <= stats.items_b_to_a <= 13


def test_empty_replica_receives_everything() -> None:
    a, b = MemoryTree(), MemoryTree()
    for i in range(3000):
        a.apply(mk(f"k{i}", i, 0, i))
    sync(b, a)
    assert a.root() == b.root()


def test_newer_write_wins_whatever_the_direction() -> None:
    a, b = MemoryTree(), MemoryTree()
    a.apply(mk("x", 5, 0, 1))
    b.apply(mk("x", 9, 1, 2))
    sync(a, b)
    assert a.items["x"].hlc == b.items["x"].hlc == 9
    # a delete with a newer version wins, an older one loses
    a.apply(mk("x", 12, 0, None))
    b.apply(mk("y", 1, 0, 1))
    sync(b, a)
    assert a.items["x"].deleted and b.items["x"].deleted and a.root() == b.root()


class LyingTree(MemoryTree):
    """A peer whose node sums and counts are noise; the items it ships are real."""

    def __init__(self, rng: random.Random, counts: list[int]) -> None:
        super().__init__()
        self.rng = rng
        self.counts = counts  # the child counts it claims, at random

    def node(self, level: int, idx: int) -> tuple[int, int]:
        return self.rng.getrandbits(256), self.rng.randint(0, 10**6)

    def children(self, level: int, idx: int) -> list[tuple[int, int]]:
        return [(self.rng.getrandbits(256), self.rng.choice(self.counts))
                for _ in range(FANOUT)]


# claimed child counts: "I have none" (ship me all), small (a leaf), large (go
# deeper); or always large, which drags the session down to the last level
@pytest.mark.parametrize("claims", [[0, 3, 50, 10**6], [10**6]], ids=["noisy", "deep"])
def test_lying_hashes_cannot_break_a_replica(claims: list[int]) -> None:
    """A peer lying in every summary steers the search, nothing more: the
    session still ends within the tree's depth, the honest side ships only
    items it has, and its replica keeps every newer version it held."""
    rng = random.Random(7)
    a, liar = MemoryTree(), LyingTree(rng, claims)
    for i in range(300):
        a.apply(mk(f"k{i}", 100 + i, 0, i))
    for i in range(0, 300, 3):
        liar.apply(mk(f"k{i}", 50, 1, 0))  # older versions: must lose
    for i in range(0, 300, 30):
        liar.apply(mk(f"k{i}", 5000, 1, 9))  # newer versions: must win
    for i in range(5):
        liar.apply(mk(f"x{i}", 1, 2, i))  # keys a lacks
    original = dict(a.items)
    to_a: list[Item] = []
    to_liar: list[Item] = []

    def into_a(items: list[Item]) -> None:
        to_a.extend(items)
        for it in items:
            a.apply(it)

    for a_starts in (True, False):
        salt = rng.randbytes(SALT_LEN)
        if a_starts:
            stats = run_pair(a, into_a, liar, to_liar.extend, salt=salt)
        else:
            stats = run_pair(liar, to_liar.extend, a, into_a, salt=salt)
        # HELLO, one message per level down to the last, a leaf diff, its answer
        assert 2 <= stats.messages <= MAX_LEVEL + 3
    # a shipped only what it had (or had been given), and got only what the liar holds
    assert to_liar and set(to_liar) <= set(original.values()) | set(to_a)
    assert to_a and all(liar.items[it.key] == it for it in to_a)
    # the liar did ship older versions of a's items; a kept its own
    assert any(it.key in original and it.version < original[it.key].version for it in to_a)
    # nothing lost, nothing rolled back, nothing a was not given; newer versions taken
    assert set(original) <= set(a.items) <= set(original) | set(liar.items)
    for key, mine in original.items():
        assert a.items[key].version >= mine.version
    for it in to_a:
        assert a.items[it.key].version >= it.version


@pytest.mark.parametrize("bad", [
    [2, [[99, 0, b"", []]], [], [], False],  # a node below the deepest level
    [2, [[1, 16, b"\0" * 64, [0] * 16]], [], [], False],  # index out of its level
    [2, [[0, 0, b"\0" * 63, [0] * 16]], [], [], False],  # short child summaries
    [2, [[0, 0, b"\0" * 64, [0] * 15]], [], [], False],  # missing child count
    [2, [[0, 0, b"\0" * 64, [-1] * 16]], [], [], False],  # negative count
    [2, [[True, 0, b"\0" * 64, [0] * 16]], [], [], False],  # bool is not a level
    [2, "x", [], [], False],
    [2, [5], [], [], False],  # an entry that is not an array
    [2, [], [[1, 0]], [], False],  # a leaf entry cut short
    [2, [], [], [None], False],
    [2, [], [[1, 0, b"abc"]], [], False],  # digest list not a multiple of 4 bytes
    [2, [], [], [[1, 0, "abcd"]], False],  # want digests of the wrong type
    [2, [], [], [], 1],  # final is a bool
    [2, [], [], []],
    "junk", [], [7], [None], [4.0], [True, "c", b"\0" * 8, b"zzzz", 5, b"\xff" * 64, [1] * 16],
    [1, "c", b"\0" * 7, b"zzzz", 5, b"\xff" * 64, [1] * 16],  # short salt
    [1, "c", b"\0" * 8, b"zzzz", 5, b"\xff" * 64, [1] * 16, -1],  # negative horizon
    [1, "c", b"\0" * 8, b"zzzz", 5, b"\xff" * 64, [1] * 16, MAX_HORIZON_MS],
    [1, "", b"\0" * 8, b"zzzz", 5, b"\xff" * 64, [1] * 16],  # no collection name
    [1, "c", b"\0" * 8, b"zzzzz", 5, b"\xff" * 64, [1] * 16],  # long root hash
    [1, "c", b"\0" * 8, b"zzzz", 5, b"\xff" * 64],
    [3, [["k", 1, b"o", False]]],  # an item with a field missing
    [3, [["k", -1, b"o", False, None]]],  # negative HLC
    [3, [["k", 1, "o", False, None]]],  # origin is bytes
    [3, [["k", 1, b"o", 0, None]]],  # deleted is a bool
    [3, [["k", 1, b"o", False, "v"]]],  # value is bytes or None
    [3, {"k": 1}],
])
def test_malformed_frames_are_refused(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        frames.from_wire(bad)
    with pytest.raises(ProtocolError):
        frames.decode(msgpack.packb(bad, use_bin_type=True))


def test_session_refuses_frames_out_of_order() -> None:
    a, b = MemoryTree(), MemoryTree()
    a.apply(mk("x", 1, 0, 1))
    hello = Session(SALT).hello(a, "c")
    responder = Session(SALT)
    step = responder.receive(b, hello)
    assert isinstance(step, Step) and not step.final
    with pytest.raises(ProtocolError, match="HELLO"):
        responder.receive(b, hello)  # a second HELLO
    initiator = Session(SALT)
    initiator.hello(a, "c")
    with pytest.raises(ProtocolError, match="HELLO"):
        initiator.receive(a, hello)  # a HELLO to the side that sent one
    # a final STEP must not leave questions: here b still lacks the item
    asker = Session(SALT)
    asker.hello(b, "c")
    with pytest.raises(ProtocolError, match="final"):
        asker.receive(b, Step((), (Leaf(1, 0, b"zzzz"),), (), final=True))
    done = Session(SALT)
    assert done.receive(a, Done()) is None and done.done
    with pytest.raises(ProtocolError, match="end"):
        done.receive(a, Done())



class CountingTree(MemoryTree):
    """Counts the whole-subtree reads a session makes."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = 0

    def digests_under(self, level: int, idx: int) -> list[bytes]:
        self.scans += 1
        return super().digests_under(level, idx)


def _opened(n: int = 300) -> tuple[Session, CountingTree]:
    """An initiator that has sent its HELLO, over a replica of ``n`` items."""
    t = CountingTree()
    for i in range(n):
        t.apply(mk(f"k{i}", i + 1, 0, i))
    s = Session(SALT)
    s.hello(t, "c")
    return s, t


@pytest.mark.parametrize("step", [
    Step(leaves=(Leaf(0, 0, b""),) * 5000),  # the root, which nobody offered
    Step(wants=(Want(0, 0, None),) * 5000),
    Step(wants=(Want(0, 0, b"zzzz"),) * 5000),
    Step(leaves=(Leaf(1, 3, b""),) * 2),  # an offered child, twice
    Step(leaves=(Leaf(1, 3, b""),), wants=(Want(1, 3, None),)),
    Step(wants=(Want(1, 3, b"zzzz"),)),  # digests wanted from a child, not a leaf we sent
    Step(leaves=(Leaf(2, 0, b""),)),  # a level below what was offered
    Step(nodes=(Node(0, 0, b"\0" * 64, (1,) * FANOUT),)),
], ids=["root-leaves", "root-wants-all", "root-wants", "twice", "leaf-and-want",
        "want-digests-of-child", "too-deep", "root-node"])
def test_a_step_may_only_answer_what_was_offered(step: Step) -> None:
    """A STEP naming nodes we never offered (or one twice) is refused before
    any work: otherwise one frame naming the root many times would scan or
    queue the whole replica once per entry."""
    s, t = _opened()
    with pytest.raises(ProtocolError, match="not offered"):
        s.receive(t, step)
    assert t.scans == 0 and not s.take_sends()


def test_a_full_step_on_the_root_is_refused_quickly() -> None:
    """A STEP as large as the codec admits, all root leaves and wants, through
    the codec: refused in well under a second, without reading the tree."""
    import time

    s, t = _opened(2000)
    n = 8000  # each way: about what the decode budget admits for such small entries
    wire = frames.encode(Step(leaves=(Leaf(0, 0, b""),) * n, wants=(Want(0, 0, None),) * n))
    step = frames.decode(wire)  # the codec lets it through: the session must not
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="not offered"):
        s.receive(t, step)
    assert time.perf_counter() - started < 1.0
    assert t.scans == 0 and not s.take_sends()


ops = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
              st.one_of(st.none(), st.integers(0, 9))),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), ops, st.randoms(use_true_random=False))
def test_random_writes_and_lossy_syncs_converge(n: int, writes: list, rnd: random.Random) -> None:  # type: ignore[type-arg]
    replicas = [MemoryTree() for _ in range(n)]
    for clock, (origin, key, value) in enumerate(writes, 1):
        replicas[origin % n].apply(mk(key, clock, origin % n, value))
        if rnd.random() < 0.3:  # interleave interrupted syncs with the writes
            i, j = rnd.sample(range(n), 2)
            sync(replicas[i], replicas[j], cut_after=rnd.randint(0, 6),
                 salt=rnd.randbytes(SALT_LEN))
    # then complete syncs in random pairs until everyone has met everyone
    for _ in range(3):
        for i in range(n):
            for j in range(n):
                if i != j:
                    sync(replicas[i], replicas[j], salt=rnd.randbytes(SALT_LEN))
    roots = {r.root() for r in replicas}
    assert len(roots) == 1
    assert all(r.items == replicas[0].items for r in replicas)
    total, count = roots.pop()
    assert len(state_hash(total, count)) == 16


# --- the frame codec: today's bytes, and nothing but ProtocolError on bad input ------

#: a HELLO as agents sent it before the codec had its own module (salt 01..08,
#: three items, horizon 1_700_000_000_000 ms): the wire must not change
HELLO_HEX = (
    "9801a56e6f746573c4080102030405060708c40494eddf2303c440a25d346da25d346da25d346da25d"
    "346da25d346da25d346da25d346daffd9075f1d374dfa25d346da25d346da25d346da25d346da25d34"
    "6da25d346dea9f88f1dc001000000000000000010100000000000001cf0000018bcfe56800"
)
#: sha256 over the length-prefixed frames of a whole session (HELLO, STEPs and
#: ITEMS both ways), recorded from the same code
TRANSCRIPT_SHA256 = "1156280e95c06ead4d71e3b32377a27ba19cb2c56408b709109c9b25bf169465"


def _transcript_replicas() -> tuple[MemoryTree, MemoryTree]:
    a, b = MemoryTree(), MemoryTree()
    for i in range(400):
        it = mk(f"k{i}", i + 1, 0, i)
        a.apply(it)
        b.apply(it)
    for i in range(0, 400, 37):
        a.apply(mk(f"k{i}", 1000 + i, 1, 7))
    for i in range(5):
        b.apply(mk(f"new{i}", 2000 + i, 2, None if i == 3 else i))
    for i in range(40):
        b.apply(mk(f"bulk{i}", 3000 + i, 3, i))
    return a, b


def test_hello_bytes_are_todays() -> None:
    t = MemoryTree()
    for i in range(3):
        t.apply(mk(f"k{i}", i + 1, 0, i))
    hello = Session(SALT).hello(t, "notes", horizon_ms=1_700_000_000_000)
    wire = bytes.fromhex(HELLO_HEX)
    assert frames.encode(hello) == wire
    assert frames.decode(wire) == hello
    # an older agent's HELLO has no horizon: it reads as 0
    old = msgpack.unpackb(wire)[:7]
    decoded = frames.decode(msgpack.packb(old, use_bin_type=True))
    assert isinstance(decoded, Hello) and decoded.horizon_ms == 0


def test_a_whole_session_is_byte_for_byte_todays() -> None:
    a, b = _transcript_replicas()
    sent: list[bytes] = []
    stats = run_pair(a, lambda items: [a.apply(i) for i in items],
                     b, lambda items: [b.apply(i) for i in items], salt=SALT,
                     on_frame=sent.append)
    assert a.root() == b.root() and stats.items_a_to_b == 11 and stats.items_b_to_a == 54
    kinds = [msgpack.unpackb(f)[0] for f in sent]
    assert set(kinds) == {1, 2, 3}  # HELLO, STEP and ITEMS all recorded
    digest = hashlib.sha256(b"".join(len(f).to_bytes(4, "big") + f for f in sent))
    assert digest.hexdigest() == TRANSCRIPT_SHA256
    for f in sent:  # and each frame decodes to a value that encodes back the same
        assert frames.encode(frames.decode(f)) == f


_u64 = st.integers(0, 2**64 - 1)
_hashes = st.binary(min_size=HASH_LEN * FANOUT, max_size=HASH_LEN * FANOUT)
_counts = st.tuples(*[_u64] * FANOUT)
_digest_list = st.lists(st.binary(min_size=HASH_LEN, max_size=HASH_LEN), max_size=6).map(
    b"".join)


@st.composite
def _ref(draw: st.DrawFn, deepest: int) -> tuple[int, int]:
    level = draw(st.integers(0, deepest))
    return level, draw(st.integers(0, FANOUT ** level - 1))


_items = st.builds(
    Item, st.text(max_size=20), _u64, st.binary(max_size=20), st.booleans(),
    st.one_of(st.none(), st.binary(max_size=20)))
valid_frames = st.one_of(
    st.builds(Hello, st.text(min_size=1, max_size=30), st.binary(min_size=8, max_size=8),
              st.binary(min_size=4, max_size=4), _u64, _hashes, _counts,
              st.integers(0, MAX_HORIZON_MS - 1)),
    st.builds(Step,
              st.lists(st.tuples(_ref(MAX_LEVEL - 1), _hashes, _counts).map(
                  lambda t: Node(*t[0], t[1], t[2])), max_size=3).map(tuple),
              st.lists(st.tuples(_ref(MAX_LEVEL), _digest_list).map(
                  lambda t: Leaf(*t[0], t[1])), max_size=3).map(tuple),
              st.lists(st.tuples(_ref(MAX_LEVEL), st.one_of(st.none(), _digest_list)).map(
                  lambda t: Want(*t[0], t[1])), max_size=3).map(tuple),
              st.booleans()),
    st.builds(Items, st.lists(_items, max_size=4).map(tuple)),
    st.just(Done()),
)


@settings(max_examples=300, deadline=None)
@given(valid_frames)
def test_valid_frames_round_trip(frame: frames.Frame) -> None:
    data = frames.encode(frame)
    assert frames.decode(data) == frame
    assert frames.encode(frames.decode(data)) == data


def _receive_or_refuse(frame: frames.Frame) -> None:
    """A frame the codec accepted is answered, or refused with ProtocolError."""
    if isinstance(frame, Items):
        return
    t = MemoryTree()
    for i in range(40):
        t.apply(mk(f"k{i}", i + 1, 0, i))
    with contextlib.suppress(ProtocolError):
        Session(SALT).receive(t, frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        frame = frames.decode(data)
    except ProtocolError:
        return
    _receive_or_refuse(frame)


_msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.binary(max_size=70), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=18),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=60)
_kinds = st.one_of(st.sampled_from([1, 2, 3, 4]), _msgpack_values)


@settings(max_examples=500, deadline=None)
@given(_kinds, st.lists(_msgpack_values, max_size=9))
def test_hostile_structures_raise_only_protocol_error(kind: Any, rest: list[Any]) -> None:
    try:
        frame = frames.decode(msgpack.packb([kind, *rest], use_bin_type=True))
    except ProtocolError:
        return
    _receive_or_refuse(frame)


@settings(max_examples=300, deadline=None)
@given(valid_frames, st.data())
def test_damaged_frames_raise_only_protocol_error(frame: frames.Frame, data: st.DataObject) -> None:
    wire = bytearray(frames.encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(wire)))
        if action == "flip" and at < len(wire):
            wire[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del wire[at:]
        else:
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    try:
        damaged = frames.decode(bytes(wire))
    except ProtocolError:
        return
    _receive_or_refuse(damaged)


def _paths(x: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = [path]
    if isinstance(x, list):
        for i, y in enumerate(x):
            out += _paths(y, (*path, i))
    return out


@settings(max_examples=500, deadline=None)
@given(valid_frames, st.data())
def test_frames_with_a_part_replaced_raise_only_protocol_error(
        frame: frames.Frame, data: st.DataObject) -> None:
    """Near misses: a valid frame with one element anywhere in it swapped for
    any other value."""
    raw = frames.to_wire(frame)
    path = data.draw(st.sampled_from(_paths(raw)[1:]))
    parent = raw
    for i in path[:-1]:
        parent = parent[i]
    parent[path[-1]] = data.draw(_msgpack_values)
    try:
        damaged = frames.decode(msgpack.packb(raw, use_bin_type=True))
    except ProtocolError:
        return
    _receive_or_refuse(damaged)
