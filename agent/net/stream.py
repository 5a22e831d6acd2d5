"""TCP streams for sync: the one place a TCP connection is opened or accepted,
and the framing of its bytes.

Rules:

* :func:`connect` and :func:`listen` are the only ways a TCP byte stream
  comes into being; both hand it to :func:`_secure`, which runs the
  handshake of :mod:`agent.net.handshake` when keys are configured and
  returns the :class:`Framed` connection. With no keys (``keys=None``) the
  stream is cleartext, and a keyed and a keyless side never complete a
  session (the keyed side sees a malformed handshake, the keyless side an
  oversized frame).
* The handshake reads only its three fixed-size messages (at most 108
  bytes) under one :data:`HANDSHAKE_TIMEOUT`; nothing else is allocated for
  a client until it has proved it holds a key. A listener accepts at most
  :data:`MAX_UNAUTHENTICATED` connections still in their handshake; any
  more are closed at once. Every refusal is reported to the listener's
  ``refused(cause, peer)`` callback (causes: ``timeout``, ``closed``,
  ``malformed``, ``unknown_key``, ``bad_proof``, ``cap``).
* A frame is a 4-byte big-endian length, then the body. Sizes are checked
  before the body is read, and every read and write has a timeout:
  :data:`IO_TIMEOUT`, or for a receive the caller's own (``timeout=None``:
  a replication stream bounds a whole stream of receives with one moving
  deadline).
* What the socket takes or holds at once goes without the event loop: a
  frame is first written straight to the non-blocking socket, and a read
  first takes what the socket already holds; only a write the socket cannot
  take whole, or a read with nothing waiting, awaits it (under the timeout).
  A timeout is a cancel scope, which costs more than a loopback write of a
  small frame; a replication stream sends hundreds of frames a second.
* Each body passes :meth:`Framed.seal` on the way out and :meth:`Framed.open`
  on the way in: ChaCha20-Poly1305 with in-order counter nonces once a
  handshake ran, identity functions on a keyless stream. (Datagrams have
  their own seam, :mod:`agent.net.seal`; a stream's keys belong to one
  connection, so its seam lives on the connection.)
* Bodies are opaque bytes here; what they mean is :mod:`merkle.frames`'.
* Failures to bind are OSError; the caller turns them into start-up errors.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute, SocketStream

if TYPE_CHECKING:  # imported when a key is configured: keyless agents skip cryptography
    from agent.net.handshake import Session, StreamKeys

IO_TIMEOUT = 15.0
#: seconds a peer has for the whole handshake
HANDSHAKE_TIMEOUT = 5.0
#: connections a listener keeps in their handshake at once; more are closed
MAX_UNAUTHENTICATED = 16

#: bytes a sealed frame adds (agent.net.handshake.TAG_LEN)
TAG_LEN = 16

#: ``refused(cause, peer)``: told of every connection refused before its session
Refused = Callable[[str, str], None]


class SyncError(Exception):
    """The stream broke the framing rules (too large a frame), or a frame
    failed authentication."""


class StreamHandshakeError(SyncError):
    """The peer failed the stream handshake; ``cause`` names why."""

    def __init__(self, cause: str, detail: str) -> None:
        self.cause = cause
        super().__init__(detail)


class Framed:
    """Length-prefixed frames over one byte stream; closes it on exit."""

    def __init__(self, stream: ByteStream, max_frame: int, peer: str = "?",
                 session: Session | None = None) -> None:
        self.stream = stream
        #: the non-blocking socket under ``stream`` (None: not a socket stream)
        self.sock: socket.socket | None = stream.extra(SocketAttribute.raw_socket, None)
        self._sending = False
        self.session = session
        # the limit applies to the body; a sealed frame carries a tag on top
        self.max_frame = max_frame + (TAG_LEN if session else 0)
        self.peer = peer
        self.buf = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def encrypted(self) -> bool:
        return self.session is not None

    def remote_addr(self) -> tuple[str, int]:
        """Where the connection comes from (("", 0) when the stream cannot say)."""
        try:
            addr = self.stream.extra(SocketAttribute.remote_address)
        except (OSError, anyio.TypedAttributeLookupError):
            return ("", 0)
        if isinstance(addr, tuple):
            return (str(addr[0]), int(addr[1]))
        return (str(addr), 0)

    # the security seam: one point per direction -------------------------------

    def seal(self, body: bytes) -> bytes:
        """An outgoing frame body as it goes on the wire."""
        return body if self.session is None else self.session.send.seal(body)

    def open(self, data: bytes) -> bytes:
        """An incoming frame as read from the wire, back to its body.
        SyncError if it fails authentication."""
        if self.session is None:
            return data
        from agent.net.handshake import FrameAuthError

        try:
            return self.session.recv.open(data)
        except FrameAuthError as e:
            raise SyncError(f"{e} (from {self.peer})") from None

    # ---------------------------------------------------------------------------

    async def send(self, body: bytes) -> None:
        data = self.seal(body)
        self.bytes_out += len(data) + 4
        frame = len(data).to_bytes(4, "big") + data
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._sending:  # another task's frame is half written
            raise anyio.BusyResourceError("writing to")
        sent = 0
        if self.sock is not None:
            try:
                sent = self.sock.send(frame)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: the stream's send says which
            if sent == len(frame):
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return
        self._sending = True
        try:
            with anyio.fail_after(IO_TIMEOUT):
                await self.stream.send(frame[sent:] if sent else frame)
        finally:
            self._sending = False

    def _take(self, n: int) -> bool:
        """Read what the socket holds without waiting (up to ``n`` bytes);
        whether anything came. EndOfStream if the peer closed."""
        if self.sock is None:
            return False
        try:
            chunk = self.sock.recv(n)
        except OSError:
            return False  # nothing yet (EAGAIN), or broken: the stream's receive says which
        if not chunk:
            raise anyio.EndOfStream
        self.buf += chunk
        return True

    async def _fill(self, n: int, timeout: float | None) -> None:
        while len(self.buf) < n:
            want = min(max(n - len(self.buf), 65536), 1 << 20)
            if self._take(want):
                continue
            if timeout is None:
                self.buf += await self.stream.receive(want)
                continue
            with anyio.fail_after(timeout):
                self.buf += await self.stream.receive(want)

    async def receive(self, timeout: float | None = IO_TIMEOUT) -> bytes:
        """The next frame's body. ``timeout`` bounds each wait for bytes;
        None: the caller bounds the whole receive itself."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self._fill(4, timeout)
        size = int.from_bytes(self.buf[:4], "big")
        if size > self.max_frame:
            raise SyncError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
        await self._fill(4 + size, timeout)
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


