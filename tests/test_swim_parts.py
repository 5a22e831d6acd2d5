"""The pure parts of the SWIM core: suspicion timing, the broadcast queue, local health.

Tables after memberlist's suspicion_test.go, broadcast_test.go and awareness_test.go.
"""

from __future__ import annotations

import heapq
import math
import re
from pathlib import Path

import pytest

from agent.core.swim.awareness import Awareness
from agent.core.swim.broadcasts import MAX_SKIPS, BroadcastQueue, retransmit_limit
from agent.core.swim.suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_bounds,
    suspicion_timeout,
)

# memberlist's LAN profile (params.lan() differs only in suspicion_mult, 3):
# probe_interval 1 s, suspicion_mult 4, suspicion_max_mult 6, suspicion_min 2 s
LAN = {"probe_interval": 1.0, "mult": 4.0, "max_mult": 6.0, "floor": 2.0}
A, B, C, D, E = (bytes([i]) * 16 for i in range(1, 6))

# ---------------------------------------------------------------- suspicion


@pytest.mark.parametrize(
    ("n", "lo", "hi"),
    [(0, 2.0, 12.0), (1, 2.0, 12.0), (3, 2.0, 12.0), (10, 4.0, 24.0), (100, 8.0, 48.0),
     (1000, 12.0, 72.0)],
)
def test_bounds_grow_with_log10_n_above_the_floor(n: int, lo: float, hi: float) -> None:
    assert suspicion_bounds(n, **LAN) == pytest.approx((lo, hi))


def test_bounds_scale_with_the_probe_interval() -> None:
    assert suspicion_bounds(100, 0.5, 4.0, 6.0, 1.0) == pytest.approx((4.0, 24.0))


@pytest.mark.parametrize(
    ("mult", "n", "k"), [(4, 1, 0), (4, 3, 0), (4, 4, 2), (4, 1000, 2), (5, 5, 3), (5, 4, 0),
                         (2, 100, 0), (1, 100, 0)],
)
def test_expected_confirmations_need_enough_other_members(mult: int, n: int, k: int) -> None:
    assert expected_confirmations(mult, n) == k


# (N, timeouts after 0, 1, 2, 3 confirmations) with the LAN parameters and k = 2:
# max - (max - min) * log(C + 1) / log(3), never below min.
LAN_TABLE = [
    (1, [2.0, 2.0, 2.0, 2.0]),  # k = 0 at N = 1: min at once
    (10, [24.0, 11.3814, 4.0, 4.0]),
    (100, [48.0, 22.7628, 8.0, 8.0]),
    (1000, [72.0, 34.1442, 12.0, 12.0]),
]


@pytest.mark.parametrize(("n", "timeouts"), LAN_TABLE)
def test_timeout_table_by_n_and_confirmations(n: int, timeouts: list[float]) -> None:
    lo, hi = suspicion_bounds(n, **LAN)
    k = expected_confirmations(4, n)
    got = [suspicion_timeout(lo, hi, c, k) for c in range(4)]
    assert got == pytest.approx(timeouts, abs=1e-3)


@pytest.mark.parametrize(
    ("confirmations", "remaining"),
    # memberlist TestSuspicion_remainingSuspicionTime (k = 3, min 2 s, max 30 s), as
    # timeout - elapsed; memberlist floors to whole ms (4.810 s), we do not.
    [(0, 30.0), (1, 14.0), (2, 4.8105), (3, -2.0), (4, -3.0), (5, -8.0)],
)
def test_timeout_matches_memberlist_table(confirmations: int, remaining: float) -> None:
    elapsed = {0: 0.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 5: 10.0}[confirmations]
    got = suspicion_timeout(2.0, 30.0, confirmations, 3) - elapsed
    assert got == pytest.approx(remaining, abs=1e-3)


def test_no_expected_confirmations_means_min() -> None:
    assert suspicion_timeout(2.0, 30.0, 0, 0) == 2.0
    assert suspicion_timeout(2.0, 30.0, 0, -1) == 2.0


