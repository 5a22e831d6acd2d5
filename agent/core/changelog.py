"""The change log's entries: their canonical encoding, their hash, and the
check that a run of entries is an unbroken chain. Pure: no SQLite, no I/O,
so a follower verifies what it receives with the same code that wrote it.

Rules:

* An entry records one change to one item: ``op`` says which kind.
  ``PUT`` stores a live version (``value`` is its msgpack bytes), ``TOMBSTONE``
  stores a deletion (``value`` is None), ``REMOVE`` takes a version out
  entirely (a stale drop or a purged tombstone: ``hlc`` and ``origin`` are
  those of the removed version and ``value`` is its item digest, which is all
  a receiver needs to remove exactly that version).
* The canonical bytes of an entry are ``msgpack.packb([FORMAT, epoch, seq,
  prev_hash, origin, hlc, collection, key, op, value])`` with ``use_bin_type``:
  str for collection and key, bin for hashes, origin and value, nil for no
  value, the smallest integer encodings (msgpack's canonical choice). They
  are what is stored and what travels; :func:`decode` accepts nothing else.
  The entry's ``hash`` is the 32-byte blake3 of those bytes. ``hash`` itself is
  not hashed; ``prev_hash`` is, which chains every entry to all before it.
* ``seq`` increases by exactly one per entry, across epochs; the first entry
  of a log has seq 1 and ``prev_hash`` = ``GENESIS`` (32 zero bytes).
* A position is ``(epoch, seq, hash)`` of the last entry (``(epoch, 0,
  GENESIS)`` for an empty log).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from typing import NamedTuple

import msgpack
from blake3 import blake3

from agent.core.fields import JS_SAFE, MAX_HLC

#: version of the hashed encoding (the first element of the array)
FORMAT = 1
HASH_LEN = 32
GENESIS = bytes(HASH_LEN)


class Op(enum.IntEnum):
    """What an entry did to its item."""

    PUT = 0
    TOMBSTONE = 1
    REMOVE = 2


_OPS = frozenset(int(op) for op in Op)
#: op number -> Op, a lookup cheaper than calling the enum (decode runs per entry)
_OP_OF = {int(op): op for op in Op}
_TOMBSTONE = Op.TOMBSTONE


class Retention(NamedTuple):
    """How much of the log is kept (HS_GOSSIP_LOG_RETAIN): an entry is kept
    while it is among the newest ``entries`` and younger than ``age_s``
    seconds; a limit that is None does not apply. The newest entry is always
    kept, so the log's position survives compaction."""

    entries: int | None
    age_s: float | None


def parse_retention(text: str) -> Retention:
    """``ENTRIES``, ``AGE`` or ``ENTRIES,AGE``: ENTRIES a whole number of
    entries (1-1000000000), AGE a number with unit s, m, h or d (at least 1
    s). Raises ValueError saying what is expected."""
    expected = ("a number of entries and/or an age with unit s, m, h or d, "
                "comma-separated (for example 100000 or 100000,7d)")
    entries: int | None = None
    age: float | None = None
    parts = [p.strip().lower() for p in text.split(",")]
    if not 1 <= len(parts) <= 2:
        raise ValueError(expected)
    for part in parts:
        if part.isdigit():
            if entries is not None or not 1 <= int(part) <= 1_000_000_000:
                raise ValueError(expected)
            entries = int(part)
        elif part[-1:] in _UNITS:
            try:
                seconds = float(part[:-1]) * _UNITS[part[-1]]
            except ValueError:
                raise ValueError(expected) from None
            if age is not None or not 1 <= seconds <= 100 * 365 * 86400:
                raise ValueError(expected)
            age = seconds
        else:
            raise ValueError(expected)
    return Retention(entries, age)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Position(NamedTuple):
    """Where a log stands: the epoch, seq and hash of its last entry."""

    epoch: int
    seq: int
    hash: bytes


class LogEntry(NamedTuple):
    """One entry of the change log (immutable)."""

    epoch: int
    seq: int
    prev_hash: bytes
    hash: bytes
    origin: bytes
    hlc: int
    collection: str
    key: str
    op: Op
    value: bytes | None

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq, self.hash)


class ChainBroken(ValueError):
    """A run of entries is not an unbroken chain; ``seq`` is the first bad entry."""

    def __init__(self, seq: int, why: str) -> None:
        self.seq = seq
        super().__init__(f"change log entry {seq}: {why}")


