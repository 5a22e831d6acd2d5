"""``GET /api/swarm/members`` and ``POST /api/swarm/join``.

Members: every member this agent knows, itself included, with its status
(alive, suspect, dead, left), read from the frozen view; ``?status=alive``
(repeated, or comma-separated) keeps only those statuses. Join: a strict JSON
body ``{"addrs": ["host:port", ...]}`` (at most :data:`MAX_JOIN` addresses),
checked here for shape and syntax; names are resolved by the runtime
(agent.runtime.joining). 200 with the numeric addresses contacted; 400 with
the reason when anything is wrong, and then nothing was added.

Both sit behind the API token like every route but ``/healthz``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from agent.config import HostPort, parse_host_port
from agent.face.json_input import InputError, read_json
from agent.runtime.view import STATUSES, AgentView, Controls, JoinError, MemberView

#: most addresses one join may name (the seeds list keeps 64 extra)
MAX_JOIN = 16
#: largest join body: MAX_JOIN names of 253 characters and their ports, quoted
MAX_JOIN_BODY = 8192

JOIN_SHAPE = '{"addrs": ["host:port", ...]}'


def member_json(m: MemberView) -> dict[str, Any]:
    return {
        "node_id": m.node_id,
        "name": m.name,
        "status": m.status,
        "addr": m.addr,
        "http_addr": m.http_addr,
        "incarnation": m.incarnation,
        "role": m.role,
        "age_secs": m.age_secs,
        "self": m.is_self,
    }


def members_json(v: AgentView, statuses: frozenset[str] | None = None) -> dict[str, Any]:
    """``GET /api/swarm/members``; ``statuses`` None: all of them."""
    return {"members": [member_json(m) for m in v.members
                        if statuses is None or m.status in statuses]}


def status_filter(values: list[str]) -> frozenset[str] | None:
    """The statuses asked for by ``?status=`` (each may be a comma-separated
    list); None when none was. ValueError naming an unknown one."""
    asked = {s.strip() for v in values for s in v.split(",")} - {""}
    unknown = sorted(asked - set(STATUSES))
    if unknown:
        raise ValueError(f"unknown status {unknown[0]!r} (one of {', '.join(STATUSES)})")
    return frozenset(asked) if asked else None


def join_addrs(doc: Any) -> list[HostPort]:
    """The addresses of a join body, in order, without repeats. ValueError
    with the reason for anything but ``{"addrs": [1..MAX_JOIN host:port]}``."""
    if not isinstance(doc, dict):
        raise ValueError(f"body must be a JSON object {JOIN_SHAPE}")
    extra = sorted(set(doc) - {"addrs"})
    if extra:
        raise ValueError(f"unknown field {extra[0]!r} (expected {JOIN_SHAPE})")
    addrs = doc.get("addrs")
    if not isinstance(addrs, list) or not addrs:
        raise ValueError(f"\"addrs\" must be a non-empty list of \"host:port\" ({JOIN_SHAPE})")
    if len(addrs) > MAX_JOIN:
        raise ValueError(f"{len(addrs)} addresses: at most {MAX_JOIN} per join")
    out: list[HostPort] = []
    for a in addrs:
        if not isinstance(a, str):
            raise ValueError(f"address {a!r} is not a string \"host:port\"")
        try:
            hp = parse_host_port(a)
        except ValueError:
            raise ValueError(
                f"{a[:300]!r} is not host:port (such as 10.0.0.5:7946 or [fd00::5]:7946)"
            ) from None
        if hp not in out:
            out.append(hp)
    return out


def routes(view: Callable[[], AgentView], controls: Controls | None) -> list[BaseRoute]:
    async def members(request: Request) -> JSONResponse:
        unknown = sorted(set(request.query_params) - {"status"})
        try:
            if unknown:
                raise ValueError(f"unknown query parameter {unknown[0]!r} (only status)")
            statuses = status_filter(request.query_params.getlist("status"))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(members_json(view(), statuses))

    async def join(request: Request) -> JSONResponse:
        if controls is None or controls.join is None:
            return JSONResponse({"error": "this agent cannot join at run time"},
                                status_code=409)
        try:
            addrs = join_addrs(await read_json(request.headers, request.stream(),
                                               MAX_JOIN_BODY))
            joined = await controls.join(addrs)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)
        except (ValueError, JoinError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"accepted": list(joined)})

    return [Route("/api/swarm/members", members),
            Route("/api/swarm/join", join, methods=["POST"])]
