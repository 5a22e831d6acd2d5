"""Datagrams per second one agent can seal, and open and verify, on this machine.

Seals a typical gossip heartbeat (``--size`` bytes of plaintext, default
1,000; the largest is 1,351) with :class:`agent.net.seal.Sealed` and opens
every one on a second seal: tag check, replay window and AEAD cache included,
the exact per-datagram path of the receive loop. ``--senders`` spreads the
datagrams over that many senders (each with its own key and window); the
keyless :class:`Cleartext` seal is measured for comparison.

    python bench/bench_seal.py [--n 50000] [--size 1000] [--senders 50]

Prints one line per figure and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.net import keyring
from agent.net.seal import Cleartext, Kind, Sealed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="datagrams (default 50,000)")
    p.add_argument("--size", type=int, default=1000, help="plaintext bytes (default 1000)")
    p.add_argument("--senders", type=int, default=50, help="distinct senders (default 50)")
    args = p.parse_args()

    ring = keyring.build([os.urandom(32)], "bench")
    plaintext = b"\x01\x01" + os.urandom(args.size - 2)
    senders = [Sealed(ring, uuid.uuid4().bytes, 1000 + i, "bench")
               for i in range(args.senders)]
    receiver = Sealed(ring, uuid.uuid4().bytes, 1, "bench")

    t0 = time.perf_counter()
    wire = [senders[i % len(senders)].seal(plaintext, Kind.GOSSIP) for i in range(args.n)]
    seal_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    opened = sum(1 for d in wire if receiver.open(d, Kind.GOSSIP) is not None)
    open_s = time.perf_counter() - t0
    assert opened == args.n, (opened, dict(receiver.refused))

    t0 = time.perf_counter()
    refused = sum(1 for d in wire if receiver.open(d, Kind.GOSSIP) is None)  # all replays
    replay_s = time.perf_counter() - t0
    assert refused == args.n

    forged = [d[:-1] + bytes([d[-1] ^ 1]) for d in wire[: args.n // 5]]
    fresh = Sealed(ring, uuid.uuid4().bytes, 1, "bench")
    t0 = time.perf_counter()
    for d in forged:
        fresh.open(d, Kind.GOSSIP)
    forged_s = time.perf_counter() - t0

    clear = Cleartext()
    t0 = time.perf_counter()
    for _ in range(args.n):
        clear.open(clear.seal(plaintext, Kind.GOSSIP), Kind.GOSSIP)
    clear_s = time.perf_counter() - t0

    out = {
        "size": args.size, "senders": args.senders, "n": args.n,
        "seal_per_s": round(args.n / seal_s),
        "open_verify_per_s": round(args.n / open_s),
        "replay_refused_per_s": round(args.n / replay_s),
        "bad_tag_refused_per_s": round(len(forged) / forged_s),
        "cleartext_round_trip_per_s": round(args.n / clear_s),
    }
    print(f"plaintext {args.size} B, {args.senders} senders, {args.n} datagrams")
    print(f"seal:                {out['seal_per_s']:>10,} datagrams/s")
    print(f"open + verify:       {out['open_verify_per_s']:>10,} datagrams/s")
    print(f"replay refused:      {out['replay_refused_per_s']:>10,} datagrams/s")
    print(f"bad tag refused:     {out['bad_tag_refused_per_s']:>10,} datagrams/s "
          "(sender not cached: key derived per datagram)")
    print(f"cleartext (no key):  {out['cleartext_round_trip_per_s']:>10,} round trips/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
