"""Where the agent looks for the swarm: configured seeds (resolved to numeric
addresses, looked up again while the agent has not joined), saved peers and
LAN discovery."""

from __future__ import annotations

import logging
import socket

import anyio

from agent.config import HostPort
from agent.core.addr import Addr
from agent.core.membership import Membership
from agent.net.udp import normalize

log = logging.getLogger("hs_gossip")

#: how often unresolved or unanswering seeds are looked up again (seconds)
SEED_RERESOLVE = 30.0


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
    """The seed list handed to the membership core: configured seeds plus
    addresses found by other means (kept across re-resolutions)."""

    def __init__(self, core: Membership, configured: tuple[HostPort, ...]) -> None:
        self.core = core
        self.configured = configured
        self.extra: list[Addr] = []
        self._resolved_at = -1e9

    def add(self, addrs: list[Addr]) -> None:
        """Seeds from other sources (saved peers, LAN discovery)."""
        for a in addrs:
            if a not in self.extra:
                self.extra.append(a)
        self.core.add_seeds(addrs)

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
                found.extend(await resolve(hp))
            except OSError as e:
                log.warning("seed %s does not resolve (%s); will retry", hp, e)
        found.extend(self.extra)
        self.core.set_seeds(found)
