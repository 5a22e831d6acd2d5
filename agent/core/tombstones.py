"""When tombstones may be purged: the rule, without I/O.

A collection's *horizon* is an HLC below which its tombstones are dropped and
remote items are refused, so that a purged delete cannot be undone by an old
copy arriving later. An agent raises a horizon in two cases only:

* **Settle**: it knows at least one peer, every peer it knows is healthy, and
  every one of them last advertised (in its digests) the same ``state_hash`` for
  the collection as its own: every replica in sight holds exactly the same
  items, tombstones included. The horizon becomes ``now -
  HS_GOSSIP_TOMBSTONE_GRACE``: only tombstones older than the grace go.
* **Adopt**: a healthy peer advertises a higher horizon. The agent purges its
  own tombstones below it only if that leaves it with exactly the peer's
  ``state_hash``: proof that it held the same items as the peer that settled.
  A replica that differs (one that was away) keeps its horizon, so it still
  accepts the older items it is missing, and catches up by ordinary sync.
  A sync initiator that removes items older than a peer's horizon applies
  this rule at once, in the same transaction (agent.runtime.sync_service).

Consequences, documented for operators: purging needs a quiet moment in which
all replicas agree (bursty edge writes give plenty); and a change that reached
no other agent within the grace (a device offline longer than that) is refused
by agents past the horizon rather than allowed to resurrect deleted data. The
grace must exceed any clock error between devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.core.clock import COUNTER_BITS
from agent.core.wire import Digest


@dataclass(frozen=True)
class PeerView:
    healthy: bool
    digests: tuple[Digest, ...]


@dataclass(frozen=True)
class Purge:
    horizon: int  # HLC
    #: None: settled, purge unconditionally; else adopt only if the result has this hash
    expected: bytes | None


def hlc_of_ms(ms: int) -> int:
    return ms << COUNTER_BITS


def choose(ours: Iterable[tuple[str, bytes, int]], peers: list[PeerView],
           now_ms: int, grace_s: float) -> dict[str, Purge]:
    """``ours``: (name, state_hash, horizon HLC) per local collection."""
    out: dict[str, Purge] = {}
    all_healthy = bool(peers) and all(p.healthy for p in peers)
    for name, state, horizon in ours:
        theirs = [next((d for d in p.digests if d.name == name), None) for p in peers]
        if all_healthy and all(d is not None and d.state_hash == state for d in theirs):
            settled = hlc_of_ms(now_ms - int(grace_s * 1000))
            if settled > horizon:
                out[name] = Purge(settled, None)
                continue
        # A horizon later than now - grace cannot come from the settle rule:
        # a peer advertising one is broken or lying, and is not followed.
        latest = now_ms - int(grace_s * 1000)
        best = max((d for p, d in zip(peers, theirs, strict=True)
                    if d is not None and p.healthy
                    and horizon < hlc_of_ms(d.horizon_ms) and d.horizon_ms <= latest),
                   key=lambda d: d.horizon_ms, default=None)
        if best is not None:
            out[name] = Purge(hlc_of_ms(best.horizon_ms), best.state_hash)
    return out
