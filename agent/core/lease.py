"""The leader's lease rule: how long a coordinator may act as leader.

A coordinator elected through etcd holds its leader key with a lease of
``ttl`` seconds. etcd deletes the key (and another candidate may win) once
the lease goes ``ttl`` seconds without a keepalive. The leader must stop
accepting writes BEFORE that can happen, using only its own monotonic clock:

* A keepalive SENT at ``t`` (our clock) reaches etcd at ``t`` or later, so
  etcd renews the lease until at least ``t + ttl``. The answer's arrival time
  tells nothing more (the request may have waited on the way there), so the
  rule counts from the sending time, never from the answer.
* The leader is leader while ``now < sent_at + ttl - margin``, where
  ``sent_at`` is the sending time of the last keepalive that succeeded. The
  margin covers what the clocks cannot see: a write checked just before the
  limit and committed just after, a paused process, etcd's clock running a
  little fast.
* Once the limit has passed the term is over, even if a late answer arrives
  afterwards: the leader has already told its writers to stop, so it steps
  down and campaigns again (a new lease, a new key, a higher epoch).
* Keepalives go every ``ttl / 3``: two may fail before the limit.

Pure: times are arguments (seconds of a monotonic clock), nothing is read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: the margin is this share of the TTL, within the bounds below
MARGIN_SHARE = 0.2
MIN_MARGIN = 0.5
MAX_MARGIN = 5.0


def safety_margin(ttl: float) -> float:
    """Seconds before the lease could expire at which the leader stops:
    a fifth of the TTL, at least 0.5 s, at most 5 s (and always below the
    keepalive period's two thirds of the TTL, so a healthy leader never
    lapses between keepalives)."""
    margin = min(MAX_MARGIN, max(MIN_MARGIN, ttl * MARGIN_SHARE))
    return min(margin, ttl / 3)


def keepalive_period(ttl: float) -> float:
    """Seconds between keepalives: a third of the TTL."""
    return ttl / 3


def valid_until(sent_at: float, ttl: float, margin: float) -> float:
    """The last instant a leader whose keepalive (or grant) was sent at
    ``sent_at`` and renewed the lease to ``ttl`` seconds may act as leader."""
    return sent_at + ttl - margin


@dataclass(frozen=True)
class Term:
    """One term as leader: the key's create revision (``epoch``), the lease
    holding it and the moment the leader must stop (``until``)."""

    epoch: int
    lease_id: int
    margin: float
    until: float
    #: sending time of the last keepalive (or grant) that succeeded
    renewed_sent_at: float

    def is_leader(self, now: float) -> bool:
        return now < self.until

    def next_keepalive(self, ttl: float) -> float:
        return self.renewed_sent_at + keepalive_period(ttl)

    def renewed(self, sent_at: float, ttl_left: float, answered_at: float) -> Term | None:
        """The term after a keepalive sent at ``sent_at`` was answered at
        ``answered_at`` with the lease renewed to ``ttl_left`` seconds; None
        when the term is over: the lease is gone (``ttl_left`` <= 0) or the
        limit passed before the answer came."""
        if ttl_left <= 0 or not self.is_leader(answered_at):
            return None
        until = max(self.until, valid_until(sent_at, ttl_left, self.margin))
        return replace(self, until=until, renewed_sent_at=max(self.renewed_sent_at, sent_at))


def begin_term(epoch: int, lease_id: int, sent_at: float, ttl: float,
               won_at: float) -> Term | None:
    """The term won by a campaign whose lease was last renewed (granted or
    kept alive) by a request sent at ``sent_at`` with ``ttl`` seconds; None
    when the limit has already passed at ``won_at`` (too slow to use it)."""
    margin = safety_margin(ttl)
    term = Term(epoch, lease_id, margin, valid_until(sent_at, ttl, margin), sent_at)
    return term if term.is_leader(won_at) else None
