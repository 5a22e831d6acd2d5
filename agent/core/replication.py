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
  (cumulative: it acknowledges every entry up to it). It answers every
  ENTRIES frame, keepalives too, so each side hears from the other at least
  once per interval.
* The leader sends no more than a :class:`Window` of unacknowledged entries
  and bytes; an ACK that does not fit what was sent is a protocol error.
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

from agent.core.changelog import GENESIS, HASH_LEN, Position

#: the first byte of every replication frame (``R``): no msgpack array
#: header starts with it, so a listener shared with sync can route on it
TAG = 0x52
HELLO, STREAM, DIVERGED, SNAPSHOT_NEEDED, ENTRIES, ACK = 1, 2, 3, 4, 5, 6
NODE_ID_LEN = 16
#: entries in one ENTRIES frame at most
MAX_BATCH = 10_000
#: collection names a DIVERGED or SNAPSHOT_NEEDED frame may list
MAX_COLLECTIONS = 10_000
MAX_NAME_BYTES = 4096
MAX_REASON = 200
MAX_U64 = 1 << 64
#: decoded objects may take DECODE_FACTOR x the frame's size + DECODE_SLACK
#: (an ENTRIES frame of tiny entries decodes to ~2x its size)
DECODE_FACTOR = 8
DECODE_SLACK = 1 << 20


class ProtocolError(Exception):
    """The peer sent something that does not fit the replication protocol."""


@dataclass(frozen=True)
class Hello:
    epoch: int
    node_id: bytes
    position: Position


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


Frame = Hello | Stream | Diverged | SnapshotNeeded | Entries | Ack


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
        return [HELLO, f.epoch, f.node_id, *_pos(f.position)]
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
            max_array_len=max(MAX_BATCH, MAX_COLLECTIONS), max_map_len=0, max_ext_len=0)
    except ProtocolError:
        raise
    except _OverBudget:
        raise ProtocolError(f"frame of {len(data)} bytes decodes to more than "
                            f"{budget} bytes of objects") from None
    except Exception:  # msgpack raises many types for bad input
        raise ProtocolError("undecodable frame") from None
    return from_wire(raw)


def _uint(x: Any, what: str) -> int:
    if type(x) is not int or not 0 <= x < MAX_U64:
        raise ProtocolError(f"bad {what}")
    return x


def _blob(x: Any, size: int, what: str) -> bytes:
    if type(x) is not bytes or len(x) != size:
        raise ProtocolError(f"bad {what}")
    return x


def _position(raw: list[Any], at: int, what: str) -> Position:
    return Position(_uint(raw[at], f"{what} epoch"), _uint(raw[at + 1], f"{what} seq"),
                    _blob(raw[at + 2], HASH_LEN, f"{what} hash"))


def _names(x: Any) -> tuple[str, ...]:
    if not isinstance(x, list) or len(x) > MAX_COLLECTIONS:
        raise ProtocolError("bad collection list")
    if not all(type(n) is str and n for n in x):
        raise ProtocolError("bad collection name")
    return tuple(x)


_LENGTHS = {HELLO: 6, STREAM: 6, DIVERGED: 8, SNAPSHOT_NEEDED: 10, ENTRIES: 4, ACK: 5}


def from_wire(raw: Any) -> Frame:
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProtocolError("frame is not an array of at least two elements")
    kind = raw[0]
    if type(kind) is not int or kind not in _LENGTHS:
        raise ProtocolError(f"unexpected frame kind {kind!r}")
    if len(raw) < _LENGTHS[kind]:
        raise ProtocolError(f"frame of kind {kind} too short")
    epoch = _uint(raw[1], "epoch")
    if kind == HELLO:
        return Hello(epoch, _blob(raw[2], NODE_ID_LEN, "node id"), _position(raw, 3, "HELLO"))
    if kind == STREAM:
        return Stream(epoch, _blob(raw[2], NODE_ID_LEN, "leader id"), _position(raw, 3, "head"))
    if kind == DIVERGED:
        reason = raw[6]
        if type(reason) is not str or len(reason) > MAX_REASON:
            raise ProtocolError("bad reason")
        return Diverged(epoch, _blob(raw[2], NODE_ID_LEN, "leader id"),
                        _position(raw, 3, "head"), reason, _names(raw[7]))
    if kind == SNAPSHOT_NEEDED:
        return SnapshotNeeded(epoch, _blob(raw[2], NODE_ID_LEN, "leader id"),
                              _position(raw, 3, "floor"), _position(raw, 6, "head"),
                              _names(raw[9]))
    if kind == ENTRIES:
        entries = raw[2]
        if not isinstance(entries, list) or len(entries) > MAX_BATCH:
            raise ProtocolError("bad entry list")
        if not all(type(e) is bytes for e in entries):
            raise ProtocolError("bad entry")
        return Entries(epoch, tuple(entries), _blob(raw[3], HASH_LEN, "last hash"))
    return Ack(epoch, _position(raw, 2, "ACK"))


# --- the leader's answer to a HELLO ------------------------------------------------


class Verdict(enum.Enum):
    STREAM = "stream"
    DIVERGED = "diverged"
    SNAPSHOT_NEEDED = "snapshot_needed"


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
