"""The boot epoch: a number that grows on every start of the agent.

Sealed datagrams (agent.net.seal) derive a per-sender key from the cluster
key, the sender's node_id and its boot epoch, and use a counter that starts
again at 1 on every start as the nonce. The nonce never repeats under one
key as long as no two starts of one node share an epoch, which is what this
module guarantees:

* The epoch is ``max(saved + 1, wall clock seconds)``: it grows across
  restarts even within one second, and a data directory restored from an old
  backup still moves forward (unless the clock is also far behind).
* It is written to ``<data_dir>/boot_epoch`` with :func:`atomic_write` (fsync,
  rename, fsync of the directory) BEFORE the first datagram is sealed: a power
  cut after sending can never bring the old number back.
* It fits 32 bits (the datagram header field); a saved value at the limit is
  an error rather than a silent wrap.
* A file that exists but is not a number is an error, never a reset to zero.
"""

from __future__ import annotations

from pathlib import Path

from agent.runtime.files import atomic_write

FILENAME = "boot_epoch"
MAX_EPOCH = 2**32 - 1


class EpochError(Exception):
    pass


def read(data_dir: Path) -> int:
    """The saved epoch, 0 when there is none. Raises EpochError."""
    path = data_dir / FILENAME
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as e:
        raise EpochError(f"cannot read boot epoch file {path}: {e}") from None
    if not text.isdigit() or int(text) > MAX_EPOCH:
        raise EpochError(f"boot epoch file {path} is corrupt; delete it only if the node "
                         "also gets a new identity or the cluster key changes")
    return int(text)


def next_for_start(data_dir: Path, wall_now: float) -> int:
    """The epoch for this start, saved durably before it is returned.
    Raises EpochError or OSError."""
    epoch = max(read(data_dir) + 1, int(wall_now))
    if epoch > MAX_EPOCH:
        raise EpochError(f"boot epoch in {data_dir / FILENAME} is exhausted")
    atomic_write(data_dir / FILENAME, f"{epoch}\n".encode())
    return epoch
