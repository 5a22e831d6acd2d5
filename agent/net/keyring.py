"""Cluster keys for datagrams: parsing, key ids, fingerprints, the key file.

Rules:

* A key is 32 random bytes, written as base64 (``hs-gossip keygen``). It
  comes from ``HS_GOSSIP_KEY`` (comma-separated) or ``HS_GOSSIP_KEYFILE`` (one key
  per line; blank lines and lines starting with ``#`` are ignored). The first
  key is the *primary*: datagrams are sealed with it. Every key listed is
  accepted. Rotation is three edits of the file, each followed by a reload
  on every agent: add the new key second, move it first, remove the old one.
* A key's *fingerprint* is ``blake3("hs-gossip key fingerprint v1" | key)``,
  first 8 bytes, shown as hex; its *key id* is the first 4 of those bytes. The
  key id travels in the clear header of every sealed datagram and selects the
  key to open it with (no trial decryption); it identifies a key without
  revealing it.
* A bad line is an error naming the file and the line number, never the key
  text (keys never appear in logs or errors). Two keys with one key id are
  refused (a 1-in-4-billion accident, but one that would make a key unusable).
* Nothing here imports ``cryptography``: the AEAD lives in agent.net.seal and
  is imported only when a key is configured.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import blake3

KEY_LEN = 32
KEY_ID_LEN = 4
_FINGERPRINT_CONTEXT = b"hs-gossip key fingerprint v1\x00"


class KeyringError(Exception):
    """A key or key file is unusable; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Key:
    secret: bytes = field(repr=False)
    key_id: bytes
    fingerprint: str  # 16 hex digits; the key id is its first 8


def make_key(secret: bytes) -> Key:
    if len(secret) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes")
    digest = blake3.blake3(_FINGERPRINT_CONTEXT + secret).digest()[:8]
    return Key(secret, digest[:KEY_ID_LEN], digest.hex())


def parse_key(text: str) -> bytes:
    """The 32 bytes of a base64 key. Raises ValueError (without the text)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"base64 of {KEY_LEN} random bytes (hs-gossip keygen)") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"base64 of {KEY_LEN} random bytes, not {len(raw)} bytes "
                         "(hs-gossip keygen)")
    return raw


def generate() -> str:
    """A new key, as base64 text."""
    return base64.b64encode(secrets.token_bytes(KEY_LEN)).decode()


@dataclass(frozen=True)
class Keyring:
    """The keys in use; ``keys[0]`` is the primary (sealing) key."""

    keys: tuple[Key, ...]
    source: str  # where they came from, for log lines

    @property
    def primary(self) -> Key:
        return self.keys[0]

    def by_id(self) -> dict[bytes, Key]:
        return {k.key_id: k for k in self.keys}


def build(secrets_: list[bytes], source: str) -> Keyring:
    """A keyring from raw keys (first is primary). Raises KeyringError."""
    keys: list[Key] = []
    seen: dict[bytes, Key] = {}
    for s in secrets_:
        k = make_key(s)
        old = seen.get(k.key_id)
        if old is not None:
            if old.secret == s:
                continue  # listed twice: harmless
            raise KeyringError(f"{source}: two keys share key id {k.key_id.hex()}; "
                               "generate another key")
        seen[k.key_id] = k
        keys.append(k)
    if not keys:
        raise KeyringError(f"{source}: no key (one base64 key per line; hs-gossip keygen)")
    return Keyring(tuple(keys), source)


def load_file(path: Path) -> Keyring:
    """Read a key file. Raises KeyringError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise KeyringError(f"cannot read key file {path} (HS_GOSSIP_KEYFILE): {reason}") from None
    raw: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            raw.append(parse_key(line))
        except ValueError as e:
            raise KeyringError(f"key file {path} line {n}: expected {e}") from None
    return build(raw, f"key file {path}")


def from_settings(keys: tuple[bytes, ...], keyfile: Path | None) -> Keyring | None:
    """The keyring the settings ask for (HS_GOSSIP_KEY's keys or the key
    file), None when keyless. Raises KeyringError."""
    if keys and keyfile is not None:
        raise KeyringError("set HS_GOSSIP_KEY or HS_GOSSIP_KEYFILE, not both")
    if keyfile is not None:
        return load_file(keyfile)
    if keys:
        return build(list(keys), "HS_GOSSIP_KEY")
    return None
