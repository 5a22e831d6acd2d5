"""Persistent node identity: a UUID4 ``node_id`` and an incarnation number.

The identity lives in ``<data_dir>/identity.json``. It is created on first
start; every later start keeps the node_id and raises the incarnation, so
peers replace the old entry instead of listing the agent twice. A refutation
at run time raises the incarnation too and is saved at once, so a restart
never goes back to a number peers have already seen.

A file that exists but cannot be read as an identity is an error, never a
silent new identity: a device that changed its id would look like a new member
and orphan what the swarm knew about it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.files import atomic_write

FILENAME = "identity.json"


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
    if ident.node_id.version != 4 or not 0 <= ident.incarnation < 2**53:
        raise IdentityError(f"identity file {path} holds an invalid node_id or incarnation")
    return ident


def save(data_dir: Path, ident: Identity) -> None:
    body = json.dumps({"node_id": str(ident.node_id), "incarnation": ident.incarnation})
    atomic_write(data_dir / FILENAME, body.encode() + b"\n")


def load_for_start(data_dir: Path) -> Identity:
    """Read (or create) the identity and raise its incarnation for this run."""
    old = read(data_dir)
    ident = (
        Identity(uuid.uuid4(), 1) if old is None else Identity(old.node_id, old.incarnation + 1)
    )
    save(data_dir, ident)
    return ident
