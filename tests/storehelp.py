"""Test-only ways into a store's database, beside the Store API.

* :func:`query` reads with its own read-only connection (safe while a Store
  has the directory open: WAL readers do not disturb the writer).
* :func:`damage` writes with its own connection, to simulate corruption or an
  older schema: only while no Store has the directory open.
  :func:`ungroup_nodes` puts the node sums back in their schema-5 table.
* :func:`direct_writer` and :func:`transaction` drive the store-thread code
  (:class:`agent.store.writer.Writer`) from the test's thread, each operation
  in a real transaction: for unit tests of the change path and for in-process
  reconciliation between two replicas. Only while no Store has the directory
  open.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from agent.core.clock import HLC
from agent.store import DB_FILE
from agent.store.nodes import load_nodes
from agent.store.store import wall_ms
from agent.store.writer import Writer


def query(data_dir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    uri = f"file:{data_dir / DB_FILE}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql, args).fetchall()


def damage(data_dir: Path, sql: str) -> None:
    """Run ``sql`` (a script) on the database of a store that is not open."""
    with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        db.executescript(sql)
        db.commit()


def ungroup_nodes(data_dir: Path) -> None:
    """Store the node sums one row per node, as schemas 1-5 did (a store
    that is not open), for a test of an older database's upgrade."""
    with closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        db.execute("CREATE TABLE nodes (coll INTEGER NOT NULL, level INTEGER NOT NULL, "
                   "idx INTEGER NOT NULL, total BLOB NOT NULL, count INTEGER NOT NULL, "
                   "PRIMARY KEY (coll, level, idx)) WITHOUT ROWID")
        for (cid,) in db.execute("SELECT id FROM collections").fetchall():
            db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?)", [
                (cid, level, idx, n[0].to_bytes(32, "big"), n[1])
                for (level, idx), n in load_nodes(db, cid).items()])
        db.execute("DROP TABLE node_groups")
        db.execute("DROP TABLE node_log")
        db.commit()


@contextmanager
def direct_writer(data_dir: Path, origin: bytes, clock: Callable[[], int] = wall_ms,
                  max_value: int = 1 << 20, max_skew: float = 300.0) -> Iterator[Writer]:
    """A Writer on ``data_dir`` owned by this thread, its HLC reading ``clock``
    (Unix milliseconds)."""
    w = Writer(data_dir / DB_FILE, HLC(clock), origin, max_value, max_skew)
    try:
        yield w
    finally:
        w.conn.close()


@contextmanager
def transaction(w: Writer) -> Iterator[Writer]:
    """One committed transaction, as the store thread runs one batch; rolled
    back (and the in-memory mirror reloaded) if the body raises."""
    w.conn.execute("BEGIN IMMEDIATE")
    try:
        yield w
        w.save_clock()
        w.conn.execute("COMMIT")
    except BaseException:
        w.conn.execute("ROLLBACK")
        w.reload()
        raise