def test_suspicion_counts_each_independent_confirmer_once() -> None:
    s = Suspicion(A, started=100.0, min_s=4.0, max_s=24.0, expected=2)
    assert s.deadline == pytest.approx(124.0)
    assert not s.confirm(A)  # the accuser repeating itself is not a confirmation
    assert s.confirmations == 0
    assert s.confirm(B)
    assert not s.confirm(B)  # one vote per member
    assert s.confirmations == 1
    assert s.deadline == pytest.approx(100.0 + 11.3814, abs=1e-3)
    assert s.confirm(C)
    assert s.deadline == pytest.approx(104.0)
    assert not s.confirm(D)  # bounded at `expected`
    assert s.confirmations == 2
    assert s.deadline == pytest.approx(104.0)


def test_suspicion_without_expected_confirmations_ends_at_min() -> None:
    s = Suspicion(A, started=10.0, min_s=2.0, max_s=12.0, expected=0)
    assert s.deadline == pytest.approx(12.0)
    assert not s.confirm(B)
    assert s.confirmations == 0


def test_confirmations_only_move_the_deadline_earlier() -> None:
    s = Suspicion(A, started=0.0, min_s=8.0, max_s=48.0, expected=5)
    deadlines = [s.deadline]
    for i in range(10):
        s.confirm(bytes([100 + i]) * 16)
        deadlines.append(s.deadline)
    assert deadlines == sorted(deadlines, reverse=True)
    assert deadlines[-1] == pytest.approx(8.0)
    assert s.confirmations == 5


# ---------------------------------------------------------------- awareness


def test_awareness_clamps_between_zero_and_max_minus_one() -> None:
    a = Awareness()
    assert a.score == 0
    a.apply(-1)
    assert a.score == 0
    a.apply(3)
    assert a.score == 3
    a.apply(100)
    assert a.score == 7
    a.apply(-2)
    assert a.score == 5
    a.apply(-100)
    assert a.score == 0


@pytest.mark.parametrize(("deltas", "score", "scaled"),
                         # memberlist TestAwareness: max 8, 1 s timeout
                         [([0], 0, 1.0), ([-1], 0, 1.0), ([-10], 0, 1.0), ([1], 1, 2.0),
                          ([-1, 1], 1, 2.0), ([10], 7, 8.0), ([10, -1], 6, 7.0),
                          ([-1, -1, 2, 1], 3, 4.0)])
def test_awareness_scales_by_score_plus_one(deltas: list[int], score: int, scaled: float) -> None:
    a = Awareness(max_score=8)
    for d in deltas:
        a.apply(d)
    assert a.score == score
    assert a.scale(1.0) == pytest.approx(scaled)
    assert a.scale(0.5) == pytest.approx(scaled / 2)


def test_awareness_max_one_never_scales() -> None:
    a = Awareness(max_score=1)
    a.apply(5)
    assert a.score == 0
    assert a.scale(2.0) == 2.0
    with pytest.raises(ValueError):
        Awareness(max_score=0)


# ---------------------------------------------------------------- broadcast queue


@pytest.mark.parametrize(
    ("mult", "n", "limit"),
    [(4, 0, 0), (4, 1, 4), (4, 9, 4), (4, 10, 8), (4, 99, 8), (4, 100, 12), (3, 1000, 12),
     (4, 4096, 16), (1, 1, 1)],
)
def test_retransmit_limit_is_mult_times_ceil_log10(mult: int, n: int, limit: int) -> None:
    assert retransmit_limit(mult, n) == limit
    if n > 0:
        assert limit == mult * math.ceil(math.log10(n + 1))


def test_newest_first_among_equally_sent() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=100)
    for node, item in ((A, b"a"), (B, b"b"), (C, b"c")):
        q.put(node, item)
    assert len(q) == 3
    assert q.take(1000, 10) == [b"c", b"b", b"a"]


