"""Length-prefixed msgpack frames over a TCP stream: a 4-byte big-endian
length, then the body. Sizes are checked before the body is read, and every
read and write has a timeout."""

from __future__ import annotations

from typing import Any

import anyio
import msgpack
from anyio.abc import ByteStream

IO_TIMEOUT = 15.0


class SyncError(Exception):
    """The stream broke the framing rules (too large, undecodable)."""


class Framed:
    def __init__(self, stream: ByteStream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.buf = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, msg: Any) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        self.bytes_out += len(data) + 4
        with anyio.fail_after(IO_TIMEOUT):
            await self.stream.send(len(data).to_bytes(4, "big") + data)

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            with anyio.fail_after(IO_TIMEOUT):
                chunk = await self.stream.receive(65536)
            self.buf += chunk

    async def receive(self) -> Any:
        await self._fill(4)
        size = int.from_bytes(self.buf[:4], "big")
        if size > self.max_frame:
            raise SyncError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
        await self._fill(4 + size)
        data = bytes(self.buf[4:4 + size])
        del self.buf[:4 + size]
        self.bytes_in += size + 4
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception:
            raise SyncError("undecodable frame") from None
