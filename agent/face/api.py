"""Local HTTP API: Starlette on Hypercorn, in the agent's own task group.

Hypercorn's trio worker is used when the agent runs on trio (the default),
its asyncio worker when the agent is embedded in an asyncio program.
Integers in responses stay below 2**53 so JavaScript clients read them exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config as HyperConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent import __version__

if TYPE_CHECKING:
    from agent.runtime.agent import Agent


def build_app(agent: Agent) -> Starlette:
    async def peers(request: Request) -> JSONResponse:
        members = sorted(agent.core.members.values(), key=lambda m: (m.host, m.port))
        body = {
            "gossip_enabled": True,
            "peer_count": len(members),
            "peers": [agent.peer_view(m) for m in members],
        }
        return JSONResponse(body)

    async def cluster_status(request: Request) -> JSONResponse:
        core = agent.core
        return JSONResponse({
            "node_id": str(agent.node_id),
            "name": core.me.name,
            "role": agent.role,
            "upstream_peer": None,
            "downstream_peers": [],
            "logical_clock": core.lc,
            "incarnation": core.me.incarnation,
            "peer_count": len(core.members),
            "healthy_peers": sum(1 for m in core.members.values() if m.healthy),
            "version": __version__,
        })

    async def swarm_stats(request: Request) -> JSONResponse:
        """Raw gossip counters (datagrams, bytes, drops by cause) since start."""
        counters = dict(agent.core.stats)
        if agent.sock is not None:
            counters.update(agent.sock.stats)
        return JSONResponse({"uptime_secs": round(time.time() - agent.started_wall, 3),
                             "counters": dict(sorted(counters.items()))})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "node_id": str(agent.node_id)})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "not found", "path": request.url.path}, status_code=404)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("hs_gossip.api").exception("request failed: %s", request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    routes: list[Any] = [
        Route("/api/swarm/peers", peers),
        Route("/api/cluster/status", cluster_status),
        Route("/api/swarm/stats", swarm_stats),
        Route("/healthz", healthz),
        *agent.extra_routes,
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 500: server_error})


def _hyper_config(host: str, port: int) -> HyperConfig:
    hc = HyperConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hs_gossip.http")
    hc.graceful_timeout = 1.0
    hc.keep_alive_timeout = 5.0
    hc.h2_max_concurrent_streams = 16
    return hc


async def serve_api(
    agent: Agent,
    shutdown: Callable[[], Awaitable[Any]],
    *,
    task_status: TaskStatus[int],
) -> None:
    """Serve until ``shutdown`` returns. Reports the bound port via task_status."""
    cfg = agent.cfg
    hc = _hyper_config(cfg.api.host, cfg.api.port)
    # Hypercorn logs "Running on ..." at INFO; the agent logs its own start line.
    logging.getLogger("hs_gossip.http").setLevel(logging.WARNING)
    app = build_app(agent)

    def started(binds: list[str]) -> None:
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
    except OSError as e:
        from agent.runtime.errors import StartupError

        raise StartupError(
            f"cannot bind HTTP API {cfg.api} (HS_GOSSIP_API): {e.strerror or e}"
        ) from None

