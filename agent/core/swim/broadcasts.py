"""The dissemination queue: member updates to piggyback, each sent a bounded number of times.

After HashiCorp memberlist's ``TransmitLimitedQueue`` (``broadcast.go``) and
SWIM's infection-style dissemination (Das, Gupta, Motivala 2002).

Rules:

* **One update per member.** An item is the encoded update about one node;
  putting a new item about the same node replaces the queued one (the newer
  news supersedes it: alive after suspect, dead after alive...), and its send
  count starts again at 0, unless the caller says the item only refines the
  queued one (``keep_count``: a suspicion's confirmation), which then goes on
  with the send count it had.
* **Order: least-sent first, then newest first.** Fresh news spreads before
  news most members already heard; among equals the newest wins because it
  is the most likely to change someone's table. memberlist breaks ties by size
  (largest first) to pack datagrams; we follow the contract (newest first) and
  fill the space left by skipping what does not fit.
* **Retransmit limit.** Each item taken counts as one transmission; an item is
  dropped once it has been sent ``retransmit_limit(mult, n)`` =
  ``mult * ceil(log10(n + 1))`` times. Gossip reaches everyone in O(log N)
  rounds with high probability, so the cost per update grows only with log N;
  a larger ``mult`` buys robustness to loss with bytes. ``n`` counts the
  members including ourselves, as memberlist's ``NumNodes`` does, so the limit
  is at least ``mult`` once anyone is known. With ``n == 0`` the limit is 0:
  nothing can be sent and nothing is dropped (the items wait for a member).
  When ``n`` shrinks, items already past the new limit are dropped on the next
  take.
* **Bounded.** At most ``max_items`` items; beyond that the worst item goes
  first: the most sent, and among those the oldest (memberlist ``Prune``).
* **Budget.** ``take(budget, n, overhead)`` returns items whose sizes plus
  ``overhead`` bytes each (the caller's framing per item, e.g. msgpack array
  slots; 0 by default) sum to at most ``budget``.

Cost: ``put`` and each item taken are O(log Q) on two heaps (a min-heap for
sending, a max-heap for eviction) with lazy deletion; both heaps are rebuilt
when stale entries outnumber live ones, which is O(1) amortised per put.
``take`` looks at no more than ``MAX_SKIPS`` items that do not fit, so it is
O((taken + MAX_SKIPS) * log Q), never O(Q): a small item deep in the queue may
wait for the next datagram rather than be searched for.
"""

from __future__ import annotations

import heapq
import math

# How many items that do not fit the remaining budget `take` passes over
# before giving up on filling the datagram. Bounds the work per call.
MAX_SKIPS = 8


def retransmit_limit(mult: int, n: int) -> int:
    """How many times an update is sent: ``mult * ceil(log10(n + 1))`` (memberlist)."""
    if n <= 0:
        return 0
    return mult * math.ceil(math.log10(n + 1))


class _Entry:
    __slots__ = ("item", "live", "node_id", "seq", "transmits")

    def __init__(self, node_id: bytes, item: bytes, transmits: int, seq: int) -> None:
        self.node_id = node_id
        self.item = item
        self.transmits = transmits
        self.seq = seq  # put order: higher is newer
        self.live = True


class BroadcastQueue:
    """Transmit-limited queue of encoded member updates, keyed by node id."""

    def __init__(self, retransmit_mult: int, max_items: int) -> None:
        if retransmit_mult < 1:
            raise ValueError("retransmit_mult must be at least 1")
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.retransmit_mult = retransmit_mult
        self.max_items = max_items
        self._live: dict[bytes, _Entry] = {}
        # (transmits, -seq): the best item to send is at the top.
        self._send: list[tuple[int, int, _Entry]] = []
        # (-transmits, seq): the item to evict first is at the top.
        self._evict: list[tuple[int, int, _Entry]] = []
        self._seq = 0
        self.evicted = 0  # items dropped because the queue was full (for stats)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._live

    def put(self, node_id: bytes, item: bytes, keep_count: bool = False) -> None:
        """Queue ``item`` about ``node_id``, replacing any queued item about it.

        ``keep_count``: the new item inherits the send count of the one it
        replaces (a refinement of news still spreading, not new news)."""
        old = self._live.get(node_id)
        transmits = 0
        if old is not None:
            old.live = False
            if keep_count:
                transmits = old.transmits
        self._seq += 1
        self._push(_Entry(node_id, item, transmits, self._seq))
        while len(self._live) > self.max_items:
            self._evict_one()
        self._maybe_compact()

    def discard(self, node_id: bytes) -> None:
        """Forget any queued item about ``node_id`` (e.g. the member was reaped)."""
        old = self._live.pop(node_id, None)
        if old is not None:
            old.live = False
            self._maybe_compact()

    def take(self, budget: int, n_members: int, overhead: int = 0) -> list[bytes]:
        """Items to piggyback now, least-sent and newest first, within ``budget`` bytes.

        Each item costs ``len(item) + overhead``. Every item returned counts one
        transmission; those reaching the retransmit limit for ``n_members``
        (including ourselves) leave the queue.
        """
        limit = retransmit_limit(self.retransmit_mult, n_members)
        if limit <= 0:
            return []
        out: list[bytes] = []
        sent: list[_Entry] = []
        skipped: list[tuple[int, int, _Entry]] = []
        free = budget
        while self._send and free > overhead and len(skipped) < MAX_SKIPS:
            top = heapq.heappop(self._send)
            entry = top[2]
            if not entry.live:
                continue
            if entry.transmits >= limit:
                # Past a limit that shrank with N: drop it unsent.
                entry.live = False
                del self._live[entry.node_id]
                continue
            cost = len(entry.item) + overhead
            if cost > free:
                skipped.append(top)
                continue
            free -= cost
            out.append(entry.item)
            entry.live = False
            if entry.transmits + 1 >= limit:
                del self._live[entry.node_id]
            else:
                # Re-queued after the loop so one call never sends an item twice.
                sent.append(entry)
        for top in skipped:
            heapq.heappush(self._send, top)
        for entry in sent:
            self._push(_Entry(entry.node_id, entry.item, entry.transmits + 1, entry.seq))
        self._maybe_compact()
        return out

    def _push(self, entry: _Entry) -> None:
        self._live[entry.node_id] = entry
        heapq.heappush(self._send, (entry.transmits, -entry.seq, entry))
        heapq.heappush(self._evict, (-entry.transmits, entry.seq, entry))

    def _evict_one(self) -> None:
        while self._evict:
            entry = heapq.heappop(self._evict)[2]
            if entry.live:
                entry.live = False
                del self._live[entry.node_id]
                self.evicted += 1
                return

    def _maybe_compact(self) -> None:
        # Stale entries (replaced, sent or evicted) stay in the heaps until
        # popped; rebuild when they outnumber the live ones so memory stays
        # O(max_items). Each rebuild is paid for by as many stale pushes.
        live = len(self._live)
        if len(self._send) + len(self._evict) <= 4 * live + 64:
            return
        entries = list(self._live.values())
        self._send = [(e.transmits, -e.seq, e) for e in entries]
        self._evict = [(-e.transmits, e.seq, e) for e in entries]
        heapq.heapify(self._send)
        heapq.heapify(self._evict)
