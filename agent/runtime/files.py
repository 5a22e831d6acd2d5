"""Small files in the data directory, replaced whole and durably.

:func:`atomic_write` is the one way the agent rewrites a state file (identity,
peer snapshot): readers see the old contents or the new, never a torn mix,
and after it returns the new contents survive a power cut. The order is what
makes that true: write a temporary file next to the target, fsync it, rename
it over the target, then fsync the directory so the rename itself is on disk.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``. Raises OSError; on error the old file
    is untouched and no temporary file is left behind."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        # Some file systems refuse to open a directory; the rename still happened.
        return
    try:
        # EINVAL on file systems that cannot sync a directory; nothing more to do there.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
