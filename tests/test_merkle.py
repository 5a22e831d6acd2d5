"""Reconciliation properties on in-memory replicas."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from merkle.loopback import run_pair
from merkle.reconcile import ProtocolError, Session
from merkle.tree import Item, MemoryTree, state_hash

ORIGINS = [bytes([i]) * 16 for i in range(5)]


def mk(key: str, hlc: int, origin: int, value: int | None) -> Item:
    return Item(key, hlc, ORIGINS[origin], value is None,
                None if value is None else value.to_bytes(4, "big"))


def sync(a: MemoryTree, b: MemoryTree, cut_after: int | None = None):  # type: ignore[no-untyped-def]
    def apply_to(t: MemoryTree):  # type: ignore[no-untyped-def]
        return lambda items: [t.apply(i) for i in items]

    return run_pair(a, apply_to(a), b, apply_to(b), cut_after=cut_after)


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


def test_lying_hashes_cannot_break_a_replica() -> None:
    a = MemoryTree()
    for i in range(100):
        a.apply(mk(f"k{i}", i, 0, i))
    before = a.root()
    s = Session(a)
    s.receive([1, "c", b"\0" * 8, b"zzzz", 5, b"\xff" * 64, [10**6] * 16])
    for bad in ([2, [[99, 0, b"", []]], [], [], False], [2, "x", [], [], False], "junk",
                [2, [], [[1, 0, b"abc"]], [], False], [7]):
        try:
            s.receive(bad)
        except ProtocolError:
            pass
        else:
            raise AssertionError(f"accepted {bad!r}")
    assert a.root() == before


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
            sync(replicas[i], replicas[j], cut_after=rnd.randint(0, 6))
    # then complete syncs in random pairs until everyone has met everyone
    for _ in range(3):
        for i in range(n):
            for j in range(n):
                if i != j:
                    sync(replicas[i], replicas[j])
    roots = {r.root() for r in replicas}
    assert len(roots) == 1
    assert all(r.items == replicas[0].items for r in replicas)
    total, count = roots.pop()
    assert len(state_hash(total, count)) == 16
