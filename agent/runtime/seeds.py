"""Where the agent looks for the swarm: configured seeds (resolved to numeric
addresses, looked up again while the agent has not joined), saved peers and
LAN discovery.

Rules: the membership core is asked to join the configured seeds (each time
they are looked up again) and every address found by other means (saved
peers, discovered agents) once, when it is new; at most :data:`MAX_EXTRA`
such addresses are remembered, the least recently added dropped first. Discovery beacons reach us
by unicast from anywhere, one new source after another, so that list must
not grow with them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import anyio

from agent.config import HostPort
from agent.core.addr import Addr
from agent.net.udp import normalize

log = logging.getLogger("hs_gossip")

#: how often unresolved or unanswering seeds are looked up again (seconds)
SEED_RERESOLVE = 30.0
#: longest one seed's name lookup may take (seconds)
RESOLVE_TIMEOUT = 5.0
#: seeds kept from saved peers and discovery (the core asks 16 per tick)
MAX_EXTRA = 64


async def resolve(hp: HostPort, family: int = 0) -> list[Addr]:
    """Numeric addresses for host:port (hostnames cost ~340 us per sendto, so
    they are resolved once, here)."""
    infos = await anyio.getaddrinfo(hp.host, hp.port, family=family, type=socket.SOCK_DGRAM)
    out: list[Addr] = []
    for _fam, _t, _p, _c, sa in infos:
        addr = (normalize(str(sa[0])), int(sa[1]))
        if addr not in out:
            out.append(addr)
    return out


class Seeds:
    """Where to join: configured seeds plus addresses found by other means
    (kept across re-resolutions, at most ``max_extra`` of them). ``join``
    is the core's: it contacts the addresses it is given."""

    def __init__(self, join: Callable[[list[Addr]], None], configured: tuple[HostPort, ...],
                 max_extra: int = MAX_EXTRA) -> None:
        self.join = join
        self.configured = configured
        self.max_extra = max_extra
        #: found by other means, least recently added first
        self._extra: dict[Addr, None] = {}
        self._resolved: list[Addr] = []  # the configured seeds, as last resolved
        self._resolved_at = -1e9

    @property
    def extra(self) -> list[Addr]:
        return list(self._extra)

    def add(self, addrs: list[Addr]) -> None:
        """Seeds from other sources (saved peers, LAN discovery). One already
        known becomes the most recent; the core is told only of new ones."""
        new = []
        for a in addrs:
            if a not in self._extra:
                new.append(a)
            self._extra.pop(a, None)
            self._extra[a] = None
            if len(self._extra) > self.max_extra:
                del self._extra[next(iter(self._extra))]
        if new:
            self.join(new)

    async def refresh(self, force: bool = False) -> None:
        """Checkpoint. Resolve the configured seeds again (at most every
        SEED_RERESOLVE seconds unless forced); one that does not resolve is
        logged and retried later."""
        now = anyio.current_time()
        if not force and now - self._resolved_at < SEED_RERESOLVE:
            return
        self._resolved_at = now
        found: list[Addr] = []
        for hp in self.configured:
            try:
                with anyio.fail_after(RESOLVE_TIMEOUT):
                    found.extend(await resolve(hp))
            except (OSError, TimeoutError) as e:
                log.warning("seed %s does not resolve (%s); will retry", hp,
                            e or f"no answer in {RESOLVE_TIMEOUT:g}s")
        self._resolved = found
        if found:
            self.join(found)
