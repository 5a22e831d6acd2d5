"""The counters the streaming parts of the runtime keep (replication,
leadership, forwarding, failover): plain ``dict[str, int]`` maps that the
view and the metrics read. One rule: a counter only goes up."""

from __future__ import annotations


def count(stats: dict[str, int], key: str, n: int = 1) -> None:
    """Add ``n`` to counter ``key`` (missing counters start at 0)."""
    stats[key] = stats.get(key, 0) + n
