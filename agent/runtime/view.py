"""An immutable snapshot of the agent, and the contract between the runtime and
the face that reads it.

:func:`build_view` is the one place that turns the live state (the membership
core, socket, sync service and store counters) into an :class:`AgentView`:
frozen dataclasses and tuples only, so whatever reads it (HTTP API, metrics,
the systemd STATUS line) cannot change the agent and sees one consistent
moment. Derived figures, such as how many peers are healthy, are computed
here once and nowhere else.

The runtime never imports the face. The face hands the agent an
:class:`ApiServer`, a callable the agent runs in its task group with a
function returning a fresh view, the store, and the shutdown trigger.

Rules: build a view on the event loop (the membership core is not
thread-safe); a view is cheap to build and never cached, so it is never stale.

The core adapter (:func:`member_rows`, :func:`seed_state`, :func:`join_core`)
is the only code in this module, and in the face, that knows the membership
core's internals (its member table, tombstones and seed list): changing the
core changes those three functions and nothing that reads the view.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.config import HostPort
from agent.core import wire
from agent.core.addr import Addr
from agent.core.swim import LEFT, STATUS_NAMES, Member, Swim
from agent.net.seal import Seal, Sealed

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from agent.runtime.forwarding import WriteGate
    from agent.runtime.replication import ReplicationView
    from agent.runtime.seeds import Seeds
    from agent.runtime.sync_service import SyncService
    from agent.store import Store

#: member statuses, as ``/api/swarm/members`` and ``hs-gossip members`` name them
STATUSES = ("alive", "suspect", "dead", "left")


@dataclass(frozen=True, slots=True)
class DigestView:
    """One collection as a peer last announced it."""

    name: str
    state_hash: str  # hex
    vector_count: int


@dataclass(frozen=True, slots=True)
class PeerView:
    """One member of the swarm, as ``/api/swarm/peers`` shows it."""

    node_id: str
    name: str
    addr: str  # host:port of its HTTP API
    gossip_addr: str
    http_port: int
    role: str
    incarnation: int
    logical_clock: int
    collections: tuple[DigestView, ...]
    last_seen_secs: int  # Unix seconds of the last news of it
    healthy: bool
    app_healthy: bool | None


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member as ``/api/swarm/members`` shows it: every known member,
    this agent included, whatever its status (see :data:`STATUSES`)."""

    node_id: str
    name: str  # "" until known (a departed member's name may be forgotten)
    status: str  # one of STATUSES
    addr: str  # gossip host:port; "" when unknown
    http_addr: str  # host:http_port of its API; "" when unknown
    incarnation: int
    role: str
    #: seconds since its status last changed or since its last news, by
    #: this agent's clock (this agent's own row: seconds since start)
    age_secs: float
    is_self: bool


@dataclass(frozen=True, slots=True)
class SeedsView:
    """Whether this agent has reached its swarm through the seeds it tried
    (configured, saved, discovered and joined at run time)."""

    tried: tuple[str, ...]  # host:port of the seeds it contacts
    reached: bool  # any member alive (the agent has joined)
    #: seconds the current state has lasted: unreached since the first seed
    #: was tried, reached since the first member answered, or no seed to try
    since_secs: float
    #: set once seeds have been tried for ``warn_after`` seconds without reaching
    #: any member (also logged once as a warning), else None
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class SyncView:
    """Sync sessions since start (started here, and answered for peers)."""

    runs: int
    failures: int
    served: int
    bytes_in: int
    bytes_out: int
    items_in: int
    items_out: int
    seconds_total: float  # duration of the sessions started here
    #: stream handshakes refused, by cause (timeout, closed, malformed,
    #: unknown_key, bad_proof, cap), both directions
    handshake_failed: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class StoreView:
    """SQLite write transactions (group commits) since start."""

    batches: int
    write_seconds: float
    ops: int
    collections: int


@dataclass(frozen=True, slots=True)
class KeyView:
    """One cluster key in use (agent.net.keyring): never the key itself."""

    fingerprint: str
    key_id: str  # hex, as in the datagram header
    primary: bool  # datagrams are sealed with it
    senders: tuple[str, ...]  # node_ids whose last datagram was sealed with it


