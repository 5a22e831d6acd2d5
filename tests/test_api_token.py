"""HTTP API access: loopback by default, a bearer token required beyond it,
and on every route but /healthz once set; the CLI sends it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.config import ConfigError, is_loopback, load
from tests.agents import AgentProc, Swarm, free_port, run_cli

TOKEN = "s3cret-token-0123456789abcdef"


def call(a: AgentProc, path: str, token: str | None = None,
         method: str = "GET", body: object = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(a.api + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_loopback_is_the_default_and_needs_no_token() -> None:
    cfg, _ = load(environ={})
    assert is_loopback(cfg.api.host) and cfg.api_token is None
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
        assert not is_loopback(host), host


@pytest.mark.parametrize("api", ["0.0.0.0:50050", "[::]:50050", "192.168.1.10:8080",
                                 "gateway.local:50050"])
def test_an_exposed_api_needs_a_token(api: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(environ={"HS_GOSSIP_API": api})
    msg = str(e.value)
    assert "HS_GOSSIP_API=" in msg and "HS_GOSSIP_API_TOKEN" in msg and "\n" not in msg
    cfg, _ = load(environ={"HS_GOSSIP_API": api, "HS_GOSSIP_API_TOKEN": TOKEN})
    assert cfg.api_token == TOKEN
    assert TOKEN not in repr(cfg)


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="HS_GOSSIP_API_TOKEN"):
        load(environ={"HS_GOSSIP_API_TOKEN": "short"})


def test_the_agent_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    out = run_cli("run", env={"HS_GOSSIP_API": f"0.0.0.0:{free_port()}",
                              "HS_GOSSIP_DATA_DIR": str(tmp_path / "d"),
                              "HS_GOSSIP_PORT": str(free_port())}, timeout=30)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "HS_GOSSIP_API" in lines[0] and "HS_GOSSIP_API_TOKEN" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_with_a_token_every_route_but_healthz_needs_it(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, HS_GOSSIP_API_TOKEN=TOKEN)
    try:
        a = swarm.add()  # comes up: /healthz answers without the token
        assert call(a, "/healthz")[0] == 200
        routes = ["/api/swarm/peers", "/api/cluster/status", "/api/swarm/stats",
                  "/api/collections", "/metrics", "/api/collections/c/items/k",
                  "/no/such/route"]
        for path in routes:
            status, body = call(a, path)
            assert status == 401, path
            assert isinstance(body, dict) and "error" in body
            assert call(a, path, token=TOKEN + "x")[0] == 401, path
            assert call(a, path, token=TOKEN[:-1])[0] == 401, path
        assert call(a, "/api/collections/c/items/k", method="PUT", body={"value": 1})[0] == 401
        assert call(a, "/api/collections/c/items/k", TOKEN, "PUT", {"value": 1})[0] == 200
        for path in routes[:5]:
            if path == "/metrics":
                req = urllib.request.Request(a.api + path,
                                             headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert r.status == 200
                continue
            assert call(a, path, token=TOKEN)[0] == 200, path
        assert call(a, "/api/collections/c/items/k", token=TOKEN)[0] == 200

        # the CLI sends the token from its environment
        env = {"HS_GOSSIP_API": a.api.removeprefix("http://")}
        refused = run_cli("status", env=env)
        assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout
        ok = run_cli("status", env={**env, "HS_GOSSIP_API_TOKEN": TOKEN})
        assert ok.returncode == 0, ok.stderr
        got = run_cli("get", "c", "k", env={**env, "HS_GOSSIP_API_TOKEN": TOKEN})
        assert got.returncode == 0 and "1" in got.stdout, got.stderr
    finally:
        swarm.stop_all()
