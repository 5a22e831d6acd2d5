"""Gossip datagram limits and the rules every datagram codec follows.

The membership datagrams themselves (PING, ACK, PING_REQ, NACK, LEAVE2,
GOSSIP and the push-pull payload) are encoded by :mod:`agent.core.swim.codec`;
this module holds what that codec, the seal and the runtime share: the
envelope's version byte, the size limits, the bounds on numbers and lengths,
the collection :class:`Digest` every card advertises and the role names.

Rules:

* A datagram is ``VERSION (1 byte) | TYPE (1 byte) | msgpack payload``. The
  envelope stays outside the payload so that the AEAD layer can wrap the
  payload and use the envelope as associated data.
* Payloads are msgpack arrays with positional fields. New fields are only ever
  appended, and decoders ignore trailing fields they do not know: that is the
  forward-compatibility rule. An unknown VERSION is rejected; an unknown TYPE
  is rejected (a newer peer may send types we cannot use). TYPE numbers are
  never reused: :data:`RETIRED_TYPES` belonged to the heartbeat protocol
  agents spoke before SWIM, and an old agent's datagram must be refused as an
  unknown type, not misread.
* Every datagram is at most :data:`MAX_DATAGRAM` bytes (1400: fits an IPv6
  path with room for tunnels), of which :data:`AEAD_RESERVE` is kept free for
  the authentication tag and nonce of the seal: a codec fills at most
  :data:`PAYLOAD_BUDGET`.
* Integers that reach the HTTP API stay below 2**53 (JavaScript-safe).
  Bounds hold both ways: decoders refuse a number above :data:`JS_SAFE` (a
  port above 65535, a string or list above its limit here), and encoders
  clamp to the same bounds, so an agent never emits a number its peers
  would refuse. Keeping numbers plausible (not just decodable) is the
  membership core's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
MAX_DATAGRAM = 1400
AEAD_RESERVE = 49  # agent.net.seal.OVERHEAD: 33-byte header + 16-byte tag
PAYLOAD_BUDGET = MAX_DATAGRAM - AEAD_RESERVE

JS_SAFE = 2**53 - 1
#: the largest probe sequence number (an unsigned 32-bit field)
MAX_AGE_MS = 0xFFFFFFFF
NODE_ID_LEN = 16
MAX_NAME = 64
MAX_COLLECTION_NAME = 128
MAX_HASH = 32
MAX_LIST = 256

#: TYPE bytes of the retired heartbeat protocol (HEARTBEAT, LEAVE, STATE):
#: never to be given to a new message
RETIRED_TYPES = (1, 2, 3)

ROLES = ("Edge", "Leader", "Follower")


@dataclass(frozen=True)
class Digest:
    """One replicated collection as a member advertises it."""

    name: str
    state_hash: bytes
    count: int
    #: tombstones older than this (Unix ms) have been purged everywhere
    horizon_ms: int = 0
