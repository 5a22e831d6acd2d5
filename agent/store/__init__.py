"""The only owner of SQLite: schema and migrations, the single change path,
the Merkle index over the items, the checkpointer."""

from agent.store.db import (
    DB_FILE,
    MIGRATIONS,
    CollectionInfo,
    ItemRejected,
    SqliteTree,
    Store,
    StoreError,
    check_key,
    check_name,
    decode_value,
    encode_value,
)

__all__ = [
    "DB_FILE",
    "MIGRATIONS",
    "CollectionInfo",
    "ItemRejected",
    "SqliteTree",
    "Store",
    "StoreError",
    "check_key",
    "check_name",
    "decode_value",
    "encode_value",
]
