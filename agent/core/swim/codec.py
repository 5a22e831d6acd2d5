"""Datagram and push-pull codec of the SWIM core.

Rules (those of :mod:`agent.core.wire`, which this module reuses):

* A datagram is ``VERSION | TYPE | msgpack array``; TYPEs 10.. are this
  protocol's (:data:`PING` .. :data:`GOSSIP`); a push-pull payload is
  ``VERSION | PUSH_PULL_MSG | msgpack array``: [join, entries] and, in a
  *summary*, a third field: the 16-byte :func:`table_hash` of the sender's
  whole table, its entries then being only its own (a decoder that does not
  know the field takes a summary for a one-entry table and answers in full).
* Fields are positional; decoders ignore trailing fields they do not know.
* Every datagram starts with the sender's *card*: node id, incarnation,
  logical clock and an 8-byte hash of its collection digests, then a flags
  integer (bit 0: "send me your full digest list") and the piggybacked member
  updates (a sender asked for its digests puts its own DIGESTS update
  first). Type-specific fields (probe seq, target) follow.
* Decoding is bounded everywhere: datagram size, list lengths, string and
  byte lengths, every number (wire.JS_SAFE, ports <= 65535). A push-pull
  payload is at most :data:`MAX_PUSH_PULL` bytes and ``max_members`` entries.
  Decoders raise only :class:`SwimDecodeError`, which carries a DropReason.
* Encoders clamp numbers to what decoders accept and never exceed their
  budget: :data:`wire.PAYLOAD_BUDGET` for a datagram, MAX_PUSH_PULL for a
  push-pull payload (entries that do not fit are left out).
* Updates are encoded once when queued (the broadcast queue holds bytes) and
  spliced into datagrams as they are; :func:`assemble` builds a datagram from
  its fixed fields and as many queued items as the budget allows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from agent.core import wire
from agent.core.swim.events import DropReason
from agent.core.wire import JS_SAFE, MAX_COLLECTION_NAME, MAX_HASH, MAX_LIST, MAX_NAME, Digest

VERSION = wire.VERSION
PING = 10
ACK = 11
PING_REQ = 12
NACK = 13
LEAVE2 = 14
GOSSIP = 15
PUSH_PULL_MSG = 20
TYPES = (PING, ACK, PING_REQ, NACK, LEAVE2, GOSSIP)

DHASH_LEN = 8
ID_LEN = wire.NODE_ID_LEN
MAX_PUSH_PULL = 1 << 20
#: the smallest encoded push-pull entry is larger than this
MIN_ENTRY = 40
#: bytes of a push-pull summary's table hash
TABLE_HASH_LEN = 16
#: a digest list goes in at most this many DIGESTS updates
MAX_PARTS = 16
#: room for one DIGESTS part: a datagram less its envelope, card and probe fields
PART_BUDGET = wire.PAYLOAD_BUDGET - 128
#: room for a member's digest list in a push-pull entry (MAX_LIST digests fit)
ENTRY_DIGESTS_BUDGET = 64 * 1024
#: flags bit: the sender asks for our card: our ALIVE and DIGESTS updates
WANT_DIGESTS = 1

# Update kinds (first field of an update); ALIVE..LEFT equal the member statuses.
U_ALIVE, U_SUSPECT, U_DEAD, U_LEFT, U_DIGESTS = 0, 1, 2, 3, 4


class SwimDecodeError(Exception):
    """The only error decoders raise; ``reason`` is what the drop is counted as."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


# --- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """What every datagram says about its sender."""

    node_id: bytes
    incarnation: int
    lc: int
    dhash: bytes


@dataclass(frozen=True)
class Alive:
    node_id: bytes
    incarnation: int
    host: str
    port: int
    http_port: int
    sync_port: int = 0
    role: int = 0
    name: str = ""


@dataclass(frozen=True)
class Suspect:
    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True)
class Dead:
    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True)
class Left:
    node_id: bytes
    incarnation: int


