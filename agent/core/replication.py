"""Change-log streaming from a leader to its followers: the frames, their
codec, and the decisions both ends take. Pure: no socket, no SQLite, no
clock, so the same code is table-tested and run by the agent.

Rules:

* Every frame is the byte :data:`TAG` (``R``, which is not a msgpack array
  header: the shared TCP listener routes on it, see
  :mod:`agent.runtime.sync_service`) followed by a msgpack array ``[kind,
  epoch, ...]``. Every frame carries the sender's epoch; a receiver refuses a
  frame whose epoch is lower than the highest it has seen
  (:func:`epoch_ok`).
* A follower opens with HELLO: its node id and its *applied position*, the
  leader's ``(epoch, seq, hash)`` of the last entry it applied (``(0, 0,
  GENESIS)`` when it applied none). The leader answers with one frame,
  decided by :func:`answer_hello`: STREAM (entries after that position
  follow), DIVERGED (the leader does not know that hash at that seq, or the
  follower is ahead) or SNAPSHOT_NEEDED (the position is below the leader's
  compaction floor). DIVERGED and SNAPSHOT_NEEDED carry the leader's head and
  its collection names, so the follower can catch up another way and ask
  again from the head.
* After STREAM the leader sends ENTRIES frames: entries' canonical bytes as
  stored (:mod:`agent.core.changelog`), in order, and the hash of the last
  one; an empty ENTRIES is a keepalive. The follower checks the chain from
  its applied position (``verify_chain``) and that it ends at that hash,
  applies the batch and answers ACK with its new applied position
  (cumulative: it acknowledges every entry up to it). Frames that arrive
  while it applies are applied and acknowledged together, and an ACK may
  wait a few milliseconds to cover more (agent.runtime.replication); a
  keepalive is answered at once, so each side hears from the other at
  least once per interval.
* The leader sends no more than a :class:`Window` of unacknowledged entries
  and bytes; an ACK that does not fit what was sent is a protocol error.
* SNAPSHOT (the follower's position is below the compaction floor, it asked
  for one after refusing a batch, or it resumes one): the leader answers
  SNAPSHOT with the position ``at`` the snapshot is taken at and, per
  collection, the Merkle root (sum of item digests mod 2**256, count) of the
  items it will send (:func:`decide`). CHUNK frames follow, each with a
  collection name, items in key order and its hash chained to the chunk
  before (:func:`chunk_hash`); the follower answers each with CHUNK_ACK
  (flow control: :data:`SNAPSHOT_AHEAD` chunks unacknowledged at most). A
  STREAM frame ends the snapshot: the follower checks that the digests of
  what it received sum to the roots (:class:`RootSums`), then entries after
  ``at`` follow as after any STREAM. A HELLO may name a snapshot it was
  installing (``at`` and the last (collection, key) it kept): if the leader
  still holds its log from ``at``, it sends only the items after that key
  (roots of those items only) and streams from ``at``, so what changed
  meanwhile before the key arrives as entries (last writer wins makes the
  replay harmless).
* PROBE asks any agent where it stands; it answers INFO: the highest epoch
  it has seen, its role, the leader of that epoch as it knows it, whose log
  its position is in (``log_id``) and the position. Promotion
  (:func:`promotion_refusal`) and finding a new leader (:func:`pick_leader`)
  are decided on INFOs. A new leader also sends INFO unasked to the agents it
  knows.
* Decoding trusts nothing: the tag, the kind, every field's type and range;
  msgpack limits before allocation and a budget on the decoded objects
  (:func:`decode_budget`, as for the sync frames in ``merkle.frames``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from sys import getsizeof
from typing import Any, NamedTuple

import msgpack
from blake3 import blake3

from agent.core.changelog import GENESIS, HASH_LEN, Position
from agent.core.fields import MAX_HLC, Fields

#: the first byte of every replication frame (``R``): no msgpack array
#: header starts with it, so a listener shared with sync can route on it
TAG = 0x52
HELLO, STREAM, DIVERGED, SNAPSHOT_NEEDED, ENTRIES, ACK = 1, 2, 3, 4, 5, 6
SNAPSHOT, CHUNK, CHUNK_ACK, PROBE, INFO = 7, 8, 9, 10, 11
#: items in one CHUNK frame at most
MAX_CHUNK_ITEMS = 10_000
#: CHUNK frames a leader sends beyond the follower's last CHUNK_ACK
SNAPSHOT_AHEAD = 4
MAX_KEY_BYTES = 4096
MAX_ADDR = 300
ROLES = ("", "Leader", "Follower", "Edge")
NODE_ID_LEN = 16
#: entries in one ENTRIES frame at most
MAX_BATCH = 10_000
#: collection names a DIVERGED or SNAPSHOT_NEEDED frame may list
MAX_COLLECTIONS = 10_000
MAX_NAME_BYTES = 4096
MAX_REASON = 200
#: decoded objects may take DECODE_FACTOR x the frame's size + DECODE_SLACK
#: (an ENTRIES frame of tiny entries decodes to ~2x its size)
DECODE_FACTOR = 8
DECODE_SLACK = 1 << 20


class ProtocolError(Exception):
    """The peer sent something that does not fit the replication protocol."""


_f = Fields(ProtocolError)


@dataclass(frozen=True)
class Resume:
    """A snapshot a follower was installing: taken at ``at``, kept up to
    and including ``key`` of ``collection``."""

    at: Position
    collection: str
    key: str


@dataclass(frozen=True)
class Hello:
    epoch: int
    node_id: bytes
    position: Position
    #: the follower refused a batch: it wants a snapshot, not the stream
    want_snapshot: bool = False
    resume: Resume | None = None
    #: the leader of ``epoch`` as the follower knows it ("" if unknown): a
    #: deposed leader that hears this HELLO follows it
    leader: str = ""


@dataclass(frozen=True)
class Stream:
    epoch: int
    leader_id: bytes
    head: Position


@dataclass(frozen=True)
class Diverged:
    epoch: int
    leader_id: bytes
    head: Position
    reason: str
    collections: tuple[str, ...]


@dataclass(frozen=True)
class SnapshotNeeded:
    epoch: int
    leader_id: bytes
    floor: Position
    head: Position
    collections: tuple[str, ...]


@dataclass(frozen=True)
class Entries:
    epoch: int
    #: canonical entry bytes, in log order (empty: a keepalive)
    entries: tuple[bytes, ...]
    #: the hash of the last entry (GENESIS for a keepalive)
    last_hash: bytes = GENESIS


@dataclass(frozen=True)
class Ack:
    epoch: int
    position: Position


@dataclass(frozen=True)
class Root:
    """A collection's Merkle root: the sum of its items' digests mod 2**256
    and their count (merkle.tree's root node)."""

    name: str
    total: int
    count: int


@dataclass(frozen=True)
class Snapshot:
    epoch: int
    leader_id: bytes
    #: the leader's log position the items are read at
    at: Position
    #: the roots of what will be sent, every collection in name order
    roots: tuple[Root, ...]
    #: resuming: only items after this (collection, key) are sent
    after: tuple[str, str] | None = None


@dataclass(frozen=True)
class Chunk:
    epoch: int
    index: int  # 0, 1, ... within one snapshot run
    collection: str
    #: items as merkle.tree.Item.to_wire: [key, hlc, origin, deleted, value]
    items: tuple[tuple[str, int, bytes, bool, bytes | None], ...]
    hash: bytes  # chunk_hash(previous chunk's hash, ...)


@dataclass(frozen=True)
class ChunkAck:
    epoch: int
    index: int


@dataclass(frozen=True)
class Probe:
    epoch: int
    node_id: bytes


@dataclass(frozen=True)
class Info:
    epoch: int  # the highest epoch this agent has seen
    node_id: bytes
    role: str  # one of ROLES ("": neither leader nor follower)
    leader: str  # the leader of ``epoch`` as it knows it ("": unknown or itself)
    #: whose log ``position`` is in: a leader's own id, a follower's leader's
    log_id: bytes
    position: Position


Frame = (Hello | Stream | Diverged | SnapshotNeeded | Entries | Ack | Snapshot | Chunk
         | ChunkAck | Probe | Info)


def chunk_hash(prev: bytes, index: int, collection: str,
               items: tuple[tuple[str, int, bytes, bool, bytes | None], ...]) -> bytes:
    """The hash a CHUNK carries: blake3 over the previous chunk's hash
    (GENESIS before the first) and the chunk's index, collection and items,
    so a chunk that is altered, missing or out of order does not verify."""
    body: bytes = msgpack.packb([index, collection, [list(i) for i in items]],
                                use_bin_type=True)
    return blake3(prev + body).digest()


def is_replication(first: bytes) -> bool:
    """Whether a connection's first frame is a replication frame."""
    return bool(first) and first[0] == TAG


def epoch_ok(frame_epoch: int, highest_seen: int) -> bool:
    """Frames of an epoch below the highest seen come from a deposed leader."""
    return frame_epoch >= highest_seen


# --- encoding -----------------------------------------------------------------------


def _pos(p: Position) -> list[Any]:
    return [p.epoch, p.seq, p.hash]


def to_wire(f: Frame) -> list[Any]:
    if isinstance(f, Hello):
        resume = None if f.resume is None else [*_pos(f.resume.at), f.resume.collection,
                                                 f.resume.key]
        return [HELLO, f.epoch, f.node_id, *_pos(f.position), f.want_snapshot, resume,
                f.leader]
    if isinstance(f, Snapshot):
        return [SNAPSHOT, f.epoch, f.leader_id, *_pos(f.at),
                [[r.name, r.total.to_bytes(32, "big"), r.count] for r in f.roots],
                None if f.after is None else list(f.after)]
    if isinstance(f, Chunk):
        return [CHUNK, f.epoch, f.index, f.collection, [list(i) for i in f.items], f.hash]
    if isinstance(f, ChunkAck):
        return [CHUNK_ACK, f.epoch, f.index]
    if isinstance(f, Probe):
        return [PROBE, f.epoch, f.node_id]
    if isinstance(f, Info):
        return [INFO, f.epoch, f.node_id, f.role, f.leader, f.log_id, *_pos(f.position)]
    if isinstance(f, Stream):
        return [STREAM, f.epoch, f.leader_id, *_pos(f.head)]
    if isinstance(f, Diverged):
        return [DIVERGED, f.epoch, f.leader_id, *_pos(f.head), f.reason, list(f.collections)]
    if isinstance(f, SnapshotNeeded):
        return [SNAPSHOT_NEEDED, f.epoch, f.leader_id, *_pos(f.floor), *_pos(f.head),
                list(f.collections)]
    if isinstance(f, Entries):
        return [ENTRIES, f.epoch, list(f.entries), f.last_hash]
    return [ACK, f.epoch, *_pos(f.position)]


def encode(f: Frame) -> bytes:
    body: bytes = msgpack.packb(to_wire(f), use_bin_type=True)
    return bytes([TAG]) + body


# --- decoding -----------------------------------------------------------------------


def decode_budget(size: int) -> int:
    return DECODE_FACTOR * size + DECODE_SLACK


class _OverBudget(Exception):
    pass


def _no_map(_: Any) -> Any:
    raise ProtocolError("a frame holds no maps")


def decode(data: bytes) -> Frame:
    """Parse and validate one frame; ProtocolError on anything else."""
    if not is_replication(data):
        raise ProtocolError("not a replication frame")
    body = data[1:]
    budget = decode_budget(len(data))
    spent = 0

    def count(arr: list[Any]) -> list[Any]:
        nonlocal spent
        spent += getsizeof(arr) + sum(getsizeof(x) for x in arr if type(x) is not list)
        if spent > budget:
            raise _OverBudget
        return arr

    try:
        raw = msgpack.unpackb(
            body, raw=False, strict_map_key=True, list_hook=count, object_hook=_no_map,
            max_str_len=MAX_NAME_BYTES, max_bin_len=len(body),
            max_array_len=max(MAX_BATCH, MAX_COLLECTIONS, MAX_CHUNK_ITEMS), max_map_len=0,
            max_ext_len=0)
    except ProtocolError:
        raise
    except _OverBudget:
        raise ProtocolError(f"frame of {len(data)} bytes decodes to more than "
                            f"{budget} bytes of objects") from None
    except Exception:  # msgpack raises many types for bad input
        raise ProtocolError("undecodable frame") from None
    return from_wire(raw)


def _position(raw: list[Any], at: int, what: str) -> Position:
    return Position(_f.uint(raw[at], f"{what} epoch"), _f.uint(raw[at + 1], f"{what} seq"),
                    _f.blob(raw[at + 2], f"{what} hash", HASH_LEN))


def _names(x: Any) -> tuple[str, ...]:
    if not isinstance(x, list) or len(x) > MAX_COLLECTIONS:
        raise ProtocolError("bad collection list")
    if not all(type(n) is str and n for n in x):
        raise ProtocolError("bad collection name")
    return tuple(x)


_LENGTHS = {HELLO: 6, STREAM: 6, DIVERGED: 8, SNAPSHOT_NEEDED: 10, ENTRIES: 4, ACK: 5,
            SNAPSHOT: 8, CHUNK: 6, CHUNK_ACK: 3, PROBE: 3, INFO: 9}


def _hello(raw: list[Any], epoch: int) -> Hello:
    node_id, pos = _f.blob(raw[2], "node id", NODE_ID_LEN), _position(raw, 3, "HELLO")
    if len(raw) == 6:  # the first slice's HELLO
        return Hello(epoch, node_id, pos)
    if len(raw) != 9 or type(raw[6]) is not bool:
        raise ProtocolError("bad HELLO")
    resume = None
    if raw[7] is not None:
        r = raw[7]
        if not isinstance(r, list) or len(r) != 5:
            raise ProtocolError("bad resume")
        resume = Resume(_position(r, 0, "resume"), _f.text(r[3], "resume name", MAX_NAME_BYTES,
                                                         False),
                        _f.text(r[4], "resume key", MAX_KEY_BYTES))
    return Hello(epoch, node_id, pos, raw[6], resume, _f.text(raw[8], "leader", MAX_ADDR))


def _roots(x: Any) -> tuple[Root, ...]:
    if not isinstance(x, list) or len(x) > MAX_COLLECTIONS:
        raise ProtocolError("bad root list")
    out = []
    for r in x:
        if not isinstance(r, list) or len(r) != 3:
            raise ProtocolError("bad root")
        out.append(Root(_f.text(r[0], "collection name", MAX_NAME_BYTES, False),
                        int.from_bytes(_f.blob(r[1], "root sum", 32), "big"),
                        _f.uint(r[2], "root count")))
    if [r.name for r in out] != sorted({r.name for r in out}):
        raise ProtocolError("roots not in name order")
    return tuple(out)


def _item(x: Any) -> tuple[str, int, bytes, bool, bytes | None]:
    if not (isinstance(x, list) and len(x) == 5 and type(x[0]) is str
            and len(x[0].encode()) <= MAX_KEY_BYTES and type(x[1]) is int
            and 0 <= x[1] <= MAX_HLC and type(x[2]) is bytes and type(x[3]) is bool
            and (x[4] is None or type(x[4]) is bytes)):
        raise ProtocolError("bad snapshot item")
    return (x[0], x[1], x[2], x[3], x[4])


def _snapshot_frames(kind: int, epoch: int, raw: list[Any]) -> Frame:
    if kind == SNAPSHOT:
        after = raw[7]
        if after is not None:
            if not isinstance(after, list) or len(after) != 2:
                raise ProtocolError("bad resume point")
            after = (_f.text(after[0], "resume name", MAX_NAME_BYTES, False),
                     _f.text(after[1], "resume key", MAX_KEY_BYTES))
        return Snapshot(epoch, _f.blob(raw[2], "leader id", NODE_ID_LEN),
                        _position(raw, 3, "snapshot"), _roots(raw[6]), after)
    if kind == CHUNK:
        items = raw[4]
        if not isinstance(items, list) or len(items) > MAX_CHUNK_ITEMS:
            raise ProtocolError("bad chunk items")
        return Chunk(epoch, _f.uint(raw[2], "chunk index"),
                     _f.text(raw[3], "collection name", MAX_NAME_BYTES, False),
                     tuple(_item(i) for i in items), _f.blob(raw[5], "chunk hash", HASH_LEN))
    if kind == CHUNK_ACK:
        return ChunkAck(epoch, _f.uint(raw[2], "chunk index"))
    if kind == PROBE:
        return Probe(epoch, _f.blob(raw[2], "node id", NODE_ID_LEN))
    role = raw[3]
    if role not in ROLES:
        raise ProtocolError("bad role")
    log_id = raw[5]
    if type(log_id) is not bytes or len(log_id) not in (0, NODE_ID_LEN):
        raise ProtocolError("bad log id")
    return Info(epoch, _f.blob(raw[2], "node id", NODE_ID_LEN), role,
                _f.text(raw[4], "leader", MAX_ADDR), log_id, _position(raw, 6, "INFO"))


def from_wire(raw: Any) -> Frame:
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProtocolError("frame is not an array of at least two elements")
    kind = raw[0]
    if type(kind) is not int or kind not in _LENGTHS:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    if len(raw) < _LENGTHS[kind]:
        raise ProtocolError(f"frame of kind {kind} too short")
    epoch = _f.uint(raw[1], "epoch")
    if kind == HELLO:
        return _hello(raw, epoch)
    if kind >= SNAPSHOT:
        return _snapshot_frames(kind, epoch, raw)
    if kind == STREAM:
        return Stream(epoch, _f.blob(raw[2], "leader id", NODE_ID_LEN),
                      _position(raw, 3, "head"))
    if kind == DIVERGED:
        reason = raw[6]
        if type(reason) is not str or len(reason) > MAX_REASON:
            raise ProtocolError("bad reason")
        return Diverged(epoch, _f.blob(raw[2], "leader id", NODE_ID_LEN),
                        _position(raw, 3, "head"), reason, _names(raw[7]))
    if kind == SNAPSHOT_NEEDED:
        return SnapshotNeeded(epoch, _f.blob(raw[2], "leader id", NODE_ID_LEN),
                              _position(raw, 3, "floor"), _position(raw, 6, "head"),
                              _names(raw[9]))
    if kind == ENTRIES:
        entries = raw[2]
        if not isinstance(entries, list) or len(entries) > MAX_BATCH:
            raise ProtocolError("bad entry list")
        if not all(type(e) is bytes for e in entries):
            raise ProtocolError("bad entry")
        return Entries(epoch, tuple(entries), _f.blob(raw[3], "last hash", HASH_LEN))
    return Ack(epoch, _position(raw, 2, "ACK"))


# --- the leader's answer to a HELLO ------------------------------------------------


class Verdict(enum.Enum):
    STREAM = "stream"
    DIVERGED = "diverged"
    SNAPSHOT_NEEDED = "snapshot_needed"
    #: a snapshot proper (SNAPSHOT frame), from the start
    SNAPSHOT = "snapshot"
    #: the rest of the snapshot the follower was installing
    RESUME = "resume"


class Answer(NamedTuple):
    verdict: Verdict
    reason: str


def answer_hello(leader_floor: Position, leader_head: Position, follower_pos: Position,
                 lookup_hash: Callable[[int], bytes | None]) -> Answer:
    """What the leader answers a follower at ``follower_pos``. The leader's
    log holds exactly the entries after ``leader_floor`` up to
    ``leader_head``; ``lookup_hash(seq)`` is the hash of its entry ``seq``
    (None if it has none). A position is judged by (seq, hash): the hash
    covers the epoch and everything before."""
    seq, hash_ = follower_pos.seq, follower_pos.hash
    if seq > leader_head.seq:
        return Answer(Verdict.DIVERGED, f"follower ahead (seq {seq} > {leader_head.seq})")
    if seq == leader_head.seq:
        if hash_ == leader_head.hash:
            return Answer(Verdict.STREAM, "up to date")
        return Answer(Verdict.DIVERGED, f"unknown hash at seq {seq}")
    if seq < leader_floor.seq:
        return Answer(Verdict.SNAPSHOT_NEEDED,
                      f"seq {seq} compacted away (floor {leader_floor.seq})")
    # At the floor the floor's hash is known without a lookup.
    ok = hash_ == (leader_floor.hash if seq == leader_floor.seq else lookup_hash(seq))
    if ok:
        return Answer(Verdict.STREAM, f"{leader_head.seq - seq} entries behind")
    return Answer(Verdict.DIVERGED, f"unknown hash at seq {seq}")


def decide(leader_floor: Position, leader_head: Position, hello: Hello,
           lookup_hash: Callable[[int], bytes | None]) -> Answer:
    """What the leader does for a HELLO: every position it cannot stream
    from becomes a snapshot, except a diverged one (unknown hash, or ahead):
    that follower merges its writes back first (Merkle sync, both ways)
    because a snapshot alone would not carry them to the leader.

    * A follower resuming a snapshot taken at a position still in the log
      (same rules as streaming from it) gets the rest (RESUME); otherwise a
      new one.
    * A follower that asks for a snapshot (it refused a batch) gets one.
    * SNAPSHOT_NEEDED from :func:`answer_hello` becomes SNAPSHOT."""
    if hello.resume is not None:
        at = answer_hello(leader_floor, leader_head, hello.resume.at, lookup_hash)
        if at.verdict is Verdict.STREAM:
            return Answer(Verdict.RESUME, f"resuming the snapshot at seq {hello.resume.at.seq}")
        return Answer(Verdict.SNAPSHOT, f"the snapshot it was installing is gone ({at.reason})")
    if hello.want_snapshot:
        return Answer(Verdict.SNAPSHOT, "the follower asked for a snapshot")
    a = answer_hello(leader_floor, leader_head, hello.position, lookup_hash)
    if a.verdict is Verdict.SNAPSHOT_NEEDED:
        return Answer(Verdict.SNAPSHOT, a.reason)
    return a


class RootSums:
    """What a follower has received of a snapshot, per collection: the sum
    of the items' digests mod 2**256 and their count, computed from the items
    (never taken from the sender), to be compared with the roots the
    SNAPSHOT frame announced."""

    MOD = 1 << 256

    def __init__(self, sums: dict[str, tuple[int, int]] | None = None) -> None:
        self.sums: dict[str, tuple[int, int]] = dict(sums or {})

    def add(self, collection: str, digest: bytes) -> None:
        total, count = self.sums.get(collection, (0, 0))
        self.sums[collection] = ((total + int.from_bytes(digest, "big")) % self.MOD, count + 1)

    def mismatch(self, roots: tuple[Root, ...]) -> str | None:
        """None if every announced root matches what was received (and
        nothing was received for a collection not announced), else why not."""
        want = {r.name: (r.total, r.count) for r in roots}
        for name in sorted(set(want) | set(self.sums)):
            got = self.sums.get(name, (0, 0))
            if got != want.get(name, (0, 0)):
                return (f"collection {name}: received {got[1]} items whose digests do not "
                        f"sum to the root announced ({want.get(name, (0, 0))[1]} items)")
        return None


# --- promotion and finding the leader -------------------------------------------------


def promotion_refusal(epoch: int, log_id: bytes, position: Position,
                      others: list[tuple[str, Info]]) -> str | None:
    """Why an agent that has seen ``epoch`` and stands at ``position`` of
    the log of ``log_id`` may not be promoted without --force, given the
    INFOs of the agents it reached (``(address, info)``); None: it may. It
    may not when one of them has seen a higher epoch, or stands further in
    the same log (a leader's log id is its own node id)."""
    for addr, info in others:
        if info.epoch > epoch:
            return f"{addr} has seen epoch {info.epoch}, this agent only {epoch}"
        if info.log_id and info.log_id == log_id and info.position.seq > position.seq:
            return (f"{addr} is further in the leader's log (seq {info.position.seq}) than "
                    f"this agent (seq {position.seq})")
    return None


def pick_leader(epoch: int, infos: list[tuple[str, Info]]) -> tuple[str, int] | None:
    """The leader to follow after asking around: the highest epoch at least
    ``epoch`` that an INFO names a leader for (an agent that says it is
    Leader, or the leader a follower names); None if nobody knows one."""
    best: tuple[int, int, str] | None = None
    for addr, info in infos:
        if info.role == "Leader":
            cand = (info.epoch, 1, addr)  # the leader itself outranks hearsay
        elif info.leader:
            cand = (info.epoch, 0, info.leader)
        else:
            continue
        if cand[0] >= epoch and (best is None or cand[:2] > best[:2]):
            best = cand
    return None if best is None else (best[2], best[0])


# --- the leader's flow control, per follower -----------------------------------------


class Window:
    """What a leader may still send one follower: at most ``max_entries``
    entries and ``max_bytes`` bytes sent and not yet acknowledged. The
    entries of a batch count until an ACK covers its last one."""

    def __init__(self, acked_seq: int, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.acked_seq = acked_seq
        self.sent_seq = acked_seq
        self._batches: deque[tuple[int, int]] = deque()  # (last seq, bytes)
        self.in_flight_bytes = 0

    @property
    def in_flight_entries(self) -> int:
        return self.sent_seq - self.acked_seq

    def room(self) -> tuple[int, int]:
        """(entries, bytes) that may be sent now; (0, 0) when the window is full."""
        entries = self.max_entries - self.in_flight_entries
        size = self.max_bytes - self.in_flight_bytes
        if entries <= 0 or size <= 0:
            return 0, 0
        return entries, size

    def sent(self, last_seq: int, size: int) -> None:
        """A batch ending at ``last_seq`` of ``size`` bytes went out."""
        if last_seq <= self.sent_seq:
            raise ValueError("batches are sent in order")
        self.sent_seq = last_seq
        self._batches.append((last_seq, size))
        self.in_flight_bytes += size

    def acked(self, seq: int) -> None:
        """A cumulative ACK up to ``seq``. ProtocolError if it acknowledges
        what was not sent, or goes backwards."""
        if not self.acked_seq <= seq <= self.sent_seq:
            raise ProtocolError(f"ACK of seq {seq} outside [{self.acked_seq}, {self.sent_seq}]")
        self.acked_seq = seq
        while self._batches and self._batches[0][0] <= seq:
            self.in_flight_bytes -= self._batches.popleft()[1]
