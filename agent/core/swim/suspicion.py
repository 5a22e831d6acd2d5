"""Suspicion timing: how long a suspected member has to refute before it is declared dead.

Pure maths after HashiCorp memberlist's ``suspicion.go`` and ``util.go``
(Lifeguard, Dadgar et al. 2018, "Lifeguard: Local Health Awareness for More
Accurate Failure Detection"). No clock is read here: times are plain seconds
handed in by the caller.

Rules:

* **Bounds grow with log N** (:func:`suspicion_bounds`): ``min = max(floor,
  mult * log10(max(n, 1)) * probe_interval)``, ``max = max_mult * min``. In a
  larger swarm the news of a suspicion needs more gossip rounds (O(log N)) to
  reach the suspect so it can refute; a fixed timeout would kill slow-to-hear
  members of big swarms, a linear one would make detection useless there. The
  ``floor`` keeps tiny swarms (N = 1..3, where log10 is ~0) from declaring a
  member dead after a single lost datagram or two.
* **Independent confirmations shorten it** (:func:`suspicion_timeout`):
  starting at ``max`` when nobody else agrees, each distinct member that also
  suspects the node moves the deadline down along ``log(C + 1) / log(k + 1)``
  until ``k`` confirmations reach ``min``. The trade-off: a lone accuser (who
  may itself be the sick one, e.g. starved of CPU or on a lossy link) must wait
  the long ``max``, while a real failure seen by several members is declared
  almost as fast as plain SWIM. The logarithm makes the first confirmations
  count most. With ``k < 1`` (too few members to expect any) the timeout is
  ``min`` straight away, as memberlist does.
* **A confirmation counts once per member, never from the accuser**, and stops
  counting at ``k`` (:class:`Suspicion`), so a single chatty or hostile member
  cannot shorten the timeout on its own.

Unlike memberlist, times are not floored to whole milliseconds; its table
test's 4.81 s is 4.8106... s here.
"""

from __future__ import annotations

import math


def suspicion_bounds(
    n: int, probe_interval: float, mult: float, max_mult: float, floor: float
) -> tuple[float, float]:
    """(min, max) suspicion timeout in seconds for a swarm of ``n`` members.

    ``min = max(floor, mult * log10(max(n, 1)) * probe_interval)`` (memberlist's
    ``suspicionTimeout``, with an explicit floor instead of its log10 >= 1
    clamp) and ``max = max_mult * min`` (memberlist's SuspicionMaxTimeoutMult).
    """
    scale = math.log10(max(n, 1))
    lo = max(floor, mult * scale * probe_interval)
    return lo, max_mult * lo


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """How many independent confirmations a suspicion waits for (memberlist ``k``).

    ``suspicion_mult - 2``, or 0 when the swarm has too few other members to
    give them: ``n`` counts everyone including ourselves, and neither we nor the
    suspect can confirm, hence ``n - 2`` possible confirmers (state.go).
    """
    k = suspicion_mult - 2
    if n - 2 < k:
        return 0
    return max(k, 0)


def suspicion_timeout(min_s: float, max_s: float, confirmations: int, expected: int) -> float:
    """Timeout after ``confirmations`` of ``expected`` (memberlist ``remainingSuspicionTime``).

    ``max(min, max - (max - min) * log(C + 1) / log(k + 1))``; ``k < 1`` gives ``min``.
    Measured from the start of the suspicion, not from now.
    """
    if expected < 1:
        return min_s
    c = max(confirmations, 0)
    frac = math.log(c + 1) / math.log(expected + 1)
    return max(min_s, max_s - (max_s - min_s) * frac)


class Suspicion:
    """One running suspicion of one member: who accused it, who confirmed, when it ends."""

    __slots__ = ("_confirmers", "accuser", "checked", "dead_from", "expected", "max_s", "min_s",
                 "started")

    def __init__(
        self, from_id: bytes, started: float, min_s: float, max_s: float, expected: int
    ) -> None:
        self.accuser = from_id
        self.started = started
        self.min_s = min_s
        self.max_s = max_s
        self.expected = expected
        # Only the distinct confirmers are kept (at most `expected`), so memory
        # per suspicion is bounded whatever arrives.
        self._confirmers: set[bytes] = set()
        #: the accuser of a DEAD heard while the suspicion was not yet
        #: corroborated: it takes effect once it is
        self.dead_from: bytes | None = None
        #: the suspect was asked directly (and through helpers) one period
        #: before the verdict (see agent.core.swim.protocol)
        self.checked = False

    def confirm(self, from_id: bytes) -> bool:
        """Count ``from_id`` as an independent confirmation.

        True only when it is new: not the accuser, not already counted, and
        fewer than ``expected`` counted so far. True means the deadline moved
        earlier and the caller should re-arm its timer (and may re-gossip the
        suspicion, as memberlist does).
        """
        if len(self._confirmers) >= self.expected:
            return False
        if from_id == self.accuser or from_id in self._confirmers:
            return False
        self._confirmers.add(from_id)
        return True

    @property
    def confirmations(self) -> int:
        return len(self._confirmers)

    @property
    def corroborated(self) -> bool:
        """Every confirmation waited for is in: ``expected`` members besides the
        accuser suspect the node independently (never true when none is expected)."""
        return self.expected >= 1 and len(self._confirmers) >= self.expected

    @property
    def timeout(self) -> float:
        """Current timeout in seconds from ``started``."""
        return suspicion_timeout(self.min_s, self.max_s, len(self._confirmers), self.expected)

    @property
    def deadline(self) -> float:
        """When the suspect is declared dead unless it refutes first."""
        return self.started + self.timeout
