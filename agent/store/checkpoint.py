"""The WAL checkpointer: a second connection, on its own thread, that copies
WAL pages back into the database file.

Rules: it writes no data (the store thread stays the only writer) and only
runs PASSIVE checkpoints, which never block the writer. Should it fall behind
or fail, the writer's own automatic checkpoint (at ``WAL_SAFETY_PAGES``)
takes over.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("hs_gossip.store")

#: WAL size (pages) at which the writer checkpoints by itself after all
WAL_SAFETY_PAGES = 16384


class Checkpointer:
    """Keeps the writer from stalling in SQLite's automatic checkpoint (about a
    fifth of a bulk write's time). SQLite starts the WAL over from its
    beginning once every frame has been copied, which keeps the file bounded.
    The writer sets :attr:`dirty` after each commit."""

    PERIOD = 0.5  # seconds between checkpoints while writes keep coming

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.dirty = threading.Event()
        self._stopping = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="hs-gossip-checkpoint",
                                       daemon=True)

    def _run(self) -> None:
        while True:
            self.dirty.wait()
            if self._stopping.is_set():
                return
            self.dirty.clear()
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("WAL checkpoint failed (%d times): %s", self.failures, e)
            if self._stopping.wait(self.PERIOD):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self.thread.join()
        self.conn.close()