def test_least_sent_before_newer_but_more_sent() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=100)
    q.put(A, b"a")
    q.put(B, b"b")
    assert q.take(1, 10) == [b"b"]  # budget for one: b is sent once
    q.put(C, b"c")
    # a (0 sends, old) comes before b (1 send); c (0 sends, newest) first of all
    assert q.take(1000, 10) == [b"c", b"a", b"b"]
    # now c and a have 1 send, b has 2
    assert q.take(1000, 10) == [b"c", b"a", b"b"]


def test_one_take_never_returns_an_item_twice() -> None:
    q = BroadcastQueue(retransmit_mult=10, max_items=10)
    q.put(A, b"a")
    assert q.take(1000, 100) == [b"a"]


def test_new_item_about_a_node_replaces_the_queued_one_and_its_count() -> None:
    q = BroadcastQueue(retransmit_mult=1, max_items=100)  # limit 2 at n = 10
    q.put(A, b"alive-a")
    q.put(B, b"alive-b")
    assert q.take(1000, 10) == [b"alive-b", b"alive-a"]
    q.put(A, b"suspect-a")
    assert len(q) == 2
    assert "alive-a" not in repr(q.take(1000, 10))
    # suspect-a starts at 0 sends: still queued after alive-b reached its limit
    assert len(q) == 1
    assert q.take(1000, 10) == [b"suspect-a"]
    assert len(q) == 0
    assert A not in q


def test_each_item_is_sent_exactly_limit_times() -> None:
    q = BroadcastQueue(retransmit_mult=3, max_items=100)
    q.put(A, b"a")
    q.put(B, b"b")
    n = 50  # limit 3 * ceil(log10 51) = 6
    counts = {b"a": 0, b"b": 0}
    for _ in range(20):
        for item in q.take(1000, n):
            counts[item] += 1
    assert counts == {b"a": 6, b"b": 6}
    assert len(q) == 0


def test_items_past_a_shrunk_limit_are_dropped() -> None:
    q = BroadcastQueue(retransmit_mult=2, max_items=100)
    q.put(A, b"a")
    for _ in range(3):
        assert q.take(1000, 100) == [b"a"]  # limit 6 at n = 100
    assert q.take(1000, 5) == []  # limit 2 at n = 5: already sent 3 times
    assert len(q) == 0


def test_no_members_sends_nothing_and_keeps_everything() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=10)
    q.put(A, b"a")
    assert q.take(1000, 0) == []
    assert len(q) == 1
    assert q.take(1000, 1) == [b"a"]


def test_bounded_dropping_the_most_sent_then_oldest() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=3)
    for node in (A, B, C):
        q.put(node, node[:1])
    assert q.take(1000, 10) == [C[:1], B[:1], A[:1]]  # all sent once
    q.put(D, D[:1])  # 4 items: evict the most sent, oldest: A
    assert len(q) == 3 and A not in q
    q.put(E, E[:1])  # then B
    assert len(q) == 3 and B not in q
    assert q.evicted == 2
    assert q.take(1000, 10) == [E[:1], D[:1], C[:1]]


def test_bounded_drops_the_most_sent_before_the_oldest() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=2)
    q.put(A, b"a")
    q.put(B, b"b")
    assert q.take(1, 10) == [b"b"]  # b sent once, a never
    q.put(C, b"c")
    assert B not in q and A in q
    assert q.take(1000, 10) == [b"c", b"a"]


def test_bounded_without_sends_drops_the_oldest() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=2)
    for i in range(10):
        q.put(bytes([i]) * 16, bytes([i]))
    assert len(q) == 2
    assert q.take(1000, 10) == [bytes([9]), bytes([8])]


def test_budget_counts_item_sizes_and_overhead() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=100)
    for node in (A, B, C):
        q.put(node, b"x" * 10)
    assert len(q.take(25, 10)) == 2
    q2 = BroadcastQueue(retransmit_mult=4, max_items=100)
    for node in (A, B, C):
        q2.put(node, b"x" * 10)
    assert len(q2.take(25, 10, overhead=3)) == 1  # 13 + 13 > 25
    assert len(q2.take(26, 10, overhead=3)) == 2
    assert q.take(0, 10) == []


