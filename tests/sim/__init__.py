"""Discrete-event simulation of the SWIM membership core at any swarm size.

``network`` (links, loss, delay, jitter, duplication, partitions), ``world`` (one timer
heap driving N real ``agent.core.swim.Swim`` cores by the shell's driving rules, with
clock skew, crashes and restarts), ``invariants`` (what must hold), ``scenarios`` (join,
crash, partition, restart, loss). Run one with ``python -m tests.sim --help``.
"""

from .scenarios import SCENARIOS, Options, run_scenario, with_params

__all__ = ["SCENARIOS", "Options", "run_scenario", "with_params"]