@dataclass(frozen=True)
class Digests:
    """A member's collection digests; ``version`` orders them within an incarnation."""

    node_id: bytes
    incarnation: int
    version: int
    dhash: bytes
    digests: tuple[Digest, ...]
    app_healthy: bool | None = None
    #: a list larger than a datagram goes in ``parts`` updates (0-based ``part``)
    part: int = 0
    parts: int = 1


Update = Alive | Suspect | Dead | Left | Digests


@dataclass(frozen=True)
class Packet:
    """One datagram. ``seq``/``target``/``target_addr`` are used by PING
    (seq, target), ACK and NACK (seq) and PING_REQ (all three)."""

    type: int
    card: Card
    want_digests: bool = False
    updates: tuple[Update, ...] = ()
    seq: int = 0
    target: bytes = b""
    target_addr: tuple[str, int] | None = None


@dataclass(frozen=True)
class Entry:
    """One member's full state in a push-pull exchange."""

    alive: Alive
    status: int
    lc: int
    digests: Digests


@dataclass(frozen=True)
class State:
    """A push-pull payload: the sender's own entry first, then its table."""

    join: bool
    entries: tuple[Entry, ...]
    #: entries left undecoded beyond ``max_members + 1`` (counted as TABLE_FULL)
    truncated: int = 0
    #: a summary: the hash of the sender's whole table (its entries: its own)
    table_hash: bytes | None = None


# --- encoding -------------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _n(v: int, hi: int = JS_SAFE) -> int:
    return min(max(int(v), 0), hi)


#: memo of host strings and their packed form (both ways); the same few
#: addresses are encoded and decoded over and over, and ipaddress is slow.
#: Cleared when full, so it stays bounded.
_IP_MEMO: dict[str, bytes] = {}
_HOST_MEMO: dict[bytes, str] = {}
_MEMO_MAX = 8192


def _ip(host: str) -> bytes:
    if not host:
        return b""
    packed = _IP_MEMO.get(host)
    if packed is None:
        try:
            packed = ipaddress.ip_address(host).packed
        except ValueError:
            packed = b""
        if len(_IP_MEMO) >= _MEMO_MAX:
            _IP_MEMO.clear()
        _IP_MEMO[host] = packed
    return packed


def _digest_fields(d: Digest) -> list[Any]:
    return [d.name[:MAX_COLLECTION_NAME], d.state_hash[:MAX_HASH], _n(d.count),
            _n(d.horizon_ms)]


def digest_hash(digests: Sequence[Digest]) -> bytes:
    """The 8-byte short hash every card carries: order-independent."""
    body = b"".join(sorted(_pack(_digest_fields(d)) for d in digests))
    return blake3.blake3(body).digest(DHASH_LEN)


def _digest_list(digests: Sequence[Digest], room: int) -> list[bytes]:
    """Packed digests, in order, as many as fit ``room`` bytes (and MAX_LIST)."""
    out: list[bytes] = []
    for d in digests[:MAX_LIST]:
        b = _pack(_digest_fields(d))
        if len(b) > room:
            break
        out.append(b)
        room -= len(b)
    return out


def _alive_fields(a: Alive) -> list[Any]:
    return [a.node_id, _n(a.incarnation), _ip(a.host), _n(a.port, 65535),
            _n(a.http_port, 65535), _n(a.sync_port, 65535), _n(a.role, 255),
            a.name[:MAX_NAME]]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_digests_body(u: Digests, budget: int) -> bytes:
    """A DIGESTS update as an array, its digest list cut to fit ``budget``.
    A part of a larger list carries (part, parts) as two trailing fields."""
    head = _pack([U_DIGESTS, u.node_id, _n(u.incarnation), _n(u.version), u.dhash])
    tail = _pack(u.app_healthy)
    n_fields = 7
    if u.parts > 1:
        tail += _pack(_n(u.part, MAX_PARTS - 1)) + _pack(_n(u.parts, MAX_PARTS))
        n_fields = 9
    room = budget - len(head) - len(tail) - 3 - 1
    items = _digest_list(u.digests, room)
    # head is a packed 5-array: replace its header with the full array's
    return (_array_header(n_fields) + head[1:] + _array_header(len(items)) + b"".join(items)
            + tail)


