"""Change-log streaming figures on loopback.

    python bench/bench_stream.py            # everything (catch-up of 1,000,000 entries)
    python bench/bench_stream.py --quick    # smaller runs, for a smoke test

What it measures:

1. **throughput**: a leader (this process: its store, its sync listener, the
   Leader of agent.runtime.replication) commits N entries in batches of
   10,000 while 3 followers (each its own process: store + Follower) stream
   them; entries per second from the first commit until the slowest
   follower committed the last one (floor: 20,000/s to each follower), and
   each process's CPU per entry.
2. **lag**: the leader commits 1,000 single-item writes per second for a few
   seconds; for each entry, the time from the leader's commit returning to a
   follower's transaction holding it committed (both read from
   CLOCK_MONOTONIC, shared by the processes), p50 and p99 over the 3
   followers (floor: p99 under 10 ms), and each process's CPU per write.
3. **catch-up**: a leader holding N entries (1,000,000 by default) and a
   fresh follower: seconds until it has applied the head.
4. **snapshot**: the leader of step 3 compacts its log to its last 1,000
   entries and a fresh follower starts: it gets a snapshot of every item,
   then the log; items per second until it holds the head, and the leader's
   database size over that time.
5. **failover** (when the ``etcd`` binary is installed): two candidate
   agents (``hs-gossip run``, HS_GOSSIP_ROLE=candidate) with a lease TTL of
   2 s; the leader is killed (SIGKILL) and the time until the other reports
   ``Leader`` is measured, several times (floor: under TTL + 1 s).

Steps 1 and 2 run ``--trials`` times (3 by default), each time with a fresh
leader and fresh followers; the median trial is the figure and every trial's
figure is printed with it. A machine shared with others is slower now and
then for seconds at a time, and one run can land in such a spell.

Followers are this same file run with ``_follower``: they report one line
per applied batch (``last_seq count monotonic_ns``, the time taken when the
batch committed), sent every 50 ms; every figure above is timed by those
commit times, not by when the leader reads the lines.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import HostPort  # noqa: E402
from agent.core.changelog import Retention  # noqa: E402
from agent.core.replication import TAG  # noqa: E402
from agent.runtime.replication import Follower, Leader  # noqa: E402
from agent.runtime.supervision import freeze_startup  # noqa: E402
from agent.runtime.sync_service import SyncService  # noqa: E402
from agent.store import Store  # noqa: E402

MAX_VALUE = 1 << 20
#: seconds between a follower's reports of what it committed
FLUSH = 0.05
COLL = "bench"


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (``pid`` None) or of a
    child process (Linux /proc; 0.0 where it cannot be read)."""
    if pid is None:
        t = os.times()
        return t[0] + t[1]
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a follower process --------------------------------------------------------------


