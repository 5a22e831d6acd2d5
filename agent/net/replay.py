"""Replay protection for sealed datagrams: a sliding window per sender.

Each sealed datagram carries its sender's node_id, boot epoch and a 64-bit
counter that grows by one per datagram sent (agent.net.seal). A receiver
keeps, per sender, the newest epoch seen, the highest counter seen in it and
a bitmap of the :data:`WINDOW` counters below that (RFC 6479 semantics; the
bitmap is one Python integer, whose shift is the word rotation of the RFC).

Rules:

* Refused: an epoch older than the newest seen from that sender
  (``old_epoch``: a capture from before its restart), a counter already seen
  (``replay``), a counter more than WINDOW below the highest (``stale``).
* A newer epoch resets the window: the sender restarted.
* :meth:`ReplayTable.check` never changes anything; :meth:`accept` records
  a counter and is called only AFTER the datagram authenticated, so forged
  datagrams can neither move a window nor make a table entry.
* The table is capped (least recently heard sender is forgotten first). A
  forgotten sender's old captures would pass the window again, so the cap is
  set well above the peer-table cap (HS_GOSSIP_MAX_PEERS) and only
  authenticated senders, i.e. key holders, ever take a place in it.
"""

from __future__ import annotations

from collections import OrderedDict

WINDOW = 1024
MAX_SENDERS = 8192


class _Window:
    __slots__ = ("bits", "epoch", "top")

    def __init__(self, epoch: int, counter: int) -> None:
        self.epoch = epoch
        self.top = counter
        self.bits = 1  # bit i set: counter top - i has been seen


class ReplayTable:
    def __init__(self, window: int = WINDOW, max_senders: int = MAX_SENDERS) -> None:
        self.window = window
        self.max_senders = max_senders
        self._mask = (1 << window) - 1
        self._senders: OrderedDict[bytes, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._senders)

    def newest_epoch(self, sender: bytes) -> int | None:
        w = self._senders.get(sender)
        return None if w is None else w.epoch

    def check(self, sender: bytes, epoch: int, counter: int) -> str | None:
        """None if (epoch, counter) is fresh for sender, else why not."""
        w = self._senders.get(sender)
        if w is None or epoch > w.epoch:
            return None
        if epoch < w.epoch:
            return "old_epoch"
        if counter > w.top:
            return None
        age = w.top - counter
        if age >= self.window:
            return "stale"
        return "replay" if w.bits >> age & 1 else None

    def accept(self, sender: bytes, epoch: int, counter: int) -> None:
        """Record an authenticated datagram that passed :meth:`check`."""
        w = self._senders.get(sender)
        if w is None or epoch > w.epoch:
            self._senders[sender] = _Window(epoch, counter)
            self._senders.move_to_end(sender)
            while len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
            return
        self._senders.move_to_end(sender)
        if counter > w.top:
            shift = counter - w.top
            w.bits = ((w.bits << shift) | 1) & self._mask if shift < self.window else 1
            w.top = counter
        else:
            w.bits |= 1 << (w.top - counter)
