"""What callers of the store see and may check up front: its errors, the rules
for collection names and keys, the value encoding and the collection summary.

Rules: nothing here touches SQLite. Values are stored as msgpack; a name is
1-128 characters of ``A-Z a-z 0-9 . _ -``; a key is 1-1024 bytes of UTF-8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

# matched with fullmatch: "$" alone would accept a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_KEY_BYTES = 1024


class StoreError(Exception):
    """A request the store refuses (bad name, key, size). Safe to show users."""


class ItemRejected(StoreError):
    """An item from a peer that fails validation; it is counted and skipped."""


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    state_hash: bytes
    count: int  # live items
    total: int  # items including tombstones
    horizon: int = 0  # HLC below which tombstones are purged and remote items refused


def check_name(name: str) -> None:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise StoreError("collection name must be 1-128 characters of A-Z a-z 0-9 . _ -")


def check_key(key: str) -> None:
    if key.isascii():
        n = len(key)  # one byte per character in UTF-8: no need to encode it
    else:
        try:
            n = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise StoreError("key must be valid UTF-8") from None
    if not 1 <= n <= MAX_KEY_BYTES:
        raise StoreError(f"key must be 1-{MAX_KEY_BYTES} bytes of UTF-8")


def encode_value(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def decode_value(data: bytes | None) -> Any:
    return None if data is None else msgpack.unpackb(data, raw=False)
