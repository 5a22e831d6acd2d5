"""Which (peer, collection) pairs to reconcile now: no I/O, time passed in.

At most one session per peer at a time and at most ``concurrency`` overall;
exponential backoff after a failure; a short cool-down after a success (the
peer's digest is stale until its next heartbeat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0


@dataclass
class _PairState:
    not_before: float = 0.0
    failures: int = 0


@dataclass
class SyncPlanner:
    concurrency: int = 2
    cooldown: float = 2.0
    running: set[str] = field(default_factory=set)  # peer keys with a session open
    pairs: dict[tuple[str, str], _PairState] = field(default_factory=dict)

    def plan(self, now: float, ours: dict[str, bytes],
             peers: list[tuple[str, dict[str, bytes]]]) -> list[tuple[str, str]]:
        """``peers`` is [(peer_key, {collection: state_hash})]; returns the
        (peer_key, collection) sessions to start now."""
        out: list[tuple[str, str]] = []
        for peer, theirs in peers:
            if len(self.running) + len(out) >= self.concurrency:
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
                break
        for peer, _ in out:
            self.running.add(peer)
        return out

    def finished(self, peer: str, name: str, now: float, ok: bool) -> None:
        self.running.discard(peer)
        st = self.pairs.setdefault((peer, name), _PairState())
        if ok:
            st.failures = 0
            st.not_before = now + self.cooldown
        else:
            st.failures += 1
            st.not_before = now + min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (st.failures - 1))
        if len(self.pairs) > 10_000:
            self.pairs = {k: v for k, v in self.pairs.items() if v.not_before > now}
