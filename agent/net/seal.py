"""The seal/open point every UDP datagram crosses, in both directions.

Both UDP sockets (gossip in agent.net.udp, multicast discovery in
agent.net.discovery) call :meth:`Seal.seal` on the bytes they are about to
send and :meth:`Seal.open` on the bytes they received, and nothing else in
the agent touches datagram bytes between the codec and the socket.

* ``seal(plaintext, kind)`` returns the bytes to put on the wire;
* ``open(datagram, kind)`` returns the plaintext, or ``None`` when the
  datagram must be refused. The socket counts the refusal (``drop_unopened``)
  and drops it; the seal counts it by cause in ``refused``.
* ``sender(plaintext)`` is the node_id that authenticated the plaintext the
  last ``open`` returned (None when keyless: nothing is authenticated). The
  runtime hands it to the membership core, which refuses a datagram whose
  card names another node.
* ``kind`` says which socket is asking; it is associated data, so a sealed
  discovery beacon can never be opened as gossip.

Two seals:

:class:`Cleartext` (no key): datagrams are the codec's bytes. It refuses
datagrams that start with :data:`SEALED_VERSION` (``sealed_refused``), so a
keyless agent never mixes with keyed ones.

:class:`Sealed` (HS_GOSSIP_KEY / HS_GOSSIP_KEYFILE)::

    version 0xA1 (1) | key id (4) | sender node_id (16) | boot epoch (4, BE)
    | counter (8, BE) | ChaCha20-Poly1305 ciphertext | tag (16)

* Overhead :data:`OVERHEAD` = 33 + 16 = 49 bytes, kept free in every gossip
  datagram (``agent.core.wire.AEAD_RESERVE``).
* Associated data: the 33-byte header, the kind, and the cluster name
  (HS_GOSSIP_CLUSTER). A datagram of another cluster, or of the other socket,
  fails the tag like a tampered one: it is counted as ``bad_tag``.
* Key: per (cluster key, sender, boot epoch), ``blake3(keyed with the cluster
  key, "hs-gossip datagram v1" | sender | epoch)``. Nonce: 4 zero bytes and
  the counter. The counter starts at 1 on every start and the boot epoch grows
  on every start (agent.runtime.epoch, saved before use), so a nonce never
  repeats under one key without persisting counters.
* Refused, each counted in ``refused``: ``malformed`` (too short, too long or
  an unknown leading byte), ``cleartext_refused`` (a keyless agent's
  datagram), ``unknown_key``, ``old_epoch``, ``replay``, ``stale`` (counter
  below the replay window), ``bad_tag``. Replay state (agent.net.replay) is
  checked before and updated only after the tag verifies; the AEAD objects
  of senders are cached (bounded) only after one of their datagrams verified.
* At most one log line per cause per :data:`LOG_EVERY` seconds.
* ``cryptography`` is imported when a :class:`Sealed` is made, never by a
  keyless agent.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import blake3

from agent.core import wire
from agent.net.keyring import Key, Keyring
from agent.net.replay import ReplayTable

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

log = logging.getLogger("hs_gossip.seal")

SEALED_VERSION = 0xA1
HEADER = struct.Struct(">B4s16sIQ")
TAG_LEN = 16
OVERHEAD = HEADER.size + TAG_LEN
#: leading bytes of cleartext datagrams: gossip's version, discovery's "HSG1"
CLEARTEXT_LEADS = frozenset({wire.VERSION, ord("H")})
LOG_EVERY = 10.0
MAX_AEADS = 4096
_SUBKEY_CONTEXT = b"hs-gossip datagram v1\x00"
_NONCE_PAD = bytes(4)

assert OVERHEAD <= wire.AEAD_RESERVE, "gossip datagrams must leave room for the seal"

#: what each refusal counter means, for log lines
CAUSES = {
    "malformed": "malformed header",
    "cleartext_refused": "cleartext datagrams (a keyless agent?) refused",
    "sealed_refused": "sealed datagrams refused (this agent has no key)",
    "unknown_key": "unknown key id",
    "old_epoch": "boot epoch older than the newest seen from that sender (replay)",
    "replay": "counter already seen (replay)",
    "stale": "counter below the replay window",
    "bad_tag": "failed authentication (tampered, wrong key, or another HS_GOSSIP_CLUSTER)",
}


class Kind(enum.StrEnum):
    """Which socket a datagram belongs to."""

    GOSSIP = "gossip"
    DISCOVERY = "discovery"


class Seal(Protocol):
    #: refusals by cause since start
    refused: Counter[str]

    @property
    def encrypted(self) -> bool: ...

    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        """The bytes to send for ``plaintext``."""
        ...

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        """The plaintext of a received datagram, or None to refuse it."""
        ...

    def sender(self, plaintext: bytes) -> bytes | None:
        """The authenticated sender of the plaintext ``open`` just returned."""
        ...


class _Throttle:
    """Counts refusals and logs one line per cause per LOG_EVERY seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.refused: Counter[str] = Counter()
        self._clock = clock
        self._logged: dict[str, tuple[float, int]] = {}

    def refuse(self, cause: str) -> None:
        self.refused[cause] += 1
        now = self._clock()
        at, count_then = self._logged.get(cause, (-LOG_EVERY, 0))
        if now - at >= LOG_EVERY:
            n = self.refused[cause] - count_then
            self._logged[cause] = (now, self.refused[cause])
            log.warning("refused %d datagram%s: %s (one line per cause per %gs at most)",
                        n, "" if n == 1 else "s", CAUSES.get(cause, cause), LOG_EVERY)


