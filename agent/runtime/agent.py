"""The agent process: wires the membership core to the UDP socket, the timer,
the HTTP API and signals, all inside one task group.

Start-up binds UDP, the sync listener and the API, then tells systemd
READY=1. Shutdown (SIGTERM / SIGINT): STOPPING=1, LEAVE to every known peer,
the API finishes in-flight requests (so acknowledged writes are queued), tasks
are cancelled, then closers run in reverse order of registration (the store
commits its queue and checkpoints the WAL), the peer snapshot is saved, exit 0.
SIGHUP re-applies the reloadable settings (log level and format) and
re-reads the key file (HS_GOSSIP_KEYFILE), as ``POST /api/keyring/reload``
does; a bad key file keeps the old keys.

Datagram security (agent.net.seal): with a cluster key the seal is built at
start, after the boot epoch (agent.runtime.epoch) is saved and before the
socket is bound; every opened datagram is handed to the core with the node_id
it authenticated as. Without a key the agent runs in cleartext, says so once
at start, and never mixes with keyed agents.

Every ``async def`` here is a checkpoint; cancelling ``run`` leaves no task
behind (structured concurrency).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from agent.config import Config, ConfigError, HostPort, load_reloadable
from agent.core import clock, wire
from agent.core.swim import (
    DigestsChanged,
    Event,
    IncarnationRaised,
    MemberExpired,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberRestarted,
    MemberSuspected,
    Params,
    PushPull,
    SelfInfo,
    Swim,
    Timer,
)
from agent.net import keyring
from agent.net.seal import Cleartext, Seal
from agent.net.udp import GossipSocket, normalize
from agent.runtime import (
    epoch,
    health,
    identity,
    maintenance,
    push_pull,
    snapshot,
    supervision,
)
from agent.runtime.errors import StartupError
from agent.runtime.faults import NO_FAULTS, Faults
from agent.runtime.joining import SeedWatch, join
from agent.runtime.rng import Seed
from agent.runtime.sdnotify import Notifier
from agent.runtime.seeds import Seeds, resolve
from agent.runtime.timers import Rounds, TimerHeap
from agent.runtime.view import (
    AgentView,
    ApiServer,
    Controls,
    build_view,
    role_name,
    seed_state,
)
from agent.store.store import wall_ms

if TYPE_CHECKING:
    from agent.net.handshake import StreamKeys
    from agent.net.stream import Framed
    from agent.runtime.failover import Failover
    from agent.runtime.forwarding import Forwarding, Upstream
    from agent.runtime.leadership import Replication
    from agent.runtime.sync_service import SyncService
    from agent.store import Store

log = logging.getLogger("hs_gossip")

#: least seconds between two writes of identity.json on refutation
IDENTITY_SAVE_EVERY = 1.0
#: how long in-flight API requests get to finish on shutdown (seconds)
API_DRAIN = 5.0
#: membership push-pull exchanges in flight at once; the core's next ones
#: fail at once beyond it (it retries on its own schedule)
MAX_PUSH_PULLS = 4


@dataclass
class Agent:
    cfg: Config
    ident: identity.Identity
    core: Swim = field(init=False)
    sock: GossipSocket | None = None
    http_port: int = 0
    started_wall: float = field(default_factory=time.time)
    #: coroutines run inside the agent's task group once sockets are bound
    services: list[Callable[[Agent], Coroutine[Any, Any, None]]] = field(default_factory=list)
    #: called on shutdown, in reverse order of registration
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: serves the HTTP API (given by the face); None: no API
    api: ApiServer | None = None
    #: monotonic time the membership loop last ran (watchdog evidence)
    last_tick: float = 0.0
    #: probe periods started
    ticks: int = 0
    #: the deadlines the membership core asked for
    timers: TimerHeap[Timer] = field(init=False)
    #: slow loops sleep until a round (agent.runtime.timers.Rounds)
    rounds: Rounds = field(init=False)
    _refreshing_seeds: bool = False
    _push_pulls_running: int = 0
    _tg: TaskGroup | None = None
    _shutdown: anyio.Event = field(default_factory=anyio.Event)
    store: Store | None = None
    sync: SyncService = field(init=False)
    seeds: Seeds = field(init=False)
    notifier: Notifier = field(default_factory=Notifier)
    #: seconds the last event-loop timer fired late (see supervision)
    loop_lag: float = 0.0
    _api_done: anyio.Event = field(default_factory=anyio.Event)
    #: the keyring the sync streams' keys were last derived from, and them
    _stream_keys_cache: tuple[keyring.Keyring, StreamKeys | None] | None = None
    _stall_tick_at: float = float("inf")
    #: fault injection for tests; production runs get none
    faults: Faults = NO_FAULTS
    #: says when no seed has answered (agent.runtime.joining)
    seed_watch: SeedWatch = field(default_factory=SeedWatch)
    #: how late the membership loop wakes (agent.runtime.supervision)
    lag: supervision.LagMeter = field(init=False)
    replication: Replication | Failover | None = None
    #: writes on a follower go through the leader (agent.runtime.forwarding)
    forwarding: Forwarding | None = None
    #: every datagram of both UDP sockets (gossip, discovery) crosses this;
    #: None: built from the key settings at start
    seal: Seal | None = None
    #: every RNG derives from it (HS_GOSSIP_SEED, else random per start)
    seed: Seed = field(init=False)
    #: an incarnation refuted to and not yet saved: forged suspicions can
    #: arrive by the hundred, so identity.json is written at most once per
    #: IDENTITY_SAVE_EVERY seconds, always with the latest value (the next
    #: tick and shutdown write what is pending)
    _ident_pending: int | None = None
    _ident_saved_at: float = float("-inf")
    _ident_save_failing: bool = False
    #: the store's digest list last handed to the core (see _publish_digests)
    _published_infos: object = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        params = Params(
            probe_interval=cfg.interval, suspicion_mult=cfg.suspect_intervals, ttl=cfg.ttl,
            gossip_fanout=cfg.fanout, max_members=cfg.max_peers,
        )
        me = SelfInfo(
            node_id=self.ident.node_id.bytes, incarnation=self.ident.incarnation,
            name=cfg.node_name, port=cfg.port, http_port=0,
        )
        self.seed = Seed.of(cfg.seed)
        log.debug("random seed %d (HS_GOSSIP_SEED replays this run's choices)", self.seed.value)
        self.core = Swim(me, params, self.seed.rng_for("membership"), now=0.0)
        self.seeds = Seeds(self._join, cfg.peers)
        self.lag = supervision.LagMeter(self._record_loop_lag)
        self.timers = TimerHeap(live=self.core.timer_pending)
        self.rounds = Rounds(slack=cfg.interval / 2)

    # --- the view the face reads -------------------------------------------

    def view(self) -> AgentView:
        """An immutable snapshot (see agent.runtime.view); on the event loop."""
        now = anyio.current_time()
        return build_view(
            self.core, started_wall=self.started_wall, wall_now=time.time(),
            mono_now=now, http_port=self.http_port,
            socket_stats=None if self.sock is None else self.sock.stats,
            sync=getattr(self, "sync", None), store=self.store, loop_lag=self.loop_lag,
            seal=self.seal, self_host=self.core.me.host or self.cfg.bind,
            seeds=self.seed_watch.view(self.core, now),
            replication=None if self.replication is None else self.replication.view(now))

    def status_line(self) -> str:
        """The systemd STATUS= text, e.g. "42 peers, 3 collections, role Edge"."""
        return self.view().status_line

    def _record_loop_lag(self, lag: float) -> None:
        self.loop_lag = lag

    @property
    def node_id(self) -> uuid.UUID:
        return self.ident.node_id

    @property
    def role(self) -> str:
        return role_name(self.core.me.role)

    def wall_time_of(self, mono: float) -> float:
        return time.time() - (anyio.current_time() - mono)

    async def join(self, addrs: Sequence[HostPort]) -> tuple[str, ...]:
        """Join at run time (``POST /api/swarm/join``): see agent.runtime.joining."""
        return await join(self.core, self.seeds, addrs, self._flush)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    # --- lifecycle -----------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        advertise = await self._resolve_advertise()
        if advertise:
            self.core.me.host = advertise
        elif self._bound_host is not None:
            # Bound to one address: that is where we are reached. (Bound to
            # all, peers take the address our datagrams come from.)
            self.core.me.host = normalize(self.cfg.bind)
        if self.seal is None:
            self.seal = self._build_seal()
        try:
            self.sock = await GossipSocket.bind(cfg.bind, cfg.port, self.seal)
        except OSError as e:
            raise StartupError(
                f"cannot bind UDP {cfg.bind}:{cfg.port} (HS_GOSSIP_PORT/HS_GOSSIP_BIND): "
                f"{e.strerror or e}"
            ) from None
        self.core.me.port = self.sock.local_port
        store = await self._open_store()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.sync.serve)
            tg.start_soon(self.sync.run, self.sync_targets)
            self.http_port = await tg.start(self._serve_api)
            # Before start: a port set later takes a new incarnation to spread.
            self.core.set_http_port(self.http_port)
            self.core.start(anyio.current_time(), [])
            # Answered only once our card is whole (its HTTP port known).
            self.sync.routes[push_pull.FIRST_BYTE] = self._serve_push_pull
            self._load_snapshot()
            await self.seeds.refresh(force=True)
            log.info(
                "agent %s (%s) incarnation %d: gossip udp %s:%d, api http://%s:%d",
                self.node_id, cfg.node_name, self.core.me.incarnation, cfg.bind,
                self.core.me.port, cfg.api.host, self.http_port,
            )
            tg.start_soon(self._receive_loop)
            tg.start_soon(self._timer_loop)
            tg.start_soon(self._signal_loop)
            tg.start_soon(maintenance.snapshot_loop, cfg.interval, cfg.data_dir,
                          self._snapshot_rows, lambda: self.core.lc, self.rounds.sleep)
            tg.start_soon(maintenance.tombstone_loop, cfg.interval, store, self.core,
                          cfg.tombstone_grace, wall_ms, self.rounds.sleep)
            # change-log streaming: leader, follower or neither (agent.runtime.replication);
            # with HS_GOSSIP_ETCD the leader is elected (agent.runtime.failover); a
            # follower's API writes go through the leader (agent.runtime.forwarding)
            from agent.runtime.forwarding import Forwarding, StaticUpstream
            from agent.runtime.leadership import Replication

            upstream: Upstream
            if cfg.etcd:
                from agent.runtime.failover import Failover

                self.replication = upstream = Failover(
                    cfg, store, self.sync, self.ident.node_id.bytes, self._stream_keys,
                    self.seed.rng_for("replication"), self.core.me.host or cfg.bind)
                self.closers.append(self.replication.close)
            else:
                self.replication = Replication(cfg, store, self.sync, self.ident.node_id.bytes,
                                               self._stream_keys,
                                               self.seed.rng_for("replication"),
                                               peers=self._member_sync_addrs)
                upstream = StaticUpstream(self.replication)
            self.forwarding = Forwarding(store, upstream, self.ident.node_id.bytes,
                                         self.sync.max_frame, self._stream_keys,
                                         self.seed.rng_for("forwarding"), cfg.interval,
                                         cfg.tombstone_grace, self.rounds.sleep)
            self.sync.streams.update(self.forwarding.routes())
            self.closers.append(self.forwarding.close)
            # Handed to every follower it runs (after a promotion or stepping down too).
            self.replication.before_hello = self.forwarding.push
            if isinstance(self.replication, Replication) and self.replication.follower is not None:
                self.replication.follower.before_hello = self.forwarding.push
            tg.start_soon(self.replication.run)
            tg.start_soon(self.forwarding.run)
            tg.start_soon(maintenance.log_compaction_loop, cfg.interval, store, cfg.log_retain,
                          self.replication.min_needed_seq, self.rounds.sleep)
            tg.start_soon(supervision.trim_memory)
            self._start_optional_services(tg)
            for svc in self.services:
                tg.start_soon(svc, self)
            supervision.freeze_startup()
            self.notifier.notify("READY=1", "STATUS=" + self.status_line())
            if self.notifier.enabled:
                tg.start_soon(supervision.systemd_loop, self.notifier, self.status_line,
                              lambda: self.last_tick, cfg.interval, self.rounds.sleep)
            task_status.started()
            await self._shutdown.wait()
            self.notifier.notify("STOPPING=1", "STATUS=leaving the swarm")
            await self._leave()
            with anyio.move_on_after(API_DRAIN, shield=True):
                await self._api_done.wait()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            for closer in reversed(self.closers):
                try:
                    await closer()
                except Exception:
                    log.exception("error while closing")
            self._save_snapshot()
            self._save_identity(force=True)
            if self.sock is not None:
                await self.sock.aclose()
        self.notifier.close()
        log.info("agent stopped")

    async def _serve_api(self, *, task_status: TaskStatus[int]) -> None:
        try:
            if self.api is None or self.store is None:
                task_status.started(0)
                return
            await self.api(self.view, self.store, self._shutdown.wait, task_status=task_status,
                           controls=Controls(reload_keyring=self.reload_keyring,
                                             join=self.join, writes=lambda: self.forwarding,
                                             promote=self._promote))
        finally:
            self._api_done.set()

    def _start_optional_services(self, tg: TaskGroup) -> None:
        cfg = self.cfg
        if cfg.health_url or cfg.health_cmd:
            tg.start_soon(health.run, cfg.health_url, cfg.health_cmd, cfg.health_interval,
                          self.core.set_app_healthy)
        if cfg.discovery == "multicast":
            from agent.net import discovery

            tg.start_soon(discovery.run, cfg.multicast_group, cfg.multicast_port,
                          self.core.me.port, self.ident.node_id.bytes,
                          lambda addr: self.seeds.add([addr]), self._seal())
        stall = self.faults.stall_tick_after
        if stall is not None:
            self._stall_tick_at = anyio.current_time() + stall
            log.warning("fault injection: the gossip loop will hang after %gs", stall)

    # --- peer snapshot (rejoin when the seeds are down) -----------------------

    def _load_snapshot(self) -> None:
        saved = snapshot.load(self.cfg.data_dir, self.cfg.snapshot_max_age)
        if saved.peers:
            log.info("rejoin candidates from the peer snapshot: %d", len(saved.peers))
            self.seeds.add(saved.peers)
        if saved.lc > self.core.lc:
            # The logical clock must not run backwards across a restart.
            self.core.lc = saved.lc

    def _snapshot_rows(self) -> list[maintenance.Row]:
        return maintenance.snapshot_rows(self.core, self.wall_time_of)

    def _save_snapshot(self) -> None:
        maintenance.write_snapshot(self.cfg.data_dir, self._snapshot_rows(), self.core.lc)

    async def _open_store(self) -> Store:
        from agent.runtime.sync_service import SyncService
        from agent.store import Store, StoreError

        cfg = self.cfg
        try:
            # An incarnation above 1 means the identity existed before this
            # start: a store should have existed too (a missing one is logged).
            self.store = await Store.open(cfg.data_dir, self.ident.node_id.bytes,
                                          cfg.max_value, cfg.max_skew,
                                          ran_before=self.ident.incarnation > 1)
        except (StoreError, OSError, sqlite3.Error) as e:
            raise StartupError(f"cannot open the database in {cfg.data_dir}: {e}") from None
        self.closers.append(self.store.close)
        self.sync = SyncService(self.store, cfg.bind, cfg.effective_sync_port, cfg.interval,
                                cfg.sync_concurrency, cfg.max_value, cfg.tombstone_grace,
                                rng=self.seed.rng_for("sync"),
                                keys=self._stream_keys)
        self.sync.rounds = self.rounds
        if cfg.sync_port is not None:
            self.core.me.sync_port = cfg.sync_port
        self._publish_digests()
        return self.store

    def _publish_digests(self) -> None:
        if self.store is not None:
            infos = self.store.digests()
            # The store hands out a new list on each commit that changed
            # it: the same list again means nothing to hash or spread.
            if infos is self._published_infos:
                return
            self._published_infos = infos
            before = self.core.digests
            self.core.set_digests([
                wire.Digest(c.name, c.state_hash, c.count, c.horizon >> clock.COUNTER_BITS)
                for c in infos])
            if self.core.digests != before and hasattr(self, "sync"):
                self.sync.poke()

    def sync_targets(self) -> list[tuple[str, str, int, dict[str, bytes], dict[str, int]]]:
        """Healthy peers with the digests they last sent us directly."""
        return [
            (m.node_id.hex(), m.host, m.sync_port or m.port,
             {d.name: d.state_hash for d in m.digests},
             {d.name: d.horizon_ms for d in m.digests})
            for m in self.core.members.values() if m.healthy and m.digests
        ]

    def _member_sync_addrs(self) -> list[HostPort]:
        """The sync addresses of the healthy members (asked by replication)."""
        return [HostPort(m.host, m.sync_port or m.port)
                for m in self.core.members.values() if m.healthy and m.host]

    async def _promote(self, force: bool) -> tuple[int | None, str]:
        """Promote to stream leader (agent.runtime.replication)."""
        from agent.runtime.leadership import PromotionRefused, Replication

        if not isinstance(self.replication, Replication):
            return None, ("the leader is elected through etcd here" if self.replication
                          else "change-log streaming is not running")
        try:
            return await self.replication.promote(force), ""
        except PromotionRefused as e:
            return None, str(e)

    async def _leave(self) -> None:
        self.core.leave(anyio.current_time())
        with anyio.move_on_after(2, shield=True):
            await self._flush()
        log.info("left the swarm (told %d peers)",
                 sum(m.healthy for m in self.core.members.values()))

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("received %s, shutting down", signal.Signals(sig).name)
                self._shutdown.set()
                return

    def reload(self) -> None:
        from agent.runtime import logging_setup

        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_reloadable()
        except ConfigError as e:
            log.error("reload refused, settings unchanged: %s", e)
        else:
            level = new.get("log_level", self.cfg.log_level)
            fmt = new.get("log_format", self.cfg.log_format)
            logging_setup.configure(level, fmt)
            # WARNING so the line shows whatever the new level is.
            log.warning("reloaded: log level %s, log format %s", level.lower(), fmt)
        if self.cfg.keyfile is not None:
            self.reload_keyring()
        self.notifier.notify("READY=1")

    # --- datagram security ----------------------------------------------------

    def _seal(self) -> Seal:
        assert self.seal is not None, "built at the start of run()"
        return self.seal

    def _build_seal(self) -> Seal:
        """The seal the key settings ask for. StartupError on a bad key file."""
        cfg = self.cfg
        try:
            ring = keyring.from_settings(cfg.key, cfg.keyfile)
        except keyring.KeyringError as e:
            raise StartupError(str(e)) from None
        if ring is None:
            log.warning("no cluster key (HS_GOSSIP_KEY or HS_GOSSIP_KEYFILE): datagrams are "
                        "neither encrypted nor authenticated, anyone who reaches UDP port %d "
                        "can join; keyed agents will not list this one", cfg.port)
            return Cleartext()
        try:
            # Saved before the first datagram is sealed: see agent.runtime.epoch.
            boot = epoch.next_for_start(cfg.data_dir, time.time())
        except (epoch.EpochError, OSError) as e:
            raise StartupError(f"cannot save the boot epoch in {cfg.data_dir}: {e}") from None
        from agent.net.seal import Sealed

        log.info("datagrams sealed (cluster %r, %s, primary key %s, %d key%s, boot epoch %d)",
                 cfg.cluster, ring.source, ring.primary.fingerprint, len(ring.keys),
                 "" if len(ring.keys) == 1 else "s", boot)
        return Sealed(ring, self.ident.node_id.bytes, boot, cfg.cluster)

    def _stream_keys(self) -> StreamKeys | None:
        """The keys sync streams use: the seal's keyring as of now, so a
        reload applies to the next connection (None: keyless, cleartext)."""
        from agent.net.handshake import StreamKeys
        from agent.net.seal import Sealed

        seal = self.seal
        if not isinstance(seal, Sealed):
            return None
        ring = seal.keyring
        if self._stream_keys_cache is None or self._stream_keys_cache[0] is not ring:
            self._stream_keys_cache = (ring, StreamKeys.from_keyring(ring, self.cfg.cluster))
        return self._stream_keys_cache[1]

    def reload_keyring(self) -> str | None:
        """Re-read HS_GOSSIP_KEYFILE and use it from now on. None when done,
        else why nothing changed (logged too)."""
        from agent.net.seal import Sealed

        seal = self.seal
        if not isinstance(seal, Sealed) or self.cfg.keyfile is None:
            why = ("no key file to re-read (HS_GOSSIP_KEYFILE is not set)" if
                   isinstance(seal, Sealed) else "this agent has no cluster key")
            log.warning("key reload: %s", why)
            return why
        try:
            ring = keyring.load_file(self.cfg.keyfile)
        except keyring.KeyringError as e:
            log.error("key reload refused, keys unchanged: %s", e)
            return f"keys unchanged: {e}"
        seal.install(ring)
        log.warning("keys reloaded from %s: primary %s, accepted %s", self.cfg.keyfile,
                    ring.primary.fingerprint, ", ".join(k.fingerprint for k in ring.keys))
        return None

    async def _resolve_advertise(self) -> str:
        adv = self.cfg.advertise
        if not adv:
            return ""
        try:
            addrs = await resolve(HostPort(adv, self.cfg.port))
        except OSError as e:
            raise StartupError(f"cannot resolve HS_GOSSIP_ADVERTISE={adv!r}: {e}") from None
        return addrs[0][0]

    @property
    def _bound_host(self) -> str | None:
        """The one address the agent is bound to (None: bound to all)."""
        return None if self.cfg.bind in ("0.0.0.0", "::") else self.cfg.bind

    def _join(self, addrs: list[tuple[str, int]]) -> None:
        """Contact these addresses now (seeds, saved peers, discovery, the API)."""
        self.core.join(addrs, anyio.current_time())

    async def _flush(self) -> None:
        """Carry out what the core asked for: timers, datagrams, push-pulls, events."""
        assert self.sock is not None
        core = self.core
        self.timers.add((t.deadline, t.timer) for t in core.take_timers())
        for s in core.take_outgoing():
            await self.sock.send(s.data, s.addr)
        for pp in core.take_push_pulls():
            self._start_push_pull(pp)
        for ev in core.take_events():
            self._on_event(ev)
        self.timers.prune()

    def _start_push_pull(self, pp: PushPull) -> None:
        if self._tg is None or self._push_pulls_running >= MAX_PUSH_PULLS:
            self.core.push_pull_failed(pp.addr, anyio.current_time())
            return
        self._push_pulls_running += 1
        self._tg.start_soon(self._push_pull, pp)

    async def _push_pull(self, pp: PushPull) -> None:
        """One exchange the core asked for; its answer or failure goes back to it."""
        host, port = pp.addr[0], pp.tcp_port or pp.addr[1]
        try:
            reply = await push_pull.exchange(host, port, pp.data, self._stream_keys(),
                                             self._bound_host)
        except push_pull.FAILURES as e:
            log.debug("push-pull with %s:%d failed: %s", host, port, e or type(e).__name__)
            self.core.push_pull_failed(pp.addr, anyio.current_time())
        else:
            self.core.receive_push_pull_reply(reply, pp.addr, anyio.current_time())
        finally:
            self._push_pulls_running -= 1
        await self._flush()

    async def _serve_push_pull(self, conn: Framed, first: bytes) -> None:
        """A member's push-pull on the sync listener: merge theirs, answer ours."""
        async def answer(data: bytes, src: tuple[str, int]) -> bytes | None:
            reply = self.core.handle_push_pull(data, src, anyio.current_time())
            await self._flush()
            return reply

        if first == bytes([push_pull.FIRST_BYTE]):
            await push_pull.serve(conn, answer)

    async def _receive_loop(self) -> None:
        assert self.sock is not None
        seal = self._seal()
        while True:
            data, src = await self.sock.receive()
            # The node it authenticated as (None when keyless): the core
            # refuses a message that speaks for another node.
            self.core.receive(data, src, anyio.current_time(), seal.sender(data))
            await self._flush()

    def _publish_role(self, now: float) -> None:
        """Our change-log streaming role (Leader, Follower, Edge) in gossip,
        so every member lists it (agent.core.swim.Swim.set_role)."""
        rv = self.replication.view(now) if self.replication is not None else None
        if rv is not None and rv.role in wire.ROLES:
            self.core.set_role(wire.ROLES.index(rv.role))

    async def _refresh_seeds(self) -> None:
        try:
            await self.seeds.refresh()
        finally:
            self._refreshing_seeds = False

    async def _timer_loop(self) -> None:
        """Fire the core's timers as they fall due, and once per interval do
        the agent's own round: publish digests, advance the logical clock,
        save a raised incarnation, see whether a seed answered, look seeds up
        again while alone. The round rides on the probe timer's wakeup (up
        to half an interval late) rather than waking the process on its own:
        an idle agent's CPU is mostly the cost of waking up."""
        interval = self.cfg.interval
        next_round = anyio.current_time()
        while True:
            now = anyio.current_time()
            if now >= self._stall_tick_at:
                await anyio.sleep_forever()
            for timer in self.timers.due(now):
                self.core.handle_timer(timer, now)
            if now >= next_round:
                next_round = now + interval
                self.ticks += 1
                self.rounds.tick(now)
                self._publish_digests()
                self.core.bump_lc()
                self._save_identity()
                self.seed_watch.update(*seed_state(self.core), now)
                self._publish_role(now)
                if (not self.core.joined and self.cfg.peers and not self._refreshing_seeds
                        and self._tg is not None):
                    # Its own task: a slow resolver must not stall the probes.
                    self._refreshing_seeds = True
                    self._tg.start_soon(self._refresh_seeds)
            await self._flush()
            self.last_tick = now
            deadline = await self.timers.wait(next_round + interval / 2)
            self.lag.woke(deadline, anyio.current_time())

    def _on_event(self, ev: Event) -> None:
        nid = _short(getattr(ev, "node_id", b""))
        if isinstance(ev, MemberJoined):
            log.info("peer %s joined at %s:%d", nid, *ev.addr)
        elif isinstance(ev, MemberRestarted):
            log.info("peer %s restarted (incarnation %d)", nid, ev.incarnation)
        elif isinstance(ev, MemberSuspected):
            log.warning("peer %s suspected (probes unanswered)", nid)
        elif isinstance(ev, MemberRecovered):
            log.info("peer %s healthy again", nid)
        elif isinstance(ev, MemberFailed):
            log.warning("peer %s failed (suspicion not refuted)", nid)
        elif isinstance(ev, MemberLeft):
            log.info("peer %s left", nid)
        elif isinstance(ev, MemberExpired):
            log.info("peer %s dropped (not confirmed alive for %.0fs)", nid, self.cfg.ttl)
        elif isinstance(ev, IncarnationRaised):
            if ev.reason == "refutation":
                log.warning("refuting a suspicion: incarnation now %d", ev.incarnation)
            else:
                log.info("%s changed: incarnation now %d", ev.reason, ev.incarnation)
            self._ident_pending = ev.incarnation
            self._save_identity()
        elif isinstance(ev, DigestsChanged) and hasattr(self, "sync"):
            self.sync.poke()

    def _save_identity(self, force: bool = False) -> None:
        """Write the pending incarnation, unless one was written less than
        IDENTITY_SAVE_EVERY seconds ago (then the next tick does it)."""
        now = time.monotonic()
        if self._ident_pending is None or (
                not force and now - self._ident_saved_at < IDENTITY_SAVE_EVERY):
            return
        incarnation = self._ident_pending
        self._ident_saved_at = now
        try:
            identity.save(self.cfg.data_dir, identity.Identity(self.ident.node_id, incarnation))
        except OSError as e:
            # Kept pending: the next tick tries again. Said once, not per tick.
            if not self._ident_save_failing:
                self._ident_save_failing = True
                log.warning("cannot save incarnation %d to %s (will retry): %s",
                            incarnation, self.cfg.data_dir, e)
            return
        if self._ident_save_failing:
            self._ident_save_failing = False
            log.info("saved incarnation %d", incarnation)
        if self._ident_pending == incarnation:
            self._ident_pending = None


def _short(node_id: bytes) -> str:
    return str(uuid.UUID(bytes=node_id))[:8] if len(node_id) == 16 else "?"

