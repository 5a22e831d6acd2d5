"""Field validators shared by the stream decoders (agent.core.replication,
agent.core.forwarding): each takes a decoded msgpack value and returns it
typed, or raises the decoder's own error class.

Rules:

* Every unsigned number is at most :data:`agent.core.wire.JS_SAFE` (2**53 - 1)
  unless a field says otherwise: it survives a JSON round trip, and whatever
  reaches SQLite (epochs, seqs, counts, ids) fits its signed 64-bit integers
  with room to spare. HLCs are the exception: they use 63 bits
  (:data:`agent.core.clock.MAX_HLC`).
* Text limits count UTF-8 bytes, not characters.
"""

from __future__ import annotations

from typing import Any

from agent.core.clock import MAX_HLC
from agent.core.wire import JS_SAFE

__all__ = ["JS_SAFE", "MAX_HLC", "Fields"]


class Fields:
    """Validators raising ``error`` (a decoder's ProtocolError)."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def uint(self, x: Any, what: str, hi: int = JS_SAFE) -> int:
        if type(x) is not int or not 0 <= x <= hi:
            raise self.error(f"bad {what}")
        return x

    def text(self, x: Any, what: str, limit: int, empty: bool = True) -> str:
        if type(x) is not str or len(x.encode()) > limit or (not empty and not x):
            raise self.error(f"bad {what}")
        return x

    def blob(self, x: Any, what: str, size: int | None = None) -> bytes:
        if type(x) is not bytes or (size is not None and len(x) != size):
            raise self.error(f"bad {what}")
        return x
