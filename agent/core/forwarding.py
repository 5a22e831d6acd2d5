"""Writes forwarded from a follower to its leader: the frames, their codec and
the leader's table of requests already answered. Pure: no socket, no SQLite,
no clock (times are arguments), so it is table-tested and run by the agent
(:mod:`agent.runtime.forwarding`).

Rules:

* A forwarding connection opens with the one-byte frame :data:`FIRST_BYTE`
  (``W``: not a msgpack array header, nor another route's byte) on the
  leader's TCP sync listener; then the follower sends REQUEST frames and the
  leader answers each with one ANSWER frame, in order.
* A REQUEST names its origin (the follower's node id) and an id unique for
  that origin; the pair identifies the write. A follower that lost the
  answer sends the same request again with the same pair, and the leader
  answers from :class:`Dedupe` instead of writing twice. Ids are drawn at
  random (64 bits), so another agent cannot guess one; and the table
  remembers a hash of each request, so a request reusing a pair for another
  write is refused (:data:`ID_CONFLICT`), never answered from the table.
* Every frame carries an epoch. The leader writes only a request whose epoch
  is its own; any other epoch is answered :data:`WRONG_EPOCH` with the
  leader's epoch, and writes nothing (a follower that saw a newer leader
  never has its write taken by a deposed one; one that knows only an older
  epoch learns the current one and asks again). The follower refuses an
  answer whose epoch is below the highest it has seen.
* An ANSWER carries an HTTP-like status, the written item (or the count of a
  batch) and the leader's log position after the commit: the follower's
  reads of that key wait until it has applied that position.
* Decoding trusts nothing: the kind, every field's type and range, msgpack
  limits before allocation; values are opaque msgpack bytes here, checked by
  the store that writes them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import msgpack
from blake3 import blake3

from agent.core.changelog import HASH_LEN, Position
from agent.core.fields import MAX_HLC, Fields

#: the one-byte first frame of a forwarding connection (``W``)
FIRST_BYTE = 0x57
REQUEST, ANSWER = 1, 2
PUT, DELETE, BATCH = 1, 2, 3
NODE_ID_LEN = 16
#: request ids are random 64-bit numbers (they never reach SQLite)
MAX_ID = (1 << 64) - 1
MAX_NAME = 4096
MAX_MESSAGE = 400
#: items in one forwarded batch at most (the API's own limit)
MAX_BATCH = 10_000

#: statuses besides HTTP's own (200, 400, 404, 413, 507, ...)
OK = 200
#: the request's epoch is not the leader's (the answer carries the leader's)
WRONG_EPOCH = 409
#: this agent is not (or no longer) the leader: ask the one etcd names
NOT_LEADER = 421
#: the request's (origin, id) was already used for another write: refused
ID_CONFLICT = 422


class ProtocolError(Exception):
    """The peer sent something that does not fit the forwarding protocol."""


_f = Fields(ProtocolError)


@dataclass(frozen=True)
class Request:
    epoch: int
    origin: bytes
    id: int
    op: int
    collection: str
    #: PUT: (key, value bytes); DELETE: (key,); BATCH: ((key, value bytes), ...)
    args: tuple[Any, ...]


@dataclass(frozen=True)
class WrittenItem:
    key: str
    hlc: int
    origin: bytes
    deleted: bool
    value: bytes | None


@dataclass(frozen=True)
class Answer:
    epoch: int
    id: int
    status: int
    message: str
    #: the leader's log head once the write committed (GENESIS-less zero if none)
    position: Position | None
    #: PUT/DELETE: the item written (None: DELETE of nothing); BATCH: None
    item: WrittenItem | None = None
    written: int = 0


Frame = Request | Answer


def encode(f: Frame) -> bytes:
    if isinstance(f, Request):
        args: list[Any] = list(f.args) if f.op != BATCH else [list(map(list, f.args))]
        raw: list[Any] = [REQUEST, f.epoch, f.origin, f.id, f.op, f.collection, args]
    else:
        pos = None if f.position is None else [f.position.epoch, f.position.seq,
                                               f.position.hash]
        item = None if f.item is None else [f.item.key, f.item.hlc, f.item.origin,
                                            f.item.deleted, f.item.value]
        raw = [ANSWER, f.epoch, f.id, f.status, f.message, pos, item, f.written]
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


def _args(op: int, raw: Any) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise ProtocolError("bad arguments")
    if op == PUT and len(raw) == 2:
        return (_f.text(raw[0], "key", MAX_NAME), _f.blob(raw[1], "value"))
    if op == DELETE and len(raw) == 1:
        return (_f.text(raw[0], "key", MAX_NAME),)
    if op == BATCH and len(raw) == 1 and isinstance(raw[0], list) \
            and 1 <= len(raw[0]) <= MAX_BATCH:
        out = []
        for pair in raw[0]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ProtocolError("bad batch item")
            out.append((_f.text(pair[0], "key", MAX_NAME), _f.blob(pair[1], "value")))
        return tuple(out)
    raise ProtocolError(f"bad arguments for op {op!r}")


def decode(data: bytes) -> Frame:
    """Parse and validate one frame; ProtocolError on anything else."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=len(data),
                              max_bin_len=len(data), max_array_len=MAX_BATCH,
                              max_map_len=0, max_ext_len=0)
    except Exception:  # msgpack raises many types for bad input
        raise ProtocolError("undecodable frame") from None
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("frame is not an array")
    kind = raw[0]
    if kind == REQUEST and len(raw) == 7:
        op = raw[4]
        if op not in (PUT, DELETE, BATCH):
            raise ProtocolError(f"unknown op {op!r}")
        return Request(_f.uint(raw[1], "epoch"), _f.blob(raw[2], "origin", NODE_ID_LEN),
                       _f.uint(raw[3], "id", MAX_ID), op, _f.text(raw[5], "collection", MAX_NAME),
                       _args(op, raw[6]))
    if kind == ANSWER and len(raw) == 8:
        pos = raw[5]
        position = None
        if pos is not None:
            if not isinstance(pos, list) or len(pos) != 3:
                raise ProtocolError("bad position")
            position = Position(_f.uint(pos[0], "epoch"), _f.uint(pos[1], "seq"),
                                _f.blob(pos[2], "hash", HASH_LEN))
        item = None
        if raw[6] is not None:
            it = raw[6]
            if not isinstance(it, list) or len(it) != 5 or type(it[3]) is not bool \
                    or not (it[4] is None or type(it[4]) is bytes):
                raise ProtocolError("bad item")
            item = WrittenItem(_f.text(it[0], "key", MAX_NAME),
                               _f.uint(it[1], "hlc", MAX_HLC),
                               _f.blob(it[2], "origin", NODE_ID_LEN), it[3], it[4])
        status = _f.uint(raw[3], "status")
        return Answer(_f.uint(raw[1], "epoch"), _f.uint(raw[2], "id", MAX_ID), status,
                      _f.text(raw[4], "message", MAX_MESSAGE), position, item,
                      _f.uint(raw[7], "written"))
    raise ProtocolError("unexpected frame")