def digests_parts(u: Digests, budget: int = PART_BUDGET) -> list[Digests]:
    """``u`` split into DIGESTS updates that each encode within ``budget``
    (at most MAX_PARTS of them: digests beyond are left out)."""
    fixed = len(encode_digests_body(dataclasses.replace(u, digests=(), part=0,
                                                        parts=MAX_PARTS), budget))
    chunks: list[list[Digest]] = [[]]
    room = budget - fixed - 2  # the list header may grow to 3 bytes
    for d in u.digests[:MAX_LIST]:
        size = len(_pack(_digest_fields(d)))
        if size > room and chunks[-1]:
            if len(chunks) == MAX_PARTS:
                break
            chunks.append([])
            room = budget - fixed - 2
        chunks[-1].append(d)
        room -= size
    if len(chunks) == 1:
        return [dataclasses.replace(u, digests=tuple(chunks[0]), part=0, parts=1)]
    return [dataclasses.replace(u, digests=tuple(c), part=i, parts=len(chunks))
            for i, c in enumerate(chunks)]


def encode_update(u: Update, budget: int = wire.PAYLOAD_BUDGET - 64) -> bytes:
    """One update as queued for piggybacking (encoded once)."""
    if isinstance(u, Alive):
        return _pack([U_ALIVE, *_alive_fields(u)])
    if isinstance(u, Suspect):
        return _pack([U_SUSPECT, u.node_id, _n(u.incarnation), u.accuser])
    if isinstance(u, Dead):
        return _pack([U_DEAD, u.node_id, _n(u.incarnation), u.accuser])
    if isinstance(u, Left):
        return _pack([U_LEFT, u.node_id, _n(u.incarnation)])
    return encode_digests_body(u, budget)


def _head_fields(p: Packet) -> list[Any]:
    c = p.card
    return [c.node_id, _n(c.incarnation), _n(c.lc), c.dhash, WANT_DIGESTS if p.want_digests else 0]


def _tail_fields(p: Packet) -> list[Any]:
    if p.type in (PING, PING_REQ):
        fields: list[Any] = [_n(p.seq), p.target]
        if p.type == PING_REQ:
            host, port = p.target_addr or ("", 0)
            fields += [_ip(host), _n(port, 65535)]
        return fields
    if p.type in (ACK, NACK):
        return [_n(p.seq)]
    return []


def assemble(p: Packet, take: Callable[[int], list[bytes]] | None = None,
             first: Sequence[bytes] = (), budget: int = wire.PAYLOAD_BUDGET) -> bytes:
    """Encode ``p`` (its ``updates`` are ignored): ``first`` (pre-encoded
    updates that must go first, if they fit), then whatever ``take(room)``
    returns for the room left. The result is at most ``budget`` bytes."""
    head = b"".join(_pack(x) for x in _head_fields(p))
    tail = b"".join(_pack(x) for x in _tail_fields(p))
    n_fields = 6 + len(_tail_fields(p))
    fixed = 2 + 1 + len(head) + 3 + len(tail)
    room = budget - fixed
    updates: list[bytes] = []
    for b in first:
        if len(b) <= room and len(updates) < MAX_LIST:
            updates.append(b)
            room -= len(b)
    if take is not None and room > 0 and len(updates) < MAX_LIST:
        for b in take(room):
            if len(updates) >= MAX_LIST:
                break
            updates.append(b)
            room -= len(b)
    data = (bytes([VERSION, p.type]) + _array_header(n_fields) + head
            + _array_header(len(updates)) + b"".join(updates) + tail)
    assert len(data) <= budget, len(data)
    return data


def encode_packet(p: Packet, budget: int = wire.PAYLOAD_BUDGET) -> bytes:
    """A datagram with its own ``updates`` (those that fit, in order)."""
    return assemble(p, first=[encode_update(u) for u in p.updates], budget=budget)


def entry_bytes(e: Entry) -> bytes:
    """One push-pull entry, encoded (what :func:`encode_state` joins)."""
    return _entry_bytes(e)


def _entry_bytes(e: Entry) -> bytes:
    fields = [*_alive_fields(e.alive), _n(e.status, 3), _n(e.lc)]
    return (_array_header(len(fields) + 1) + b"".join(_pack(x) for x in fields)
            + encode_digests_body(e.digests, ENTRY_DIGESTS_BUDGET))


