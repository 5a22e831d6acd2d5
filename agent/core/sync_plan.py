"""Which (peer, collection) pairs to reconcile now: no I/O, time passed in.

Rules:

* A pair is due when the peer's heartbeat digest for the collection differs
  from ours and the pair is not waiting (backoff or cool-down).
* At most one session per peer at a time and at most ``concurrency`` overall.
* After a failure the pair waits ``BACKOFF_MIN`` seconds, doubling with each
  failure in a row up to ``BACKOFF_MAX``; after a success it waits
  ``cooldown`` (the peer's digest is stale until its next heartbeat), and the
  failure count starts again.
* The table of pair states is bounded (``max_pairs``): a swarm whose members
  come and go must not grow it forever. Expired entries go first; if that is
  not enough, those whose wait ends soonest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
MAX_PAIRS = 10_000


@dataclass
class _PairState:
    not_before: float = 0.0
    failures: int = 0


@dataclass
class SyncPlanner:
    concurrency: int = 2
    cooldown: float = 2.0
    max_pairs: int = MAX_PAIRS
    running: set[str] = field(default_factory=set)  # peer keys with a session open
    pairs: dict[tuple[str, str], _PairState] = field(default_factory=dict)

    def plan(self, now: float, ours: dict[str, bytes],
             peers: list[tuple[str, dict[str, bytes]]]) -> list[tuple[str, str]]:
        """``peers`` is [(peer_key, {collection: state_hash})]; returns the
        (peer_key, collection) sessions to start now. The caller reports the
        end of each with :meth:`finished`."""
        out: list[tuple[str, str]] = []
        for peer, theirs in peers:
            if len(self.running) >= self.concurrency:
                break
            if peer in self.running:
                continue
            for name, h in sorted(theirs.items()):
                if ours.get(name) == h:
                    continue
                st = self.pairs.get((peer, name))
                if st is not None and now < st.not_before:
                    continue
                out.append((peer, name))
                self.running.add(peer)
                break
        return out

    def finished(self, peer: str, name: str, now: float, ok: bool) -> None:
        self.running.discard(peer)
        st = self.pairs.setdefault((peer, name), _PairState())
        if ok:
            st.failures = 0
            st.not_before = now + self.cooldown
        else:
            st.failures += 1
            # the exponent is capped: 2**1024 does not fit a float
            doubling = BACKOFF_MIN * 2 ** min(st.failures - 1, 64)
            st.not_before = now + min(BACKOFF_MAX, doubling)
        if len(self.pairs) > self.max_pairs:
            self._shrink(now)

    def _shrink(self, now: float) -> None:
        kept = {k: v for k, v in self.pairs.items() if v.not_before > now}
        if len(kept) > self.max_pairs:
            latest = sorted(kept.items(), key=lambda kv: kv[1].not_before)[-self.max_pairs:]
            kept = dict(latest)
        self.pairs = kept
