"""Zero-config LAN discovery: two agents in two network namespaces joined by a
veth pair (a private two-host LAN the test builds and removes) find each other
by multicast with no seed list. Needs root and iproute2; skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import clean_environ, cli_command, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed; run .ci/setup-system.sh"
    probe = f"hsgp{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace here: {e}"
    return None


@pytest.fixture
def lan() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces on one link: [(netns, address), ...]."""
    reason = _why_no_netns()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"hsg{tag}a", "10.231.7.1"), (f"hsg{tag}b", "10.231.7.2")]
    links = [f"hsg{tag}0", f"hsg{tag}1"]
    try:
        for ns, _ in hosts:
            _ip("netns", "add", ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for (ns, addr), link in zip(hosts, links, strict=True):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
            # No default route in a bare namespace: send multicast out of the link.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", link)
        yield hosts
    finally:
        for ns, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_multicast_discovery_finds_agents_without_seeds(
        lan: list[tuple[str, str]], tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i, (ns, addr) in enumerate(lan):
            env = clean_environ()
            env.update({
                "HS_GOSSIP_DISCOVERY": "multicast",
                "HS_GOSSIP_BIND": addr,
                "HS_GOSSIP_INTERVAL": "0.2",
                "HS_GOSSIP_DATA_DIR": str(tmp_path / f"agent{i}"),
                "HS_GOSSIP_NODE_NAME": f"lan{i}",
            })
            log = tmp_path / f"agent{i}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *cli_command(), "run"],
                                              env=env, stdout=out, stderr=subprocess.STDOUT))

        def peers_of(ns: str) -> dict[str, dict[str, object]]:
            r = subprocess.run(["ip", "netns", "exec", ns, *cli_command(), "peers", "--json",
                                "--api", "127.0.0.1:50050"], env=clean_environ(),
                               capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return {}
            return {p["name"]: p for p in json.loads(r.stdout)["peers"]}

        def found_each_other() -> bool:
            a, b = peers_of(lan[0][0]), peers_of(lan[1][0])
            return bool(a.get("lan1", {}).get("healthy") and b.get("lan0", {}).get("healthy"))

        try:
            wait_for(found_each_other, timeout=20, interval=0.3, what="multicast discovery")
        except AssertionError:
            raise AssertionError("\n".join(p.read_text()[-2000:] for p in logs)) from None
        # One side hearing the other's beacon is enough; gossip does the rest.
        assert any("discovered agent at 10.231.7." in p.read_text() for p in logs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
