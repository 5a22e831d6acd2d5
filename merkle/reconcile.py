"""Reconciliation of two replicas of one collection: a sans-I/O state machine.

Each side holds a :class:`Session` over its own :class:`~merkle.tree.TreeReader`.
The initiator sends HELLO; from then on each side answers the other's STEP
with a STEP of its own, each message going one tree level deeper, until a side
has nothing left to ask: its STEP is *final* and the session ends. Items travel
in ITEMS frames sent just before the STEP that announced them.

Theory of operation:

* Node summaries and digests are cut to 4 bytes after hashing with a random
  per-session salt: small on the wire, and a collision (a difference that looks
  like a match) is not repeated next time, since the salt changes.
* For each child of a node the two sides compare (hash, count):
  equal -> skip; one side empty -> the other ships everything under it;
  both small (<= ``leaf_max`` items) -> the side sends its digest list (a
  *leaf*); otherwise -> it sends that child's 16 children: one level down.
* A leaf answered with a leaf-diff: the items the other lacks are shipped,
  the ones we lack are asked for (*wants*).
* Because both sides descend alternately, each message is half a round trip:
  1M items with a few differences settle in 7 messages.
* Nothing here trusts the peer: counts and hashes only steer the search;
  every received item is validated and applied by last-writer-wins by the
  caller, so lying hashes can waste work but cannot corrupt a replica.

Messages (msgpack arrays):

* ``[HELLO, collection, salt, root_hash, root_count, child_hashes, child_counts,
  horizon_ms]`` (horizon_ms optional, 0 when absent)
* ``[STEP, nodes, leaves, wants, final]`` with ``nodes = [[level, idx,
  child_hashes, child_counts], ...]``, ``leaves = [[level, idx, digests], ...]``,
  ``wants = [[level, idx, digests or None], ...]`` (None: everything there)
* ``[ITEMS, [[key, hlc, origin, deleted, value], ...]]``
* ``[DONE]``: the roots are equal, nothing to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3

from merkle.tree import FANOUT, MAX_LEVEL, TreeReader

HELLO, STEP, ITEMS, DONE = 1, 2, 3, 4
HASH_LEN = 4
SALT_LEN = 8
#: a differing subtree with at most this many items (on both sides) is settled
#: by digest lists (4 bytes per item) rather than 16 child summaries (~100 bytes)
LEAF_MAX = 24


class ProtocolError(Exception):
    """The peer sent something that does not fit the protocol."""


#: (level, idx, digests) of items to ship to the peer; None means all of them
SendRequest = tuple[int, int, set[bytes] | None]


def _summary(salt: bytes, total: int, count: int) -> bytes:
    return blake3(salt + total.to_bytes(32, "big") + count.to_bytes(8, "big")).digest()[:HASH_LEN]


def _cut(salt: bytes, digest: bytes) -> bytes:
    return blake3(salt + digest).digest()[:HASH_LEN]


def _split(blob: bytes) -> list[bytes]:
    if len(blob) % HASH_LEN:
        raise ProtocolError("hash list length is not a multiple of the hash size")
    return [blob[i:i + HASH_LEN] for i in range(0, len(blob), HASH_LEN)]


def _check_node(level: Any, idx: Any) -> tuple[int, int]:
    if type(level) is not int or type(idx) is not int or not 0 <= level <= MAX_LEVEL:
        raise ProtocolError("bad node reference")
    if not 0 <= idx < FANOUT ** level:
        raise ProtocolError("bad node index")
    return level, idx


@dataclass
class Session:
    reader: TreeReader
    salt: bytes = field(default_factory=lambda: os.urandom(SALT_LEN))
    leaf_max: int = LEAF_MAX
    #: items the peer needs from us, to stream before our next STEP
    sends: list[SendRequest] = field(default_factory=list)
    done: bool = False
    messages_out: int = 0
    messages_in: int = 0

    # --- initiator ---------------------------------------------------------

    def hello(self, collection: str, horizon_ms: int = 0) -> list[Any]:
        """``horizon_ms``: the sender's tombstone horizon, so that the other side
        does not ship it items it would refuse (see agent.core.tombstones)."""
        total, count = self.reader.node(0, 0)
        hashes, counts = self._children(0, 0)
        self.messages_out += 1
        return [HELLO, collection, self.salt, _summary(self.salt, total, count), count,
                hashes, counts, horizon_ms]

    # --- both sides --------------------------------------------------------

    def receive(self, msg: Any) -> list[Any] | None:
        """Handle HELLO, STEP or DONE; return our answer, or None when the
        session is over. Raises ProtocolError on nonsense."""
        self.messages_in += 1
        if not isinstance(msg, list) or not msg:
            raise ProtocolError("message is not a list")
        kind = msg[0]
        if kind == DONE:
            self.done = True
            return None
        if kind == HELLO:
            return self._on_hello(msg)
        if kind == STEP:
            return self._on_step(msg)
        raise ProtocolError(f"unexpected message type {kind!r}")

    def _on_hello(self, msg: list[Any]) -> list[Any]:
        if len(msg) < 7 or type(msg[2]) is not bytes or len(msg[2]) != SALT_LEN:
            raise ProtocolError("bad HELLO")
        self.salt = msg[2]
        total, count = self.reader.node(0, 0)
        if msg[3] == _summary(self.salt, total, count) and msg[4] == count:
            self.done = True
            self.messages_out += 1
            return [DONE]
        nodes: list[Any] = []
        leaves: list[Any] = []
        wants: list[Any] = []
        self._compare(0, 0, msg[5], msg[6], nodes, leaves, wants)
        return self._step(nodes, leaves, wants)

    def _on_step(self, msg: list[Any]) -> list[Any] | None:
        if len(msg) < 5 or not all(isinstance(x, list) for x in msg[1:4]):
            raise ProtocolError("bad STEP")
        nodes: list[Any] = []
        leaves: list[Any] = []
        wants: list[Any] = []
        for entry in msg[1]:
            if not isinstance(entry, list) or len(entry) < 4:
                raise ProtocolError("bad node entry")
            level, idx = _check_node(entry[0], entry[1])
            if level >= MAX_LEVEL:
                raise ProtocolError("node below the deepest level")
            self._compare(level, idx, entry[2], entry[3], nodes, leaves, wants)
        for entry in msg[2]:
            if not isinstance(entry, list) or len(entry) < 3 or type(entry[2]) is not bytes:
                raise ProtocolError("bad leaf entry")
            level, idx = _check_node(entry[0], entry[1])
            self._leaf_diff(level, idx, _split(entry[2]), wants)
        for entry in msg[3]:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ProtocolError("bad want entry")
            level, idx = _check_node(entry[0], entry[1])
            if entry[2] is None:
                self.sends.append((level, idx, None))
            elif type(entry[2]) is bytes:
                wanted = set(_split(entry[2]))
                mine = {d for d in self.reader.digests_under(level, idx)
                        if _cut(self.salt, d) in wanted}
                if mine:
                    self.sends.append((level, idx, mine))
            else:
                raise ProtocolError("bad want entry")
        if msg[4] is True:
            if nodes or leaves or wants:
                raise ProtocolError("final STEP left questions open")
            self.done = True
            return None
        return self._step(nodes, leaves, wants)

    # --- internals ---------------------------------------------------------

    def _step(self, nodes: list[Any], leaves: list[Any], wants: list[Any]) -> list[Any]:
        final = not (nodes or leaves or wants)
        if final:
            self.done = True
        self.messages_out += 1
        return [STEP, nodes, leaves, wants, final]

    def _children(self, level: int, idx: int) -> tuple[bytes, list[int]]:
        kids = self.reader.children(level, idx)
        return (b"".join(_summary(self.salt, s, c) for s, c in kids), [c for _, c in kids])

    def _compare(self, level: int, idx: int, their_hashes: Any, their_counts: Any,
                 nodes: list[Any], leaves: list[Any], wants: list[Any]) -> None:
        if (type(their_hashes) is not bytes or len(their_hashes) != FANOUT * HASH_LEN
                or not isinstance(their_counts, list) or len(their_counts) != FANOUT
                or not all(type(c) is int and c >= 0 for c in their_counts)):
            raise ProtocolError("bad child summaries")
        theirs = _split(their_hashes)
        kids = self.reader.children(level, idx)
        for c, (total, count) in enumerate(kids):
            other = their_counts[c]
            if count == other and _summary(self.salt, total, count) == theirs[c]:
                continue
            child = (level + 1, idx * FANOUT + c)
            if count == 0:
                wants.append([*child, None])
            elif other == 0:
                self.sends.append((*child, None))
            elif max(count, other) <= self.leaf_max or child[0] >= MAX_LEVEL:
                digests = self.reader.digests_under(*child)
                leaves.append([*child, b"".join(_cut(self.salt, d) for d in digests)])
            else:
                hashes, counts = self._children(*child)
                nodes.append([*child, hashes, counts])

    def _leaf_diff(self, level: int, idx: int, theirs: list[bytes], wants: list[Any]) -> None:
        mine = {_cut(self.salt, d): d for d in self.reader.digests_under(level, idx)}
        their_set = set(theirs)
        ship = {d for cut, d in mine.items() if cut not in their_set}
        if ship:
            self.sends.append((level, idx, ship))
        missing = [cut for cut in theirs if cut not in mine]
        if missing:
            wants.append([level, idx, b"".join(missing)])

    def take_sends(self) -> list[SendRequest]:
        out, self.sends = self.sends, []
        return out
