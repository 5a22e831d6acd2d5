"""Reconciliation of two replicas of one collection: a sans-I/O state machine.

Each side runs a :class:`Session` that reads its own :class:`~merkle.tree.TreeReader`.
The initiator sends HELLO; from then on each side answers the other's STEP
with a STEP of its own, each message going one tree level deeper, until a side
has nothing left to ask: its STEP is *final* and the session ends. Items travel
in ITEMS frames sent just before the STEP that announced them.

Theory of operation:

* Node summaries and digests are cut to 4 bytes after hashing with a random
  per-session salt: small on the wire, and a collision (a difference that looks
  like a match) is not repeated next time, since the salt changes. The
  initiator's caller draws the salt (from its RNG) and passes it in; the
  responder takes it from the HELLO. Nothing here reads a clock or a random
  source, so a session is a pure function of its inputs.
* The session holds no replica: every call that needs one gets the
  :class:`~merkle.tree.TreeReader` as an argument, so that the caller may hand
  it a view valid for that call only (the agent's store thread).
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
* A STEP may only answer what our last message offered, each node once: a
  child of a node we summarised (as a node, a leaf or a want of everything),
  or a leaf we sent (as a want of some of its digests). Anything else is a
  ProtocolError, raised before any work: otherwise one STEP naming the root
  100,000 times would scan (or queue) the whole replica 100,000 times.

Messages (msgpack arrays; typed, encoded and validated in :mod:`merkle.frames`):

* ``[HELLO, collection, salt, root_hash, root_count, child_hashes, child_counts,
  horizon_ms]`` (horizon_ms optional, 0 when absent)
* ``[STEP, nodes, leaves, wants, final]`` with ``nodes = [[level, idx,
  child_hashes, child_counts], ...]``, ``leaves = [[level, idx, digests], ...]``,
  ``wants = [[level, idx, digests or None], ...]`` (None: everything there)
* ``[ITEMS, [[key, hlc, origin, deleted, value], ...]]``
* ``[DONE]``: the roots are equal, nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blake3 import blake3

from merkle.frames import (
    DONE,
    HASH_LEN,
    HELLO,
    ITEMS,
    SALT_LEN,
    STEP,
    Done,
    Hello,
    Leaf,
    Node,
    ProtocolError,
    Step,
    Want,
    split_hashes,
)
from merkle.tree import FANOUT, MAX_LEVEL, Item, TreeReader

__all__ = ["BATCH_BYTES", "BATCH_ITEMS", "DONE", "HASH_LEN", "HELLO", "ITEMS", "LEAF_MAX",
           "SALT_LEN", "STEP",
           "ProtocolError", "SendRequest", "Session", "item_batches"]

#: a differing subtree with at most this many items (on both sides) is settled
#: by digest lists (4 bytes per item) rather than 16 child summaries (~100 bytes)
LEAF_MAX = 24

#: (level, idx, digests) of items to ship to the peer; None means all of them
SendRequest = tuple[int, int, set[bytes] | None]

#: what the peer may say of a node we offered: a child of a node we summarised
#: comes back as a node, a leaf or a want of everything; a leaf we sent, as a
#: want of some digests
_CHILD, _LEAF = 0, 1


def _summary(salt: bytes, total: int, count: int) -> bytes:
    return blake3(salt + total.to_bytes(32, "big") + count.to_bytes(8, "big")).digest()[:HASH_LEN]


def _cut(salt: bytes, digest: bytes) -> bytes:
    return blake3(salt + digest).digest()[:HASH_LEN]


@dataclass
class Session:
    """One side of one reconciliation. ``salt``: drawn by the initiator's
    caller; a responder passes the HELLO's (it adopts it in any case)."""

    salt: bytes
    leaf_max: int = LEAF_MAX
    #: items the peer needs from us, to stream before our next STEP
    sends: list[SendRequest] = field(default_factory=list)
    done: bool = False
    messages_out: int = 0
    messages_in: int = 0
    #: the nodes our last message offered, and how each may be answered
    _offered: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.salt) != SALT_LEN:
            raise ValueError(f"the salt is {SALT_LEN} bytes")

    # --- initiator ---------------------------------------------------------

    def hello(self, reader: TreeReader, collection: str, horizon_ms: int = 0) -> Hello:
        """``horizon_ms``: the sender's tombstone horizon, so that the other side
        does not ship it items it would refuse (see agent.core.tombstones)."""
        total, count = reader.node(0, 0)
        hashes, counts = self._children(reader, 0, 0)
        self.messages_out += 1
        self._offered = {(1, c): _CHILD for c in range(FANOUT)}
        return Hello(collection, self.salt, _summary(self.salt, total, count), count,
                     hashes, counts, horizon_ms)

    # --- both sides --------------------------------------------------------

    def receive(self, reader: TreeReader, frame: Hello | Step | Done) -> Step | Done | None:
        """Handle HELLO, STEP or DONE; return our answer, or None when the
        session is over. Raises ProtocolError on nonsense. ITEMS frames are
        the caller's to validate and apply."""
        if self.done:
            raise ProtocolError("message after the end of the session")
        self.messages_in += 1
        if isinstance(frame, Done):
            self.done = True
            return None
        if isinstance(frame, Hello):
            if self.messages_in > 1 or self.messages_out:
                raise ProtocolError("HELLO in the middle of a session")
            return self._on_hello(reader, frame)
        if isinstance(frame, Step):
            return self._on_step(reader, frame)
        raise ProtocolError(f"unexpected message {type(frame).__name__}")

    def _on_hello(self, reader: TreeReader, msg: Hello) -> Step | Done:
        self.salt = msg.salt
        total, count = reader.node(0, 0)
        if msg.root_hash == _summary(self.salt, total, count) and msg.root_count == count:
            self.done = True
            self.messages_out += 1
            return Done()
        nodes: list[Node] = []
        leaves: list[Leaf] = []
        wants: list[Want] = []
        self._compare(reader, 0, 0, msg.child_hashes, msg.child_counts, nodes, leaves, wants)
        return self._step(nodes, leaves, wants)

    def _on_step(self, reader: TreeReader, msg: Step) -> Step | None:
        self._check_offered(msg)
        nodes: list[Node] = []
        leaves: list[Leaf] = []
        wants: list[Want] = []
        for n in msg.nodes:
            self._compare(reader, n.level, n.idx, n.child_hashes, n.child_counts,
                          nodes, leaves, wants)
        for lf in msg.leaves:
            self._leaf_diff(reader, lf.level, lf.idx, split_hashes(lf.digests), wants)
        for w in msg.wants:
            if w.digests is None:
                self.sends.append((w.level, w.idx, None))
                continue
            wanted = set(split_hashes(w.digests))
            mine = {d for d in reader.digests_under(w.level, w.idx)
                    if _cut(self.salt, d) in wanted}
            if mine:
                self.sends.append((w.level, w.idx, mine))
        if msg.final:
            if nodes or leaves or wants:
                raise ProtocolError("final STEP left questions open")
            self.done = True
            return None
        return self._step(nodes, leaves, wants)

    # --- internals ---------------------------------------------------------

    def _check_offered(self, msg: Step) -> None:
        """Every node the STEP names answers one we offered, each once; the
        offers are used up either way."""
        offered, self._offered = self._offered, {}
        refs = [(n.level, n.idx, _CHILD) for n in msg.nodes]
        refs += [(lf.level, lf.idx, _CHILD) for lf in msg.leaves]
        refs += [(w.level, w.idx, _CHILD if w.digests is None else _LEAF) for w in msg.wants]
        for level, idx, kind in refs:
            if offered.pop((level, idx), None) != kind:
                raise ProtocolError(f"STEP names node ({level}, {idx}), which was not "
                                    "offered or was named already")

    def _step(self, nodes: list[Node], leaves: list[Leaf], wants: list[Want]) -> Step:
        final = not (nodes or leaves or wants)
        if final:
            self.done = True
        self.messages_out += 1
        self._offered = {(lf.level, lf.idx): _LEAF for lf in leaves}
        for n in nodes:
            first = n.idx * FANOUT
            self._offered.update(((n.level + 1, first + c), _CHILD) for c in range(FANOUT))
        return Step(tuple(nodes), tuple(leaves), tuple(wants), final)

    def _children(self, reader: TreeReader, level: int,
                  idx: int) -> tuple[bytes, tuple[int, ...]]:
        kids = reader.children(level, idx)
        return (b"".join(_summary(self.salt, s, c) for s, c in kids),
                tuple(c for _, c in kids))

    def _compare(self, reader: TreeReader, level: int, idx: int, their_hashes: bytes,
                 their_counts: tuple[int, ...], nodes: list[Node], leaves: list[Leaf],
                 wants: list[Want]) -> None:
        # sizes were checked by the codec: FANOUT hashes and FANOUT counts
        theirs = split_hashes(their_hashes)
        for c, (total, count) in enumerate(reader.children(level, idx)):
            other = their_counts[c]
            if count == other and _summary(self.salt, total, count) == theirs[c]:
                continue
            child_level, child_idx = level + 1, idx * FANOUT + c
            if count == 0:
                wants.append(Want(child_level, child_idx, None))
            elif other == 0:
                self.sends.append((child_level, child_idx, None))
            elif max(count, other) <= self.leaf_max or child_level >= MAX_LEVEL:
                digests = reader.digests_under(child_level, child_idx)
                leaves.append(Leaf(child_level, child_idx,
                                   b"".join(_cut(self.salt, d) for d in digests)))
            else:
                hashes, counts = self._children(reader, child_level, child_idx)
                nodes.append(Node(child_level, child_idx, hashes, counts))

    def _leaf_diff(self, reader: TreeReader, level: int, idx: int, theirs: list[bytes],
                   wants: list[Want]) -> None:
        mine = {_cut(self.salt, d): d for d in reader.digests_under(level, idx)}
        their_set = set(theirs)
        ship = {d for cut, d in mine.items() if cut not in their_set}
        if ship:
            self.sends.append((level, idx, ship))
        missing = [cut for cut in theirs if cut not in mine]
        if missing:
            wants.append(Want(level, idx, b"".join(missing)))

    def take_sends(self) -> list[SendRequest]:
        out, self.sends = self.sends, []
        return out


#: items per ITEMS frame (frames are also cut at ~512 KiB of values)
BATCH_ITEMS = 1000
BATCH_BYTES = 512 * 1024


def item_batches(reader: TreeReader, requests: list[SendRequest]) -> Iterator[list[Item]]:
    """Stream the requested items in bounded batches, in position order: the
    ITEMS frames that answer :meth:`Session.take_sends`."""
    batch: list[Item] = []
    size = 0
    for level, idx, digests in requests:
        after = -1
        while True:
            page = reader.items_under(level, idx, digests, after, BATCH_ITEMS)
            if not page:
                break
            for item in page:
                batch.append(item)
                size += len(item.value or b"") + len(item.key) + 40
                if len(batch) >= BATCH_ITEMS or size >= BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
            after = page[-1].pos
            if len(page) < BATCH_ITEMS:
                break
    if batch:
        yield batch