def encode(epoch: int, seq: int, prev_hash: bytes, origin: bytes, hlc: int,
           collection: str, key: str, op: int, value: bytes | None) -> bytes:
    """The canonical bytes of an entry (what its hash covers)."""
    return _pack([FORMAT, epoch, seq, prev_hash, origin, hlc, collection, key, int(op), value])


_local = threading.local()


def packer() -> msgpack.Packer:
    """This thread's Packer for the canonical bytes, made once: what
    msgpack.packb builds afresh per call (with a 256 KiB buffer). It resets
    itself after each pack, also after an error, and is never entered twice
    at once: not shared between threads, and packing the lists of int, str,
    bytes and None given to it runs no Python code that could pack again.
    (merkle.tree has its own: neither package may import the other.)"""
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True)
        return _local.packer


def _pack(obj: object) -> bytes:
    return packer().pack(obj)  # type: ignore[no-any-return]


class EntryInvalid(ValueError):
    """Bytes that are not the canonical encoding of an entry."""


def decode(data: bytes) -> LogEntry:
    """The entry whose canonical bytes are ``data``; its hash is computed
    here. Raises :class:`EntryInvalid` if ``data`` is anything else."""
    try:
        # Only the limits that differ from unpackb's defaults are passed (its
        # keyword parsing costs as much as the rest): raw=False, use_list,
        # strict_map_key and str and bin lengths up to len(data) are its own.
        fields = msgpack.unpackb(data, max_array_len=16, max_map_len=0, max_ext_len=0)
    except Exception as e:
        raise EntryInvalid(f"not msgpack: {e}") from None
    if type(fields) is not list or len(fields) != 10 or type(fields[0]) is not int \
            or fields[0] != FORMAT:
        raise EntryInvalid("not an entry of format 1")
    _, epoch, seq, prev, origin, hlc, coll, key, op, value = fields
    # Bounded so that whatever is stored fits SQLite's integers (agent.core.fields).
    if not (type(epoch) is int and type(seq) is int and type(hlc) is int
            and 0 <= epoch <= JS_SAFE and 1 <= seq <= JS_SAFE and 0 <= hlc <= MAX_HLC
            and type(prev) is bytes and len(prev) == HASH_LEN
            and type(origin) is bytes and type(coll) is str and type(key) is str
            and type(op) is int and op in _OPS
            and (value is None or type(value) is bytes)):
        raise EntryInvalid("malformed entry fields")
    if _pack(fields) != data:  # the fields as checked above, FORMAT first
        raise EntryInvalid("not the canonical encoding")
    # tuple.__new__ directly: LogEntry(...) is the same tuple through a Python-level __new__.
    return _new_tuple(LogEntry, (epoch, seq, prev, blake3(data).digest(), origin, hlc, coll, key,
                                 _OP_OF[op], value))


_new_tuple = tuple.__new__


def bytes_hash(data: bytes) -> bytes:
    """The hash of the entry whose canonical bytes are ``data`` (as
    :func:`decode` would give it, without decoding)."""
    return blake3(data).digest()


def entry_hash(epoch: int, seq: int, prev_hash: bytes, origin: bytes, hlc: int,
               collection: str, key: str, op: int, value: bytes | None) -> bytes:
    return blake3(encode(epoch, seq, prev_hash, origin, hlc, collection, key, op,
                         value)).digest()


def verify_chain(entries: Iterable[LogEntry], prev_hash: bytes,
                 prev_seq: int | None = None, rehash: bool = True) -> bytes:
    """Check that ``entries`` follow a position whose hash is ``prev_hash``
    (and seq ``prev_seq`` if given) with nothing missing, reordered or
    altered. Returns the hash of the last entry (``prev_hash`` if none);
    raises :class:`ChainBroken` at the first entry that does not fit.
    ``rehash=False`` skips recomputing each entry's hash from its fields:
    only for entries just made by :func:`decode`, which hashed their bytes."""
    expect_seq = prev_seq
    # The fields by unpacking the tuple (cheaper than by name, once per entry).
    for epoch, seq, prev, hash_, origin, hlc, coll, key, op, value in entries:
        if expect_seq is not None and seq != expect_seq + 1:
            raise ChainBroken(seq, f"expected seq {expect_seq + 1}")
        if prev != prev_hash:
            raise ChainBroken(seq, "prev_hash is not the hash of the entry before")
        if op not in _OPS or (op == _TOMBSTONE) != (value is None):
            raise ChainBroken(seq, "op and value disagree")
        if rehash and entry_hash(epoch, seq, prev, origin, hlc, coll, key, op,
                                 value) != hash_:
            raise ChainBroken(seq, "hash does not match its contents")
        prev_hash = hash_
        expect_seq = seq
    return prev_hash
