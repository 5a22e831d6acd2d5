"""Merkle delta sync and store benchmark.

Two SQLite replicas of one collection with ``--n`` items that differ in ``d``
items (half changed on each side) are reconciled in one process through the
same Session and TreeReader code the agent runs over TCP; bytes are counted as
encoded frames. Also measured: write throughput through the async store
(single writes and batches) and the time to build and to verify the index.

    python bench/bench_sync.py                 # n = 1,000,000, d = 10 and 1,000
    python bench/bench_sync.py --n 100000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from agent.core.clock import HLC
from agent.store import Store, encode_value
from agent.store.changes import Kind
from agent.store.store import wall_ms
from agent.store.writer import Writer
from merkle.loopback import run_pair
from merkle.tree import Item

ORIGIN_A, ORIGIN_B = b"A" * 16, b"B" * 16


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path, n: int) -> float:
    """Write n items in batches of 10,000 through the store's one change path."""
    w = Writer(path / "store.sqlite3", HLC(wall_ms), ORIGIN_A, 1 << 20, 300)
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        items = [Item(f"key-{i:08d}", (1_700_000_000_000 + i) << 16, ORIGIN_A, False,
                      encode_value({"i": i, "tag": "sensor"}))
                 for i in range(start, min(n, start + 10_000))]
        w.conn.execute("BEGIN")
        w.change("bench", Kind.WRITE, items)
        w.conn.execute("COMMIT")
    took = time.perf_counter() - t0
    w.conn.close()
    return took


def diverge(w: Writer, keys: list[int], origin: bytes) -> None:
    w.conn.execute("BEGIN")
    w.change("bench", Kind.WRITE, [Item(f"key-{i:08d}", (1_800_000_000_000 + i) << 16, origin,
                                        False, encode_value({"i": i, "changed": True}))
                                   for i in keys])
    w.conn.execute("COMMIT")


def sync_case(base: Path, n: int, d: int, seed: int) -> dict[str, Any]:
    a_dir, b_dir = base / f"a{d}", base / f"b{d}"
    for p in (a_dir, b_dir):
        shutil.copytree(base / "seed", p)
    a = Writer(a_dir / "store.sqlite3", HLC(wall_ms), ORIGIN_A, 1 << 20, 1e9)
    b = Writer(b_dir / "store.sqlite3", HLC(wall_ms), ORIGIN_B, 1 << 20, 1e9)
    changed = random.Random(seed).sample(range(n), d)
    diverge(a, changed[: d // 2], ORIGIN_A)
    diverge(b, changed[d // 2:], ORIGIN_B)

    def applier(w: Writer):  # type: ignore[no-untyped-def]
        def apply(items: list[Item]) -> None:
            w.conn.execute("BEGIN")
            w.apply_remote("bench", items)
            w.conn.execute("COMMIT")
        return apply

    t0 = time.perf_counter()
    stats = run_pair(a.tree("bench"), applier(a), b.tree("bench"), applier(b),
                     collection="bench")
    took = time.perf_counter() - t0
    assert a.infos() == b.infos(), "replicas differ after sync"
    for w in (a, b):
        w.conn.close()
    return {
        "n": n, "d": d, "bytes_total": stats.bytes_total,
        "bytes_a_to_b": stats.bytes_a_to_b, "bytes_b_to_a": stats.bytes_b_to_a,
        "messages": stats.messages, "round_trips": stats.round_trips,
        "items_shipped": stats.items_a_to_b + stats.items_b_to_a,
        "seconds": round(took, 3),
    }


async def throughput(path: Path, singles: int, batch_items: int) -> dict[str, float]:
    s = await Store.open(path, ORIGIN_A)
    t0 = time.perf_counter()
    for i in range(singles):
        await s.put("tp", f"single-{i}", {"i": i})
    single_seq = singles / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(singles):
            tg.start_soon(s.put, "tp", f"conc-{i}", {"i": i})
    single_conc = singles / (time.perf_counter() - t0)
    batched: dict[int, float] = {}
    for size in (1000, 10_000):  # 10,000 is the batch endpoint's maximum
        t0 = time.perf_counter()
        for b in range(batch_items // size):
            await s.put_many("tp", {f"batch{size}-{b}-{i}": {"i": i} for i in range(size)})
        batched[size] = batch_items / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    report = await s.verify("tp")
    verify_s = time.perf_counter() - t0
    await s.close()
    return {"single_sequential_per_s": round(single_seq), "single_concurrent_per_s":
            round(single_conc), "batched_1000_per_s": round(batched[1000]),
            "batched_10000_per_s": round(batched[10_000]),
            "verify_items": report["items"], "verify_seconds": round(verify_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--singles", type=int, default=5000)
    ap.add_argument("--batch-items", type=int, default=100_000,
                    help="items written for each batch size (1,000 and 10,000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="hs-gossip-bench-"))
    try:
        (base / "seed").mkdir()
        build_s = build(base / "seed", args.n)
        results: dict[str, Any] = {
            "index_build": {"n": args.n, "seconds": round(build_s, 2),
                            "items_per_s": round(args.n / build_s)},
            "sync": [sync_case(base, args.n, d, seed=d) for d in args.d],
        }
        (base / "tp").mkdir()
        results["throughput"] = anyio.run(throughput, base / "tp", args.singles, args.batch_items,
                                          backend="trio")
        results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    ib = results["index_build"]
    print(f"index build: {ib['n']:,} items in {ib['seconds']} s ({ib['items_per_s']:,}/s)")
    print(f"{'n':>10} {'d':>6} {'bytes':>10} {'msgs':>5} {'RTT':>5} {'items':>6} {'time s':>7}")
    for r in results["sync"]:
        print(f"{r['n']:>10,} {r['d']:>6,} {r['bytes_total']:>10,} {r['messages']:>5} "
              f"{r['round_trips']:>5} {r['items_shipped']:>6,} {r['seconds']:>7}")
    tp = results["throughput"]
    print(f"writes/s: single sequential {tp['single_sequential_per_s']:,}, single concurrent "
          f"{tp['single_concurrent_per_s']:,}, batches of 1000 {tp['batched_1000_per_s']:,}, "
          f"batches of 10000 {tp['batched_10000_per_s']:,}")
    print(f"verify (rebuild from items): {tp['verify_items']:,} items in {tp['verify_seconds']} s")
    print(f"peak RSS: {results['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