class Cleartext:
    """No key: datagrams leave and arrive as they are; sealed ones are refused."""

    encrypted = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._throttle = _Throttle(clock)
        self.refused = self._throttle.refused

    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        return plaintext

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        if datagram[:1] == bytes([SEALED_VERSION]):
            self._throttle.refuse("sealed_refused")
            return None
        return datagram

    def sender(self, plaintext: bytes) -> bytes | None:
        return None


CLEARTEXT: Seal = Cleartext()


def _subkey(key: Key, sender: bytes, epoch: int) -> bytes:
    return blake3.blake3(_SUBKEY_CONTEXT + sender + epoch.to_bytes(4, "big"),
                         key=key.secret).digest()


class Sealed:
    """ChaCha20-Poly1305 with per-sender keys and a replay window."""

    encrypted = True

    def __init__(self, keyring: Keyring, node_id: bytes, epoch: int, cluster: str, *,
                 replay: ReplayTable | None = None, max_aeads: int = MAX_AEADS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if len(node_id) != wire.NODE_ID_LEN or not 0 <= epoch < 2**32:
            raise ValueError("node_id is 16 bytes, epoch 32 bits")
        self._aead_class = ChaCha20Poly1305
        self._invalid_tag = InvalidTag
        self._me = node_id
        self._epoch = epoch
        self._cluster = cluster.encode()
        self._counter = 0
        self._max_aeads = max_aeads
        self._aeads: OrderedDict[tuple[bytes, bytes, int], ChaCha20Poly1305] = OrderedDict()
        self.replay = replay if replay is not None else ReplayTable()
        self._throttle = _Throttle(clock)
        self.refused = self._throttle.refused
        #: sender -> key id it last sealed with (bounded like the replay table)
        self.last_key: OrderedDict[bytes, bytes] = OrderedDict()
        self._last: tuple[bytes, bytes] | None = None
        self.install(keyring)

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def install(self, keyring: Keyring) -> None:
        """Use a new keyring from now on (rotation): seal with its primary,
        accept all of its keys."""
        self._keyring = keyring
        self._by_id = keyring.by_id()
        self._aeads.clear()
        primary = keyring.primary
        self._send_key_id = primary.key_id
        self._send = self._aead_class(_subkey(primary, self._me, self._epoch))

    def _ad(self, header: bytes, kind: Kind) -> bytes:
        return header + kind.value.encode() + b"\x00" + self._cluster

    def seal(self, plaintext: bytes, kind: Kind) -> bytes:
        self._counter += 1
        header = HEADER.pack(SEALED_VERSION, self._send_key_id, self._me, self._epoch,
                             self._counter)
        nonce = _NONCE_PAD + self._counter.to_bytes(8, "big")
        return header + self._send.encrypt(nonce, plaintext, self._ad(header, kind))

    def open(self, datagram: bytes, kind: Kind) -> bytes | None:
        self._last = None
        if len(datagram) < OVERHEAD or len(datagram) > wire.MAX_DATAGRAM \
                or datagram[0] != SEALED_VERSION:
            lead = datagram[0] if datagram else -1
            self._throttle.refuse("cleartext_refused" if lead in CLEARTEXT_LEADS
                                  else "malformed")
            return None
        _, key_id, sender, epoch, counter = HEADER.unpack_from(datagram)
        key = self._by_id.get(key_id)
        if key is None:
            self._throttle.refuse("unknown_key")
            return None
        stale = self.replay.check(sender, epoch, counter)
        if stale is not None:
            self._throttle.refuse(stale)
            return None
        slot = (key_id, sender, epoch)
        aead = self._aeads.get(slot)
        cached = aead is not None
        if aead is None:
            aead = self._aead_class(_subkey(key, sender, epoch))
        header = datagram[:HEADER.size]
        nonce = _NONCE_PAD + datagram[HEADER.size - 8:HEADER.size]
        try:
            plaintext = aead.decrypt(nonce, datagram[HEADER.size:], self._ad(header, kind))
        except self._invalid_tag:
            self._throttle.refuse("bad_tag")
            return None
        # Authenticated: only now may the sender take table and cache space.
        self.replay.accept(sender, epoch, counter)
        if cached:
            self._aeads.move_to_end(slot)
        else:
            self._aeads[slot] = aead
            while len(self._aeads) > self._max_aeads:
                self._aeads.popitem(last=False)
        self.last_key[sender] = key_id
        self.last_key.move_to_end(sender)
        while len(self.last_key) > self.replay.max_senders:
            self.last_key.popitem(last=False)
        self._last = (plaintext, sender)
        return plaintext

    def sender(self, plaintext: bytes) -> bytes | None:
        # Identity, not equality: only the very object open() returned is
        # vouched for; anything else gets an id no message can carry.
        if self._last is not None and self._last[0] is plaintext:
            return self._last[1]
        return b""
