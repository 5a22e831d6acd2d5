"""``hs-gossip members`` / ``GET /api/swarm/members`` (every member, this
agent included, with its status), ``hs-gossip join`` / ``POST
/api/swarm/join`` (run-time join, strict bodies, behind the API token), and
the warning of an agent that reached no seed, with real agent processes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.face.cli_members import format_members
from agent.runtime.joining import SEED_WARN_AFTER
from tests.agents import AgentProc, Swarm, free_port, run_cli, wait_for

TOKEN = "members-token-0123456789abcdef"


def call(a: AgentProc, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(a.api + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def members(a: AgentProc, query: str = "", token: str | None = None) -> list[dict[str, Any]]:
    status, body = call(a, "GET", "/api/swarm/members" + query, token=token)
    assert status == 200, (status, body)
    rows: list[dict[str, Any]] = body["members"]
    return rows


def cli(a: AgentProc, *args: str, token: str | None = None) -> Any:
    env = {"HS_GOSSIP_API_TOKEN": token} if token else {}
    return run_cli(*args, "--api", f"127.0.0.1:{a.api_port}", env=env)


def test_members_lists_itself_and_peers_with_statuses_and_filters(tmp_path: Path) -> None:
    # The default TTL (30 s). A killed member's suspicion lasts 2-12 s here
    # (no other member corroborates it), cut to end one probe interval
    # before TTL after it was last alive; it is reaped at TTL. With a short
    # TTL (6 s, 12 s) the dead window could be a fraction of a second, less
    # than the CLI, a process of its own, takes to start.
    sw = Swarm(tmp_path, interval=0.2)
    try:
        a0 = sw.add()
        a1 = sw.add(seeds=[a0])
        a2 = sw.add(seeds=[a0])
        wait_for(lambda: [r["status"] for r in members(a0)] == ["alive"] * 3,
                 what="a0 lists 3 alive members")
        rows = members(a0)
        me = rows[0]
        assert me["self"] is True and me["name"] == "agent0" and me["node_id"] == a0.node_id
        assert me["addr"] == a0.gossip_addr and me["http_addr"].endswith(f":{a0.api_port}")
        assert [r["self"] for r in rows[1:]] == [False, False]
        assert {r["node_id"] for r in rows[1:]} == {a1.node_id, a2.node_id}
        for r in rows:
            assert set(r) == {"node_id", "name", "status", "addr", "http_addr", "incarnation",
                              "role", "age_secs", "self"}
            assert r["role"] == "Edge" and r["incarnation"] >= 1 and r["age_secs"] >= 0
        peer = next(r for r in rows if r["node_id"] == a1.node_id)
        assert peer["addr"] == a1.gossip_addr
        # every agent lists itself first
        assert members(a1)[0]["node_id"] == a1.node_id and members(a1)[0]["self"] is True

        # a clean stop is "left" at once
        assert a1.terminate() == 0
        wait_for(lambda: [r["node_id"] for r in members(a0, "?status=left")] == [a1.node_id],
                 what="a1 listed as left")
        assert [r["node_id"] for r in members(a0, "?status=alive")] == [a0.node_id, a2.node_id]
        assert len(members(a0, "?status=alive,left")) == 3
        assert len(members(a0, "?status=alive&status=left")) == 3
        assert members(a0, "?status=dead,suspect") == []
        for query in ("?status=gone", "?state=alive"):
            status, body = call(a0, "GET", "/api/swarm/members" + query)
            assert status == 400 and "status" in body["error"], (query, body)

        # the CLI: a serf-like table, the API's JSON, the same filter
        out = cli(a0, "members")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["NAME", "ADDRESS", "STATUS", "INCARNATION", "ROLE", "AGE"]
        assert lines[1].split()[:3] == ["agent0", a0.gossip_addr, "alive"]
        assert len(lines) == 4
        assert sorted(ln.split()[2] for ln in lines[2:]) == ["alive", "left"]
        # columns are aligned: STATUS starts at the same offset on every line
        col = lines[0].index("STATUS")
        assert sorted(ln[col:].split()[0] for ln in lines) == ["STATUS", "alive", "alive", "left"]
        out = cli(a0, "members", "--status", "left", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert [(r["node_id"], r["status"], r["self"]) for r in doc["members"]] == [
            (a1.node_id, "left", False)]

        # a killed agent is suspect, then dead (after the TTL)
        a2.kill()
        wait_for(lambda: [r["node_id"] for r in members(a0, "?status=suspect")] == [a2.node_id],
                 what="a2 listed as suspect")
        wait_for(lambda: [r["node_id"] for r in members(a0, "?status=dead")] == [a2.node_id],
                 timeout=30, what="a2 listed as dead")
        assert [r["node_id"] for r in members(a0, "?status=alive")] == [a0.node_id]
        out = cli(a0, "members", "--status", "dead,alive", "--json")
        assert out.returncode == 0, out.stderr
        assert [(r["node_id"], r["status"]) for r in json.loads(out.stdout)["members"]] == [
            (a0.node_id, "alive"), (a2.node_id, "dead")]
    finally:
        sw.stop_all()


def test_format_members_aligns_columns() -> None:
    rows = [{"name": "gw-1", "addr": "10.0.0.1:7946", "status": "alive", "incarnation": 3,
             "role": "Edge", "age_secs": 4.2, "self": True},
            {"name": "", "addr": "", "status": "left", "incarnation": 12, "role": "Edge",
             "age_secs": 7300.0, "self": False}]
    assert format_members(rows).splitlines() == [
        "NAME  ADDRESS        STATUS  INCARNATION  ROLE  AGE",
        "gw-1  10.0.0.1:7946  alive   3            Edge  4s",
        "-     -              left    12           Edge  2h",
    ]


def test_join_at_run_time_merges_two_agents_started_without_seeds(tmp_path: Path) -> None:
    sw = Swarm(tmp_path, interval=0.2, HS_GOSSIP_API_TOKEN=TOKEN)
    try:
        a0, a1 = sw.add(), sw.add()
        # alone, and not for lack of time: neither has anyone to ask
        time.sleep(1.0)
        ids = {}
        for a in (a0, a1):
            rows = members(a, token=TOKEN)
            assert [r["self"] for r in rows] == [True]
            ids[a.name] = rows[0]["node_id"]
        # behind the API token like every route but /healthz
        status, _ = call(a0, "POST", "/api/swarm/join", {"addrs": [a1.gossip_addr]})
        assert status == 401
        assert call(a0, "GET", "/api/swarm/members")[0] == 401
        out = cli(a0, "join", a1.gossip_addr)
        assert out.returncode == 1 and "unauthorized" in out.stderr, out

        out = cli(a0, "join", a1.gossip_addr, token=TOKEN)
        assert out.returncode == 0, out.stderr
        assert a1.gossip_addr in out.stdout
        for a, other in ((a0, a1), (a1, a0)):
            wait_for(lambda a=a, other=other: any(  # type: ignore[misc]
                r["node_id"] == ids[other.name] and r["status"] == "alive"
                for r in members(a, token=TOKEN)), what=f"{a.name} lists {other.name} alive")
        status, body = call(a0, "GET", "/api/cluster/status", token=TOKEN)
        assert status == 200 and body["seeds"]["reached"] is True
        assert a1.gossip_addr in body["seeds"]["tried"]
    finally:
        sw.stop_all()


def _bad_bodies(seed: str) -> list[tuple[str, bytes]]:
    many = [f"127.0.0.1:{7000 + i}" for i in range(17)]
    return [
        ("not json", b"addrs=127.0.0.1:7946"),
        ("a list", json.dumps([seed]).encode()),
        ("no addrs", b"{}"),
        ("empty", json.dumps({"addrs": []}).encode()),
        ("a string", json.dumps({"addrs": seed}).encode()),
        ("not strings", json.dumps({"addrs": [7946]}).encode()),
        ("no port", json.dumps({"addrs": ["127.0.0.1"]}).encode()),
        ("port 0", json.dumps({"addrs": ["127.0.0.1:0"]}).encode()),
        ("port too big", json.dumps({"addrs": ["127.0.0.1:70000"]}).encode()),
        ("17 addresses", json.dumps({"addrs": many}).encode()),
        ("unknown field", json.dumps({"addrs": [seed], "wait": True}).encode()),
        ("NaN", b'{"addrs": ["127.0.0.1:7946"], "x": NaN}'),
        ("does not resolve", json.dumps({"addrs": [seed, "no-such-host.invalid:7946"]}).encode()),
    ]


def test_bad_join_bodies_are_400_and_change_nothing(swarm: Swarm) -> None:
    a0 = swarm.add()
    seed = f"127.0.0.1:{free_port()}"
    before = call(a0, "GET", "/api/cluster/status")[1]["seeds"]
    for what, raw in _bad_bodies(seed):
        status, body = call(a0, "POST", "/api/swarm/join", raw=raw)
        assert status == 400, (what, status, body)
        assert isinstance(body, dict) and body.get("error"), (what, body)
    assert "no-such-host.invalid" in body["error"]
    # nothing was added by a refused join: not even the good address beside a bad one
    after = call(a0, "GET", "/api/cluster/status")[1]["seeds"]
    assert after["tried"] == before["tried"] == []
    status, body = call(a0, "POST", "/api/swarm/join", {"addrs": [seed, seed]})
    assert status == 200 and body == {"accepted": [seed]}
    assert call(a0, "GET", "/api/cluster/status")[1]["seeds"]["tried"] == [seed]
    # the CLI checks addresses before asking
    for argv in (["join", "nonsense"], ["join", "127.0.0.1:0"], ["members", "--status", "gone"],
                 ["join", *[f"127.0.0.1:{7000 + i}" for i in range(17)]]):
        out = cli(a0, *argv)
        assert out.returncode == 2, (argv, out)
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("hs-gossip: ")


@pytest.mark.parametrize("argv", [["members"], ["join", "127.0.0.1:7946"]])
def test_no_agent_is_one_line_exit_1(argv: list[str]) -> None:
    out = run_cli(*argv, "--api", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1, out
    assert len(out.stderr.splitlines()) == 1 and "cannot reach the agent" in out.stderr
    assert "is it running?" in out.stderr


def test_an_agent_that_reaches_no_seed_says_so_after_10s(swarm: Swarm, tmp_path: Path) -> None:
    # a seed that never answers: a UDP port nobody listens on
    dead_seed = f"127.0.0.1:{free_port()}"
    a0 = swarm.add(HS_GOSSIP_PEERS=dead_seed)
    started = time.monotonic()
    seeds = a0.get("/api/cluster/status")["seeds"]
    assert seeds["reached"] is False and seeds["tried"] == [dead_seed]
    assert seeds["warning"] is None  # not yet: it has tried for less than 10 s
    assert "no seed reached" not in a0.log_path.read_text()

    def warned() -> dict[str, Any] | None:
        s: dict[str, Any] = a0.get("/api/cluster/status")["seeds"]
        return s if s["warning"] else None

    seeds = wait_for(warned, timeout=SEED_WARN_AFTER + 5, interval=0.5, what="seeds warning")
    assert time.monotonic() - started >= SEED_WARN_AFTER - 2
    assert dead_seed in seeds["warning"] and seeds["since_secs"] >= SEED_WARN_AFTER
    assert seeds["reached"] is False
    out = cli(a0, "status")
    assert out.returncode == 0 and "no seed reached" in out.stdout and dead_seed in out.stdout
    log = wait_for(lambda: a0.log_path.read_text().count("no seed reached"),
                   what="the warning in the log")
    assert log == 1
    line = next(ln for ln in a0.log_path.read_text().splitlines() if "no seed reached" in ln)
    assert "WARNING" in line and dead_seed in line
