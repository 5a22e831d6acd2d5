"""Slow loops of the agent process: the peer snapshot kept for the next start,
tombstone purging and change log compaction. Each takes what it reads as arguments, so it owns no
agent state; each ``async def`` sleeps between rounds and is cancelled with
the agent's task group (a cancelled round leaves nothing half-written: the
snapshot is replaced atomically, a purge is one store transaction and log
compaction moves its floor in the transaction that deletes the entries).
Each sleeps through ``sleep`` (the agent passes agent.runtime.timers.Rounds.sleep,
so their rounds cost an idle agent no wakeup of their own).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from agent.core import tombstones
from agent.core.changelog import Retention
from agent.core.swim import ALIVE, LEFT, SUSPECT, Swim
from agent.runtime import snapshot
from agent.store import Store

log = logging.getLogger("hs_gossip")

#: the known peers are saved for the next start every this many intervals
#: when they changed, and every SNAPSHOT_REFRESH seconds anyway (to keep the
#: last-seen times fresh) - not more often, to spare devices' flash.
SNAPSHOT_EVERY_INTERVALS = 30
SNAPSHOT_REFRESH = 600.0
#: how often the tombstone purge rule is evaluated
TOMBSTONE_EVERY_INTERVALS = 10
#: how often the change log is compacted (each round deletes in transactions
#: of at most 10,000 entries, so local writes interleave)
LOG_COMPACT_EVERY_INTERVALS = 30

#: (node_id hex, host, gossip port, wall time last seen)
Row = tuple[str, str, int, float]
#: how a loop sleeps between rounds
Sleep = Callable[[float], Awaitable[None]]


def snapshot_rows(core: Swim, wall_time_of: Callable[[float], float]) -> list[Row]:
    """Taken on the event loop: the membership core is not thread-safe."""
    return [(m.node_id.hex(), m.host, m.port, wall_time_of(m.last_alive))
            for m in core.members.values() if m.status in (ALIVE, SUSPECT)]


def write_snapshot(data_dir: Path, rows: list[Row], lc: int) -> None:
    """Save the rows; a failure is logged, never raised (the agent runs on)."""
    try:
        snapshot.save(data_dir, rows, lc)
    except OSError as e:
        log.warning("cannot save the peer snapshot in %s: %s", data_dir, e)


async def snapshot_loop(interval: float, data_dir: Path, rows: Callable[[], list[Row]],
                        lc: Callable[[], int], sleep: Sleep = anyio.sleep) -> None:
    saved: set[tuple[str, str, int]] = set()
    saved_at = -SNAPSHOT_REFRESH
    while True:
        await sleep(SNAPSHOT_EVERY_INTERVALS * interval)
        taken = rows()
        members = {r[:3] for r in taken}
        now = anyio.current_time()
        if taken and (members != saved or now - saved_at >= SNAPSHOT_REFRESH):
            # The fsync runs off the event loop; the rows are taken on it.
            await anyio.to_thread.run_sync(write_snapshot, data_dir, taken, lc())
            saved, saved_at = members, now


async def tombstone_loop(interval: float, store: Store, core: Swim, grace: float,
                         wall_ms: Callable[[], int], sleep: Sleep = anyio.sleep) -> None:
    """Purge tombstones when agent.core.tombstones says it is safe."""
    while True:
        await sleep(TOMBSTONE_EVERY_INTERVALS * interval)
        # Replicas in sight: every member but those that left. A member that
        # left said goodbye and is out of the peer listing at once, but the
        # core keeps its entry (unhealthy) until it is reaped a TTL later;
        # counting it would hold every purge back that long. Suspect and dead
        # members do count (unhealthy): they may hold copies we cannot see.
        peers = [tombstones.PeerView(m.healthy, m.digests) for m in core.members.values()
                 if m.status != LEFT]
        ours = [(c.name, c.state_hash, c.horizon) for c in store.digests()]
        for name, p in tombstones.choose(ours, peers, wall_ms(), grace).items():
            purged = await store.purge_tombstones(name, p.horizon, p.expected)
            if purged:
                why = "every replica in sight had them" if p.expected is None \
                    else "as a peer did"
                log.info("purged %d tombstone(s) in %s (%s)", purged, name, why)


def no_follower_needs() -> int | None:
    return None


async def log_compaction_loop(interval: float, store: Store, retain: Retention,
                              min_needed: Callable[[], int | None] = no_follower_needs,
                              sleep: Sleep = anyio.sleep) -> None:
    """Compact the change log to HS_GOSSIP_LOG_RETAIN. ``min_needed``: the
    oldest seq a connected follower still needs (None: no follower), which
    holds compaction back up to agent.store.log.hold_bound."""
    while True:
        await sleep(LOG_COMPACT_EVERY_INTERVALS * interval)
        gone = await store.compact_log(retain, min_needed())
        if gone:
            log.debug("compacted %d change log entries", gone)