@dataclass(frozen=True, slots=True)
class AgentView:
    node_id: str
    name: str
    role: str
    incarnation: int
    logical_clock: int
    http_port: int
    uptime: float  # seconds since the agent object was made
    peers: tuple[PeerView, ...]  # sorted by gossip address
    peer_count: int
    healthy_peers: int
    #: membership and socket counters (datagrams, bytes, drops by cause), by name
    counters: tuple[tuple[str, int], ...]
    collections: int  # local collections
    sync: SyncView | None
    store: StoreView | None
    loop_lag: float  # seconds the last event-loop timer fired late
    #: datagrams are sealed with a cluster key (agent.net.seal)
    encrypted: bool = False
    keys: tuple[KeyView, ...] = ()
    #: datagrams the seal refused since start, by cause (also in ``counters``
    #: as ``drop_seal_<cause>``)
    refused: tuple[tuple[str, int], ...] = ()
    #: every known member and this agent, this agent first, then by address
    members: tuple[MemberView, ...] = ()
    #: the seeds tried and whether any was reached (None: not watched)
    seeds: SeedsView | None = None
    #: change-log streaming (agent.runtime.replication); None: neither
    #: leader nor follower
    replication: ReplicationView | None = None

    @property
    def status_line(self) -> str:
        """The systemd STATUS= text, e.g. "42 peers, 3 collections, role Edge"."""
        total, healthy = self.peer_count, self.healthy_peers
        peers = f"{total} peers" if healthy == total else f"{total} peers ({healthy} healthy)"
        n = self.collections
        return f"{peers}, {n} collection{'' if n == 1 else 's'}, role {self.role}"


class JoinError(Exception):
    """A run-time join refused, before anything changed (an address that does
    not resolve): the message is safe to show."""


@dataclass(frozen=True)
class Controls:
    """The few actions the face may ask of the runtime (besides the store)."""

    #: re-read the key file; None when done, else why not (nothing changed)
    reload_keyring: Callable[[], str | None]
    #: join at run time: resolve the addresses, add them as seeds and contact
    #: them at once; returns the numeric addresses contacted, raises
    #: JoinError (nothing added) when one does not resolve
    join: Callable[[Sequence[HostPort]], Awaitable[tuple[str, ...]]] | None = None
    #: the write gate of agent.runtime.forwarding once replication runs
    writes: Callable[[], WriteGate | None] | None = None
    #: promote to stream leader (force?): (the new epoch, "") or (None, why not)
    promote: Callable[[bool], Awaitable[tuple[int | None, str]]] | None = None


class ApiServer(Protocol):
    """What serves HTTP, given by the face. It reports the bound port through
    ``task_status`` and returns once ``shutdown()`` returns and in-flight
    requests are done; a port it cannot bind is a StartupError."""

    def __call__(self, view: Callable[[], AgentView], store: Store,
                 shutdown: Callable[[], Awaitable[object]], *,
                 task_status: TaskStatus[int],
                 controls: Controls | None = None) -> Awaitable[None]: ...


def role_name(role: int) -> str:
    return wire.ROLES[role] if role < len(wire.ROLES) else "Unknown"


def build_view(core: Swim, *, started_wall: float, wall_now: float, mono_now: float,
               http_port: int = 0, socket_stats: Mapping[str, int] | None = None,
               sync: SyncService | None = None, store: Store | None = None,
               loop_lag: float = 0.0, seal: Seal | None = None, self_host: str = "",
               seeds: SeedsView | None = None,
               replication: ReplicationView | None = None) -> AgentView:
    """The agent as of now. ``wall_now``/``mono_now`` are read together by the
    caller: members' last-seen times are monotonic and shown as wall clock.
    ``self_host`` is the address this agent's own member row shows (its
    advertised or bound address)."""
    offset = wall_now - mono_now
    # A member that left is gone at once; suspect and dead ones stay listed,
    # unhealthy, until they are dropped.
    members = sorted((m for m in core.members.values() if m.status != LEFT),
                     key=lambda m: (m.host, m.port))
    peers = tuple(_peer(m, offset) for m in members)
    counters = dict(core.stats)
    if socket_stats is not None:
        counters.update(socket_stats)
    refused: dict[str, int] = {}
    if seal is not None:
        refused = {k: n for k, n in seal.refused.items() if n}
        # The socket's drop_unopened is their total: count each datagram once.
        counters.pop("drop_unopened", None)
        counters.update({"drop_seal_" + k: n for k, n in refused.items()})
    store_view = None
    collections = len(core.digests)
    if store is not None:
        collections = len(store.digests())
        store_view = StoreView(store.batches, store.write_seconds, store.ops, collections)
    return AgentView(
        node_id=str(uuid.UUID(bytes=core.me.node_id)),
        name=core.me.name,
        role=replication.role if replication is not None else role_name(core.me.role),
        incarnation=core.me.incarnation,
        logical_clock=core.lc,
        http_port=http_port,
        uptime=wall_now - started_wall,
        peers=peers,
        peer_count=len(peers),
        healthy_peers=sum(1 for p in peers if p.healthy),
        counters=tuple(sorted(counters.items())),
        collections=collections,
        sync=None if sync is None else _sync(sync.stats, sync.seconds_total),
        store=store_view,
        loop_lag=loop_lag,
        encrypted=seal is not None and seal.encrypted,
        keys=_keys(seal) if isinstance(seal, Sealed) else (),
        refused=tuple(sorted(refused.items())),
        members=member_rows(core, mono_now, self_host=self_host, http_port=http_port,
                            uptime=wall_now - started_wall),
        seeds=seeds,
        replication=replication,
    )


