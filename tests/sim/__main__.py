"""``python -m tests.sim --agents 1000 --seed 7 --scenario join``: one JSON line.

Exits 1 when an invariant or floor does not hold, after printing the violations and the
command that replays the run (same seed, same options) on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys

from .scenarios import SCENARIOS, Options, run_scenario


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="join")
    ap.add_argument("--loss", type=float, default=None,
                    help="loss on every link, 0..1 (the loss scenario defaults to 0.2)")
    ap.add_argument("--duration", type=float, default=None,
                    help="partition length / lossy phase in simulated seconds")
    ap.add_argument("--join-spread", type=float, default=5.0,
                    help="non-seed agents start over this many seconds after t=1 s")
    ap.add_argument("--skew", type=float, default=1e-3, help="clock rates within 1 +- skew")
    ap.add_argument("--delay", type=float, default=0.001, help="base one-way delay, s")
    ap.add_argument("--jitter", type=float, default=0.002, help="extra delay, uniform, s")
    ap.add_argument("--dup", type=float, default=0.0, help="duplication probability")
    ap.add_argument("--window", type=float, default=30.0, help="idle byte window, s")
    ap.add_argument("--profile", action="store_true", help="cProfile top 25 on stderr")
    a = ap.parse_args(argv)
    opts = Options(agents=a.agents, seed=a.seed, scenario=a.scenario, loss=a.loss,
                   duration=a.duration, join_spread=a.join_spread, skew=a.skew,
                   delay=a.delay, jitter=a.jitter, dup=a.dup, window=a.window)
    if a.profile:
        prof = cProfile.Profile()
        result = prof.runcall(run_scenario, opts)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    else:
        result = run_scenario(opts)
    print(json.dumps(result), flush=True)
    if not result["ok"]:
        for v in result["violations"]:
            print(f"invariant failed: {v}", file=sys.stderr)
        print(f"seed {opts.seed} replays it: {opts.replay()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
