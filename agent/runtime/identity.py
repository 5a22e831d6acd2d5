"""Persistent node identity: a UUID4 ``node_id`` and an incarnation number.

The identity lives in ``<data_dir>/identity.json``. It is created on first
start; every later start keeps the node_id and raises the incarnation, so
peers replace the old entry instead of listing the agent twice. A refutation
at run time raises the incarnation too and is saved at once, so a restart
never goes back to a number peers have already seen.

A file that exists but cannot be read as an identity is an error, never a
silent new identity: a device that changed its id would look like a new member
and orphan what the swarm knew about it.

An incarnation is at most :data:`MAX_INCARNATION`, the largest number every
peer's decoder accepts: :func:`save` refuses a larger one, and a saved one out
of range (or a start that would go past it) restarts the count at 1 with a
warning rather than refusing to start. Peers that knew the higher number
ignore the agent until its old entry expires there (about two TTLs); an
agent that never starts again would be worse.

A full disk does not stop a restart: the file is rewritten only when its
contents change; if the atomic rewrite (which needs room for a temporary
file) fails, the same few bytes are written in place, into the block the file
already holds; if even that fails, the agent runs with the raised incarnation
unsaved and says so (the next start raises it from the saved value again).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.core.wire import JS_SAFE
from agent.runtime.files import atomic_write

#: the largest incarnation peers accept (the datagram decoder's bound)
MAX_INCARNATION = JS_SAFE

FILENAME = "identity.json"

log = logging.getLogger("hs_gossip")


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    node_id: uuid.UUID
    incarnation: int


def read(data_dir: Path) -> Identity | None:
    path = data_dir / FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"cannot read identity file {path}: {e.strerror}") from None
    try:
        obj = json.loads(raw)
        ident = Identity(uuid.UUID(obj["node_id"]), int(obj["incarnation"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IdentityError(
            f"identity file {path} is corrupt; restore it from a backup, or delete it "
            "to start as a new node (peers will see a new member)"
        ) from None
    if ident.node_id.version != 4:
        raise IdentityError(f"identity file {path} holds an invalid node_id")
    if not 0 <= ident.incarnation <= MAX_INCARNATION:
        log.warning("identity file %s holds incarnation %d, outside 0..%d; counting "
                    "again from 1 (peers take this agent back once its old entry expires)",
                    path, ident.incarnation, MAX_INCARNATION)
        return Identity(ident.node_id, 0)
    return ident


def _body(ident: Identity) -> bytes:
    return json.dumps({"node_id": str(ident.node_id),
                       "incarnation": ident.incarnation}).encode() + b"\n"


def save(data_dir: Path, ident: Identity) -> None:
    """Write the identity if it differs from the file's. Raises OSError, and
    ValueError for an incarnation peers would refuse (never written)."""
    if not 0 <= ident.incarnation <= MAX_INCARNATION:
        raise ValueError(f"incarnation {ident.incarnation} outside 0..{MAX_INCARNATION}")
    path = data_dir / FILENAME
    body = _body(ident)
    try:
        if path.read_bytes() == body:
            return
    except OSError:
        pass
    try:
        atomic_write(path, body)
    except OSError as e:
        if not path.exists():
            raise
        _overwrite(path, body, e)


def _overwrite(path: Path, body: bytes, cause: OSError) -> None:
    """Write ``body`` over the existing file, in place: a few bytes in a
    block the file already owns need no free space. Not atomic as a rename
    is, but one write of under a sector; used only when the rename cannot be."""
    log.warning("cannot replace %s (%s); writing it in place", path, cause.strerror or cause)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, body)
        os.ftruncate(fd, len(body))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_for_start(data_dir: Path) -> Identity:
    """Read (or create) the identity and raise its incarnation for this run.
    A new identity that cannot be saved is an OSError; a raised incarnation
    that cannot be saved is a warning."""
    old = read(data_dir)
    if old is None:
        ident = Identity(uuid.uuid4(), 1)
        save(data_dir, ident)
        return ident
    if old.incarnation >= MAX_INCARNATION:
        log.warning("incarnation %d is the largest peers accept; counting again from 1 "
                    "(peers take this agent back once its old entry expires)", old.incarnation)
    ident = Identity(old.node_id, old.incarnation + 1 if old.incarnation < MAX_INCARNATION else 1)
    try:
        save(data_dir, ident)
    except OSError as e:
        log.warning("cannot save incarnation %d in %s (%s); running with it unsaved",
                    ident.incarnation, data_dir / FILENAME, e.strerror or e)
    return ident