def encode_state(s: State, max_members: int, limit: int = MAX_PUSH_PULL) -> bytes:
    """A push-pull payload: entries in order, as many as fit ``limit`` bytes
    and ``max_members + 1`` entries (the sender's own entry first)."""
    return encode_state_parts(s.join, (_entry_bytes(e) for e in s.entries[: max_members + 1]),
                              max_members, s.table_hash, limit)


def encode_state_parts(join: bool, entries: Iterable[bytes], max_members: int,
                       table_hash: bytes | None = None, limit: int = MAX_PUSH_PULL) -> bytes:
    """:func:`encode_state` from entries already encoded by :func:`entry_bytes`
    (the sender's own first), with the same bounds."""
    summary = table_hash is not None
    prefix = (bytes([VERSION, PUSH_PULL_MSG]) + _array_header(3 if summary else 2)
              + _pack(join))
    suffix = _pack(table_hash[:TABLE_HASH_LEN]) if table_hash is not None else b""
    room = limit - len(prefix) - len(suffix) - 5
    parts: list[bytes] = []
    for b in entries:
        if len(b) > room or len(parts) > max_members:
            break
        parts.append(b)
        room -= len(b)
    data = prefix + _array_header(len(parts)) + b"".join(parts) + suffix
    assert len(data) <= limit
    return data


def table_hash(rows: Sequence[tuple[bytes, int, int]]) -> bytes:
    """Order-independent hash of a table's (node id, incarnation, status)
    rows: two members whose hashes match agree on who is in which state."""
    h = blake3.blake3()
    for nid, inc, status in sorted(rows):
        h.update(nid + inc.to_bytes(8, "big") + bytes([status & 255]))
    return h.digest(TABLE_HASH_LEN)


# --- decoding -------------------------------------------------------------------

_FIELD = DropReason.DECODE_FIELD


def _int(v: Any, hi: int = JS_SAFE) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise SwimDecodeError(_FIELD)
    return v


def _bytes(v: Any, lo: int, hi: int) -> bytes:
    if type(v) is not bytes or not lo <= len(v) <= hi:
        raise SwimDecodeError(_FIELD)
    return v


def _id(v: Any) -> bytes:
    return _bytes(v, ID_LEN, ID_LEN)


def _str(v: Any, lo: int, hi: int) -> str:
    if type(v) is not str or not lo <= len(v) <= hi:
        raise SwimDecodeError(_FIELD)
    return v


def _list(v: Any, lo: int = 0, hi: int = MAX_LIST) -> list[Any]:
    if type(v) is not list or not lo <= len(v) <= hi:
        raise SwimDecodeError(_FIELD)
    return v


def _opt_bool(v: Any) -> bool | None:
    if v is not None and type(v) is not bool:
        raise SwimDecodeError(_FIELD)
    return v


def _host(v: Any) -> str:
    b = _bytes(v, 0, 16)
    if not b:
        return ""
    host = _HOST_MEMO.get(b)
    if host is not None:
        return host
    if len(b) == 4:
        host = str(ipaddress.IPv4Address(b))
    elif len(b) == 16:
        a = ipaddress.IPv6Address(b)
        host = str(a.ipv4_mapped) if a.ipv4_mapped else str(a)
    else:
        raise SwimDecodeError(_FIELD)
    if len(_HOST_MEMO) >= _MEMO_MAX:
        _HOST_MEMO.clear()
    _HOST_MEMO[b] = host
    return host


def _digest(v: Any) -> Digest:
    f = _list(v, 3)
    return Digest(_str(f[0], 1, MAX_COLLECTION_NAME), _bytes(f[1], 1, MAX_HASH), _int(f[2]),
                  _int(f[3]) if len(f) > 3 else 0)


def _digests(v: Any) -> tuple[Digest, ...]:
    return tuple(_digest(d) for d in _list(v))


