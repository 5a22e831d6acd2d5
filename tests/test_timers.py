"""The agent's timer heap: moot timers cost no wakeup, and a flood sheds
them before any timer the core still wants."""

from __future__ import annotations

import anyio

from agent.runtime.timers import SWEEP_MIN, Rounds, TimerHeap


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


def test_a_timer_made_moot_while_the_loop_sleeps_does_not_wake_it() -> None:
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
            # The sleep moves to the probe: no wakeup at 0.4, none at prune.
            deadline = await heap.wait(now + 10)
            assert anyio.current_time() - now >= 0.49
        assert abs(deadline - (now + 0.5)) < 1e-9
        assert heap.due(anyio.current_time()) == ["probe"]

    anyio.run(main, backend="trio")


def test_a_round_wakes_a_sleeper_before_its_own_timer() -> None:
    async def main() -> None:
        rounds = Rounds(slack=0.05)
        woke: list[float] = []
        now = anyio.current_time()
        async with anyio.create_task_group() as tg:
            async def sleeper() -> None:
                await rounds.sleep(0.4)
                woke.append(anyio.current_time() - now)

            tg.start_soon(sleeper)
            await anyio.sleep(0.1)
            rounds.tick(anyio.current_time())  # not due yet: sleeps on
            await anyio.sleep(0.2)
            assert not woke
            await anyio.sleep(0.07)
            rounds.tick(anyio.current_time())  # within slack of its deadline
        # woken by the round at ~0.37, before its deadline; its own timer
        # would only have fired at 0.4 + 0.2
        assert 0.3 < woke[0] < 0.4
        assert len(rounds) == 0

    anyio.run(main, backend="trio")


def test_a_sleeper_wakes_on_its_own_when_rounds_stop() -> None:
    async def main() -> None:
        rounds = Rounds(slack=0.05)
        now = anyio.current_time()
        with anyio.fail_after(2):
            await rounds.sleep(0.2)
        assert 0.2 <= anyio.current_time() - now < 0.5

    anyio.run(main, backend="trio")


def test_waiters_woken_before_their_round_do_not_pile_up() -> None:
    """An idle plan poked again and again (each time a new event on a round
    seconds away), sleepers woken by their own timer or cancelled: the
    entries they leave are swept, the live one stays."""
    async def main() -> None:
        rounds = Rounds(slack=0.05)
        now = anyio.current_time()
        live = anyio.Event()
        rounds.wake_at(now + 5, live)
        for _ in range(10_000):
            poked = anyio.Event()
            rounds.wake_at(now + 5, poked)
            poked.set()
        with anyio.move_on_after(0.01):
            await rounds.sleep(5)  # cancelled
        await rounds.sleep(0.01)  # woken by its own timer
        assert len(rounds) <= 2 * SWEEP_MIN
        rounds.tick(now + 5)
        assert live.is_set()

    anyio.run(main, backend="trio")
