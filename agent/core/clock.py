"""Hybrid logical clock (HLC): 48 bits of Unix milliseconds, 16 bits of counter.

Every item version carries an HLC. A local write takes ``now()``: never below
the wall clock, always above anything this node has seen, so a write made
after reading a value orders after it even between devices whose clocks
disagree. A remote HLC is adopted by ``observe`` only once the write carrying
it was accepted; one more than ``max_skew`` ahead of our wall clock is
refused (a device with a clock years ahead must not drag the swarm along).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_HLC = (1 << 63) - 1


def physical_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


def counter(hlc: int) -> int:
    return hlc & COUNTER_MASK


class HLC:
    """``clock`` returns the wall clock in Unix milliseconds; the process
    passes the real one, tests and simulations their own."""

    def __init__(self, clock: Callable[[], int], last: int = 0) -> None:
        self.last = last
        self._clock = clock
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            pt = self._clock() << COUNTER_BITS
            self.last = pt if pt > self.last else self.last + 1
            return self.last

    def observe(self, remote: int) -> None:
        with self._lock:
            if remote > self.last:
                self.last = remote

    def ahead_limit(self, max_skew_s: float) -> int:
        """The newest physical time (ms) a remote clock may show now."""
        return self._clock() + int(max_skew_s * 1000)
