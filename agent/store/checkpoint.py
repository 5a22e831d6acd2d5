"""The WAL checkpointer: a second connection, on its own thread, that copies
WAL pages back into the database file.

Rules: it writes no data (the store thread stays the only writer) and only
runs PASSIVE checkpoints, which never block the writer. Should it fall behind
or fail, the writer's own automatic checkpoint (at ``WAL_SAFETY_PAGES``)
takes over. A failing checkpoint (a full disk) is logged once per episode,
without a traceback, and retried every ``RETRY`` seconds until it works.

SQLite starts the WAL over from its beginning only when a write transaction
begins while every frame has been copied. Under steady writes (a follower
applying a stream) one pass never gets there: what commits during the pass
is left over, and the WAL grew to ``WAL_SAFETY_PAGES`` (64 MiB) before the
writer's own checkpoint, a stall of 10-15 ms, started it over. So once the
WAL holds more than ``CATCH_UP_PAGES``, a pass is followed by up to
``CATCH_UP_PASSES`` short ones, each copying only what committed during the
one before, until one leaves the writer nothing to wait for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("hs_gossip.store")

#: WAL size (pages) at which the writer checkpoints by itself after all
WAL_SAFETY_PAGES = 16384
#: WAL size (pages, 4 MiB) above which a pass is followed by catch-up passes;
#: below it a WAL that does not start over costs little
CATCH_UP_PAGES = 1024
#: the most catch-up passes after one pass (each costs two fsyncs)
CATCH_UP_PASSES = 3


class Checkpointer:
    """Keeps the writer from stalling in SQLite's automatic checkpoint (about a
    fifth of a bulk write's time). SQLite starts the WAL over from its
    beginning once every frame has been copied, which keeps the file bounded.
    The writer sets :attr:`dirty` after each commit."""

    PERIOD = 0.5  # seconds between checkpoints while writes keep coming
    RETRY = 5.0  # seconds between attempts while checkpoints fail
    #: niceness of this thread: a pass copies megabytes of pages at once,
    #: and the event loop and the writer, whose latency is the agent's, go
    #: first (a checkpoint that falls behind is caught by WAL_SAFETY_PAGES)
    NICE = 10

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.dirty = threading.Event()
        self._stopping = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="hs-gossip-checkpoint",
                                       daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux sets it per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, 0) + self.NICE)
        failing = False
        while True:
            # While failing, retry on a timer: the WAL should shrink as soon
            # as space returns, even if no write comes to set ``dirty``.
            self.dirty.wait(self.RETRY if failing else None)
            if self._stopping.is_set():
                return
            self.dirty.clear()
            try:
                self.passes()
            except sqlite3.Error as e:
                self.failures += 1
                if not failing:
                    log.warning("WAL checkpoint failed: %s; retrying every %gs "
                                "(the WAL keeps every write meanwhile)", e, self.RETRY)
                failing = True
            else:
                if failing:
                    log.warning("WAL checkpoint works again (after %d failed attempts)",
                                self.failures)
                    failing = False
                    self.failures = 0
            if self._stopping.wait(self.PERIOD):
                return

    def passes(self) -> None:
        """One pass, then the catch-up passes (see the module's docstring)."""
        frames = self._pass()
        for _ in range(CATCH_UP_PASSES):
            if frames <= CATCH_UP_PAGES:
                return
            again = self._pass()
            if again <= frames:
                # Nothing committed since the last pass (the writer starts
                # the WAL over at its next transaction), or it already did.
                return
            frames = again

    def _pass(self) -> int:
        """A PASSIVE checkpoint; the WAL's size in frames when it began."""
        row = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1])

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self.thread.join()
        self.conn.close()
