"""The only owner of SQLite.

* :mod:`~agent.store.values`: errors, name and key rules, value encoding.
* :mod:`~agent.store.nodes`: how the Merkle index's node sums are stored (rows, journal).
* :mod:`~agent.store.schema`: tables, migrations, the writing connection.
* :mod:`~agent.store.changes`: the one change path and the Merkle index it keeps.
* :mod:`~agent.store.log`: the change log the change path appends to; compaction.
* :mod:`~agent.store.stream`: a follower's applied position; applying a leader's entries.
* :mod:`~agent.store.tree`: the read-only tree view reconciliation uses.
* :mod:`~agent.store.writer`: the operations, run on the store thread.
* :mod:`~agent.store.checkpoint`: the WAL checkpointer thread.
* :mod:`~agent.store.check`: the start-up check; a damaged file is moved aside.
* :mod:`~agent.store.store`: the async face: thread, queue, group commit.
"""

from agent.store.check import CheckResult
from agent.store.schema import DB_FILE, MIGRATIONS
from agent.store.store import StorageFull, Store, StoreCorrupt
from agent.store.tree import SqliteTree
from agent.store.values import (
    CollectionInfo,
    ItemRejected,
    StoreError,
    check_key,
    check_name,
    decode_value,
    encode_value,
)

__all__ = [
    "DB_FILE",
    "MIGRATIONS",
    "CheckResult",
    "CollectionInfo",
    "ItemRejected",
    "SqliteTree",
    "StorageFull",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "check_key",
    "check_name",
    "decode_value",
    "encode_value",
]
