"""The agent's timer heap: moot timers cost no wakeup, and a flood sheds
them before any timer the core still wants."""

from __future__ import annotations

import anyio

from agent.runtime.timers import TimerHeap


def test_a_timer_the_core_no_longer_wants_does_not_wake_the_loop() -> None:
    async def main() -> None:
        wanted = {"probe_end"}
        heap: TimerHeap[str] = TimerHeap(live=lambda t: t in wanted)
        now = anyio.current_time()
        heap.add([(now + 0.05, "probe_timeout"), (now + 0.3, "probe_end")])
        deadline = await heap.wait(now + 10)
        # slept towards the wanted timer, not the moot one before it
        assert abs(deadline - (now + 0.3)) < 1e-9
        assert anyio.current_time() - now >= 0.29
        assert heap.due(anyio.current_time()) == ["probe_end"]

    anyio.run(main, backend="trio")


def test_an_earlier_timer_wakes_a_waiting_loop() -> None:
    async def main() -> None:
        heap: TimerHeap[str] = TimerHeap()
        now = anyio.current_time()
        heap.add([(now + 5, "late")])
        async with anyio.create_task_group() as tg:
            async def add_soon() -> None:
                await anyio.sleep(0.05)
                heap.add([(now + 0.1, "soon")])

            tg.start_soon(add_soon)
            with anyio.fail_after(2):
                await heap.wait(now + 10)
        assert anyio.current_time() - now < 1.0

    anyio.run(main, backend="trio")


def test_a_full_heap_sheds_moot_timers_before_wanted_ones() -> None:
    live = {"probe"}
    heap: TimerHeap[str] = TimerHeap(live=lambda t: t in live, max_timers=4)
    # the recurring probe timer has the LATEST deadline: dropping the latest
    # deadlines would stop probing for good
    heap.add([(float(i), "moot") for i in range(10)] + [(100.0, "probe")])
    assert len(heap) == 1
    assert heap.due(1000.0) == ["probe"]
    assert heap.dropped == 0


def test_a_timer_made_moot_while_the_loop_sleeps_does_not_wake_it_later() -> None:
    async def main() -> None:
        wanted = {"probe_timeout", "probe"}
        heap: TimerHeap[str] = TimerHeap(live=lambda t: t in wanted)
        now = anyio.current_time()
        heap.add([(now + 0.4, "probe_timeout"), (now + 0.5, "probe")])
        async with anyio.create_task_group() as tg:
            async def ack_arrives() -> None:
                await anyio.sleep(0.05)
                wanted.discard("probe_timeout")  # the ACK came in
                heap.prune()

            tg.start_soon(ack_arrives)
            await heap.wait(now + 10)  # woken early by prune, not at 0.4
            assert anyio.current_time() - now < 0.3
            second = await heap.wait(now + 10)  # now sleeps to the probe
        assert abs(second - (now + 0.5)) < 1e-9
        assert heap.due(anyio.current_time()) == ["probe"]

    anyio.run(main, backend="trio")
