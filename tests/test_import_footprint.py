"""What an agent process does not import: the other CLI commands' modules
and the in-process reconciliation driver (tests and benchmarks only). Each
module's code stays resident for the life of the process."""

from __future__ import annotations

import subprocess
import sys

#: the modules ``hs-gossip run`` loads, then its command line parsed
RUN_PATH = ("import sys, agent.face.cli, agent.runtime.agent, agent.face.api, agent.store, "
            "agent.runtime.sync_service, agent.face.collections_api, agent.face.metrics; "
            "a = agent.face.cli.build_parser(['run']).parse_args(['run']); "
            "assert a.handler is agent.face.cli.cmd_run; "
            "print(' '.join(sorted(sys.modules)))")

NOT_NEEDED = ("agent.face.cli_data", "agent.face.cli_ops", "agent.face.unit_files",
              "merkle.loopback")


def test_the_run_path_leaves_out_what_it_does_not_need() -> None:
    loaded = set(subprocess.run([sys.executable, "-c", RUN_PATH], capture_output=True,
                                text=True, check=True).stdout.split())
    assert "agent.face.cli" in loaded and "merkle.reconcile" in loaded
    assert not loaded & set(NOT_NEEDED), sorted(loaded & set(NOT_NEEDED))
