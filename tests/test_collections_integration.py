"""Three real agents replicating collections through Merkle delta sync."""

from __future__ import annotations

import pytest

from tests import storehelp
from tests.agents import AgentProc, Swarm, run_cli, wait_for

pytestmark = pytest.mark.integration


def hashes(agents: list[AgentProc], name: str) -> set[str | None]:
    out: set[str | None] = set()
    for a in agents:
        cols = {c["name"]: c["state_hash"] for c in a.get("/api/collections")}
        out.add(cols.get(name))
    return out


def converged(agents: list[AgentProc], name: str) -> bool:
    h = hashes(agents, name)
    return len(h) == 1 and None not in h


def value(a: AgentProc, name: str, key: str) -> object:
    status, body = a.request("GET", f"/api/collections/{name}/items/{key}")
    return body["value"] if status == 200 else status


def test_writes_deletes_and_catch_up_across_three_agents(swarm: Swarm) -> None:
    a = swarm.add()
    b = swarm.add(seeds=[a])
    c = swarm.add(seeds=[a])
    agents = [a, b, c]
    # a write on each agent, through the API and through the CLI
    assert a.request("PUT", "/api/collections/vision/items/cam-7", {"value": {"x": 1}})[0] == 200
    out = run_cli("put", "vision", "cam-8", '{"y": 2}', "--api", f"127.0.0.1:{b.api_port}")
    assert out.returncode == 0, out.stderr
    assert c.request("PUT", "/api/collections/vision/items/cam-9", {"value": [3]})[0] == 200
    wait_for(lambda: converged(agents, "vision"), timeout=15, what="three agents converge")
    for ag in agents:
        assert value(ag, "vision", "cam-7") == {"x": 1}
        assert value(ag, "vision", "cam-8") == {"y": 2}
        assert value(ag, "vision", "cam-9") == [3]
    out = run_cli("get", "vision", "cam-7", "--api", f"127.0.0.1:{c.api_port}")
    assert out.returncode == 0 and out.stdout.strip() == '{"x": 1}'
    # every peer shows the same state_hash in /api/swarm/peers
    h = hashes([a], "vision").pop()
    wait_for(lambda: all(col["state_hash"] == h for p in a.get("/api/swarm/peers")["peers"]
                         for col in p["collections"] if col["name"] == "vision")
             and len(a.get("/api/swarm/peers")["peers"]) == 2, timeout=10,
             what="peers advertise the same state hash")

    # a delete propagates and does not come back
    assert b.request("DELETE", "/api/collections/vision/items/cam-7")[0] == 200
    wait_for(lambda: all(value(ag, "vision", "cam-7") == 404 for ag in agents), timeout=15,
             what="delete propagated")
    c.request("PUT", "/api/collections/other/items/k", {"value": 1})  # forces more syncs
    wait_for(lambda: converged(agents, "other") and converged(agents, "vision"), timeout=15,
             what="converged again")
    assert all(value(ag, "vision", "cam-7") == 404 for ag in agents)

    # an agent offline during writes catches up when restarted
    c.terminate()
    for i in range(50):
        a.request("PUT", f"/api/collections/vision/items/offline-{i}", {"value": i})
    b.request("POST", "/api/collections/vision/items", {"items": {"batch-1": 1, "batch-2": 2}})
    c.start()
    wait_for(lambda: converged(agents, "vision"), timeout=20, what="restarted agent caught up")
    assert value(c, "vision", "offline-49") == 49 and value(c, "vision", "batch-2") == 2
    listing = c.get("/api/collections/vision/items?prefix=offline-&limit=10")
    assert len(listing["items"]) == 10 and listing["next_after"] == "offline-17"
    counts = {col["name"]: col["vector_count"] for col in c.get("/api/collections")}
    assert counts["vision"] == 2 + 50 + 2  # cam-8, cam-9, offline-*, batch-*


def b_count_at_kill(b: AgentProc) -> int:
    """Live items in b's database, read directly (b is dead). Read-only, so
    that closing the connection does not checkpoint the WAL b left behind:
    b must restart from the files exactly as the kill left them."""
    rows = storehelp.query(b.data_dir, "SELECT live FROM collections WHERE name='big'")
    return int(rows[0][0]) if rows else 0


def test_kill_during_a_large_sync_then_recover(swarm: Swarm) -> None:
    a = swarm.add()
    n = 30_000
    for start in range(0, n, 5000):
        batch = {f"item-{i:06d}": {"i": i, "pad": "x" * 64} for i in range(start, start + 5000)}
        assert a.request("POST", "/api/collections/big/items", {"items": batch})[0] == 200
    b = swarm.add(seeds=[a])

    def b_count() -> int:
        cols = {col["name"]: col["vector_count"] for col in b.get("/api/collections")}
        return int(cols.get("big", 0))

    wait_for(lambda: b_count() > 0, timeout=20, interval=0.02, what="sync under way")
    b.kill()  # kill -9, meant to land in the middle of the transfer
    if b_count_at_kill(b) >= n:
        # A race the test cannot win on every machine; what follows would
        # then test a plain restart, not recovery from an interrupted sync.
        pytest.skip("the transfer finished before the kill could interrupt it")
    report = run_cli("verify", "big", "--api", f"127.0.0.1:{a.api_port}")
    assert report.returncode == 0
    b.start()
    out = run_cli("verify", "big", "--api", f"127.0.0.1:{b.api_port}")
    assert out.returncode == 0, out.stdout + out.stderr  # consistent after the kill
    wait_for(lambda: converged([a, b], "big"), timeout=60, what="converged after restart")
    assert b_count() == n
    out = run_cli("verify", "big", "--api", f"127.0.0.1:{b.api_port}")
    assert out.returncode == 0 and '"ok": true' in out.stdout


