"""Gossip datagram codec: envelope, message types, size limits.

Rules:

* A datagram is ``VERSION (1 byte) | TYPE (1 byte) | msgpack payload``. The
  envelope stays outside the payload so that a later AEAD layer can wrap the
  payload and use the envelope as associated data.
* Payloads are msgpack arrays with positional fields. New fields are only ever
  appended, and decoders ignore trailing fields they do not know: that is the
  forward-compatibility rule. An unknown VERSION is rejected; an unknown TYPE
  is rejected (a newer peer may send types we cannot use).
* Every datagram is at most :data:`MAX_DATAGRAM` bytes (1400: fits an IPv6
  path with room for tunnels), of which :data:`AEAD_RESERVE` is kept free for
  the authentication tag and nonce that encryption will add.
* :func:`decode` never raises anything but :class:`DecodeError`, whose
  ``reason`` is a short stable label used for drop counters.
* Integers that reach the HTTP API stay below 2**53 (JavaScript-safe).
  Bounds hold both ways: :func:`decode` refuses a counter above
  :data:`JS_SAFE` (or an age above :data:`MAX_AGE_MS`, a port above 65535),
  and the encoders clamp to the same bounds, so an agent never emits a
  number its peers would refuse. Keeping numbers plausible (not just
  decodable) is the membership core's rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_DATAGRAM = 1400
AEAD_RESERVE = 49  # agent.net.seal.OVERHEAD: 33-byte header + 16-byte tag
PAYLOAD_BUDGET = MAX_DATAGRAM - AEAD_RESERVE

JS_SAFE = 2**53 - 1
#: ages are milliseconds in an unsigned 32-bit field (about 49 days)
MAX_AGE_MS = 0xFFFFFFFF
NODE_ID_LEN = 16
MAX_NAME = 64
MAX_COLLECTION_NAME = 128
MAX_HASH = 32
MAX_LIST = 256
MAX_WANTS = 8

# Message types.
HEARTBEAT = 1
LEAVE = 2
STATE = 3

# Member status as gossiped.
ALIVE = 0
SUSPECT = 1
LEFT = 2

ROLES = ("Edge", "Leader", "Follower")


class DecodeError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Digest:
    """One replicated collection as advertised in a heartbeat."""

    name: str
    state_hash: bytes
    count: int
    #: tombstones older than this (Unix ms) have been purged everywhere
    horizon_ms: int = 0


@dataclass(frozen=True)
class Entry:
    """What one agent says about a member (itself or another)."""

    node_id: bytes
    incarnation: int
    heartbeat: int
    status: int
    host: str  # numeric IP, or "" when the sender does not know it
    port: int
    http_port: int
    age_ms: int  # how long ago the sender last saw this member make progress
    role: int = 0


@dataclass(frozen=True)
class Heartbeat:
    sender: Entry
    name: str
    lc: int  # Lamport logical clock
    digests: tuple[Digest, ...]
    peers: tuple[Entry, ...]
    want_state: bool = False
    app_healthy: bool | None = None
    #: members the sender has the stalest news of; the receiver answers with
    #: its entries for them (pull repair of the dissemination tail)
    wants: tuple[bytes, ...] = ()
    #: TCP port for Merkle sync; 0 means the same number as the gossip port
    sync_port: int = 0


@dataclass(frozen=True)
class Leave:
    sender: Entry


@dataclass(frozen=True)
class State:
    """One chunk of a full peer list, sent in answer to ``want_state``."""

    sender_id: bytes
    peers: tuple[Entry, ...]


Message = Heartbeat | Leave | State


# --- encoding ---------------------------------------------------------------


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _ip_bytes(host: str) -> bytes:
    if not host:
        return b""
    return ipaddress.ip_address(host).packed


def _counter(v: int) -> int:
    """A counter as sent: within what :func:`decode` accepts."""
    return min(max(v, 0), JS_SAFE)


def entry_fields(e: Entry) -> list[Any]:
    return [e.node_id, _counter(e.incarnation), _counter(e.heartbeat), e.status,
            _ip_bytes(e.host), e.port, e.http_port, min(max(e.age_ms, 0), MAX_AGE_MS), e.role]


def packed_entry(e: Entry) -> bytes:
    return _pack(entry_fields(e))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _packed_array(items: list[bytes]) -> bytes:
    return _array_header(len(items)) + b"".join(items)


def envelope(mtype: int) -> bytes:
    return bytes([VERSION, mtype])


def encode_heartbeat(hb: Heartbeat, budget: int = PAYLOAD_BUDGET) -> tuple[bytes, int, int]:
    """Encode as many digests and peer entries as fit in ``budget`` bytes, in
    the order given. Returns (datagram, digests_included, peers_included)."""
    head = [entry_fields(hb.sender), hb.name, _counter(hb.lc)]
    tail = [hb.want_state, hb.app_healthy, list(hb.wants[:MAX_WANTS]), hb.sync_port]
    # envelope + outer array header + fields + two list headers (3 bytes at most each)
    fixed = 2 + 1 + sum(len(_pack(x)) for x in head + tail) + 3 + 3
    room = budget - fixed
    digests: list[bytes] = []
    for d in hb.digests:
        b = _pack([d.name, d.state_hash, d.count, d.horizon_ms])
        # Keep at least a third of the datagram for peer exchange.
        if len(b) > room - budget // 3:
            break
        digests.append(b)
        room -= len(b)
    peers: list[bytes] = []
    for e in hb.peers:
        b = packed_entry(e)
        if len(b) > room:
            break
        peers.append(b)
        room -= len(b)
    body = (
        _array_header(9)
        + b"".join(_pack(x) for x in head)
        + _packed_array(digests)
        + _packed_array(peers)
        + b"".join(_pack(x) for x in tail)
    )
    data = envelope(HEARTBEAT) + body
    assert len(data) <= budget, len(data)
    return data, len(digests), len(peers)


def encode_leave(msg: Leave) -> bytes:
    return envelope(LEAVE) + _pack([entry_fields(msg.sender)])


def encode_state(
    sender_id: bytes, entries: list[Entry], budget: int = PAYLOAD_BUDGET
) -> list[bytes]:
    """Split a full peer list into as many STATE datagrams as needed."""
    out: list[bytes] = []
    prefix = envelope(STATE) + _array_header(2) + _pack(sender_id)
    room0 = budget - len(prefix) - 3
    chunk: list[bytes] = []
    room = room0
    for e in entries:
        b = packed_entry(e)
        if len(b) > room and chunk:
            out.append(prefix + _packed_array(chunk))
            chunk, room = [], room0
        chunk.append(b)
        room -= len(b)
    if chunk:
        out.append(prefix + _packed_array(chunk))
    return out


def encode(msg: Message) -> bytes:
    if isinstance(msg, Heartbeat):
        return encode_heartbeat(msg)[0]
    if isinstance(msg, Leave):
        return encode_leave(msg)
    chunks = encode_state(msg.sender_id, list(msg.peers))
    if len(chunks) != 1:
        raise ValueError("state message does not fit one datagram")
    return chunks[0]


# --- decoding ---------------------------------------------------------------


def _int(v: Any, lo: int = 0, hi: int = JS_SAFE) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise DecodeError("bad_field")
    return v


def _bytes(v: Any, lo: int, hi: int) -> bytes:
    if type(v) is not bytes or not lo <= len(v) <= hi:
        raise DecodeError("bad_field")
    return v


def _str(v: Any, lo: int, hi: int) -> str:
    if type(v) is not str or not lo <= len(v) <= hi:
        raise DecodeError("bad_field")
    return v


def _list(v: Any, hi: int = MAX_LIST) -> list[Any]:
    if type(v) is not list or len(v) > hi:
        raise DecodeError("bad_field")
    return v


def _host(v: Any) -> str:
    b = _bytes(v, 0, 16)
    if not b:
        return ""
    if len(b) == 4:
        return str(ipaddress.IPv4Address(b))
    if len(b) == 16:
        a = ipaddress.IPv6Address(b)
        return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)
    raise DecodeError("bad_field")


def decode_entry(v: Any) -> Entry:
    f = _list(v)
    if len(f) < 8:
        raise DecodeError("bad_field")
    status = _int(f[3], 0, 255)
    if status > LEFT:
        raise DecodeError("bad_field")
    return Entry(
        node_id=_bytes(f[0], NODE_ID_LEN, NODE_ID_LEN),
        incarnation=_int(f[1]),
        heartbeat=_int(f[2]),
        status=status,
        host=_host(f[4]),
        port=_int(f[5], 0, 65535),
        http_port=_int(f[6], 0, 65535),
        age_ms=_int(f[7], 0, MAX_AGE_MS),
        role=_int(f[8], 0, 255) if len(f) > 8 else 0,
    )


def _decode_digest(v: Any) -> Digest:
    f = _list(v)
    if len(f) < 3:
        raise DecodeError("bad_field")
    return Digest(_str(f[0], 1, MAX_COLLECTION_NAME), _bytes(f[1], 1, MAX_HASH), _int(f[2]),
                  _int(f[3]) if len(f) > 3 else 0)


def decode(data: bytes) -> Message:
    """Decode one datagram. Raises DecodeError(reason) and nothing else."""
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("oversized")
    if len(data) < 3:
        raise DecodeError("truncated")
    if data[0] != VERSION:
        raise DecodeError("unknown_version")
    mtype = data[1]
    try:
        body = msgpack.unpackb(
            data[2:], raw=False, use_list=True, strict_map_key=True,
            max_bin_len=MAX_DATAGRAM,
            max_str_len=MAX_DATAGRAM, max_array_len=MAX_LIST, max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise DecodeError("trailing_bytes") from None
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError,
            RecursionError):
        raise DecodeError("malformed") from None
    try:
        fields = _list(body)
        if mtype == HEARTBEAT:
            if len(fields) < 7:
                raise DecodeError("bad_field")
            want = fields[5]
            healthy = fields[6]
            if type(want) is not bool or (healthy is not None and type(healthy) is not bool):
                raise DecodeError("bad_field")
            return Heartbeat(
                sender=decode_entry(fields[0]),
                name=_str(fields[1], 0, MAX_NAME * 4),
                lc=_int(fields[2]),
                digests=tuple(_decode_digest(d) for d in _list(fields[3])),
                peers=tuple(decode_entry(e) for e in _list(fields[4])),
                want_state=want,
                app_healthy=healthy,
                wants=tuple(_bytes(w, NODE_ID_LEN, NODE_ID_LEN)
                            for w in (_list(fields[7], MAX_WANTS) if len(fields) > 7 else ())),
                sync_port=_int(fields[8], 0, 65535) if len(fields) > 8 else 0,
            )
        if mtype == LEAVE:
            if len(fields) < 1:
                raise DecodeError("bad_field")
            return Leave(decode_entry(fields[0]))
        if mtype == STATE:
            if len(fields) < 2:
                raise DecodeError("bad_field")
            return State(
                _bytes(fields[0], NODE_ID_LEN, NODE_ID_LEN),
                tuple(decode_entry(e) for e in _list(fields[1])),
            )
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError):
        raise DecodeError("bad_field") from None
    raise DecodeError("unknown_type")
