"""The hash tree over a collection: positions, digests, node sums.

Rules:

* An item's *position* is the first 8 bytes of blake3(key): a 64-bit number,
  the same for every version of the key, spread uniformly.
* An item's *digest* is blake3 over a canonical msgpack encoding of
  (key, hlc, origin, deleted, value). It names one version of one item.
* The tree has fanout 16: a node at level L covers the positions whose top 4L
  bits equal its index. Level 0 is the root; level 16 is one position.
* A node's value is ``(sum of its items' digests mod 2**256, item count)``.
  The sum is set-homomorphic: adding or removing an item changes every node on
  its path by one addition, without reading siblings, and two replicas holding
  the same items have the same root whatever order writes arrived in. Integrity
  against a dishonest peer does not rest on these sums: received items are
  checked one by one; the sums only steer the search for differences.
* ``state_hash`` is blake3(sum || count) cut to 16 bytes: what heartbeats and
  the API show for a collection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
from blake3 import blake3

FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS
POS_BITS = 64
MAX_LEVEL = POS_BITS // FANOUT_BITS
#: levels 1..STORED_LEVELS are kept incrementally; deeper ones are computed
#: from the items on demand (at 1M items a level-3 node holds ~244 items)
STORED_LEVELS = 3
MOD = 1 << 256
ORIGIN_LEN = 16


def key_position(key: str) -> int:
    # blake3's output of 8 bytes is the first 8 bytes of its 32-byte digest.
    return int.from_bytes(blake3(key.encode()).digest(8), "big")


_local = threading.local()


def packer() -> msgpack.Packer:
    """This thread's msgpack Packer (``use_bin_type``): what ``msgpack.packb``
    builds afresh per call (with a 256 KiB buffer), made once per thread.
    Its ``pack`` gives the same bytes as ``packb`` and resets itself after
    each call, also after an error. It is never entered twice at once: a
    Packer is not shared between threads, and packing the str, int, bytes,
    bool, None and lists that its callers pass runs no Python code that
    could pack again."""
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True)
        return _local.packer


_set = object.__setattr__


def item_digest(key: str, hlc: int, origin: bytes, deleted: bool, value: bytes | None) -> bytes:
    return blake3(packer().pack([key, hlc, origin, deleted, value])).digest()


def node_index(pos: int, level: int) -> int:
    return pos >> (POS_BITS - FANOUT_BITS * level) if level else 0


def node_range(level: int, idx: int) -> tuple[int, int]:
    """Inclusive range of positions under node (level, idx)."""
    shift = POS_BITS - FANOUT_BITS * level
    return idx << shift, ((idx + 1) << shift) - 1


def state_hash(total: int, count: int) -> bytes:
    return blake3(total.to_bytes(32, "big") + count.to_bytes(8, "big")).digest()[:16]


@dataclass(frozen=True, init=False)
class Item:
    """One version of one item. ``value`` is msgpack bytes, None for a tombstone."""

    key: str
    hlc: int
    origin: bytes
    deleted: bool
    value: bytes | None
    digest: bytes = field(default=b"", compare=False, repr=False)
    pos: int = field(default=-1, compare=False, repr=False)

    def __init__(self, key: str, hlc: int, origin: bytes, deleted: bool, value: bytes | None,
                 digest: bytes = b"", pos: int = -1) -> None:
        # Written out: the generated __init__ of a frozen dataclass looks up
        # object.__setattr__ per field and then calls __post_init__, which set
        # digest and pos a second time; this sets each field once (digest and
        # position inline: item_digest and key_position). Field by field, not
        # a whole __dict__ at once: the instance keeps CPython's inline
        # attribute values, about 190 bytes less per item than a dict of its
        # own, and one container less for the garbage collector.
        _set(self, "key", key)
        _set(self, "hlc", hlc)
        _set(self, "origin", origin)
        _set(self, "deleted", deleted)
        _set(self, "value", value)
        _set(self, "digest",
             digest or blake3(packer().pack([key, hlc, origin, deleted, value])).digest())
        _set(self, "pos",
             pos if pos >= 0 else int.from_bytes(blake3(key.encode()).digest(8), "big"))

    @property
    def version(self) -> tuple[int, bytes, bytes]:
        # Last writer wins on (hlc, origin); the digest breaks the tie should a
        # broken peer reuse a version for different content, so that every
        # replica still picks the same winner.
        return (self.hlc, self.origin, self.digest)

    def to_wire(self) -> list[object]:
        return [self.key, self.hlc, self.origin, self.deleted, self.value]


def wins(new: Item, old: Item | None) -> bool:
    return old is None or new.version > old.version


class TreeReader(Protocol):
    """What reconciliation needs to read from a replica."""

    def node(self, level: int, idx: int) -> tuple[int, int]:
        """(sum, count) of a node."""
        ...

    def children(self, level: int, idx: int) -> list[tuple[int, int]]:
        """(sum, count) of the 16 children of a node."""
        ...

    def digests_under(self, level: int, idx: int) -> list[bytes]:
        """Digests of every item under a node."""
        ...

    def items_under(self, level: int, idx: int, digests: set[bytes] | None,
                    after_pos: int, limit: int) -> list[Item]:
        """Items under a node in position order after ``after_pos`` (exclusive;
        -1 to start), all of them or only those whose digest is in ``digests``."""
        ...


class MemoryTree:
    """An in-memory replica: the reference model for tests and simulations."""

    def __init__(self) -> None:
        self.items: dict[str, Item] = {}

    def apply(self, item: Item) -> bool:
        old = self.items.get(item.key)
        if wins(item, old):
            self.items[item.key] = item
            return True
        return False

    def _under(self, level: int, idx: int) -> list[Item]:
        lo, hi = node_range(level, idx)
        return [i for i in self.items.values() if lo <= i.pos <= hi]

    def node(self, level: int, idx: int) -> tuple[int, int]:
        items = self._under(level, idx)
        return sum(int.from_bytes(i.digest, "big") for i in items) % MOD, len(items)

    def children(self, level: int, idx: int) -> list[tuple[int, int]]:
        out = [(0, 0)] * FANOUT
        sums = [0] * FANOUT
        counts = [0] * FANOUT
        for i in self._under(level, idx):
            c = node_index(i.pos, level + 1) & (FANOUT - 1)
            sums[c] = (sums[c] + int.from_bytes(i.digest, "big")) % MOD
            counts[c] += 1
        out = list(zip(sums, counts, strict=True))
        return out

    def digests_under(self, level: int, idx: int) -> list[bytes]:
        return [i.digest for i in self._under(level, idx)]

    def items_under(self, level: int, idx: int, digests: set[bytes] | None,
                    after_pos: int, limit: int) -> list[Item]:
        items = sorted((i for i in self._under(level, idx) if i.pos > after_pos),
                       key=lambda i: (i.pos, i.key))
        if digests is not None:
            items = [i for i in items if i.digest in digests]
        return items[:limit]

    def root(self) -> tuple[int, int]:
        return self.node(0, 0)