def _keys(seal: Sealed) -> tuple[KeyView, ...]:
    senders: dict[bytes, list[str]] = {}
    for node_id, key_id in seal.last_key.items():
        senders.setdefault(key_id, []).append(str(uuid.UUID(bytes=node_id)))
    primary = seal.keyring.primary.key_id
    return tuple(
        KeyView(k.fingerprint, k.key_id.hex(), k.key_id == primary,
                tuple(sorted(senders.get(k.key_id, ()))))
        for k in seal.keyring.keys)


def _peer(m: Member, wall_minus_mono: float) -> PeerView:
    return PeerView(
        node_id=str(uuid.UUID(bytes=m.node_id)),
        name=m.name,
        addr=str(HostPort(m.host, m.http_port)),
        gossip_addr=str(HostPort(m.host, m.port)),
        http_port=m.http_port,
        role=role_name(m.role),
        incarnation=m.incarnation,
        logical_clock=m.lc,
        collections=tuple(DigestView(d.name, d.state_hash.hex(), d.count) for d in m.digests),
        last_seen_secs=int(wall_minus_mono + m.last_alive),
        healthy=m.healthy,
        app_healthy=m.app_healthy,
    )


def _sync(s: Mapping[str, int], seconds_total: float) -> SyncView:
    return SyncView(
        runs=s.get("sync_runs", 0), failures=s.get("sync_failures", 0),
        served=s.get("sync_served", 0), bytes_in=s.get("sync_bytes_in", 0),
        bytes_out=s.get("sync_bytes_out", 0), items_in=s.get("sync_items_in", 0),
        items_out=s.get("sync_items_out", 0), seconds_total=seconds_total,
        handshake_failed=tuple(sorted((k[len("handshake_failed_"):], n) for k, n in s.items()
                                      if k.startswith("handshake_failed_"))),
    )


# --- the core adapter: the only code that knows the core's internals ---------


def member_rows(core: Swim, now: float, *, self_host: str, http_port: int,
                uptime: float) -> tuple[MemberView, ...]:
    """Every member the core knows, this agent first, in its status (alive,
    suspect, dead, left). ``age_secs`` is how long it has been in that
    status. ``now`` is the core's (monotonic) clock."""
    me = core.me
    rows = [MemberView(
        node_id=str(uuid.UUID(bytes=me.node_id)), name=me.name,
        status="left" if core.leaving else "alive",
        addr=_host_port(me.host or self_host, me.port),
        http_addr=_host_port(me.host or self_host, http_port),
        incarnation=me.incarnation, role=role_name(me.role),
        age_secs=round(max(0.0, uptime), 1), is_self=True)]
    others = [MemberView(
        node_id=str(uuid.UUID(bytes=m.node_id)), name=m.name,
        status=STATUS_NAMES[m.status],
        addr=_host_port(m.host, m.port), http_addr=_host_port(m.host, m.http_port),
        incarnation=m.incarnation, role=role_name(m.role),
        age_secs=round(max(0.0, now - m.status_since), 1), is_self=False)
        for m in core.members.values()]
    others.sort(key=lambda r: (r.addr, r.node_id))
    return (rows[0], *others)


def seed_state(core: Swim) -> tuple[tuple[Addr, ...], bool]:
    """The seeds the core has tried, and whether one answered."""
    return core.seeds_tried, core.seeds_reached or core.joined


def join_core(core: Swim, seeds: Seeds, addrs: Sequence[Addr], now: float) -> None:
    """Add numeric ``addrs`` as seeds (so re-resolving the configured seeds
    keeps them) and contact them now (the caller sends what the core queued)."""
    again = [a for a in dict.fromkeys(addrs) if a in seeds.extra]
    seeds.add(list(addrs))  # joins the new ones
    if again:
        core.join(again, now)


def _host_port(host: str, port: int) -> str:
    return str(HostPort(host, port)) if host and port else ""
