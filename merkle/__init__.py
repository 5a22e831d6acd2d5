"""Incremental Merkle index and reconciliation state machine (pure, no I/O)."""
