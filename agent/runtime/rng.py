"""One seed for every random choice the agent makes.

The cores take an RNG as an argument (agent.core has no global randomness);
this module is where the runtime makes those RNGs. They all derive from one
integer seed, so a run can be replayed choice for choice:

* by default the seed is fresh from the OS (:func:`secrets.randbits`) at every
  start, so agents, and restarts of one agent, choose independently;
* ``HS_GOSSIP_SEED`` fixes it, a debugging aid for reproducible runs. Never in
  production: agents sharing a seed pick the same peers in the same order.

Each user gets its own stream, :meth:`Seed.rng_for` ``(name)``, so that one
user drawing more numbers does not shift another's choices. The child seed is
blake3 over the seed and the name: stable across processes, machines and
Python versions (Python's ``hash()`` of a string is salted per process).
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

from blake3 import blake3

SEED_BITS = 64
_CONTEXT = b"hs-gossip rng v1\0"


@dataclass(frozen=True)
class Seed:
    value: int

    @classmethod
    def of(cls, configured: int | None) -> Seed:
        """The configured seed, or a fresh random one when there is none."""
        return cls(secrets.randbits(SEED_BITS) if configured is None else configured)

    def rng_for(self, name: str) -> random.Random:
        """An RNG of its own for one user, e.g. ``"membership"`` or ``"tick"``.
        The same seed and name give the same sequence, wherever and whenever."""
        key = _CONTEXT + self.value.to_bytes(SEED_BITS // 8, "big") + name.encode()
        return random.Random(int.from_bytes(blake3(key).digest(), "big"))
