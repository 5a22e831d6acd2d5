"""The timers a sans-I/O core asks for, kept in one heap and fired in order.

Rules: a core says "call me back at this deadline with this timer" and never
cancels; a timer that no longer applies is ignored by the core when it fires.
So the heap only grows by what the core asked for and shrinks as deadlines
pass, and :meth:`TimerHeap.due` costs O(log n) per fired timer. The task
that waits on it sleeps until the earliest deadline. A timer added or
dropped while it sleeps moves the deadline of that sleep instead of waking
the task to recompute it (an idle agent's CPU is mostly the cost of its
wakeups). A timer the core says it no longer wants is dropped before the
wait instead of waking it.
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
        #: the sleep in progress (its deadline is moved as timers come and go)
        self._scope: anyio.CancelScope | None = None
        self._until = float("inf")
        #: an event nobody sets, made on the loop that waits on it
        self._never_set: anyio.Event | None = None
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
        if len(self._heap) > self.max_timers:
            self._shed()
        if self._heap and self._heap[0][0] < earliest:
            self._retarget()

    def _never(self) -> anyio.Event:
        if self._never_set is None:
            self._never_set = anyio.Event()
        return self._never_set

    def _retarget(self) -> None:
        """Move the sleep in progress to the deadline the heap asks for now."""
        scope = self._scope
        if scope is not None:
            scope.deadline = min(self._heap[0][0], self._until) if self._heap else self._until

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
        move the sleep in progress to the next one: an ACK that makes the
        probe's timeout moot then costs no wakeup, neither now nor half a
        second later."""
        live = self.live
        if live is None or not self._heap or live(self._heap[0][2]):
            return
        while self._heap and not live(self._heap[0][2]):
            heapq.heappop(self._heap)
        self._retarget()

    def due(self, now: float) -> list[T]:
        """Pop every timer whose deadline has passed, earliest first."""
        out: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    async def wait(self, until: float) -> float:
        """Checkpoint. Sleep until the earliest deadline but not past
        ``until`` (timers added or pruned meanwhile move that deadline).
        Timers at the top that ``live`` says no longer matter are dropped
        first, so a cancelled timer costs no wakeup. Returns the deadline it
        slept towards (to tell how late the loop woke)."""
        live = self.live
        if live is not None:
            while self._heap and not live(self._heap[0][2]):
                heapq.heappop(self._heap)
        self._until = until
        deadline = min(self._heap[0][0], until) if self._heap else until
        with anyio.CancelScope(deadline=deadline) as scope:
            self._scope = scope
            try:
                # Never set: the scope's deadline ends the wait. (Not
                # sleep_forever, which nests a cancel scope of its own.)
                await self._never().wait()
            finally:
                self._scope = None
        return scope.deadline


#: waiting entries of :class:`Rounds` before the first sweep of moot ones
SWEEP_MIN = 64


class Rounds:
    """Slow periodic work (snapshots, purges, the idle sync plan, watchdog
    pings) woken by the agent's round, which itself rides on the probe
    timer's wakeup, instead of by timers of its own: each such timer costs
    an idle process a wakeup. :meth:`tick` is called on every round;
    :meth:`sleep` returns on the first round within ``slack`` of its
    deadline, or on its own timer a little later should rounds stop.
    Entries whose event was set meanwhile (a sleeper woken by its own timer,
    an idle plan poked early) are dropped when they pile up, so a waiter
    woken often before its round holds no more than the live ones."""

    def __init__(self, slack: float) -> None:
        self.slack = slack
        self._waiting: list[tuple[float, int, anyio.Event]] = []
        self._seq = 0
        self._sweep_at = SWEEP_MIN

    def __len__(self) -> int:
        return len(self._waiting)

    def wake_at(self, deadline: float, event: anyio.Event) -> None:
        """Set ``event`` on the first round within ``slack`` of ``deadline``."""
        if len(self._waiting) >= self._sweep_at:
            self._waiting = [w for w in self._waiting if not w[2].is_set()]
            heapq.heapify(self._waiting)
            self._sweep_at = max(SWEEP_MIN, 2 * len(self._waiting))
        self._seq += 1
        heapq.heappush(self._waiting, (deadline, self._seq, event))

    def tick(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now + self.slack:
            heapq.heappop(self._waiting)[2].set()

    async def sleep(self, seconds: float) -> None:
        """Checkpoint. Sleep about ``seconds``: until a round wakes it, at
        most ``min(seconds / 2, 4 * slack)`` late when rounds stop."""
        event = anyio.Event()
        self.wake_at(anyio.current_time() + seconds, event)
        try:
            with anyio.move_on_after(seconds + min(seconds / 2, 4 * self.slack)):
                await event.wait()
        finally:
            event.set()  # its entry is moot now (see wake_at)

