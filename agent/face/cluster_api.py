"""``POST /api/cluster/promote[?force=true]``: make this agent the leader of
the change-log stream at an epoch above every epoch it has seen
(agent.runtime.replication, Replication.promote).

Rules:

* Behind the API token like every route but ``/healthz`` (agent.face.auth).
* 200 ``{"role": "Leader", "epoch": N}`` once the new epoch is persisted.
* 409 ``{"error": reason}`` when refused: already the leader, no streaming
  here, or (without ``force``) an agent it can reach has seen a higher epoch
  or is further in the leader's log.
* 400 for a ``force`` that is not true/false/1/0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from starlette.requests import Request

    from agent.runtime.view import Controls

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def routes(controls: Controls | None) -> list[BaseRoute]:
    async def promote(request: Request) -> JSONResponse:
        unknown = sorted(set(request.query_params) - {"force"})
        raw = request.query_params.get("force", "false").lower()
        if unknown or raw not in _BOOL:
            return JSONResponse({"error": "the only parameter is force=true|false"},
                                status_code=400)
        if controls is None or controls.promote is None:
            return JSONResponse({"error": "this agent does not take part in streaming"},
                                status_code=409)
        epoch, reason = await controls.promote(_BOOL[raw])
        if epoch is None:
            return JSONResponse({"error": reason}, status_code=409)
        return JSONResponse({"role": "Leader", "epoch": epoch})

    return [Route("/api/cluster/promote", promote, methods=["POST"])]
