"""What the agent tells systemd about itself, and how it watches its own loop.

* ``systemd_loop``: STATUS= lines whenever they change, and WATCHDOG=1 only
  while the gossip tick loop makes progress. A hung tick loop (a deadlock, a
  stuck await) therefore stops the pings and systemd restarts the unit after
  ``WatchdogSec``; a blocked event loop stops them too, since this task cannot
  run either.
* ``LagMeter``: how late the membership loop's timers fire, the best cheap
  measure of an event loop that is overloaded or blocked by synchronous
  work. It rides on wakeups the agent has anyway (a timer of its own would
  cost an idle agent two more wakeups a second).

Both take what they read and report as plain functions, so this module knows
nothing of the agent that runs them.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable

import anyio

from agent.runtime.sdnotify import Notifier

log = logging.getLogger("hs_gossip.supervision")

#: the tick loop counts as alive when its last tick is at most this many
#: intervals old (ticks are jittered by +-10% and a tick may wait on a flush)
TICK_GRACE_INTERVALS = 3.0


def tick_is_recent(last_tick: float, now: float, interval: float) -> bool:
    return now - last_tick <= max(TICK_GRACE_INTERVALS * interval, 1.0)


async def systemd_loop(notifier: Notifier, status_line: Callable[[], str],
                       last_tick: Callable[[], float], interval: float,
                       sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
    """``status_line()``: the STATUS= text now; ``last_tick()``: monotonic
    time of the last completed gossip tick; ``interval``: the gossip interval;
    ``sleep``: how to wait between pings (the agent's rounds, which fall
    back on a timer within half the period when the rounds stop)."""
    # Ping at a third of the watchdog period so one late ping is not fatal.
    period = min(notifier.watchdog_s / 3, 5.0) if notifier.watchdog_s else 5.0
    last_status = status_line()  # sent with READY=1
    # The tick loop starts together with this one: until its first tick, the
    # start counts as the last evidence (not the tick time 0 of an agent that
    # has not ticked yet, which read as a stall of the whole uptime).
    started = anyio.current_time()
    stalled = False
    while True:
        now = anyio.current_time()
        lines = []
        status = status_line()
        if status != last_status:
            lines.append("STATUS=" + status)
            last_status = status
        if notifier.watchdog_s:
            ticked = max(last_tick(), started)
            if tick_is_recent(ticked, now, interval):
                lines.append("WATCHDOG=1")
                if stalled:
                    log.warning("gossip loop is making progress again")
                    stalled = False
            elif not stalled:
                log.error("gossip loop made no progress for %.1fs; withholding the "
                          "systemd watchdog ping", now - ticked)
                stalled = True
        if lines:
            notifier.notify(*lines)
        await sleep(period)


#: container allocations (net) between two collections of the youngest
#: generation; Python's default is 700
GC_YOUNG = 5000


def freeze_startup() -> None:
    """Collect once, then freeze what is left: what start-up made (modules,
    the store, the app) lives as long as the process, so no later
    collection, automatic or ours, traverses it again. Run at the end of
    start-up, where a full collection's ~10-30 ms are part of starting
    rather than of the first idle seconds.

    Then collect the youngest generation every :data:`GC_YOUNG` allocations
    rather than every 700: applying a batch of entries makes a few objects
    per entry that all live until the batch is done, and at 700 the
    collector walked them again and again (about 5 % of a follower's CPU
    while streaming). A collection of 5,000 young objects takes well under
    a millisecond; the periodic full collection (:func:`trim_memory`) still
    bounds what cyclic garbage can wait."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


TRIM_AFTER = 5.0
TRIM_EVERY = 600.0


async def trim_memory() -> None:
    """Hand freed memory back to the OS: once start-up is over (its
    temporaries are ~0.6 MiB of a ~40 MiB agent), then every 10 minutes (a
    burst of sync traffic leaves free heap behind). A full collection, then
    glibc's malloc_trim; without glibc (musl) only the collection happens.
    Costs a few milliseconds each time once start-up is frozen
    (:func:`freeze_startup`)."""
    await anyio.sleep(TRIM_AFTER)
    while True:
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        await anyio.sleep(TRIM_EVERY)


class LagMeter:
    """Calls ``report(seconds late)`` each time a task that slept until a
    deadline wakes (:meth:`woke`), and logs a lag above a second when it is
    twice the worst logged so far."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self.report = report
        self.worst_logged = 0.0

    def woke(self, deadline: float, now: float) -> None:
        lag = max(0.0, now - deadline)
        self.report(lag)
        if lag > 1.0 and lag > 2 * self.worst_logged:
            log.warning("event loop ran %.2fs late", lag)
            self.worst_logged = lag
