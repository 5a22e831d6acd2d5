"""What an agent process does not import: the other CLI commands' modules,
the in-process reconciliation driver (tests and benchmarks only), and the
stream leader and follower (agent.runtime.replication) on an agent that is
neither. Each module's code stays resident for the life of the process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.agents import AgentProc, clean_environ, free_port, wait_for

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


#: runs ``hs-gossip run`` and writes the modules it loaded to argv[1] on exit
RUN_AGENT = ("import atexit, sys; out = sys.argv[1]; "
             "atexit.register(lambda: open(out, 'w').write(' '.join(sorted(sys.modules)))); "
             "from agent.face.cli import main; sys.exit(main(['run']))")


def test_an_agent_neither_leading_nor_following_leaves_out_the_stream_roles(
        tmp_path: Path) -> None:
    out = tmp_path / "modules"
    a = AgentProc("plain", "127.0.0.1", free_port(kind=socket.SOCK_DGRAM), tmp_path / "plain", {})
    env = clean_environ()
    env.update({"HS_GOSSIP_BIND": a.host, "HS_GOSSIP_PORT": str(a.gossip_port),
                "HS_GOSSIP_API": f"127.0.0.1:{a.api_port}",
                "HS_GOSSIP_DATA_DIR": str(a.data_dir)})
    with open(a.log_path, "wb") as log:
        a.proc = subprocess.Popen([sys.executable, "-c", RUN_AGENT, str(out)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(a.is_up, timeout=20, what="agent API")
        # what reads the replication view: status and metrics
        assert a.get("/api/cluster/status")["node_id"]
        with urllib.request.urlopen(a.api + "/metrics", timeout=5) as r:
            assert r.status == 200
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(15) == 0, a.log()
    finally:
        a.stop()
    loaded = set(out.read_text().split())
    # every agent answers PROBE and can be promoted: its Replication is there
    assert {"agent.runtime.leadership", "agent.runtime.forwarding"} <= loaded
    assert "agent.runtime.replication" not in loaded
