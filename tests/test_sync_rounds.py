"""The sync service's idle re-plan (its safety net while every peer is in
step) rides on the agent's rounds instead of a timer of its own."""

from __future__ import annotations

import random
from typing import Any

import anyio

from agent.runtime.sync_service import IDLE_PLAN_INTERVALS, SyncService
from agent.runtime.timers import Rounds


class _NoCollections:
    def digests(self) -> list[Any]:
        return []


def test_the_idle_plan_waits_for_a_round() -> None:
    interval = 0.2
    plans: list[float] = []

    async def main() -> None:
        svc = SyncService(_NoCollections(), "127.0.0.1", 0, interval, 2, 1024,  # type: ignore[arg-type]
                          rng=random.Random(1))
        rounds = Rounds(slack=interval / 2)
        svc.rounds = rounds
        t0 = anyio.current_time()

        def peers() -> list[Any]:
            plans.append(anyio.current_time() - t0)
            return []

        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.run, peers)
            await anyio.sleep(0.01)
            assert len(plans) == 1 and len(rounds) == 1
            # No round yet: past the idle wait, the plan still waits ...
            await anyio.sleep(IDLE_PLAN_INTERVALS * interval + 0.05)
            assert len(plans) == 1
            # ... for the round, which starts it at once.
            rounds.tick(anyio.current_time())
            await anyio.sleep(0.01)
            assert len(plans) == 2
            # Rounds that stop: its own timer, one interval later.
            await anyio.sleep((IDLE_PLAN_INTERVALS + 1) * interval + 0.1)
            assert len(plans) == 3
            tg.cancel_scope.cancel()

    anyio.run(main, backend="trio")
