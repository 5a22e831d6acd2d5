"""Membership push-pull over TCP: the exchange the membership core asks for.

The core (agent.core.swim) hands out ``PushPull(addr, data)``: open a stream
to the member, send our full state as one frame, read theirs back as one
frame. Streams go through :mod:`agent.net.stream` like sync sessions (the
handshake applies with cluster keys) and arrive on the sync listener, which
routes them here by their first byte (:mod:`agent.runtime.sync_service`).
The opener sends a one-byte frame (:data:`FIRST_BYTE`, so every first frame
on that listener stays small) and then its state; the answer is one frame.
Both directions are bounded: at most :data:`MAX_FRAME` bytes of state each
way, the whole exchange within :data:`TIMEOUT` seconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from agent.core import wire
from agent.core.addr import Addr
from agent.net.stream import Framed, SyncError, connect

if TYPE_CHECKING:
    from agent.net.handshake import StreamKeys

#: a push-pull payload opens with the datagram envelope's version byte; a
#: sync HELLO opens with a msgpack array header, so the listener tells them
#: apart by this first byte
FIRST_BYTE = wire.VERSION
#: what a failed exchange raises (the peer is gone, slow, or not one of us)
FAILURES = (OSError, TimeoutError, SyncError, anyio.EndOfStream, anyio.BrokenResourceError)

#: one side's full state: the core caps its payload at 1 MiB
MAX_FRAME = (1 << 20) + 1024
#: seconds a whole exchange may take (connect, handshake, both frames)
TIMEOUT = 10.0


async def exchange(host: str, port: int, data: bytes, keys: StreamKeys | None,
                   local_host: str | None = None, timeout: float = TIMEOUT) -> bytes:
    """Checkpoint. Send ``data`` from ``local_host`` (the member's peers
    believe a push-pull about it only from its own address), return the
    answer. Raises OSError, TimeoutError, anyio stream errors or
    StreamHandshakeError on failure; a cancellation leaves nothing open."""
    with anyio.fail_after(timeout):
        async with await connect(host, port, MAX_FRAME, keys, local_host) as conn:
            await conn.send(bytes([FIRST_BYTE]))
            await conn.send(data)
            return await conn.receive()


async def serve(conn: Framed, answer: Callable[[bytes, Addr], Awaitable[bytes | None]],
                timeout: float = TIMEOUT) -> None:
    """Checkpoint. The listener's side, after the one-byte first frame: read
    the opener's state (at most MAX_FRAME bytes), send what ``answer``
    returns (nothing when it returns None)."""
    with anyio.fail_after(timeout):
        limit = conn.max_frame
        conn.max_frame = MAX_FRAME
        try:
            data = await conn.receive()
        finally:
            conn.max_frame = limit
        reply = await answer(data, conn.remote_addr())
        if reply is not None:
            await conn.send(reply)
