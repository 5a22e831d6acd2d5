"""The member table's records: statuses, :class:`Member`, :class:`SelfInfo`.

Rules (the listing rules the shell applies, kept true by the protocol):

* ``Swim.members`` holds every known member except ourselves, in every
  status, until reaped. ``healthy`` is true only while ALIVE.
* ``/api/swarm/peers`` shows ALIVE, SUSPECT and DEAD members, not LEFT.
* A member that is not ALIVE and not confirmed alive for ``ttl`` seconds is
  removed; its tombstone (incarnation, status) stays another ``ttl`` so stale
  gossip cannot revive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.addr import Addr
from agent.core.wire import Digest

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATUS_NAMES = ("alive", "suspect", "dead", "left")


@dataclass
class SelfInfo:
    """Who we are: our card's fixed fields (the incarnation rises on refutation)."""

    node_id: bytes
    incarnation: int
    name: str
    port: int
    http_port: int
    host: str = ""  # advertised numeric address, "" to let peers use the source address
    role: int = 0
    sync_port: int = 0  # 0: same number as the gossip port


@dataclass
class Member:
    node_id: bytes
    incarnation: int
    status: int
    host: str
    port: int
    http_port: int
    sync_port: int
    role: int
    name: str
    #: last logical clock heard from it (its card)
    lc: int
    #: 8-byte short hash over its collection digests, as its card says
    dhash: bytes
    #: its digests; may lag ``dhash`` until fetched
    digests: tuple[Digest, ...]
    app_healthy: bool | None
    #: monotonic seconds when status last changed
    status_since: float
    #: last confirmation of life (ack, own datagram, alive news with higher inc)
    last_alive: float
    #: source address of its last own datagram (what reaches it behind NAT)
    src: Addr | None = None
    #: (incarnation, version) of the digest list held: older lists are refused
    digests_version: tuple[int, int] = (-1, -1)
    #: hash of ``digests`` as held (differs from dhash while they lag)
    held_dhash: bytes = b""
    #: parts of a digest list larger than a datagram, gathered for one version
    parts_version: tuple[int, int] = (-1, -1)
    parts: dict[int, tuple[Digest, ...]] = field(default_factory=dict)
    #: when we last asked it for, or sent it, a full digest list
    digests_asked: float = -1e18
    digests_sent: float = -1e18
    #: its push-pull entry as last encoded, with the fields it was encoded
    #: from: a table is sent whole many times and changes little in between
    entry_cache: tuple[tuple[object, ...], bytes] | None = field(
        default=None, repr=False, compare=False)

    @property
    def healthy(self) -> bool:
        return self.status == ALIVE

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    @property
    def status_name(self) -> str:
        return STATUS_NAMES[self.status]


@dataclass
class Tombstone:
    """What stays of a reaped member: stale gossip at or below it is refused."""

    incarnation: int
    status: int
    until: float