def test_items_that_do_not_fit_are_skipped_and_not_counted() -> None:
    q = BroadcastQueue(retransmit_mult=1, max_items=100)  # limit 1 at n = 1
    q.put(A, b"small")
    q.put(B, b"L" * 100)  # newest, but too big for this datagram
    assert q.take(50, 1) == [b"small"]
    assert len(q) == 1  # small reached its limit; the big one was not counted
    assert q.take(50, 1) == []
    assert q.take(200, 1) == [b"L" * 100]
    assert len(q) == 0


def test_take_looks_at_a_bounded_number_of_items(monkeypatch: pytest.MonkeyPatch) -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=20_000)
    q.put(A, b"s")  # oldest and small: behind 10,000 items that never fit
    for i in range(10_000):
        q.put(i.to_bytes(4, "big"), b"B" * 200)
    pops = 0
    real = heapq.heappop

    def counting(heap: list[object]) -> object:
        nonlocal pops
        pops += 1
        return real(heap)  # type: ignore[type-var]

    monkeypatch.setattr(heapq, "heappop", counting)
    assert q.take(100, 10) == []  # gives up rather than scanning the queue
    assert pops <= MAX_SKIPS + 1
    assert len(q) == 10_001


def test_heaps_stay_bounded_under_replacement_churn() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=10)
    for i in range(20_000):
        q.put(bytes([i % 5]) * 16, i.to_bytes(4, "big"))
    assert len(q) == 5
    assert len(q._send) + len(q._evict) <= 4 * len(q) + 64 + 2


def test_heaps_stay_bounded_under_repeated_sends() -> None:
    q = BroadcastQueue(retransmit_mult=100, max_items=10)
    for node in (A, B, C, D, E):
        q.put(node, node[:1])
    for _ in range(500):
        assert len(q.take(1000, 10**6)) == 5  # limit 600: nothing leaves
    assert len(q._send) + len(q._evict) <= 4 * len(q) + 64 + 2


def test_discard_forgets_a_node() -> None:
    q = BroadcastQueue(retransmit_mult=4, max_items=10)
    q.put(A, b"a")
    q.put(B, b"b")
    q.discard(A)
    q.discard(C)
    assert len(q) == 1
    assert q.take(1000, 10) == [b"b"]


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        BroadcastQueue(retransmit_mult=0, max_items=10)
    with pytest.raises(ValueError):
        BroadcastQueue(retransmit_mult=4, max_items=0)


# ---------------------------------------------------------------- purity


def test_parts_read_no_clock_randomness_or_socket() -> None:
    root = Path(__file__).resolve().parent.parent / "agent" / "core" / "swim"
    for name in ("broadcasts.py", "suspicion.py", "awareness.py"):
        src = (root / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+(time|random|socket|os)\b", src, re.M), name
        assert not re.search(r"\b(time|random|socket)\.", src), name


def test_a_refinement_keeps_the_send_count_of_what_it_replaces() -> None:
    """A suspicion's confirmation goes on with what is left of the suspicion's
    sends (keep_count); news replacing news starts again at 0."""
    q = BroadcastQueue(retransmit_mult=1, max_items=100)  # limit 2 at n = 10
    q.put(A, b"suspect")
    assert q.take(1000, 10) == [b"suspect"]  # one send of two
    q.put(A, b"confirmed", keep_count=True)
    assert q.take(1000, 10) == [b"confirmed"]
    assert q.take(1000, 10) == [] and len(q) == 0  # the limit counted both
    q.put(B, b"suspect")
    assert q.take(1000, 10) == [b"suspect"]
    q.put(B, b"alive")  # new news: two more sends
    assert q.take(1000, 10) == [b"alive"]
    assert q.take(1000, 10) == [b"alive"]
    assert len(q) == 0
