from agent.core.clock import HLC, counter, physical_ms


def test_monotonic_even_when_the_wall_clock_goes_back() -> None:
    t = [1_000]
    c = HLC(clock=lambda: t[0])
    a = c.now()
    t[0] = 900
    b = c.now()
    assert b > a and physical_ms(b) == 1_000 and counter(b) == 1
    t[0] = 2_000
    assert physical_ms(c.now()) == 2_000 and counter(c.now()) == 1


def test_observed_remote_clock_orders_later_writes_after_it() -> None:
    c = HLC(clock=lambda: 1_000)
    c.observe((5_000 << 16) | 7)
    assert c.now() == (5_000 << 16) | 8


def test_far_future_is_refused() -> None:
    c = HLC(clock=lambda: 1_000_000)
    assert physical_ms((1_000_000 + 301_000) << 16) > c.ahead_limit(300)
    assert not physical_ms((1_000_000 + 299_000) << 16) > c.ahead_limit(300)