#: memo of decoded ALIVE updates by their raw fields: one member's ALIVE is
#: heard from many senders (gossip repeats it), and validating it field by
#: field is most of the cost of a datagram. Only valid ones are kept;
#: cleared when full.
_ALIVE_MEMO: dict[tuple[Any, ...], Alive] = {}


def _alive(f: list[Any]) -> Alive:
    """Alive fields from f[0:8] (node_id .. name)."""
    key = tuple(f[0:8])
    try:
        hit = _ALIVE_MEMO.get(key)
    except TypeError:  # an unhashable field (a list): invalid anyway
        raise SwimDecodeError(_FIELD) from None
    # True == 1 and 1.0 == 1 as keys: a hit counts only with exact ints
    if hit is not None and type(key[1]) is int and type(key[3]) is int \
            and type(key[4]) is int and type(key[5]) is int and type(key[6]) is int:
        return hit
    a = _alive_fields_checked(f)
    if len(_ALIVE_MEMO) >= _MEMO_MAX:
        _ALIVE_MEMO.clear()
    _ALIVE_MEMO[key] = a
    return a


def _alive_fields_checked(f: list[Any]) -> Alive:
    return Alive(_id(f[0]), _int(f[1]), _host(f[2]), _int(f[3], 65535), _int(f[4], 65535),
                 _int(f[5], 65535), _int(f[6], 255), _str(f[7], 0, MAX_NAME * 4))


def _digests_update(f: list[Any]) -> Digests:
    """DIGESTS fields from f[0:6] (node_id .. app_healthy), then (part, parts)."""
    part, parts = 0, 1
    if len(f) >= 8:
        parts = _int(f[7], MAX_PARTS)
        part = _int(f[6], MAX_PARTS - 1)
        if not part < parts:
            raise SwimDecodeError(_FIELD)
    return Digests(_id(f[0]), _int(f[1]), _int(f[2]), _bytes(f[3], DHASH_LEN, DHASH_LEN),
                   _digests(f[4]), _opt_bool(f[5]), part, parts)


def _update(v: Any) -> Update:
    f = _list(v, 1)
    kind = _int(f[0], 255)
    if kind == U_ALIVE and len(f) >= 9:
        return _alive(f[1:9])
    if kind in (U_SUSPECT, U_DEAD) and len(f) >= 4:
        cls = Suspect if kind == U_SUSPECT else Dead
        return cls(_id(f[1]), _int(f[2]), _id(f[3]))
    if kind == U_LEFT and len(f) >= 3:
        return Left(_id(f[1]), _int(f[2]))
    if kind == U_DIGESTS and len(f) >= 7:
        return _digests_update(f[1:9])
    raise SwimDecodeError(_FIELD)


def _unpack(body: bytes, max_len: int, max_array: int) -> Any:
    try:
        return msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True, max_bin_len=max_len,
            max_str_len=max_len, max_array_len=max_array, max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError,
            RecursionError, msgpack.ExtraData):
        # ExtraData (trailing bytes) is a ValueError subclass in some versions
        raise SwimDecodeError(_FIELD) from None


def _envelope(data: bytes, limit: int) -> int:
    if len(data) > limit:
        raise SwimDecodeError(DropReason.DECODE_TOO_BIG)
    if len(data) < 3:
        raise SwimDecodeError(DropReason.DECODE_TRUNCATED)
    if data[0] != VERSION:
        raise SwimDecodeError(DropReason.DECODE_VERSION)
    return data[1]


def decode_packet(data: bytes) -> Packet:
    """One datagram. Raises SwimDecodeError and nothing else."""
    mtype = _envelope(data, wire.MAX_DATAGRAM)
    if mtype not in TYPES:
        raise SwimDecodeError(DropReason.DECODE_TYPE)
    body = _unpack(data[2:], wire.MAX_DATAGRAM, MAX_LIST)
    try:
        f = _list(body, 6)
        card = Card(_id(f[0]), _int(f[1]), _int(f[2]), _bytes(f[3], DHASH_LEN, DHASH_LEN))
        flags = _int(f[4], 0xFFFF)
        updates = tuple(_update(u) for u in _list(f[5]))
        seq, target, taddr = 0, b"", None
        if mtype in (PING, PING_REQ, ACK, NACK):
            seq = _int(f[6]) if len(f) > 6 else _int(None)
        if mtype in (PING, PING_REQ):
            target = _id(f[7]) if len(f) > 7 else _id(None)
        if mtype == PING_REQ:
            if len(f) < 10:
                raise SwimDecodeError(_FIELD)
            host = _host(f[8])
            port = _int(f[9], 65535)
            if bool(host) != bool(port):
                raise SwimDecodeError(_FIELD)
            # No address: the helper probes the target at the address it knows.
            taddr = (host, port) if host else None
        return Packet(mtype, card, bool(flags & WANT_DIGESTS), updates, seq, target, taddr)
    except SwimDecodeError:
        raise
    except (ValueError, TypeError, IndexError):
        raise SwimDecodeError(_FIELD) from None


