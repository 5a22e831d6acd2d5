"""The timers a sans-I/O core asks for, kept in one heap and fired in order.

Rules: a core says "call me back at this deadline with this timer" and never
cancels; a timer that no longer applies is ignored by the core when it fires.
So the heap only grows by what the core asked for and shrinks as deadlines
pass, and :meth:`TimerHeap.due` costs O(log n) per fired timer. The task
that waits on it sleeps until the earliest deadline, or until an earlier one
is added (:meth:`wait` returns then, so the caller recomputes). A timer the
core says it no longer wants is dropped before the wait instead of waking it.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")

#: the most timers held at once. Beyond it the timers the core no longer
#: wants go first, and only then (logged) the latest deadlines. A core asks
#: for a handful per member in flight, so this is never reached by a healthy
#: one: it only keeps a bug from growing memory without bound.
MAX_TIMERS = 1 << 16

log = logging.getLogger("hs_gossip")


class TimerHeap(Generic[T]):
    """``live(timer)`` says whether the core still wants a timer it handed
    out (None: every timer counts)."""

    def __init__(self, live: Callable[[T], bool] | None = None,
                 max_timers: int = MAX_TIMERS) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0
        self._wake = anyio.Event()
        self.live = live
        self.max_timers = max_timers
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, items: Iterable[tuple[float, T]]) -> None:
        earliest = self._heap[0][0] if self._heap else float("inf")
        for deadline, timer in items:
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, timer))
            if deadline < earliest:
                earliest = deadline
                self._wake.set()
        if len(self._heap) > self.max_timers:
            self._shed()

    def _shed(self) -> None:
        live = self.live
        if live is not None:
            self._heap = [e for e in self._heap if live(e[2])]
            heapq.heapify(self._heap)
        excess = len(self._heap) - self.max_timers
        if excess > 0:
            self.dropped += excess
            log.error("timer heap full: %d timers dropped (a core that asks for this "
                      "many is broken)", excess)
            self._heap = heapq.nsmallest(self.max_timers, self._heap)
            heapq.heapify(self._heap)

    def prune(self) -> None:
        """Drop the timers at the top that the core no longer wants, and
        wake the waiting loop when that moved its deadline: an ACK that
        makes the probe's timeout moot then costs no wakeup half a second
        later."""
        live = self.live
        if live is None or not self._heap or live(self._heap[0][2]):
            return
        while self._heap and not live(self._heap[0][2]):
            heapq.heappop(self._heap)
        self._wake.set()

    def due(self, now: float) -> list[T]:
        """Pop every timer whose deadline has passed, earliest first."""
        out: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    async def wait(self, until: float) -> float:
        """Checkpoint. Sleep until the earliest deadline but not past
        ``until``, or until an earlier timer is added. Timers at the top
        that ``live`` says no longer matter are dropped first, so a
        cancelled timer costs no wakeup. Returns the deadline it slept
        towards (to tell how late the loop woke)."""
        self._wake = anyio.Event()
        live = self.live
        if live is not None:
            while self._heap and not live(self._heap[0][2]):
                heapq.heappop(self._heap)
        deadline = min(self._heap[0][0], until) if self._heap else until
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await self._wake.wait()
        return deadline