def test_bad_requests_get_json_errors(swarm: Swarm) -> None:
    a = swarm.add()
    for method, path, body, code in [
        ("PUT", "/api/collections/bad%20name/items/k", {"value": 1}, 400),
        ("PUT", "/api/collections/ok/items/k", None, 400),
        ("PUT", "/api/collections/ok/items/k", {"nope": 1}, 400),
        ("PUT", "/api/collections/ok/items/" + "k" * 1100, {"value": 1}, 400),
        ("GET", "/api/collections/ok/items/missing", None, 404),
        ("DELETE", "/api/collections/ok/items/missing", None, 404),
        ("GET", "/api/collections/ok/items?limit=0", None, 400),
    ]:
        status, doc = a.request(method, path, body)
        assert status == code, (method, path, status, doc)
        assert isinstance(doc, dict) and doc.get("error")
    out = run_cli("put", "ok", "k", "not json", "--api", f"127.0.0.1:{a.api_port}")
    assert out.returncode == 2 and "JSON" in out.stderr


def full_log(a: AgentProc) -> str:
    """The whole log (``AgentProc.log`` keeps only the tail, for failure messages)."""
    return a.log_path.read_text(errors="replace")


def _coll(a: AgentProc, name: str) -> dict[str, object]:
    return next((c for c in a.get("/api/collections") if c["name"] == name), {})


def test_tombstones_are_purged_everywhere_and_old_copies_stay_dead(swarm: Swarm) -> None:
    swarm.env["HS_GOSSIP_TOMBSTONE_GRACE"] = "1"
    a = swarm.add()
    b = swarm.add(seeds=[a])
    c = swarm.add(seeds=[a])
    for k in ("k1", "k2", "k3"):
        assert a.request("PUT", f"/api/collections/t/items/{k}", {"value": k})[0] == 200
    wait_for(lambda: all(_coll(x, "t").get("vector_count") == 3 for x in (a, b, c))
             and converged([a, b, c], "t"), what="replication to all three")

    assert c.terminate() == 0  # c is away, holding a live copy of k1
    assert a.request("DELETE", "/api/collections/t/items/k1")[0] == 200

    def purged(x: AgentProc) -> bool:
        info = _coll(x, "t")
        return info.get("tombstones") == 0 and info.get("vector_count") == 2 \
            and int(str(info.get("tombstone_horizon_ms", 0))) > 0

    wait_for(lambda: purged(a) and purged(b) and converged([a, b], "t"), timeout=20,
             what="the delete to reach b and its tombstone to be purged on a and b")
    # The log line follows the commit the API already shows: poll for it.
    wait_for(lambda: "purged 1 tombstone(s) in t" in full_log(a) + full_log(b), timeout=5,
             what="the purge to be logged")

    c.start()  # comes back with k1, older than the horizon
    # c must neither give k1 back to the others nor keep it: it drops its stale
    # copy, takes the horizon, and all three agree again.
    wait_for(lambda: converged([a, b, c], "t") and value(c, "t", "k1") == 404, timeout=20,
             what="c to drop its stale copy and converge")
    wait_for(lambda: "older than a peer's tombstone horizon" in full_log(c), timeout=5,
             what="c to log why it dropped k1")
    for x in (a, b, c):
        assert value(x, "t", "k1") == 404
        assert _coll(x, "t").get("vector_count") == 2


def test_a_hello_claiming_a_late_horizon_cannot_delete_anything(swarm: Swarm) -> None:
    """Any TCP client can open a sync session. One that claims an empty
    replica and a tombstone horizon of "now" must get nothing, and take
    nothing away."""
    import time

    import anyio

    from agent.net.stream import connect
    from merkle import frames
    from merkle.reconcile import Session
    from merkle.tree import MemoryTree

    a = swarm.add()
    batch = {"items": {f"k{i}": i for i in range(50)}}
    assert a.request("POST", "/api/collections/safe/items", batch)[0] == 200
    before = _coll(a, "safe")

    async def attack() -> int:
        shipped = 0
        empty = MemoryTree()
        async with await connect(a.host, a.gossip_port, 1 << 22) as conn:
            session = Session(b"attacker")
            hello = session.hello(empty, "safe", horizon_ms=int(time.time() * 1000))
            await conn.send(frames.encode(hello))
            while not session.done:
                msg = frames.decode(await conn.receive())
                if isinstance(msg, frames.Items):
                    shipped += len(msg.items)
                    continue
                reply = session.receive(empty, msg)
                if reply is None:
                    break
                await conn.send(frames.encode(reply))
        return shipped

    assert anyio.run(attack, backend="trio") == 0  # withheld: we would refuse them
    assert _coll(a, "safe") == before
    assert value(a, "safe", "k7") == 7
