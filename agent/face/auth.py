"""Bearer-token access to the HTTP API.

With ``HS_GOSSIP_API_TOKEN`` set, every request but ``GET /healthz`` must
carry ``Authorization: Bearer <token>``; anything else is answered 401 with
a JSON error before any route (or body limit) runs. Tokens are compared with
:func:`hmac.compare_digest`, so the time taken says nothing about how much
of a guess was right. ``/healthz`` stays open: supervisors and load
balancers probe it, and it tells nothing but that the agent is up.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz"})


class BearerToken:
    """ASGI middleware: 401 unless the request carries the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            if not hmac.compare_digest(given, self.expected):
                resp = JSONResponse(
                    {"error": "unauthorized: send Authorization: Bearer <HS_GOSSIP_API_TOKEN>"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
