"""Cost of the start-up store check (agent.store.check) at 1,000,000 items.

Builds a database of ``--n`` items (small JSON-like values, as in
bench_sync.py) through the store's own write path, closes it, then times the
check the agent runs at every start: header read, ``PRAGMA quick_check``,
schema and meta read. The floor is 2 s at 1,000,000 items; the file size is
printed with it, since the cost grows with the file, not the item count.

    python bench/bench_store_check.py              # n = 1,000,000
    python bench/bench_store_check.py --n 100000 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from agent.core.clock import HLC
from agent.store import DB_FILE
from agent.store.changes import Kind
from agent.store.check import check_at_start
from agent.store.store import wall_ms
from agent.store.values import encode_value
from agent.store.writer import Writer
from merkle.tree import Item

ORIGIN = b"A" * 16
FLOOR_SECONDS = 2.0


def build(data_dir: Path, n: int, chunk: int = 50_000) -> None:
    """n items in one collection, written in transactions of ``chunk`` through
    the one change path (what Store.put_many runs on the store thread)."""
    hlc = HLC(wall_ms)
    w = Writer(data_dir / DB_FILE, hlc, ORIGIN, 1 << 20, 300.0)
    for start in range(0, n, chunk):
        items = [Item(f"sensor-{i:08d}", hlc.now(), ORIGIN, False,
                      encode_value({"t": 20.5, "n": i, "ok": True}))
                 for i in range(start, min(n, start + chunk))]
        w.conn.execute("BEGIN IMMEDIATE")
        w.change("bench", Kind.WRITE, items)
        w.save_clock()
        w.conn.execute("COMMIT")
    w.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    w.conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hs-bench-check-"))
    try:
        t0 = time.perf_counter()
        build(tmp, args.n)
        built = time.perf_counter() - t0
        size = (tmp / DB_FILE).stat().st_size
        times = []
        for _ in range(args.runs):
            res = check_at_start(tmp / DB_FILE, ran_before=True)
            assert res.outcome == "ok", res
            times.append(res.seconds)
        best, worst = min(times), max(times)
        out = {"items": args.n, "file_mib": round(size / 2**20, 1),
               "build_s": round(built, 1), "check": "header + PRAGMA quick_check + schema read",
               "check_s_best": round(best, 3), "check_s_worst": round(worst, 3),
               "floor_s": FLOOR_SECONDS, "within_floor": worst < FLOOR_SECONDS}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{args.n:,} items, {out['file_mib']} MiB file (built in {built:.1f}s)")
            print(f"start-up check ({out['check']}): best {best:.3f}s, worst {worst:.3f}s "
                  f"over {args.runs} runs (floor {FLOOR_SECONDS}s: "
                  f"{'met' if out['within_floor'] else 'NOT met'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
