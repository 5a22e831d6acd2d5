"""The reconciliation frames and their codec: the only place they are encoded
and validated, by the agent's TCP service and the in-process driver alike.

Rules:

* The bytes are msgpack arrays, exactly as described at the top of
  :mod:`merkle.reconcile`; agents of every version interoperate, so a change
  here is a wire change.
* :func:`decode` / :func:`from_wire` trust nothing: a frame that does not fit
  (wrong type, wrong length, an integer out of range, undecodable bytes)
  raises :class:`ProtocolError` and nothing else. Sizes are bounded by the
  transport's frame limit; every field whose size the protocol fixes is
  checked here.
* Decoding is bounded before it allocates: no maps (frames have none),
  strings of at most :data:`MAX_STR_BYTES`, and the objects a frame decodes
  to may take at most ``DECODE_FACTOR x size + DECODE_SLACK`` bytes, arrays
  hold at most :data:`MAX_ARRAY` elements (counted
  as arrays are built, a frame over budget is refused at that point). A
  3 MiB frame of empty arrays would otherwise become ~200 MB of lists.
* Trailing array elements a newer agent may add are ignored, as they always
  were. A HELLO without a horizon (an older agent) reads as horizon 0.
* What an item *means* (key length, origin size, horizon) is the caller's to
  judge item by item; the codec checks only that each field has its type.
"""

from __future__ import annotations

from dataclasses import dataclass
from sys import getsizeof
from typing import Any

import msgpack

from merkle.tree import FANOUT, MAX_LEVEL, Item

HELLO, STEP, ITEMS, DONE = 1, 2, 3, 4
HASH_LEN = 4
SALT_LEN = 8
#: longest collection name a HELLO may carry (the agent's own rule is stricter)
MAX_COLLECTION = 1024
#: horizons are milliseconds that fit the HLC's 47-bit wall-clock field
MAX_HORIZON_MS = 1 << 47
#: counts and HLCs are unsigned 64-bit
MAX_U64 = 1 << 64
#: longest string in a frame, in UTF-8 bytes (a collection name of
#: MAX_COLLECTION characters; item keys are shorter)
MAX_STR_BYTES = 4 * MAX_COLLECTION
#: decoded objects may take this many times the frame's size (measured:
#: honest STEP frames take 4.5-7x whatever their size, 1 KiB values 1.3x,
#: 1000 tiny items 6.5x)...
DECODE_FACTOR = 10
#: ...plus this much, so small frames are never refused for their shape
DECODE_SLACK = 1 << 20
#: longest array: above the 65,536 nodes of a whole tree level four, and it
#: bounds what msgpack allocates for one array header before its elements
MAX_ARRAY = 1 << 17


class ProtocolError(Exception):
    """The peer sent something that does not fit the protocol."""


@dataclass(frozen=True)
class Hello:
    """The initiator's opening: the salt of the session and its root summary."""

    collection: str
    salt: bytes
    root_hash: bytes
    root_count: int
    child_hashes: bytes  #: FANOUT salted summaries of HASH_LEN bytes, concatenated
    child_counts: tuple[int, ...]
    horizon_ms: int = 0  #: the sender's tombstone horizon (see agent.core.tombstones)


@dataclass(frozen=True)
class Node:
    """A differing node whose 16 children the sender summarises: go one level down."""

    level: int
    idx: int
    child_hashes: bytes
    child_counts: tuple[int, ...]


@dataclass(frozen=True)
class Leaf:
    """A small differing node: the sender's salted digests of every item under it."""

    level: int
    idx: int
    digests: bytes  #: HASH_LEN bytes each, concatenated


@dataclass(frozen=True)
class Want:
    """Items the sender lacks under a node: those salted digests, or all (None)."""

    level: int
    idx: int
    digests: bytes | None


@dataclass(frozen=True)
class Step:
    nodes: tuple[Node, ...] = ()
    leaves: tuple[Leaf, ...] = ()
    wants: tuple[Want, ...] = ()
    final: bool = False


@dataclass(frozen=True)
class Items:
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Done:
    """The roots are equal: nothing to do."""


Frame = Hello | Step | Items | Done


def split_hashes(blob: bytes) -> list[bytes]:
    """A concatenation of HASH_LEN-byte hashes, cut apart."""
    if len(blob) % HASH_LEN:
        raise ProtocolError("hash list length is not a multiple of the hash size")
    return [blob[i:i + HASH_LEN] for i in range(0, len(blob), HASH_LEN)]


# --- encoding ---------------------------------------------------------------------


def to_wire(frame: Frame) -> list[Any]:
    """The msgpack-ready array of a frame."""
    if isinstance(frame, Hello):
        return [HELLO, frame.collection, frame.salt, frame.root_hash, frame.root_count,
                frame.child_hashes, list(frame.child_counts), frame.horizon_ms]
    if isinstance(frame, Step):
        return [STEP,
                [[n.level, n.idx, n.child_hashes, list(n.child_counts)] for n in frame.nodes],
                [[lf.level, lf.idx, lf.digests] for lf in frame.leaves],
                [[w.level, w.idx, w.digests] for w in frame.wants],
                frame.final]
    if isinstance(frame, Items):
        return [ITEMS, [i.to_wire() for i in frame.items]]
    return [DONE]


def encode(frame: Frame) -> bytes:
    data: bytes = msgpack.packb(to_wire(frame), use_bin_type=True)
    return data


# --- decoding and validation ------------------------------------------------------


class _OverBudget(Exception):
    pass


def _no_map(_: Any) -> Any:
    raise ProtocolError("a frame holds no maps")


def _cost(x: Any) -> int:
    """Bytes one decoded element adds: none for an array (its own call
    counted it) or for the objects Python shares (None, bools, small ints)."""
    t = type(x)
    if t is list or x is None or t is bool or (t is int and -5 <= x <= 256):
        return 0
    return getsizeof(x)


