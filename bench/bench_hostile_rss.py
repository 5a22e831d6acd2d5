"""RSS of one agent under hostile sync clients.

Phase 1: ``--clients`` connections (default 100), each from its own loopback
address, send a valid HELLO and then park all but 16 bytes of a frame of the
largest size (3 MiB at the default HS_GOSSIP_MAX_VALUE). Phase 2: as many
connections (8) send a whole 3 MiB frame of nested empty arrays (before bounded
decoding, ~75x its size in Python objects; now refused once its objects
pass 10x the frame's size + 1 MiB). The agent's VmRSS is sampled every 50 ms;
the floor, for phase 1, is a peak under 80 MiB. Phase 2 is reported beside
it: its peak is phase 1's held buffers plus one decode budget (31 MiB).

Phase 3, on a second, fresh agent: 8 clients at once send a 50 MB body, in
four rounds: to PUT and to the batch endpoint, each announced by
Content-Length and chunked without one. Reported per round: the answers
(each must be a JSON 413 or 503), the slowest answer, the sampled peak VmRSS;
and the agent's VmHWM (peak resident size of its whole life, so nothing short
is missed between samples) after all four. The floor: VmHWM under 80 MiB.

    python bench/bench_hostile_rss.py [--clients 100]

(from the repository root: it starts the agent the way the tests do.)
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package

from tests.agents import AgentProc, Swarm
from tests.test_api_input import _peak_rss_kib, _send_huge
from tests.test_hostile_sync import MAX_FRAME, attack, hello, rss_mib

FLOOR_MIB = 80.0


class Sampler:
    """Peak VmRSS of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def bomb(host: str, port: int, source: str) -> bool:
    """HELLO, then one whole frame of empty arrays as big as allowed. True if
    the agent took the frame (it then refuses it when decoding)."""
    # 1 byte per empty list, in arrays short enough to pass the array limit
    chunk = [[]] * 100_000
    body = msgpack.packb([2, [chunk] * ((MAX_FRAME - 64) // 100_003), [], [], False])
    try:
        with socket.create_connection((host, port), timeout=10,
                                      source_address=(source, 0)) as s:
            s.sendall(hello("safe"))
            s.sendall(len(body).to_bytes(4, "big") + body)
            s.settimeout(20)
            while s.recv(65536):
                pass
        return True
    except OSError:
        return False


BODY_ROUNDS = [("put", "PUT", "/api/collections/huge/items/k"),
               ("batch", "POST", "/api/collections/huge/items")]


def _send_into(answers: list[tuple[int, Any, float]], a: AgentProc, method: str,
               path: str, chunked: bool) -> None:
    try:
        answers.append(_send_huge(a, method, path, chunked))
    except Exception as e:  # a reset or no answer: counted as not ok
        answers.append((0, {"error": repr(e)}, 0.0))


def body_rounds(a: AgentProc, clients: int = 8) -> dict[str, Any]:
    """Phase 3: ``clients`` send 50 MB bodies at once, in four rounds."""
    assert a.proc is not None
    pid = a.proc.pid
    out: dict[str, Any] = {"rss_idle_mib": round(rss_mib(pid), 1),
                           "hwm_idle_mib": round(_peak_rss_kib(pid) / 1024, 1)}
    all_ok = True
    for name, method, path in BODY_ROUNDS:
        for chunked in (False, True):
            answers: list[tuple[int, Any, float]] = []

            sampler = Sampler(pid)
            threads = [threading.Thread(target=_send_into,
                                        args=(answers, a, method, path, chunked))
                       for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = sampler.stop()
            ok = all(st in (413, 503) and isinstance(b, dict) and "error" in b and sec < 10
                     for st, b, sec in answers)
            all_ok = all_ok and ok
            out[f"{name}_{'chunked' if chunked else 'content_length'}"] = {
                "answers": dict(Counter(str(st) for st, _, _ in answers)),
                "slowest_s": round(max(sec for _, _, sec in answers), 2),
                "rss_peak_mib": round(peak, 1),
                "all_413_or_503_quickly": ok,
            }
    hwm = _peak_rss_kib(pid) / 1024
    out["hwm_after_mib"] = round(hwm, 1)
    out["floor_mib"] = FLOOR_MIB
    out["ok"] = all_ok and hwm < FLOOR_MIB
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        swarm = Swarm(Path(tmp))
        try:
            a = swarm.add()
            assert a.proc is not None
            pid = a.proc.pid
            items = {f"k{i}": i for i in range(50)}
            assert a.request("POST", "/api/collections/safe/items", {"items": items})[0] == 200
            time.sleep(1.0)
            idle = rss_mib(pid)

            sampler = Sampler(pid)
            held, refused = attack(a, args.clients)
            time.sleep(2.0)
            parked_now = rss_mib(pid)
            parked_peak = sampler.stop()
            for s in held:
                s.close()

            sampler = Sampler(pid)
            threads = [threading.Thread(target=bomb, args=(a.host, a.gossip_port,
                                                           f"127.0.5.{i + 1}"))
                       for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(1.0)
            bomb_peak = sampler.stop()
            out = {
                "clients": args.clients,
                "rss_idle_mib": round(idle, 1),
                "parked_sessions_held": len(held),
                "parked_refused": len(refused),
                "refused_max_seconds": round(max(refused, default=0.0), 3),
                "rss_parked_mib": round(parked_now, 1),
                "rss_parked_peak_mib": round(parked_peak, 1),
                "rss_decode_bomb_peak_mib": round(bomb_peak, 1),
                "floor_mib": FLOOR_MIB,
                "ok": parked_peak < FLOOR_MIB,
            }
            b = swarm.add()
            out["bodies_50mb_x8"] = body_rounds(b)
            print(json.dumps(out, indent=2))
        finally:
            swarm.stop_all()


if __name__ == "__main__":
    main()