async def follower_main(port: int, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(data_dir, uuid.uuid4().bytes, MAX_VALUE)
    sync = SyncService(store, "127.0.0.1", 0, 1.0, 4, MAX_VALUE, rng=random.Random(2))
    f = Follower(store, HostPort("127.0.0.1", port), uuid.uuid4().bytes, 1.0, sync.max_frame,
                 lambda: None, random.Random(3))
    freeze_startup()  # as an agent does once it has started
    apply = store.apply_stream
    # Each batch's commit time is taken when it commits; the lines go out
    # every FLUSH seconds, so that reporting them costs neither this process
    # nor the leader's (which reads them) a wake-up per commit.
    lines: list[str] = []

    async def timed(entries: Any, last_hash: Any = None, hashed: bool = False) -> Any:
        out = await apply(entries, last_hash, hashed)
        if entries:
            lines.append(f"{entries[-1].seq} {len(entries)} {time.monotonic_ns()}")
        return out

    async def flush() -> None:
        while True:
            await anyio.sleep(FLUSH)
            if lines:
                print("\n".join(lines), flush=True)
                lines.clear()

    store.apply_stream = timed  # type: ignore[method-assign]
    finish = getattr(store, "finish_snapshot", None)
    if finish is not None:
        async def installed(p: Any, leader: str) -> None:
            await finish(p, leader)
            lines.append(f"{p.at.seq} 0 {time.monotonic_ns()}")  # a snapshot installed

        store.finish_snapshot = installed  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(flush)
        await f.run()


# --- the leader (this process) ---------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.procs: list[anyio.abc.Process] = []
        self.leader_stats: dict[str, int] = {}
        #: per follower: (last seq, monotonic ns) of each batch it committed,
        #: in order (an entry's commit time is its batch's: :meth:`committed_at`)
        self.applied: list[tuple[list[int], list[int]]] = []
        self.heads: list[int] = []
        #: (seq, monotonic ns) of every snapshot a follower installed
        self.snapshots: list[tuple[int, int]] = []

    async def leader(self, tg: Any, name: str) -> Store:
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        store = await Store.open(self.tmp / name, uuid.uuid4().bytes, MAX_VALUE)
        sync = SyncService(store, "127.0.0.1", self.port, 1.0, 4, MAX_VALUE,
                           rng=random.Random(1))
        leader = Leader(store, uuid.uuid4().bytes, 1.0)
        self.leader_stats = leader.stats
        sync.streams[TAG] = leader.serve
        await tg.start(sync.serve)
        freeze_startup()  # as an agent does once it has started
        return store

    async def follower(self, tg: Any, name: str) -> int:
        i = len(self.applied)
        self.applied.append(([], []))
        self.heads.append(0)
        proc = await anyio.open_process(
            [sys.executable, __file__, "_follower", str(self.port), str(self.tmp / name)],
            stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        tg.start_soon(self._read, proc, i)
        return i

    async def _read(self, proc: anyio.abc.Process, i: int) -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                seq, n, t = map(int, line.split())
                if n == 0:
                    self.snapshots.append((seq, t))
                self.applied[i][0].append(seq)
                self.applied[i][1].append(t)
                self.heads[i] = seq

    def committed_at(self, i: int, seq: int) -> int:
        """When follower ``i`` committed the batch holding entry ``seq``."""
        seqs, times = self.applied[i]
        return times[bisect.bisect_left(seqs, seq)]

    async def until(self, followers: list[int], seq: int, timeout: float = 600) -> float:
        """Wait until every follower committed ``seq``; returns when the last
        of them did, as they timed it (time.monotonic, shared)."""
        with anyio.fail_after(timeout):
            while min(self.heads[i] for i in followers) < seq:
                await anyio.sleep(0.01)
        return max(self.committed_at(i, seq) for i in followers) / 1e9

    def cpu(self) -> list[float]:
        """CPU seconds so far: the leader's process (this one), then each follower's."""
        return [cpu_seconds(), *(cpu_seconds(p.pid) for p in self.procs)]

    async def stop(self) -> None:
        for p in self.procs:
            p.kill()
            await p.wait()
        self.procs.clear()


async def fill(store: Store, n: int, start: int = 0, batch: int = 10_000) -> None:
    for base in range(start, start + n, batch):
        await store.put_many(COLL, {f"k{i:08d}": {"i": i, "pad": "x" * 20}
                                    for i in range(base, min(start + n, base + batch))})


async def stream_trial(tmp: Path, n: int, lag_seconds: float) -> dict[str, Any]:
    """Steps 1 and 2 on a fresh leader and 3 fresh followers."""
    out: dict[str, Any] = {}
    b = Bench(tmp)
    async with anyio.create_task_group() as tg:
        store = await b.leader(tg, "leader")
        fs = [await b.follower(tg, f"f{i}") for i in range(3)]
        await store.put(COLL, "hello", 0)
        await b.until(fs, store.log_head.seq, timeout=30)

        # 1. throughput
        cpu0 = b.cpu()
        t0 = time.monotonic()
        await fill(store, n)
        t_written = time.monotonic()
        t_done = await b.until(fs, store.log_head.seq)
        out["throughput"] = {
            "entries": n, "followers": 3,
            "leader_commit_s": round(t_written - t0, 3),
            "all_followers_s": round(t_done - t0, 3),
            "per_follower_per_s": round(n / (t_done - t0)),
            "total_per_s": round(3 * n / (t_done - t0)),
            # CPU per entry: the leader's process (its own commits and the
            # three streams), then each follower's
            "cpu_us_per_entry": [round((c1 - c0) / n * 1e6, 1)
                                 for c0, c1 in zip(cpu0, b.cpu(), strict=True)],
        }
        print("throughput", json.dumps(out["throughput"]), flush=True)

        # 2. lag at 1,000 writes/s
        committed: dict[int, int] = {}
        drops = b.leader_stats.get("follower_streams_failed", 0)
        period = 0.001
        count = int(lag_seconds / period)
        first = store.log_head.seq + 1
        cpu0 = b.cpu()
        nxt = time.monotonic()
        for i in range(count):
            nxt += period
            await store.put(COLL, f"lag{i % 1000}", i)
            committed[store.log_head.seq] = time.monotonic_ns()
            delay = nxt - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
        rate = count / (time.monotonic() - (nxt - count * period))
        await b.until(fs, store.log_head.seq, timeout=60)
        cpu1 = b.cpu()
        lags = [(b.committed_at(i, s) - t) / 1e6 for i in fs for s, t in committed.items()
                if s >= first]
        lags.sort()
        out["lag"] = {
            "writes": count, "rate_per_s": round(rate), "samples": len(lags),
            "p50_ms": round(lags[len(lags) // 2], 3),
            "p99_ms": round(lags[int(len(lags) * 0.99)], 3),
            "max_ms": round(lags[-1], 3),
            # streams that broke and reconnected meanwhile (each costs a backoff)
            "stream_drops": b.leader_stats.get("follower_streams_failed", 0) - drops,
            # the leader's process (with the writing client), then each follower's
            "cpu_us_per_write": [round((c1 - c0) / count * 1e6)
                                 for c0, c1 in zip(cpu0, cpu1, strict=True)],
        }
        print("lag", json.dumps(out["lag"]), flush=True)
        await b.stop()
        tg.cancel_scope.cancel()
    await store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def median_trial(trials: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The trial whose ``key`` is the median (the lower of the two middle
    ones for an even count), with every trial's figure beside it."""
    ranked = sorted(trials, key=lambda t: t[key])
    return {**ranked[(len(ranked) - 1) // 2], "trials": [t[key] for t in trials]}


async def bench_stream(n: int, lag_seconds: float, catchup: int,
                       trials: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        # Steps 1 and 2 several times over, each on fresh stores: a machine
        # shared with others is slower now and then, for seconds at a time,
        # and the median trial is the figure (every trial is printed).
        runs = [await stream_trial(Path(tmp) / f"trial{t}", n, lag_seconds)
                for t in range(trials)]
        out["throughput"] = median_trial([r["throughput"] for r in runs],
                                         "per_follower_per_s")
        out["lag"] = median_trial([r["lag"] for r in runs], "p99_ms")

        # 3. catch-up of a fresh follower
        b = Bench(Path(tmp))
        async with anyio.create_task_group() as tg:
            store = await b.leader(tg, "leader2")
            t0 = time.monotonic()
            await fill(store, catchup)
            fill_s = time.monotonic() - t0
            head = store.log_head.seq
            t0 = time.monotonic()
            f = await b.follower(tg, "fresh")
            t_done = await b.until([f], head, timeout=3600)
            out["catchup"] = {
                "entries": head, "leader_fill_s": round(fill_s, 1),
                "seconds": round(t_done - t0, 2),
                "per_s": round(head / (t_done - t0)),
            }
            print("catchup", json.dumps(out["catchup"]), flush=True)
            await b.stop()

            # 4. snapshot: the log compacted below a fresh follower's position
            if snapshot_available():
                await store.compact_log(Retention(1000, None))
                size = sum(f.stat().st_size for f in (b.tmp / "leader2").iterdir()
                           if f.name.startswith("store.sqlite3"))
                t0 = time.monotonic()
                f = await b.follower(tg, "snap")
                t_done = await b.until([f], head, timeout=3600)
                got = b.snapshots[-1][0] if b.snapshots else None
                out["snapshot"] = {
                    "items": catchup, "snapshot_at_seq": got, "seconds": round(t_done - t0, 2),
                    "items_per_s": round(catchup / (t_done - t0)),
                    "leader_db_mb_per_s": round(size / (t_done - t0) / 1e6, 1),
                }
                print("snapshot", json.dumps(out["snapshot"]), flush=True)
                await b.stop()
            tg.cancel_scope.cancel()
    return out


# --- snapshot -------------------------------------------------------------------------


def snapshot_available() -> bool:
    return hasattr(Store, "finish_snapshot")


# --- failover through etcd -------------------------------------------------------------


def _status(api_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/cluster/status",
                                timeout=1) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _role(api_port: int) -> str:
    try:
        return str(_status(api_port)["role"])
    except (OSError, ValueError):
        return "down"


def _wait(cond: Any, timeout: float, what: str, interval: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


def bench_failover(rounds: int, ttl: int) -> dict[str, Any] | None:
    etcd = shutil.which("etcd")
    exe = shutil.which("hs-gossip") or str(Path(sys.executable).parent / "hs-gossip")
    if etcd is None:
        print("failover: skipped (etcd is not installed; Debian package etcd-server)")
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    etcd_proc = subprocess.Popen(
        [etcd, "--name", "b", "--data-dir", str(tmp / "etcd"), "--listen-client-urls", client,
         "--advertise-client-urls", client, "--listen-peer-urls", peer,
         "--initial-advertise-peer-urls", peer, "--initial-cluster", f"b={peer}",
         "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    base = {k: v for k, v in os.environ.items() if not k.startswith("HS_GOSSIP_")}

    def start(i: int, api: int, gossip: int) -> None:
        env = {**base, "HS_GOSSIP_ROLE": "candidate", "HS_GOSSIP_ETCD": client,
               "HS_GOSSIP_ETCD_TTL": str(ttl), "HS_GOSSIP_CLUSTER": "bench",
               "HS_GOSSIP_BIND": f"127.0.0.{60 + i}", "HS_GOSSIP_PORT": str(gossip),
               "HS_GOSSIP_API": f"127.0.0.1:{api}", "HS_GOSSIP_INTERVAL": "0.2",
               "HS_GOSSIP_DATA_DIR": str(tmp / f"c{i}"), "HS_GOSSIP_LOG_LEVEL": "warning"}
        procs[i] = subprocess.Popen([exe, "run"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)

    times: list[float] = []
    try:
        _wait(lambda: _etcd_ok(client), 20, "etcd")
        gossip = free_port()
        apis = [free_port(), free_port()]
        for i in (0, 1):
            start(i, apis[i], gossip)
        for _ in range(rounds):
            _wait(lambda: sorted(_role(a) for a in apis) == ["Follower", "Leader"], 30,
                  "one leader, one follower")
            lead = next(i for i in (0, 1) if _role(apis[i]) == "Leader")
            other = 1 - lead
            procs[lead].send_signal(signal.SIGKILL)
            procs[lead].wait()
            killed = time.monotonic()
            took = _wait(lambda o=other: _role(apis[o]) == "Leader", 30,  # type: ignore[misc]
                         "a new leader")
            times.append(took - killed)
            print(f"failover: new leader after {took - killed:.3f}s", flush=True)
            start(lead, apis[lead], gossip)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        etcd_proc.terminate()
        etcd_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ttl_s": ttl, "rounds": rounds, "min_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "floor_s": ttl + 1}


def _etcd_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_follower":
        anyio.run(follower_main, int(sys.argv[2]), Path(sys.argv[3]), backend="trio")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small runs (a smoke test)")
    ap.add_argument("--entries", type=int, help="entries streamed to 3 followers")
    ap.add_argument("--catchup", type=int, help="entries a fresh follower catches up")
    ap.add_argument("--lag-seconds", type=float, help="seconds of 1,000 writes/s")
    ap.add_argument("--trials", type=int, help="runs of steps 1 and 2 (the median is the "
                    "figure; default 3, 1 with --quick)")
    ap.add_argument("--failover-rounds", type=int, default=5)
    ap.add_argument("--ttl", type=int, default=2, help="etcd lease TTL of the candidates")
    args = ap.parse_args()
    n = args.entries or (20_000 if args.quick else 200_000)
    catchup = args.catchup or (50_000 if args.quick else 1_000_000)
    lag_s = args.lag_seconds or (2.0 if args.quick else 10.0)
    load_before = os.getloadavg()[0]
    trials = args.trials or (1 if args.quick else 3)
    results = anyio.run(bench_stream, n, lag_s, catchup, trials, backend="trio")
    if not snapshot_available():
        print("snapshot: no snapshot path in this tree; not measured")
    results["failover"] = bench_failover(2 if args.quick else args.failover_rounds, args.ttl)
    # Figures on a busy machine are not the agent's: say how busy it was.
    results["load_average"] = {"before": round(load_before, 1),
                               "after": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