def decode_budget(size: int) -> int:
    """The most the objects decoded from a frame of ``size`` bytes may take."""
    return DECODE_FACTOR * size + DECODE_SLACK


def decode(data: bytes) -> Frame:
    """Parse and validate one frame body; ProtocolError on anything else."""
    budget = decode_budget(len(data))
    spent = 0

    def count(arr: list[Any]) -> list[Any]:
        # Every scalar sits in an array, so sizing each array and its elements
        # as it is built bounds the whole.
        nonlocal spent
        spent += getsizeof(arr) + sum(map(_cost, arr))
        if spent > budget:
            raise _OverBudget
        return arr

    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, list_hook=count, object_hook=_no_map,
            max_str_len=MAX_STR_BYTES, max_bin_len=len(data), max_array_len=MAX_ARRAY,
            max_map_len=0, max_ext_len=0)
    except ProtocolError:
        raise
    except _OverBudget:
        raise ProtocolError(f"frame of {len(data)} bytes decodes to more than "
                            f"{budget} bytes of objects") from None
    except Exception:  # msgpack raises many types for bad input (and RecursionError)
        raise ProtocolError("undecodable frame") from None
    return from_wire(raw)


def from_wire(raw: Any) -> Frame:
    """Validate a decoded msgpack array as a frame."""
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("frame is not a non-empty array")
    kind = raw[0]
    if type(kind) is not int:
        raise ProtocolError("frame type is not an integer")
    if kind == HELLO:
        return _hello(raw)
    if kind == STEP:
        return _step(raw)
    if kind == ITEMS:
        return _items(raw)
    if kind == DONE:
        return Done()
    raise ProtocolError(f"unexpected frame type {kind}")


def _uint(x: Any, limit: int, what: str) -> int:
    if type(x) is not int or not 0 <= x < limit:
        raise ProtocolError(f"bad {what}")
    return x


def _blob(x: Any, size: int, what: str) -> bytes:
    if type(x) is not bytes or len(x) != size:
        raise ProtocolError(f"bad {what}")
    return x


def _hashes(x: Any, what: str) -> bytes:
    if type(x) is not bytes:
        raise ProtocolError(f"bad {what}")
    split_hashes(x)
    return x


def _entry(x: Any, size: int, what: str) -> list[Any]:
    if not isinstance(x, list) or len(x) < size:
        raise ProtocolError(f"bad {what} entry")
    return x


def _node_ref(level: Any, idx: Any, deepest: int) -> tuple[int, int]:
    level = _uint(level, deepest + 1, "node level")
    return level, _uint(idx, FANOUT ** level, "node index")


def _children(hashes: Any, counts: Any) -> tuple[bytes, tuple[int, ...]]:
    hashes = _blob(hashes, FANOUT * HASH_LEN, "child summaries")
    if not isinstance(counts, list) or len(counts) != FANOUT:
        raise ProtocolError("bad child counts")
    return hashes, tuple(_uint(c, MAX_U64, "child count") for c in counts)


def _hello(raw: list[Any]) -> Hello:
    if len(raw) < 7:
        raise ProtocolError("HELLO too short")
    collection = raw[1]
    if type(collection) is not str or not 0 < len(collection) <= MAX_COLLECTION:
        raise ProtocolError("bad collection in HELLO")
    hashes, counts = _children(raw[5], raw[6])
    return Hello(collection, _blob(raw[2], SALT_LEN, "salt"),
                 _blob(raw[3], HASH_LEN, "root hash"), _uint(raw[4], MAX_U64, "root count"),
                 hashes, counts,
                 _uint(raw[7], MAX_HORIZON_MS, "horizon in HELLO") if len(raw) > 7 else 0)


def _step(raw: list[Any]) -> Step:
    if len(raw) < 5 or not all(isinstance(x, list) for x in raw[1:4]):
        raise ProtocolError("bad STEP")
    if type(raw[4]) is not bool:
        raise ProtocolError("bad final flag in STEP")
    nodes = []
    for e in raw[1]:
        e = _entry(e, 4, "node")
        # a node has children to summarise only above the deepest level
        level, idx = _node_ref(e[0], e[1], MAX_LEVEL - 1)
        nodes.append(Node(level, idx, *_children(e[2], e[3])))
    leaves = []
    for e in raw[2]:
        e = _entry(e, 3, "leaf")
        leaves.append(Leaf(*_node_ref(e[0], e[1], MAX_LEVEL), _hashes(e[2], "leaf digests")))
    wants = []
    for e in raw[3]:
        e = _entry(e, 3, "want")
        digests = None if e[2] is None else _hashes(e[2], "want digests")
        wants.append(Want(*_node_ref(e[0], e[1], MAX_LEVEL), digests))
    return Step(tuple(nodes), tuple(leaves), tuple(wants), raw[4])


def _items(raw: list[Any]) -> Items:
    if len(raw) < 2 or not isinstance(raw[1], list):
        raise ProtocolError("bad ITEMS frame")
    out = []
    for f in raw[1]:
        if not isinstance(f, list) or len(f) < 5:
            raise ProtocolError("bad item")
        key, hlc, origin, deleted, value = f[:5]
        if (type(key) is not str or type(hlc) is not int or not 0 <= hlc < MAX_U64
                or type(origin) is not bytes or type(deleted) is not bool
                or not (value is None or type(value) is bytes)):
            raise ProtocolError("bad item fields")
        try:
            out.append(Item(key, hlc, origin, deleted, value))
        except ValueError:  # a str that is not valid Unicode cannot be hashed
            raise ProtocolError("bad item") from None
    return Items(tuple(out))
