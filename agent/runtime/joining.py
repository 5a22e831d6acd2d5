"""Joining the swarm at run time, and noticing when no seed answers.

:func:`join` is what ``POST /api/swarm/join`` and ``hs-gossip join`` end in:
it resolves every address first (a name that does not resolve refuses the
whole request, nothing is added), then hands the numeric addresses to the
core as seeds, contacted at once.

:class:`SeedWatch` tells the operator, once, when the agent has tried seeds
for :data:`SEED_WARN_AFTER` seconds without reaching any member: a warning
in the log naming the seeds, and the same text in ``/api/cluster/status``
(``seeds.warning``). Being reached resets it, so an agent that loses every
member and cannot get back says so again.

Rules: what is core-specific (the seed list, "reached", how seeds are
contacted) goes through the adapter in agent.runtime.view; this module
only keeps time and talks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio

from agent.config import HostPort
from agent.core.addr import Addr
from agent.core.swim import Swim
from agent.runtime.seeds import Seeds, resolve
from agent.runtime.view import JoinError, SeedsView, join_core, seed_state

log = logging.getLogger("hs_gossip")

#: seconds an agent tries its seeds without reaching any member before it
#: says so (memberlist's join gives up on a seed after 10 s too)
SEED_WARN_AFTER = 10.0
#: longest a join waits for one name to resolve (seconds)
RESOLVE_TIMEOUT = 5.0
#: seeds named in the warning; the rest are counted
SHOWN_SEEDS = 8


async def join(core: Swim, seeds: Seeds, addrs: Sequence[HostPort],
               flush: Callable[[], Awaitable[None]]) -> tuple[str, ...]:
    """Checkpoint. Resolve ``addrs`` (JoinError naming the first that does not
    resolve, nothing changed), add them as seeds, contact them and send.
    Returns the numeric addresses as host:port."""
    found: list[Addr] = []
    for hp in addrs:
        resolved: list[Addr] | None = None
        with anyio.move_on_after(RESOLVE_TIMEOUT):
            try:
                resolved = await resolve(hp)
            except OSError as e:
                raise JoinError(f"{hp} does not resolve: {e.strerror or e}") from None
        if resolved is None:
            raise JoinError(f"{hp} does not resolve: no answer in {RESOLVE_TIMEOUT:g}s")
        found.extend(a for a in resolved if a not in found)
    join_core(core, seeds, found, anyio.current_time())
    await flush()
    shown = tuple(str(HostPort(*a)) for a in found)
    log.info("joining at run time through %s", ", ".join(shown))
    return shown


class SeedWatch:
    """Whether the seeds tried have reached the swarm, and since when.
    :meth:`view` brings it up to date (so a view is never stale) and the
    agent's once-an-interval round calls :meth:`update`, so the warning is
    logged even when nothing reads the view."""

    def __init__(self, warn_after: float = SEED_WARN_AFTER) -> None:
        self.warn_after = warn_after
        self._state = ""  # "idle" (no seed), "trying", "reached"; "" before the first look
        self._since = 0.0
        self._tried: tuple[Addr, ...] = ()
        self._warning: str | None = None

    def update(self, tried: tuple[Addr, ...], reached: bool, now: float) -> None:
        state = "reached" if reached else "trying" if tried else "idle"
        if state != self._state:
            if state == "reached" and self._warning is not None:
                log.info("reached the swarm after %.0fs of trying its seeds",
                         now - self._since)
            self._state, self._since, self._warning = state, now, None
        self._tried = tried
        if (state == "trying" and self._warning is None
                and now - self._since >= self.warn_after):
            self._warning = _warning(tried, now - self._since)
            log.warning("%s", self._warning)

    def view(self, core: Swim, now: float) -> SeedsView:
        self.update(*seed_state(core), now)
        return SeedsView(tried=tuple(str(HostPort(*a)) for a in self._tried),
                         reached=self._state == "reached",
                         since_secs=round(now - self._since, 1), warning=self._warning)


def _warning(tried: tuple[Addr, ...], secs: float) -> str:
    shown = ", ".join(str(HostPort(*a)) for a in tried[:SHOWN_SEEDS])
    more = f" and {len(tried) - SHOWN_SEEDS} more" if len(tried) > SHOWN_SEEDS else ""
    return (f"no seed reached after {secs:.0f}s: tried {shown}{more} (are they running, "
            f"is UDP open between us, do we share the cluster key?)")
