"""The on-disk format: tables, migrations, how a row maps to an item, and how
the writing connection is opened.

Rules:

* ``MIGRATIONS[n]`` takes a database from schema version n to n+1 inside one
  transaction; the version is kept in ``meta``. A database newer than this
  code is refused, never opened.
* Positions are unsigned 64-bit; SQLite stores them shifted by 2**63 to fit
  its signed integers (``SHIFT``).
* The last HLC handed out is saved in ``meta`` with every commit, so that a
  restarted agent never issues a version older than one it already wrote.
* The stored node sums of the collections' trees are laid out by
  :mod:`agent.store.nodes` (schema 6).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from agent.store import nodes
from agent.store.values import StoreError
from merkle.tree import Item

DB_FILE = "store.sqlite3"
SHIFT = 1 << 63
#: the columns of an item row, in the order :func:`row_item` takes them
ITEM_COLUMNS = "key, hlc, origin, deleted, value, digest, pos"

MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: collections, items, tree nodes
    """
    CREATE TABLE collections (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        live INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE items (
        coll INTEGER NOT NULL,
        key TEXT NOT NULL,
        pos INTEGER NOT NULL,
        hlc INTEGER NOT NULL,
        origin BLOB NOT NULL,
        deleted INTEGER NOT NULL,
        value BLOB,
        digest BLOB NOT NULL,
        PRIMARY KEY (coll, key)
    ) WITHOUT ROWID;
    CREATE INDEX items_by_pos ON items (coll, pos);
    CREATE TABLE nodes (
        coll INTEGER NOT NULL,
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        total BLOB NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (coll, level, idx)
    ) WITHOUT ROWID;
    """,
    # 2: tombstone horizon per collection; tombstones findable by age
    """
    ALTER TABLE collections ADD COLUMN horizon INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX items_tombstones ON items (coll, hlc) WHERE deleted = 1;
    """,
    # 3: the change log (agent.store.log): seq, the entry's canonical bytes
    # (agent.core.changelog: epoch, seq, prev_hash, origin, hlc, collection,
    # key, op, value) and the wall time it was appended. seq is the rowid:
    # appends go to the end of the table. A database upgraded from 2 starts
    # with an empty log: the items stored before are in no entry.
    """
    CREATE TABLE log (
        seq INTEGER PRIMARY KEY,
        entry BLOB NOT NULL,
        at INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO meta VALUES ('log_epoch', 1);
    """,
    # 4: a follower's applied position in its leader's log (agent.store.stream):
    # at most one row, written in the transaction that applies the entries it
    # names, and the highest leader epoch seen (frames of lower epochs are
    # refused).
    """
    CREATE TABLE IF NOT EXISTS upstream (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        epoch_seen INTEGER NOT NULL
    );
    """,
    # 5: the leader of the highest epoch seen (its address, and the id of
    # the log the applied position is in), and the snapshot a follower is
    # installing (agent.store.stream): one row, written in the transaction
    # that applies each chunk, so an interrupted snapshot resumes.
    """
    CREATE TABLE upstream5 (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        epoch_seen INTEGER NOT NULL,
        leader TEXT NOT NULL DEFAULT '',
        log_id BLOB NOT NULL DEFAULT x''
    );
    INSERT INTO upstream5 (id, epoch, seq, hash, epoch_seen)
        SELECT id, epoch, seq, hash, epoch_seen FROM upstream;
    DROP TABLE upstream;
    ALTER TABLE upstream5 RENAME TO upstream;
    CREATE TABLE IF NOT EXISTS snapshot_progress (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        state BLOB NOT NULL
    );
    """,
    # 6: node sums in rows of 16 siblings, and the journal of leaf sums
    # (agent.store.nodes)
    nodes.from_rows,
]


def row_item(key: str, hlc: int, origin: bytes, deleted: int, value: bytes | None,
             digest: bytes, pos: int | None = None) -> Item:
    """An item from the columns of a row, as stored (digest and position are
    taken from the row, not recomputed: verification compares the two)."""
    return Item(key, hlc, origin, bool(deleted), value, digest,
                -1 if pos is None else pos + SHIFT)


def open_db(path: Path) -> sqlite3.Connection:
    """The writing connection: autocommit (the caller opens transactions), WAL,
    schema migrated to the newest version."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=5000")
    # Index pages for random positions: a bigger cache keeps bulk writes fast.
    conn.execute("PRAGMA cache_size=-32768")
    migrate(conn, path)
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v)")
    row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database {path} has schema version {version}, newer than this "
            f"agent understands ({len(MIGRATIONS)}); upgrade the agent")
    for n in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step = MIGRATIONS[n]
            if callable(step):
                step(conn)
            else:
                for stmt in step.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (n + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def saved_clock(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT v FROM meta WHERE k='hlc'").fetchone()
    return int(row[0]) if row else None


def save_clock(conn: sqlite3.Connection, hlc: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)", (hlc,))
