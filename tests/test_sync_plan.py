"""The sync planner: who to reconcile with, how many at once, and when to retry."""

from __future__ import annotations

import pytest

from agent.core.sync_plan import BACKOFF_MAX, BACKOFF_MIN, SyncPlanner

OURS = {"a": b"1", "b": b"1", "c": b"1"}


def differing(*names: str) -> dict[str, bytes]:
    """A peer's digests: equal to ours except for ``names``."""
    return {n: (b"2" if n in names else b"1") for n in OURS}


def test_equal_digests_start_nothing() -> None:
    p = SyncPlanner(concurrency=4)
    assert p.plan(0.0, OURS, [("p1", differing()), ("p2", dict(OURS))]) == []
    assert not p.running


def test_one_session_per_peer() -> None:
    p = SyncPlanner(concurrency=4, cooldown=2.0)
    peers = [("p1", differing("a", "b"))]
    assert p.plan(0.0, OURS, peers) == [("p1", "a")]
    # still running: the peer's other difference waits, however often we ask
    assert p.plan(1.0, OURS, peers) == []
    assert p.plan(1.0, OURS, peers + peers) == []
    p.finished("p1", "a", 1.5, ok=True)
    # "a" cools down (the peer's digest is stale until it heartbeats again); "b" is next
    assert p.plan(1.5, OURS, peers) == [("p1", "b")]


def test_a_peer_listed_twice_gets_one_session() -> None:
    p = SyncPlanner(concurrency=4)
    assert p.plan(0.0, OURS, [("p1", differing("a")), ("p1", differing("b"))]) == [("p1", "a")]


def test_concurrency_cap() -> None:
    p = SyncPlanner(concurrency=2)
    peers = [(f"p{i}", differing("a")) for i in range(5)]
    first = p.plan(0.0, OURS, peers)
    assert first == [("p0", "a"), ("p1", "a")]
    assert p.plan(0.5, OURS, peers) == []  # both slots taken
    p.finished("p0", "a", 1.0, ok=True)
    assert p.plan(1.0, OURS, peers) == [("p2", "a")]  # one slot freed, one started
    assert len(p.running) == 2


def _due_at(p: SyncPlanner, peer: str, name: str, now: float) -> float:
    """The first time, to 1 ms, at which the pair is started again."""
    lo, hi = now, now + 10 * BACKOFF_MAX
    assert p.plan(lo, OURS, [(peer, differing(name))]) == []
    while hi - lo > 0.001:
        mid = (lo + hi) / 2
        probe = SyncPlanner(concurrency=p.concurrency, cooldown=p.cooldown,
                            pairs=dict(p.pairs))
        if probe.plan(mid, OURS, [(peer, differing(name))]):
            hi = mid
        else:
            lo = mid
    return hi


def test_backoff_doubles_to_the_max_after_failures() -> None:
    p = SyncPlanner(concurrency=1)
    now = 0.0
    waits = []
    for _ in range(9):
        assert p.plan(now, OURS, [("p1", differing("a"))]) == [("p1", "a")]
        p.finished("p1", "a", now, ok=False)
        due = _due_at(p, "p1", "a", now)
        waits.append(round(due - now, 2))
        now = due
    assert waits == [BACKOFF_MIN * 2**i for i in range(6)] + [BACKOFF_MAX] * 3
    assert waits[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_cool_down_after_success_resets_the_backoff() -> None:
    p = SyncPlanner(concurrency=1, cooldown=3.0)
    for t in (0.0, 10.0, 20.0, 30.0):  # four failures in a row: 8 s of backoff
        p.plan(t, OURS, [("p1", differing("a"))])
        p.finished("p1", "a", t, ok=False)
    assert _due_at(p, "p1", "a", 30.0) == pytest.approx(38.0, abs=0.01)
    assert p.plan(40.0, OURS, [("p1", differing("a"))]) == [("p1", "a")]
    p.finished("p1", "a", 40.0, ok=True)
    assert _due_at(p, "p1", "a", 40.0) == pytest.approx(43.0, abs=0.01)
    # and the next failure starts the doubling again from the minimum
    assert p.plan(43.0, OURS, [("p1", differing("a"))]) == [("p1", "a")]
    p.finished("p1", "a", 43.0, ok=False)
    assert _due_at(p, "p1", "a", 43.0) == pytest.approx(43.0 + BACKOFF_MIN, abs=0.01)


def test_a_peer_failing_for_days_stays_at_the_max() -> None:
    p = SyncPlanner(concurrency=1)
    now = 0.0
    for _ in range(3000):  # 2**3000 seconds would not fit a float
        p.plan(now, OURS, [("p1", differing("a"))])
        p.finished("p1", "a", now, ok=False)
        now += BACKOFF_MAX
    assert p.pairs[("p1", "a")].not_before == now  # the last failure plus the max


def test_pairs_table_is_bounded() -> None:
    p = SyncPlanner(concurrency=1000, max_pairs=50)
    now = 0.0
    # peers that come and go, all failing: each leaves a pair in backoff
    for i in range(500):
        peer = f"p{i}"
        assert p.plan(now, OURS, [(peer, differing("a"))]) == [(peer, "a")]
        p.finished(peer, "a", now, ok=False)
        assert len(p.pairs) <= 50
        now += 0.001
    # the ones kept are those that wait longest: the most recent failures
    assert ("p499", "a") in p.pairs and ("p0", "a") not in p.pairs
    assert not p.running
