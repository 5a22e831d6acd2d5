"""TCP streams for sync: the one place a TCP connection is opened or accepted,
and the framing of its bytes.

Rules:

* :func:`connect` and :func:`listen` are the only ways a TCP byte stream
  comes into being; both hand it to :func:`_secure`, the one seam where a
  handshake will go, and which returns the :class:`Framed` connection.
* A frame is a 4-byte big-endian length, then the body. Sizes are checked
  before the body is read, and every read and write has a timeout.
* Each body passes :meth:`Framed.seal` on the way out and :meth:`Framed.open`
  on the way in: where per-connection authenticated encryption will go.
  Identity functions today: the bytes on the wire are the frames themselves.
  (Datagrams have their own seam, :mod:`agent.net.seal`; a stream's keys
  belong to one connection, so its seam lives on the connection.)
* Bodies are opaque bytes here; what they mean is :mod:`merkle.frames`'.
* Failures to bind are OSError; the caller turns them into start-up errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream

IO_TIMEOUT = 15.0


class SyncError(Exception):
    """The stream broke the framing rules (too large a frame)."""


class Framed:
    """Length-prefixed frames over one byte stream; closes it on exit."""

    def __init__(self, stream: ByteStream, max_frame: int, peer: str = "?") -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.peer = peer
        self.buf = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    # the security seam: one point per direction -------------------------------

    def seal(self, body: bytes) -> bytes:
        """An outgoing frame body as it goes on the wire."""
        return body

    def open(self, data: bytes) -> bytes:
        """An incoming frame as read from the wire, back to its body."""
        return data

    # ---------------------------------------------------------------------------

    async def send(self, body: bytes) -> None:
        data = self.seal(body)
        self.bytes_out += len(data) + 4
        with anyio.fail_after(IO_TIMEOUT):
            await self.stream.send(len(data).to_bytes(4, "big") + data)

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            with anyio.fail_after(IO_TIMEOUT):
                chunk = await self.stream.receive(65536)
            self.buf += chunk

    async def receive(self) -> bytes:
        await self._fill(4)
        size = int.from_bytes(self.buf[:4], "big")
        if size > self.max_frame:
            raise SyncError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
        await self._fill(4 + size)
        data = bytes(self.buf[4:4 + size])
        del self.buf[:4 + size]
        self.bytes_in += size + 4
        return self.open(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Framed:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


async def _secure(stream: SocketStream, max_frame: int, initiator: bool) -> Framed:
    """Where every TCP stream becomes a framed connection, both directions:
    the place for a handshake (``initiator`` says which side speaks first)."""
    try:
        peer = str(stream.extra(SocketAttribute.remote_address))
    except (OSError, anyio.TypedAttributeLookupError):
        peer = "?"
    return Framed(stream, max_frame, peer)


async def connect(host: str, port: int, max_frame: int) -> Framed:
    """Open a framed connection to host:port (use it as ``async with``)."""
    stream = await anyio.connect_tcp(host, port)
    try:
        return await _secure(stream, max_frame, initiator=True)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


class FramedListener:
    """A bound TCP listener; :meth:`serve` hands each connection, framed, to a handler."""

    def __init__(self, listener: Listener[SocketStream], max_frame: int) -> None:
        self.listener = listener
        self.max_frame = max_frame

    async def serve(self, handler: Callable[[Framed], Awaitable[None]]) -> None:
        """Serve until cancelled; each connection is closed when its handler returns."""
        async def one(stream: SocketStream) -> None:
            async with stream:  # closed whatever the handshake or the handler do
                await handler(await _secure(stream, self.max_frame, initiator=False))

        async with self.listener, anyio.create_task_group() as tg:
            await self.listener.serve(one, task_group=tg)


async def listen(bind: str, port: int, max_frame: int) -> FramedListener:
    """Bind the sync port on ``bind`` (all interfaces for 0.0.0.0 or ::).
    Raises OSError when the port cannot be had."""
    host = None if bind in ("0.0.0.0", "::") else bind
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                               reuse_port=False)
    return FramedListener(listener, max_frame)
