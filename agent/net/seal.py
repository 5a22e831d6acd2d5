"""The seal/open point every UDP datagram crosses, in both directions.

Both UDP sockets (gossip in agent.net.udp, multicast discovery in
agent.net.discovery) call :meth:`Seal.seal` on the bytes they are about to
send and :meth:`Seal.open` on the bytes they received, and nothing else in
the agent touches datagram bytes between the codec and the socket. This is
where authenticated encryption (an AEAD) goes:

* ``seal(plaintext, kind)`` returns the bytes to put on the wire;
* ``open(datagram, kind)`` returns the plaintext, or ``None`` when the
  datagram must be refused (it fails authentication, or is too short to be
  sealed). The socket counts the refusal (``drop_unopened``) and drops it.
* ``kind`` says which socket is asking, so that a sealed discovery beacon can
  never be opened as gossip (an AEAD binds it as associated data).

Today there is no key: :data:`CLEARTEXT` is the identity in both directions,
so the bytes on the wire are exactly what the codecs produce. The space an
AEAD needs is already kept free in every gossip datagram
(``agent.core.wire.AEAD_RESERVE``).
"""

from __future__ import annotations

import enum
from typing import Protocol


class Kind(enum.StrEnum):
    """Which socket a datagram belongs to."""

    GOSSIP = "gossip"
    DISCOVERY = "discovery"


class Seal(Protocol):
    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        """The bytes to send for ``plaintext``."""
        ...

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        """The plaintext of a received datagram, or None to refuse it."""
        ...


class Cleartext:
    """No key: datagrams leave and arrive as they are (today's wire format)."""

    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        return plaintext

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        return datagram


CLEARTEXT: Seal = Cleartext()
