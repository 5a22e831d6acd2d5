"""The TCP stream handshake and frame cipher: a small pre-shared-key handshake
on ``cryptography`` primitives, sans I/O (bytes in, bytes out, no sockets).

Both ends hold cluster keys (32 bytes each, one primary) and a cluster name.
Three fixed-size messages, initiator first::

    m1  I -> R  MAGIC(4) | key_id(8) | nonce_i(32) | eph_i(32)              76 bytes
    m2  R -> I  MAGIC(4) | key_id(8) | nonce_r(32) | eph_r(32) | proof_r(32) 108 bytes
    m3  I -> R  proof_i(32)                                                  32 bytes

* ``key_id`` is :func:`key_id` of the initiator's primary key (its 8-byte
  fingerprint, as :mod:`agent.net.keyring` computes it); the responder
  looks it up among the keys it accepts (no trial decryption) and answers
  with the same key. An unknown id ends the handshake (``unknown_key``).
* ``th`` = SHA-256 over a label, the cluster name, m1 and m2 without its
  proof: the transcript. ``ikm`` = PSK || X25519(eph_i, eph_r).
  HKDF-SHA256(ikm, salt=th) gives four 32-byte keys: the two directions'
  frame keys and the two proof keys. Fresh ephemeral keys and nonces on both
  sides make every session's keys new, even against a replayed m1.
* ``proof_x`` = HMAC-SHA256(proof key of side x, th). Each side checks the
  other's proof with a constant-time compare before it sends or accepts any
  frame: a peer without the key (or with another cluster name) fails here
  (``bad_proof``). The responder proves first; the initiator's proof comes
  last, so the responder never hands a frame to an unproven client.
* Frames after the handshake are ChaCha20-Poly1305, one key per direction,
  nonce = 4 zero bytes + a 64-bit big-endian counter that starts at 0 and
  grows by one per frame. Receivers expect exactly the next counter, so a
  dropped, replayed, reordered or altered frame fails to open and ends the
  connection (:class:`FrameAuthError`).

Every malformed input raises :class:`HandshakeError` with a ``cause``
(``malformed``, ``unknown_key``, ``bad_proof``); nothing else escapes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.net import keyring

MAGIC = b"HSS1"
KEY_LEN = 32
KEY_ID_LEN = 8
NONCE_LEN = 32
PUB_LEN = 32
PROOF_LEN = 32
M1_LEN = len(MAGIC) + KEY_ID_LEN + NONCE_LEN + PUB_LEN
M2_LEN = M1_LEN + PROOF_LEN
M3_LEN = PROOF_LEN
TAG_LEN = 16  # ChaCha20-Poly1305 tag added to every frame
_LABEL = b"hs-gossip stream v1"
_COUNTER_MAX = 2**64 - 1


class HandshakeError(Exception):
    """The peer failed the handshake. ``cause`` is a short counter name."""

    def __init__(self, cause: str, detail: str = "") -> None:
        self.cause = cause
        super().__init__(f"handshake failed ({cause}){': ' + detail if detail else ''}")


class FrameAuthError(Exception):
    """A frame failed to open: altered, replayed, reordered or dropped before it."""


def key_id(key: bytes) -> bytes:
    """The public 8-byte id of a cluster key: its keyring fingerprint (a hash
    of it, not the key)."""
    return bytes.fromhex(keyring.make_key(key).fingerprint)


@dataclass(frozen=True)
class StreamKeys:
    """The key material a stream needs: the primary key (sent with) and all
    accepted keys by id (the primary among them), plus the cluster name."""

    primary: bytes
    accepted: Mapping[bytes, bytes]
    cluster: bytes

    @classmethod
    def from_keys(cls, keys: list[bytes], cluster: str) -> StreamKeys:
        """``keys[0]`` is the primary; all are accepted. ValueError if a key is
        not 32 bytes or the list is empty."""
        if not keys or any(len(k) != KEY_LEN for k in keys):
            raise ValueError("one or more 32-byte keys")
        return cls(keys[0], {key_id(k): k for k in keys}, cluster.encode())

    @classmethod
    def from_keyring(cls, ring: keyring.Keyring | None, cluster: str) -> StreamKeys | None:
        """The stream keys of a keyring (None: keyless, cleartext streams)."""
        if ring is None:
            return None
        return cls.from_keys([k.secret for k in ring.keys], cluster)


@dataclass
class FrameCipher:
    """One direction of an authenticated stream: in-order counter nonces."""

    key: bytes
    counter: int = 0
    _aead: ChaCha20Poly1305 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._aead = ChaCha20Poly1305(self.key)

    def _nonce(self) -> bytes:
        if self.counter >= _COUNTER_MAX:  # never reached in practice: 2**64 frames
            raise FrameAuthError("frame counter exhausted")
        n = b"\x00\x00\x00\x00" + self.counter.to_bytes(8, "big")
        self.counter += 1
        return n

    def seal(self, body: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(), body, None)

    def open(self, data: bytes) -> bytes:
        if len(data) < TAG_LEN:
            raise FrameAuthError("frame shorter than its tag")
        try:
            return self._aead.decrypt(self._nonce(), data, None)
        except InvalidTag:
            raise FrameAuthError("frame failed authentication") from None


@dataclass(frozen=True)
class Session:
    """What a finished handshake gives: a cipher per direction."""

    send: FrameCipher
    recv: FrameCipher
    key_id: bytes


def _derive(psk: bytes, shared: bytes, th: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=4 * KEY_LEN, salt=th,
               info=_LABEL).derive(psk + shared)
    return okm[0:32], okm[32:64], okm[64:96], okm[96:128]


def _transcript(cluster: bytes, m1: bytes, m2_body: bytes) -> bytes:
    h = hashlib.sha256(_LABEL)
    h.update(len(cluster).to_bytes(2, "big") + cluster)
    h.update(m1)
    h.update(m2_body)
    return h.digest()


def _proof(key: bytes, th: bytes) -> bytes:
    return hmac.new(key, th, hashlib.sha256).digest()


def _parse_hello(data: bytes, expect: int) -> tuple[bytes, bytes, bytes]:
    if len(data) != expect or data[:4] != MAGIC:
        raise HandshakeError("malformed", "not a handshake message of this protocol")
    kid = data[4:12]
    nonce = data[12:44]
    pub = data[44:76]
    return kid, nonce, pub


def _exchange(eph: X25519PrivateKey, pub: bytes) -> bytes:
    try:
        return eph.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError:  # an all-zero (low-order) shared secret
        raise HandshakeError("bad_proof", "degenerate ephemeral key") from None


class Initiator:
    """The connecting side: :meth:`start` -> m1; :meth:`finish` (m2) -> m3 and the session."""

    def __init__(self, keys: StreamKeys, *, nonce: bytes | None = None,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        self.keys = keys
        self.kid = key_id(keys.primary)
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self.eph = ephemeral or X25519PrivateKey.generate()
        self.m1 = b""

    def start(self) -> bytes:
        pub = self.eph.public_key().public_bytes_raw()
        self.m1 = MAGIC + self.kid + self.nonce + pub
        return self.m1

    def finish(self, m2: bytes) -> tuple[bytes, Session]:
        kid, _, pub = _parse_hello(m2[:M1_LEN] if len(m2) == M2_LEN else b"", M1_LEN)
        if kid != self.kid:
            raise HandshakeError("bad_proof", "responder answered with another key")
        th = _transcript(self.keys.cluster, self.m1, m2[:M1_LEN])
        i2r, r2i, proof_r_key, proof_i_key = _derive(self.keys.primary,
                                                     _exchange(self.eph, pub), th)
        if not hmac.compare_digest(m2[M1_LEN:], _proof(proof_r_key, th)):
            raise HandshakeError("bad_proof", "responder does not hold the cluster key")
        return _proof(proof_i_key, th), Session(FrameCipher(i2r), FrameCipher(r2i), kid)


class Responder:
    """The accepting side: :meth:`answer` (m1) -> m2; :meth:`finish` (m3) -> the session."""

    def __init__(self, keys: StreamKeys, *, nonce: bytes | None = None,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        self.keys = keys
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self.eph = ephemeral or X25519PrivateKey.generate()
        self._pending: tuple[bytes, bytes, bytes, bytes] | None = None

    def answer(self, m1: bytes) -> bytes:
        kid, _, pub = _parse_hello(m1, M1_LEN)
        psk = self.keys.accepted.get(kid)
        if psk is None:
            raise HandshakeError("unknown_key", f"key id {kid.hex()}")
        body = MAGIC + kid + self.nonce + self.eph.public_key().public_bytes_raw()
        th = _transcript(self.keys.cluster, m1, body)
        i2r, r2i, proof_r_key, proof_i_key = _derive(psk, _exchange(self.eph, pub), th)
        self._pending = (i2r, r2i, _proof(proof_i_key, th), kid)
        return body + _proof(proof_r_key, th)

    def finish(self, m3: bytes) -> Session:
        if self._pending is None:
            raise HandshakeError("malformed", "finish before answer")
        i2r, r2i, expected, kid = self._pending
        self._pending = None
        if len(m3) != M3_LEN or not hmac.compare_digest(m3, expected):
            raise HandshakeError("bad_proof", "initiator does not hold the cluster key")
        return Session(FrameCipher(r2i), FrameCipher(i2r), kid)
