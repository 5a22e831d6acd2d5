"""Lifeguard local health ("awareness"): how much to distrust our own verdicts.

After HashiCorp memberlist's ``awareness.go`` (Lifeguard, Dadgar et al. 2018).
A member whose probes go unanswered may be the sick one: starved of CPU,
behind a saturated link, or paused. Such a member would otherwise accuse
healthy peers. So it keeps a score of its own trouble and stretches its probe
timeout and probe interval (and its suspicion timeouts) by ``score + 1``.

Rules (the caller decides the deltas, as memberlist's state.go does):

* +1 when a probe fails and fewer nacks came back than indirect probes were
  asked (the helpers could not even tell us "no answer": our own traffic is
  suffering), +1 when we have to refute a suspicion about ourselves;
* -1 when a probe succeeds.
* The score is clamped to ``0 .. max_score - 1``: at worst we run
  ``max_score`` times slower, never stop probing. The trade-off: a larger
  ``max_score`` removes more false accusations from a sick member, but a sick
  member that is also right about a dead peer takes that much longer to say so.
"""

from __future__ import annotations


class Awareness:
    """Local health score in ``0 .. max_score - 1``; 0 is healthy."""

    __slots__ = ("_score", "max_score")

    def __init__(self, max_score: int = 8) -> None:
        if max_score < 1:
            raise ValueError("max_score must be at least 1")
        self.max_score = max_score
        self._score = 0

    def apply(self, delta: int) -> None:
        """Add ``delta`` and clamp to ``0 .. max_score - 1`` (memberlist ``ApplyDelta``)."""
        self._score = min(max(self._score + delta, 0), self.max_score - 1)

    @property
    def score(self) -> int:
        return self._score

    def scale(self, duration: float) -> float:
        """``duration * (score + 1)`` (memberlist ``ScaleTimeout``)."""
        return duration * (self._score + 1)