def _peer_name(stream: SocketStream) -> str:
    """host:port ([host]:port for IPv6) of the other end, for logs and views."""
    try:
        addr = stream.extra(SocketAttribute.remote_address)
    except (OSError, anyio.TypedAttributeLookupError):
        return "?"
    if not isinstance(addr, tuple):
        return str(addr)
    host = str(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


async def _read_exactly(stream: ByteStream, n: int) -> bytes:
    """Exactly ``n`` bytes (a handshake message), never more: the bytes
    after it belong to the first frame and are kept by the caller."""
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive(n - len(buf))
    return bytes(buf)


async def _handshake(stream: ByteStream, keys: StreamKeys,
                     initiator: bool) -> Session:
    """Run the handshake; StreamHandshakeError (with its cause) on any failure."""
    from agent.net import handshake
    from agent.net.handshake import HandshakeError

    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            if initiator:
                ini = handshake.Initiator(keys)
                await stream.send(ini.start())
                m3, session = ini.finish(await _read_exactly(stream, handshake.M2_LEN))
                await stream.send(m3)
                return session
            resp = handshake.Responder(keys)
            await stream.send(resp.answer(await _read_exactly(stream, handshake.M1_LEN)))
            return resp.finish(await _read_exactly(stream, handshake.M3_LEN))
    except HandshakeError as e:
        raise StreamHandshakeError(e.cause, str(e)) from None
    except TimeoutError:
        raise StreamHandshakeError("timeout", "handshake timed out") from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as e:
        raise StreamHandshakeError(
            "closed", f"connection closed during the handshake ({type(e).__name__}); "
            "is the peer's key configuration the same?") from None


async def _secure(stream: SocketStream, max_frame: int, initiator: bool,
                  keys: StreamKeys | None) -> Framed:
    """Where every TCP stream becomes a framed connection, both directions:
    the handshake runs here when there are keys (``initiator`` says which side
    speaks first)."""
    peer = _peer_name(stream)
    session = None if keys is None else await _handshake(stream, keys, initiator)
    return Framed(stream, max_frame, peer, session)


async def connect(host: str, port: int, max_frame: int,
                  keys: StreamKeys | None = None, local_host: str | None = None) -> Framed:
    """Open a framed connection to host:port (use it as ``async with``),
    from ``local_host`` when given (an agent bound to one address speaks
    from it). StreamHandshakeError if the peer fails the handshake."""
    stream = await anyio.connect_tcp(host, port, local_host=local_host)
    try:
        return await _secure(stream, max_frame, initiator=True, keys=keys)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


def _ignore(cause: str, peer: str) -> None:
    return None


class FramedListener:
    """A bound TCP listener; :meth:`serve` hands each connection, framed and
    (with keys) authenticated, to a handler."""

    def __init__(self, listener: Listener[SocketStream], max_frame: int,
                 keys: Callable[[], StreamKeys | None], refused: Refused) -> None:
        self.listener = listener
        self.max_frame = max_frame
        self.keys = keys
        self.refused = refused
        self.unauthenticated = 0  # connections in their handshake now

    async def serve(self, handler: Callable[[Framed], Awaitable[None]]) -> None:
        """Serve until cancelled; each connection is closed when its handler returns."""
        async def one(stream: SocketStream) -> None:
            async with stream:  # closed whatever the handshake or the handler do
                keys = self.keys()
                if keys is None:
                    await handler(await _secure(stream, self.max_frame, False, None))
                    return
                peer = _peer_name(stream)
                if self.unauthenticated >= MAX_UNAUTHENTICATED:
                    self.refused("cap", peer)
                    return
                self.unauthenticated += 1
                try:
                    conn = await _secure(stream, self.max_frame, False, keys)
                except StreamHandshakeError as e:
                    self.refused(e.cause, peer)
                    return
                finally:
                    self.unauthenticated -= 1
                await handler(conn)

        async with self.listener, anyio.create_task_group() as tg:
            await self.listener.serve(one, task_group=tg)


async def listen(bind: str, port: int, max_frame: int,
                 keys: Callable[[], StreamKeys | None] = lambda: None,
                 refused: Refused = _ignore) -> FramedListener:
    """Bind the sync port on ``bind`` (all interfaces for 0.0.0.0 or ::).
    ``keys()`` is asked at each accept (so a reloaded keyring applies to the
    next connection). Raises OSError when the port cannot be had."""
    host = None if bind in ("0.0.0.0", "::") else bind
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                               reuse_port=False)
    return FramedListener(listener, max_frame, keys, refused)
