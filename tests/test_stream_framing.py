"""Framing over real loopback TCP (agent.net.stream.Framed): frames written
straight to the socket when it takes them, awaited when it does not, and
never interleaved."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from agent.net.stream import Framed

BIG = 8 << 20  # more than a loopback socket's buffers hold


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Framed, SocketStream]]:
    """A framed client connection and the raw server side of it."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    async with listener:
        client = await anyio.connect_tcp("127.0.0.1", port)
        server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
        async with client, server:
            yield Framed(client, BIG), server


async def read_frames(stream: SocketStream, n: int) -> list[bytes]:
    framed = Framed(stream, BIG)
    return [await framed.receive() for _ in range(n)]


def test_frames_larger_than_the_socket_takes_arrive_whole_and_in_order() -> None:
    frames = [b"a" * 10, bytes(range(256)) * (BIG // 256), b"b" * 100, b"c" * (3 << 20), b"d"]

    async def main() -> list[bytes]:
        async with pair() as (conn, server), anyio.create_task_group() as tg:
            got: list[bytes] = []

            async def reader() -> None:
                got.extend(await read_frames(server, len(frames)))

            tg.start_soon(reader)
            for f in frames:
                await conn.send(f)
        return got

    got = anyio.run(main, backend="trio")
    assert [len(f) for f in got] == [len(f) for f in frames]
    assert got == frames


def test_a_send_while_another_frame_is_half_written_is_refused() -> None:
    """The first frame does not fit the socket: its sender waits for room.
    A second sender, even once the socket has room again, must not write
    into the middle of it."""

    async def main() -> tuple[bool, list[bytes]]:
        async with pair() as (conn, server), anyio.create_task_group() as tg:
            first = b"1" * BIG
            done = anyio.Event()

            async def big() -> None:
                await conn.send(first)
                done.set()

            tg.start_soon(big)
            raw = server.extra(SocketAttribute.raw_socket)
            # Until the first frame is stuck half written.
            with anyio.fail_after(10):
                while not conn._sending:  # the state under test
                    await anyio.sleep(0.001)
            # Make room without letting the blocked sender run (no await).
            drained = b""
            raw.setblocking(False)
            while len(drained) < 1 << 20:
                drained += raw.recv(1 << 20)
            refused = False
            try:
                await conn.send(b"2" * 10)
            except anyio.BusyResourceError:
                refused = True
            # The rest of the stream: exactly the first frame, nothing inside it.
            framed = Framed(server, BIG)
            framed.buf += drained
            got = [await framed.receive()]
            await done.wait()
        return refused, got

    refused, got = anyio.run(main, backend="trio")
    assert refused
    assert got == [b"1" * BIG]


def test_a_closed_peer_ends_the_stream() -> None:
    async def main() -> None:
        async with pair() as (conn, server):
            await conn.send(b"x")
            await server.aclose()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await conn.receive()

    anyio.run(main, backend="trio")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_connection_names_its_peer_as_host_and_port(host: str) -> None:
    """Logs and /api/cluster/status show the other end as host:port
    ([host]:port for IPv6), not as a Python tuple."""
    from agent.net.stream import connect, listen

    async def main() -> tuple[str, str]:
        try:
            listener = await listen(host, 0, 1024)
        except OSError:
            pytest.skip(f"no {host} here")
        port = listener.listener.extra(SocketAttribute.local_port)
        seen: list[str] = []

        async def handler(conn: Framed) -> None:
            seen.append(conn.peer)
            await conn.send(b"ok")

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            async with await connect(host, port, 1024) as conn:
                assert await conn.receive() == b"ok"
                local = conn.stream.extra(SocketAttribute.local_address)
                mine = conn.peer
            tg.cancel_scope.cancel()
        wrapped = f"[{host}]" if ":" in host else host
        assert mine == f"{wrapped}:{port}"
        return seen[0], f"{wrapped}:{local[1]}"  # type: ignore[index]

    server_saw, client_addr = anyio.run(main, backend="trio")
    assert server_saw == client_addr
