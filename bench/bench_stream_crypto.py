"""Sync stream security benchmark: what a cluster key costs a TCP sync.

* ``handshake``: the three-message handshake (agent.net.handshake), both
  sides in one process, no network: milliseconds per handshake.
* ``aead``: sealing and opening frames (ChaCha20-Poly1305 with counter
  nonces) of several sizes: MB/s of frame bodies.
* ``sync``: Merkle sync of two SQLite replicas of ``--n`` items that differ
  in ``--d`` items, over real loopback TCP through the agent's own
  listener and ``sync_once``, once keyless and once with a key (the two
  directions each run the whole session: replicas are rebuilt between runs).

    python bench/bench_stream_crypto.py --n 20000 --d 1000
    python bench/bench_stream_crypto.py                  # n = 1,000,000, d = 1,000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from bench_sync import ORIGIN_A, ORIGIN_B, build, diverge

from agent.core.clock import HLC
from agent.net import handshake
from agent.net.handshake import Initiator, Responder, StreamKeys
from agent.net.stream import listen
from agent.runtime.sync_service import FRAME_OVERHEAD, handle_connection, sync_once
from agent.store import Store
from agent.store.store import wall_ms
from agent.store.writer import Writer
from merkle.frames import SALT_LEN


def bench_handshake(rounds: int) -> dict[str, float]:
    keys = StreamKeys.from_keys([os.urandom(32)], "bench")
    t0 = time.perf_counter()
    for _ in range(rounds):
        ini, resp = Initiator(keys), Responder(keys)
        m3, _ = ini.finish(resp.answer(ini.start()))
        resp.finish(m3)
    return {"rounds": rounds, "ms_per_handshake": round((time.perf_counter() - t0)
                                                        / rounds * 1000, 3)}


def bench_aead(total_mb: int) -> dict[str, float]:
    keys = StreamKeys.from_keys([os.urandom(32)], "bench")
    ini, resp = Initiator(keys), Responder(keys)
    m3, s_i = ini.finish(resp.answer(ini.start()))
    s_r = resp.finish(m3)
    out: dict[str, float] = {}
    for size in (1024, 64 * 1024, 1 << 20):
        body = os.urandom(size)
        n = max(1, total_mb * (1 << 20) // size)
        t0 = time.perf_counter()
        for _ in range(n):
            s_r.recv.open(s_i.send.seal(body))
        out[f"seal_open_{size}B_MBps"] = round(n * size / (time.perf_counter() - t0) / 1e6, 1)
    return out


async def _sync_over_tcp(a_dir: Path, b_dir: Path, keys: StreamKeys | None) -> dict[str, Any]:
    a = await Store.open(a_dir, ORIGIN_A, 1 << 20, 1e9)
    b = await Store.open(b_dir, ORIGIN_B, 1 << 20, 1e9)
    max_frame = 2 * (1 << 20) + FRAME_OVERHEAD
    refused: list[str] = []
    listener = await listen("127.0.0.1", 0, max_frame, lambda: keys,
                            lambda cause, peer: refused.append(cause))
    port = listener.listener.extra(anyio.abc.SocketAttribute.local_port)
    stats: dict[str, int] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, partial(handle_connection, b, stats=stats))
            t0 = time.perf_counter()
            r = await sync_once(a, "127.0.0.1", port, "bench", max_frame,
                                salt=random.Random(1).randbytes(SALT_LEN), keys=keys)
            took = time.perf_counter() - t0
            tg.cancel_scope.cancel()
        da = {c.name: c.state_hash for c in a.digests()}
        db = {c.name: c.state_hash for c in b.digests()}
        assert da == db, "replicas differ after sync"
        assert not refused, refused
        return {"seconds": round(took, 3), "items_in": r.items_in, "items_out": r.items_out,
                "bytes": r.bytes_in + r.bytes_out}
    finally:
        await a.close()
        await b.close()


def bench_sync(base: Path, n: int, d: int) -> dict[str, Any]:
    (base / "seed").mkdir()
    build(base / "seed", n)
    changed = random.Random(7).sample(range(n), d)
    out: dict[str, Any] = {"n": n, "d": d}
    for label, keys in (("keyless", None),
                        ("keyed", StreamKeys.from_keys([os.urandom(32)], "bench"))):
        a_dir, b_dir = base / f"a-{label}", base / f"b-{label}"
        for p in (a_dir, b_dir):
            shutil.copytree(base / "seed", p)
        wa = Writer(a_dir / "store.sqlite3", HLC(wall_ms), ORIGIN_A, 1 << 20, 1e9)
        wb = Writer(b_dir / "store.sqlite3", HLC(wall_ms), ORIGIN_B, 1 << 20, 1e9)
        diverge(wa, changed[: d // 2], ORIGIN_A)
        diverge(wb, changed[d // 2:], ORIGIN_B)
        wa.conn.close()
        wb.conn.close()
        out[label] = anyio.run(_sync_over_tcp, a_dir, b_dir, keys, backend="trio")
    out["keyed_slower_pct"] = round(
        (out["keyed"]["seconds"] / max(out["keyless"]["seconds"], 1e-9) - 1) * 100, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1000)
    ap.add_argument("--handshakes", type=int, default=500)
    ap.add_argument("--aead-mb", type=int, default=64, help="MB sealed and opened per size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="hs-gossip-bench-crypto-"))
    try:
        results = {"handshake": bench_handshake(args.handshakes),
                   "aead": bench_aead(args.aead_mb),
                   "frame_overhead_bytes": handshake.TAG_LEN,
                   "sync_tcp": bench_sync(base, args.n, args.d)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for section, values in results.items():
        print(f"{section}: {values}")


if __name__ == "__main__":
    main()
