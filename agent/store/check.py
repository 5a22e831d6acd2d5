"""The start-up check of the database file, and what happens to a damaged one.

Rules:

* Runs before the store opens its connections, on the file as the last run
  left it (its WAL included: a committed write that only lives in the WAL is
  part of the database).
* The check is: the 100-byte header reads as SQLite's, then ``PRAGMA
  quick_check`` (every b-tree page, cell and freelist; not the agreement of
  indexes with their tables, which ``integrity_check`` adds at several times
  the cost), then the schema and ``meta`` table read. Its cost at 1,000,000
  items is measured by ``bench/bench_store_check.py``.
* Damage the check does not see but opening the file does (the schema or the
  collections table) is treated the same way, by the store.
* A damaged file is never repaired in place and never deleted: it is renamed,
  with its ``-wal``, ``-shm`` and ``-journal``, to
  ``store.sqlite3.corrupt-<UTC timestamp>`` beside it, logged at ERROR with
  that path, and the agent starts empty; its peers send everything back
  through sync.
* Damage means only: an empty file, a bad header, a failed ``quick_check`` or
  an error SQLite names as corruption (:func:`is_corrupt`). Any other failure
  (locked by another process, no permission, an I/O error, not a regular
  file) says nothing about the file's content: it raises
  :class:`StoreError` and the file is left exactly where it is, because
  moving a healthy database aside would throw its data away.
* A database that is missing while the agent has run before (its identity
  file existed) is logged at WARNING: it starts empty and re-syncs, but never
  silently.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from agent.store.values import StoreError

log = logging.getLogger("hs_gossip.store")

HEADER = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm", "-journal")
#: seconds the check waits for a lock another connection holds
BUSY_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckResult:
    """What the start-up check found: ``ok``, ``new`` (no file), ``missing``
    (no file, but the agent had run before) or ``quarantined`` (moved to
    ``moved_to``)."""

    outcome: str
    seconds: float = 0.0
    problem: str = ""
    moved_to: Path | None = None


def problem_of(path: Path) -> str | None:
    """Why the database at ``path`` is damaged, or None if it passes.
    Raises :class:`StoreError` when it cannot be checked for another reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(HEADER))
    except OSError as e:
        # Permissions, a directory in its place, an I/O error: not damage.
        raise StoreError(f"cannot read the database {path}: {e.strerror or e}") from None
    if size == 0:
        return "the file is empty (0 bytes)"
    if head != HEADER:
        return "not an SQLite database (bad header)"
    try:
        # Read-write (not mode=ro): a WAL left by the last run must be read,
        # which needs the -shm index; nothing is written by the check itself.
        with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT,
                                     isolation_level=None)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
            if rows != [("ok",)]:
                shown = "; ".join(str(r[0]) for r in rows[:3])
                return f"quick_check: {shown}"
            db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_schema")}
            if "meta" in tables:
                db.execute("SELECT k, v FROM meta").fetchall()
    except sqlite3.Error as e:
        if is_full(e):
            # Not damage: the check could not run for lack of space (e.g.
            # replaying the WAL). The store opens it as it is.
            log.warning("start-up check of %s skipped: %s", path, e)
            return None
        if is_corrupt(e):
            return f"{type(e).__name__}: {e}"
        # Locked by another process, no permission, an I/O error: the file
        # may be perfectly healthy, so it stays where it is.
        raise StoreError(f"cannot check the database {path}: {e}") from None
    return None


def is_full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL: no space left on the device."""
    return (getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(e))


def is_corrupt(e: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged."""
    code = getattr(e, "sqlite_errorcode", None)
    return (code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
            or "malformed" in str(e) or "not a database" in str(e))


def quarantine(path: Path, now: float | None = None) -> Path:
    """Rename the database and its side files aside; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for side in SIDE_FILES:
        src = path.with_name(path.name + side)
        if src.exists():
            os.replace(src, target.with_name(target.name + side))
    return target


def check_at_start(path: Path, ran_before: bool) -> CheckResult:
    """Check the database file before opening it; move it aside if damaged.
    ``ran_before``: the agent's identity existed, so a database should too.
    Raises :class:`StoreError`, moving nothing, when the file cannot be
    checked for a reason other than damage (a lock, permissions, I/O)."""
    if not path.exists():
        for side in SIDE_FILES:  # a WAL without its database cannot be used
            side_path = path.with_name(path.name + side)
            if side_path.exists():
                os.replace(side_path, side_path.with_name(
                    side_path.name + f".orphan-{int(time.time())}"))
        if ran_before:
            log.warning("the database %s was missing; starting empty, will re-sync "
                        "from peers", path)
            return CheckResult("missing")
        return CheckResult("new")
    t0 = time.perf_counter()
    problem = problem_of(path)
    seconds = time.perf_counter() - t0
    if problem is None:
        log.debug("start-up check of %s: ok in %.3fs", path, seconds)
        return CheckResult("ok", seconds)
    return set_aside(path, problem, seconds)


def set_aside(path: Path, problem: str, seconds: float = 0.0) -> CheckResult:
    """Move a damaged database aside and say so at ERROR, with both paths."""
    moved = quarantine(path)
    log.error("the database %s is damaged (%s); moved it to %s; starting empty, will "
              "re-sync from peers", path, problem, moved)
    return CheckResult("quarantined", seconds, problem, moved)