def request_digest(req: Request) -> bytes:
    """What a dedupe entry remembers of a request: a hash of its op,
    collection, keys and values (not its epoch), so the same (origin, id)
    carrying another write is told apart."""
    args: list[Any] = list(req.args) if req.op != BATCH else [list(map(list, req.args))]
    return blake3(msgpack.packb([req.op, req.collection, args], use_bin_type=True)).digest()


class DedupeConflict(Exception):
    """A request's (origin, id) is in the table for another write."""


def _lean(answer: Answer) -> Answer:
    """The answer as the table keeps it: without the item's value (the
    follower sent it, and gets it again from the stream)."""
    item = answer.item
    if item is None or item.value is None:
        return answer
    return replace(answer, item=replace(item, value=None))


#: bytes one table entry takes besides its key and message (estimate)
ENTRY_OVERHEAD = 320


class Dedupe:
    """The leader's memory of forwarded writes by (origin, id): a hash of
    the request (:func:`request_digest`) and the answer given, without the
    item's value, for at most ``max_entries`` requests, ``max_bytes`` bytes
    and ``max_age`` seconds (whichever is smallest: the window). A request
    seen again inside the window gets the same answer if its hash is the
    same, and :class:`DedupeConflict` if not (never another write's answer);
    one seen again after it is written again (a put of the same value: a new
    version of the same content).

    Only answers of committed writes are kept: a refused request (wrong
    epoch, not leader, bad input) may be sent again and decided afresh."""

    def __init__(self, max_entries: int = 65_536, max_age: float = 600.0,
                 max_bytes: int = 16 << 20) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.bytes = 0
        self._seen: OrderedDict[tuple[bytes, int], tuple[float, bytes, Answer, int]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, origin: bytes, id_: int, digest: bytes, now: float) -> Answer | None:
        """The answer given to this request, None if not seen (in the
        window); DedupeConflict if the pair was another write's."""
        self._expire(now)
        hit = self._seen.get((origin, id_))
        if hit is None:
            return None
        if hit[1] != digest:
            raise DedupeConflict(f"request id {id_} of this origin was another write")
        return hit[2]

    def put(self, origin: bytes, id_: int, digest: bytes, answer: Answer, now: float) -> None:
        lean = _lean(answer)
        size = ENTRY_OVERHEAD + len(lean.message) + (
            0 if lean.item is None else len(lean.item.key.encode()))
        old = self._seen.pop((origin, id_), None)
        if old is not None:
            self.bytes -= old[3]
        self._seen[(origin, id_)] = (now, digest, lean, size)
        self.bytes += size
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._seen and (len(self._seen) > self.max_entries or self.bytes > self.max_bytes
                              or next(iter(self._seen.values()))[0] < now - self.max_age):
            self.bytes -= self._seen.popitem(last=False)[1][3]
