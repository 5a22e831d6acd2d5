"""Local HTTP API: Starlette on Hypercorn, in the agent's own task group.

Every agent route reads an immutable :class:`~agent.runtime.view.AgentView`,
taken fresh per request from the ``view`` function the agent hands in; the
API never touches the runtime's live objects. The collection routes
(agent.face.collections_api) and ``/metrics`` (agent.face.metrics) are
mounted here. The agent imports none of this: the ``run`` command gives it a
function that imports this module on first use (Starlette is the slow part
of start-up).

Hypercorn's trio worker is used when the agent runs on trio (the default),
its asyncio worker when the agent is embedded in an asyncio program.
Integers in responses stay below 2**53 so JavaScript clients read them exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config as HyperConfig
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.face import auth, cluster_api, collections_api, metrics, swarm_api
from agent.runtime.view import AgentView, Controls, PeerView

if TYPE_CHECKING:
    from agent.config import Config, HostPort
    from agent.store import Store

ViewSource = Callable[[], AgentView]


def peer_json(p: PeerView) -> dict[str, Any]:
    return {
        "node_id": p.node_id,
        "name": p.name,
        "addr": p.addr,
        "gossip_addr": p.gossip_addr,
        "http_port": p.http_port,
        "role": p.role,
        "incarnation": p.incarnation,
        "logical_clock": p.logical_clock,
        "collections": [
            {"name": d.name, "state_hash": d.state_hash, "vector_count": d.vector_count}
            for d in p.collections
        ],
        "last_seen_secs": p.last_seen_secs,
        "healthy": p.healthy,
        "app_healthy": p.app_healthy,
    }


def peers_json(v: AgentView) -> dict[str, Any]:
    """``GET /api/swarm/peers``."""
    return {"gossip_enabled": True, "peer_count": v.peer_count,
            "peers": [peer_json(p) for p in v.peers]}


def cluster_status_json(v: AgentView) -> dict[str, Any]:
    """``GET /api/cluster/status``."""
    return {
        "node_id": v.node_id,
        "name": v.name,
        "role": v.role,
        **replication_json(v),
        "logical_clock": v.logical_clock,
        "incarnation": v.incarnation,
        "peer_count": v.peer_count,
        "healthy_peers": v.healthy_peers,
        "version": __version__,
        # sync stream handshakes refused since start, by cause
        "sync_handshake_failures": dict(v.sync.handshake_failed) if v.sync else {},
        # datagram security (agent.net.seal): keys by fingerprint, never the keys
        "encrypted": v.encrypted,
        "keys": [{"fingerprint": k.fingerprint, "key_id": k.key_id, "primary": k.primary,
                  "peers": list(k.senders)} for k in v.keys],
        "datagrams_refused": dict(v.refused),
        # the seeds tried and whether any answered; "warning" once none has
        # for agent.runtime.joining.SEED_WARN_AFTER seconds
        "seeds": None if v.seeds is None else {
            "tried": list(v.seeds.tried), "reached": v.seeds.reached,
            "since_secs": v.seeds.since_secs, "warning": v.seeds.warning},
    }


def replication_json(v: AgentView) -> dict[str, Any]:
    """The change-log streaming part of ``/api/cluster/status``."""
    r = v.replication
    if r is None:
        return {"upstream_peer": None, "downstream_peers": [], "epoch": None,
                "applied_seq": None}
    # The stream's source address says little (an ephemeral port); the
    # follower's membership entry, when it is a member, says who it is.
    members = {p.node_id: p for p in v.peers}
    return {
        "upstream_peer": r.upstream,
        "downstream_peers": [
            {"addr": d.addr, "node_id": d.node_id,
             "name": m.name if (m := members.get(d.node_id)) else None,
             "gossip_addr": m.gossip_addr if m else None,
             "lag": d.lag, "start_seq": d.start_seq,
             "acked": {"epoch": d.acked.epoch, "seq": d.acked.seq, "hash": d.acked.hash.hex()}}
            for d in r.downstream],
        "epoch": r.epoch,
        "applied_seq": r.applied_seq,
        "replication": dict(r.stats),
    }


def keyring_routes(controls: Controls | None) -> list[BaseRoute]:
    """``POST /api/keyring/reload``: re-read HS_GOSSIP_KEYFILE now (as SIGHUP
    does). 200 with the keys in use; 409 when nothing was changed (no key
    file, or a bad one: the old keys stay) with the reason."""

    async def reload(request: Request) -> JSONResponse:
        if controls is None:
            return JSONResponse({"error": "this agent cannot reload keys"}, status_code=409)
        problem = controls.reload_keyring()
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=409)
        return JSONResponse({"reloaded": True})

    return [Route("/api/keyring/reload", reload, methods=["POST"])]


def swarm_stats_json(v: AgentView) -> dict[str, Any]:
    """``GET /api/swarm/stats``: raw gossip counters (datagrams, bytes, drops
    by cause) since start."""
    return {"uptime_secs": round(v.uptime, 3), "counters": dict(v.counters)}


#: largest request body any route accepts (a batch write); see BodyLimit
MAX_BODY = collections_api.MAX_BATCH_BODY


#: longest a refused request's unread body is drained after the answer (seconds)
DRAIN_WAIT = 10.0

#: starts draining a request's queue (its ``receive``) in a task that outlives it
Spawn = Callable[[Receive], None]


def build_app(view: ViewSource, extra_routes: list[BaseRoute],
              max_body: int = MAX_BODY, spawn: Spawn | None = None) -> Starlette:
    async def peers(request: Request) -> JSONResponse:
        return JSONResponse(peers_json(view()))

    async def cluster_status(request: Request) -> JSONResponse:
        return JSONResponse(cluster_status_json(view()))

    async def swarm_stats(request: Request) -> JSONResponse:
        return JSONResponse(swarm_stats_json(view()))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "node_id": view().node_id})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # 404, 405 and any other refusal raised by routing: JSON like the rest
        status = getattr(exc, "status_code", 500)
        body: dict[str, Any] = {"error": str(getattr(exc, "detail", "") or status).lower()}
        if status == 404:
            body = {"error": "not found", "path": request.url.path}
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the log, never to the client
        logging.getLogger("hs_gossip.api").error(
            "request failed: %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    routes: list[BaseRoute] = [
        Route("/api/swarm/peers", peers),
        Route("/api/cluster/status", cluster_status),
        Route("/api/swarm/stats", swarm_stats),
        Route("/healthz", healthz),
        *extra_routes,
    ]
    return Starlette(routes=routes,
                     middleware=[Middleware(BodyLimit, limit=max_body, spawn=spawn)],
                     exception_handlers={HTTPException: http_error, 500: server_error})


async def _drain(receive: Receive) -> None:
    """Take and drop what the server still queues for an answered request."""
    with anyio.move_on_after(DRAIN_WAIT):
        while (await receive())["type"] != "http.disconnect":
            pass


class BodyLimit:
    """Refuses, before the app runs, a request whose Content-Length is over
    ``limit`` (413, JSON). Routes that read a body also count what streams in
    (agent.face.json_input.read_json), so a body without Content-Length is
    bounded too, and all bodies in flight share one budget.

    A request answered before its body was read whole leaves Hypercorn's
    reader parked on the request's full queue (10 chunks), and the
    disconnect Hypercorn queues once the answer is sent parks behind it,
    inside the app's last ``send``: the connection would never close and its
    chunks never be freed. So when such a request starts its answer, its
    queue is drained in the background (``spawn``: a task group that outlives
    requests) until that disconnect, for at most DRAIN_WAIT seconds."""

    def __init__(self, app: ASGIApp, limit: int, spawn: Spawn | None = None) -> None:
        self.app = app
        self.limit = limit
        self.spawn = spawn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spawn = self.spawn
        if scope["type"] != "http" or spawn is None:
            await self._call(scope, receive, send)
            return
        read_whole = draining = False

        def drain() -> None:
            nonlocal draining
            if not (read_whole or draining):
                draining = True
                spawn(receive)

        async def tracked_receive() -> Message:
            nonlocal read_whole
            msg = await receive()
            read_whole = (read_whole or msg["type"] == "http.disconnect"
                          or not msg.get("more_body"))
            return msg

        async def tracked_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                drain()
            await send(msg)

        try:
            await self._call(scope, tracked_receive, tracked_send)
        finally:
            drain()  # a failure answered outside this middleware

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (not value.isdigit()
                                                  or int(value) > self.limit):
                    if value.isdigit():
                        status, msg = 413, (f"body of {int(value)} bytes is over the limit "
                                            f"of {self.limit} bytes")
                    else:
                        status, msg = 400, "Content-Length is not a number"
                    resp = JSONResponse({"error": msg}, status_code=status,
                                        headers={"Connection": "close"})
                    await resp(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _hyper_config(bind: HostPort) -> HyperConfig:
    hc = HyperConfig()
    hc.bind = [str(bind)]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hs_gossip.http")
    hc.graceful_timeout = 1.0
    hc.keep_alive_timeout = 5.0
    hc.h2_max_concurrent_streams = 16
    return hc


async def serve_api(
    cfg: Config,
    view: ViewSource,
    store: Store,
    shutdown: Callable[[], Awaitable[object]],
    *,
    task_status: TaskStatus[int],
    controls: Controls | None = None,
) -> None:
    """Serve the agent's routes, its collections' and ``/metrics`` until
    ``shutdown`` returns. Reports the bound port via task_status."""
    hc = _hyper_config(cfg.api)
    # Hypercorn logs "Running on ..." at INFO; the agent logs its own start line.
    logging.getLogger("hs_gossip.http").setLevel(logging.WARNING)
    async with anyio.create_task_group() as drains:  # see BodyLimit

        def drain(receive: Receive) -> None:
            drains.start_soon(_drain, receive)

        refused = await _serve(cfg, view, store, shutdown, hc, drain, task_status, controls)
        drains.cancel_scope.cancel()
    if refused is not None:  # raised out here, so no task group wraps it
        raise refused from None


async def _serve(cfg: Config, view: ViewSource, store: Store,
                 shutdown: Callable[[], Awaitable[object]], hc: HyperConfig, spawn: Spawn,
                 task_status: TaskStatus[int], controls: Controls | None) -> Exception | None:
    """Run Hypercorn until shutdown; the bind error, if that is why it stopped."""
    app = build_app(view, [*collections_api.routes(store, cfg.max_value,
                                                   controls.writes if controls else None),
                           *metrics.routes(view), *keyring_routes(controls),
                           *swarm_api.routes(view, controls),
                           *cluster_api.routes(controls)],
                    max_body=max(MAX_BODY, collections_api.put_body_limit(cfg.max_value)),
                    spawn=spawn)
    if cfg.api_token is not None:  # outermost: nothing runs for a request without it
        app.add_middleware(auth.BearerToken, token=cfg.api_token)

    bound = False

    def started(binds: list[str]) -> None:
        nonlocal bound
        bound = True
        task_status.started(int(binds[0].rsplit(":", 1)[1]))

    class _Status:
        def started(self, value: Any = None) -> None:
            started(value)

    try:
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve as trio_serve

            await trio_serve(app, hc, shutdown_trigger=shutdown,  # type: ignore[arg-type]
                             task_status=_Status())
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            # The asyncio worker does not report its binds; the port is known
            # unless it was 0.
            task_status.started(cfg.api.port)
            await asyncio_serve(app, hc, shutdown_trigger=shutdown)  # type: ignore[arg-type]
        return None
    except (OSError, BaseExceptionGroup) as e:
        # Hypercorn's trio worker raises the bind error inside an exception
        # group; before the port is reported, any OSError is the bind.
        err = None if bound else _first_os_error(e)
        if err is None:
            raise
        from agent.runtime.errors import StartupError

        return StartupError(
            f"cannot bind HTTP API {cfg.api} (HS_GOSSIP_API): {err.strerror or err}")


def _first_os_error(e: BaseException) -> OSError | None:
    if isinstance(e, OSError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _first_os_error(sub)
            if found is not None:
                return found
    return None

