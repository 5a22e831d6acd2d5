"""The command line's failures are one line on stderr with the documented
exit code, never a traceback: bad arguments (2), a port already taken by
another process (1, naming the variable and the address). And the peers
table's address column is one that answers: the peer's gossip address."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.face.cli import format_peers
from tests.agents import Swarm, free_port, run_cli, wait_for

ARG_ERRORS = [
    ["peers", "--api", "nonsense"],
    ["status", "--api", "127.0.0.1:99999"],
    ["peers", "--api", "http://localhost:port"],
    ["ls", "--api", ":50050"],
    ["ls", "c", "--limit", "many"],
    ["demo", "--interval", "nan"],
    ["no-such-command"],
    ["put", "c", "k", "NaN", "--api", "127.0.0.1:9"],
    ["put", "c", "k", str(2 ** 64), "--api", "127.0.0.1:9"],
    ["put", "c", "k", "not json", "--api", "127.0.0.1:9"],
    ["run", "--port", "seventy"],
]


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("hs-gossip: "), stderr
    return lines[0]


@pytest.mark.parametrize("argv", ARG_ERRORS, ids=[" ".join(a) for a in ARG_ERRORS])
def test_argument_errors_are_one_line_exit_2(argv: list[str], tmp_path: Path) -> None:
    r = run_cli(*argv, env={"HS_GOSSIP_DATA_DIR": str(tmp_path)}, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    _one_line(r.stderr)


def test_bad_api_variable_is_one_line_exit_2() -> None:
    r = run_cli("peers", env={"HS_GOSSIP_API": "nonsense"})
    assert r.returncode == 2, r.stderr
    assert "HS_GOSSIP_API" in _one_line(r.stderr)


def test_unreachable_agent_is_one_line_exit_1() -> None:
    r = run_cli("peers", "--api", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1, r.stderr
    assert "cannot reach" in _one_line(r.stderr)


# --- ports already taken, with real processes ----------------------------------------


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def _hold(held: list[socket.socket], host: str, kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    held.append(s)
    return int(s.getsockname()[1])


def _run_agent(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"HS_GOSSIP_DATA_DIR": str(tmp_path / "data"), "HS_GOSSIP_BIND": "127.0.0.251",
            "HS_GOSSIP_PORT": str(free_port("127.0.0.251", socket.SOCK_DGRAM)),
            "HS_GOSSIP_API": f"127.0.0.1:{free_port()}"}
    return run_cli("run", env={**base, **env}, timeout=60)


def test_udp_port_taken(tmp_path: Path, held: list[socket.socket]) -> None:
    port = _hold(held, "127.0.0.251", socket.SOCK_DGRAM)
    r = _run_agent(tmp_path, {"HS_GOSSIP_PORT": str(port),
                              "HS_GOSSIP_SYNC_PORT": str(free_port("127.0.0.251"))})
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = _one_line(r.stderr)
    assert "HS_GOSSIP_PORT" in line and f"127.0.0.251:{port}" in line, line


def test_tcp_sync_port_taken(tmp_path: Path, held: list[socket.socket]) -> None:
    port = _hold(held, "127.0.0.251", socket.SOCK_STREAM)
    r = _run_agent(tmp_path, {"HS_GOSSIP_SYNC_PORT": str(port)})
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = _one_line(r.stderr)
    assert "HS_GOSSIP_SYNC_PORT" in line and f"127.0.0.251:{port}" in line, line


def test_api_port_taken(tmp_path: Path, held: list[socket.socket]) -> None:
    port = _hold(held, "127.0.0.1", socket.SOCK_STREAM)
    r = _run_agent(tmp_path, {"HS_GOSSIP_API": f"127.0.0.1:{port}",
                              "HS_GOSSIP_SYNC_PORT": str(free_port("127.0.0.251"))})
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = _one_line(r.stderr)
    assert "HS_GOSSIP_API" in line and f"127.0.0.1:{port}" in line, line


# --- the peers table -----------------------------------------------------------------------


def test_peers_table_shows_the_gossip_address() -> None:
    body = {"peer_count": 1, "peers": [{
        "node_id": "0b8f2c1e-0000-0000-0000-000000000000", "name": "gw-7",
        "addr": "10.0.0.5:50050", "gossip_addr": "10.0.0.5:7946", "http_port": 50050,
        "role": "Edge", "logical_clock": 3, "collections": [], "last_seen_secs": 100.0,
        "healthy": True}]}
    header, row, *_ = format_peers(body, 101.0).splitlines()
    assert "GOSSIP ADDR" in header
    assert "10.0.0.5:7946" in row and "50050" not in row


def test_peers_command_lists_addresses_that_answer(swarm: Swarm) -> None:
    a = swarm.add()
    b = swarm.add(seeds=[a])
    wait_for(lambda: b.node_id in a.peers(), what="a to know b")
    r = run_cli("peers", "--api", f"127.0.0.1:{a.api_port}")
    assert r.returncode == 0, r.stderr
    assert b.gossip_addr in r.stdout
    # what the row shows is where b answers (its gossip socket), not b's host
    # with its API port (b's API listens on 127.0.0.1 only)
    assert f"{b.host}:{b.api_port}" not in r.stdout
