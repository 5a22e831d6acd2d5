"""Run a reconciliation between two replicas in one process, counting bytes
and messages as the wire would carry them. Used by tests, simulations and
benchmarks; the agent's TCP driver performs the same steps over a socket,
with the same codec (:mod:`merkle.frames`): every frame is encoded to bytes
and decoded (validated) again on the other side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from merkle import frames
from merkle.frames import SALT_LEN, Done, Frame, Hello, Items, Step
from merkle.reconcile import Session, item_batches
from merkle.tree import Item, TreeReader

#: the salt when the caller gives none: runs are reproducible. Vary it between
#: runs (as the agent does) so that a 4-byte collision is not met twice.
DEFAULT_SALT = bytes(SALT_LEN)


@dataclass
class Stats:
    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    messages: int = 0
    items_a_to_b: int = 0
    items_b_to_a: int = 0

    @property
    def bytes_total(self) -> int:
        return self.bytes_a_to_b + self.bytes_b_to_a

    @property
    def round_trips(self) -> float:
        return self.messages / 2


def run_pair(
    a: TreeReader, apply_a: Callable[[list[Item]], Any],
    b: TreeReader, apply_b: Callable[[list[Item]], Any],
    collection: str = "c", cut_after: int | None = None, salt: bytes = DEFAULT_SALT,
    on_frame: Callable[[bytes], Any] | None = None,
) -> Stats:
    """Reconcile ``a`` (initiator) with ``b``. ``apply_x`` receives the items
    shipped to x. ``cut_after`` drops the connection after that many frames,
    as a crash or a network fault would. ``on_frame`` sees every frame's bytes
    in the order sent."""
    stats = Stats()
    readers = {"a": a, "b": b}
    sessions = {"a": Session(salt), "b": Session(salt)}  # b adopts the HELLO's anyway
    appliers = {"a": apply_a, "b": apply_b}
    sent = 0

    def send(src: str, frame: Frame) -> Frame:
        nonlocal sent
        sent += 1
        if cut_after is not None and sent > cut_after:
            raise ConnectionResetError("cut")
        data = frames.encode(frame)
        if on_frame is not None:
            on_frame(data)
        if src == "a":
            stats.bytes_a_to_b += len(data)
        else:
            stats.bytes_b_to_a += len(data)
        return frames.decode(data)

    try:
        msg = send("a", sessions["a"].hello(a, collection))
        stats.messages += 1
        turn = "b"
        while True:
            other = "a" if turn == "b" else "b"
            if not isinstance(msg, Hello | Step | Done):
                raise frames.ProtocolError("ITEMS where a message was due")
            reply = sessions[turn].receive(readers[turn], msg)
            for batch in item_batches(readers[turn], sessions[turn].take_sends()):
                wire = send(turn, Items(tuple(batch)))
                if not isinstance(wire, Items):  # cannot happen: the codec round-trips
                    raise frames.ProtocolError("ITEMS did not decode as ITEMS")
                appliers[other](list(wire.items))
                if turn == "a":
                    stats.items_a_to_b += len(wire.items)
                else:
                    stats.items_b_to_a += len(wire.items)
            if reply is None:
                break
            msg = send(turn, reply)
            stats.messages += 1
            turn = other
    except ConnectionResetError:
        pass
    return stats