#: memo of decoded push-pull entries by their encoded bytes. A table
#: arrives whole at every exchange and most of its entries are byte for byte
#: what an earlier table (from this peer or another that agrees) carried:
#: each distinct entry is validated once, not once per table. Only valid
#: entries are kept; cleared when full.
_ENTRY_MEMO: dict[bytes, Entry] = {}
_ENTRY_MEMO_MAX = 16384


def _entry(raw: bytes) -> Entry:
    hit = _ENTRY_MEMO.get(raw)
    if hit is not None:
        return hit
    e = _list(_unpack(raw, MAX_PUSH_PULL, MAX_PUSH_PULL // MIN_ENTRY), 11)
    try:
        entry = Entry(_alive(e[0:8]), _int(e[8], 3), _int(e[9]),
                      _digests_update(_list(e[10], 7)[1:9]))
    except SwimDecodeError:
        raise
    except (ValueError, TypeError, IndexError):
        raise SwimDecodeError(_FIELD) from None
    if len(_ENTRY_MEMO) >= _ENTRY_MEMO_MAX:
        _ENTRY_MEMO.clear()
    _ENTRY_MEMO[raw] = entry
    return entry


def decode_state(data: bytes, max_members: int) -> State:
    """A push-pull payload: at most MAX_PUSH_PULL bytes, of which the first
    ``max_members + 1`` entries (the sender's own and its table) are decoded
    and the rest counted in ``truncated``. Raises SwimDecodeError only.

    The entries are cut out of the payload as raw bytes (msgpack skips them
    without building objects) and decoded through :data:`_ENTRY_MEMO`."""
    mtype = _envelope(data, MAX_PUSH_PULL)
    if mtype != PUSH_PULL_MSG:
        raise SwimDecodeError(DropReason.DECODE_TYPE)
    body = data[2:]
    # An entry takes more than MIN_ENTRY bytes: no list can be longer than this.
    up = msgpack.Unpacker(
        raw=False, use_list=True, strict_map_key=True, max_buffer_size=MAX_PUSH_PULL,
        max_bin_len=MAX_PUSH_PULL, max_str_len=MAX_PUSH_PULL,
        max_array_len=MAX_PUSH_PULL // MIN_ENTRY, max_map_len=0, max_ext_len=0)
    up.feed(body)
    try:
        n_fields = up.read_array_header()
        if n_fields < 2:
            raise SwimDecodeError(_FIELD)
        join = up.unpack()
        if type(join) is not bool:
            raise SwimDecodeError(_FIELD)
        n = up.read_array_header()
        if n < 1:
            raise SwimDecodeError(_FIELD)
        entries = []
        for i in range(n):
            at = up.tell()
            up.skip()
            if i <= max_members:
                entries.append(_entry(body[at:up.tell()]))
        thash = None
        if n_fields > 2:
            h = up.unpack()
            if h is not None:
                thash = _bytes(h, TABLE_HASH_LEN, TABLE_HASH_LEN)
            for _ in range(n_fields - 3):
                up.skip()
        if up.tell() != len(body):
            raise SwimDecodeError(_FIELD)  # trailing bytes
        return State(join, tuple(entries), max(n - max_members - 1, 0), thash)
    except SwimDecodeError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError,
            RecursionError, IndexError, msgpack.OutOfData):
        raise SwimDecodeError(_FIELD) from None
