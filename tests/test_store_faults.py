"""Storage faults on real agents: a full disk (a small tmpfs as the data
directory) and a damaged or missing database file at start.

A full disk must refuse writes with 507 while reads, gossip and the API go
on, recover by itself when space returns, shut down cleanly and restart. A
damaged file is moved aside with its path logged, a missing one is logged,
and the agent re-syncs what it held from a peer.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from agent.store import DB_FILE, Store, StoreCorrupt, StoreError
from tests import storehelp
from tests.agents import AgentProc, Swarm, wait_for

FILLER_CHUNK = b"\0" * (64 << 10)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that can be filled and freed in a moment."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def add_on(swarm: Swarm, data_dir: Path, seeds: list[AgentProc] | None = None) -> AgentProc:
    """An agent of the swarm whose data directory is ``data_dir`` (its log
    stays outside, so a full disk does not swallow it)."""
    env = dict(swarm.env)
    if seeds:
        env["HS_GOSSIP_PEERS"] = ",".join(s.gossip_addr for s in seeds)
    i = len(swarm.agents)
    a = AgentProc(f"agent{i}", swarm.host(i), swarm.port, data_dir, env)
    a.log_path = swarm.tmp / f"agent{i}.log"
    swarm.agents.append(a)
    return a.start()


def fill(mnt: Path) -> Path:
    """Write a filler file until the file system is full."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        chunk = FILLER_CHUNK
        while chunk:  # down to single bytes: not a byte left
            try:
                os.write(fd, chunk)
            except OSError:
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


def put_until_full(a: AgentProc, tries: int = 200) -> tuple[int, object]:
    """PUT growing values until the agent answers something else than 200 (the
    WAL may reuse space it already holds for the first few)."""
    big = "x" * 50_000
    for i in range(tries):
        status, body = a.request("PUT", f"/api/collections/c/items/fill-{i}", {"value": big})
        if status != 200:
            break
    else:
        raise AssertionError("writes never failed on a full disk")
    # Smaller writes may still fit in what the big one could not use.
    for i in range(tries):
        small = a.request("PUT", f"/api/collections/c/items/fill-small-{i}",
                          {"value": "x" * 100})[0]
        if small != 200:
            return status, body
    raise AssertionError("small writes never failed on a full disk")


def full_log(a: AgentProc) -> str:
    return a.log_path.read_text(errors="replace")


def test_full_disk_refuses_writes_with_507_reads_and_gossip_go_on_then_recovers(
        swarm: Swarm, tmpfs: Path) -> None:
    b = swarm.add()
    a = add_on(swarm, tmpfs / "data", seeds=[b])
    assert a.request("PUT", "/api/collections/c/items/kept", {"value": {"n": 1}})[0] == 200
    wait_for(lambda: a.node_id in b.peers() and b.peers()[a.node_id]["healthy"], what="join")
    filler = fill(tmpfs)

    status, body = put_until_full(a)
    # Reads, the API and gossip go on.
    assert a.get("/api/collections/c/items/kept")["value"] == {"n": 1}
    assert any(i["key"] == "kept" for i in a.get("/api/collections/c/items")["items"])
    assert a.request("POST", "/api/collections/c/verify")[0] == 200
    assert any(c["name"] == "c" for c in a.get("/api/collections"))
    b.request("PUT", "/api/collections/d/items/from-b", {"value": 2})
    wait_for(lambda: b.node_id in a.peers() and a.peers()[b.node_id]["healthy"],
             what="gossip while full")
    # Writes are refused as such.
    assert status == 507, (status, body)
    assert "storage full" in body["error"]
    batch = a.request("POST", "/api/collections/c/items", {"items": {"k1": 1, "k2": 2}})
    assert batch[0] == 507, batch
    assert a.request("DELETE", "/api/collections/c/items/kept")[0] == 507

    # Space returns: writes work again without a restart.
    filler.unlink()
    wait_for(lambda: a.request("PUT", "/api/collections/c/items/after",
                               {"value": 3})[0] == 200, what="writes after space returned")
    assert a.get("/api/collections/c/items/after")["value"] == 3
    # The item B wrote meanwhile arrives by sync.
    wait_for(lambda: a.request("GET", "/api/collections/d/items/from-b")[0] == 200,
             timeout=30, what="sync after space returned")
    log = full_log(a)
    assert "storage full" in log and "storage has space again" in log
    # Logged once per episode (full until a write succeeds), not per request.
    episodes = log.count("storage full: writes to")
    assert 1 <= episodes == log.count("storage has space again"), episodes
    assert "Traceback" not in log


def test_sigterm_on_a_full_disk_is_a_clean_shutdown(swarm: Swarm, tmpfs: Path) -> None:
    a = add_on(swarm, tmpfs / "data")
    assert a.request("PUT", "/api/collections/c/items/kept", {"value": 1})[0] == 200
    fill(tmpfs)
    put_until_full(a)
    assert a.terminate() == 0
    log = full_log(a)
    assert "agent stopped" in log and "Traceback" not in log


def test_restart_on_a_full_disk_starts_serves_reads_and_recovers(
        swarm: Swarm, tmpfs: Path) -> None:
    a = add_on(swarm, tmpfs / "data")
    assert a.request("PUT", "/api/collections/c/items/kept", {"value": 1})[0] == 200
    a.kill()  # the WAL and its index stay, as after a power cut
    filler = fill(tmpfs)

    a.start()  # identity and store open on the full disk
    assert a.get("/api/collections/c/items/kept")["value"] == 1
    assert put_until_full(a)[0] == 507
    filler.unlink()
    wait_for(lambda: a.request("PUT", "/api/collections/c/items/new",
                               {"value": 2})[0] == 200, what="writes after space returned")
    assert a.terminate() == 0
    assert "Traceback" not in full_log(a)


def _truncate(db: Path) -> None:
    db.write_bytes(b"")


def _garbage_in_the_middle(db: Path) -> None:
    size = db.stat().st_size
    assert size >= 64 << 10, size  # enough pages for a middle one
    with open(db, "r+b") as f:
        f.seek((size // 2) & ~4095)
        f.write(bytes((i * 151 + 7) % 256 for i in range(4096)))


def _delete(db: Path) -> None:
    db.unlink()
    for side in ("-wal", "-shm"):
        db.with_name(db.name + side).unlink(missing_ok=True)


@pytest.mark.parametrize("damage,moved", [
    (_truncate, True), (_garbage_in_the_middle, True), (_delete, False),
], ids=["truncated-to-0", "garbage-in-the-middle", "deleted"])
def test_damaged_or_missing_database_is_moved_aside_logged_and_resynced(
        swarm: Swarm, damage: object, moved: bool) -> None:
    b = swarm.add()
    a = swarm.add(seeds=[b])
    items = {f"k{i:05d}": {"n": i, "pad": "p" * 40} for i in range(2000)}
    assert b.request("POST", "/api/collections/c/items", {"items": items})[0] == 200
    assert b.request("PUT", "/api/collections/c/items/probe", {"value": "from-b"})[0] == 200
    wait_for(lambda: a.request("GET", "/api/collections/c/items/probe")[0] == 200,
             timeout=30, what="first sync")
    assert a.terminate() == 0
    db = a.data_dir / DB_FILE
    assert callable(damage)
    damage(db)

    a.start()
    log = a.log()
    if moved:
        aside = sorted(a.data_dir.glob(f"{DB_FILE}.corrupt-*"))
        aside = [p for p in aside if not p.name.endswith(("-wal", "-shm"))]
        assert len(aside) == 1, list(a.data_dir.iterdir())
        assert f"moved it to {aside[0]}" in log and "is damaged" in log
        assert "ERROR" in next(line for line in log.splitlines() if "is damaged" in line)
    else:
        assert f"the database {db} was missing; starting empty, will re-sync" in log
    # It starts empty and gets everything back from its peer.
    wait_for(lambda: a.request("GET", "/api/collections/c/items/probe")[0] == 200,
             timeout=30, what="re-sync from the peer")
    assert a.get("/api/collections/c/items/probe")["value"] == "from-b"
    wait_for(lambda: {c["name"]: c["vector_count"] for c in a.get("/api/collections")}
             .get("c") == 2001, timeout=30, what="every item re-synced")
    assert "Traceback" not in a.log()


def test_damage_the_start_up_check_missed_is_a_503_error_not_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pages damaged after the check (or in a way it cannot see): reads fail
    with StoreCorrupt (503, advice to restart, logged without a traceback)
    and the store thread lives on."""
    async def fill_store() -> None:
        s = await Store.open(tmp_path, b"a" * 16)
        await s.put_many("c", {f"k{i:05d}": {"n": i, "pad": "p" * 40} for i in range(3000)})
        await s.close()

    anyio.run(fill_store, backend="trio")
    db = tmp_path / DB_FILE
    # The item table's pages (other tables, such as the change log, share the file).
    pages = [p for (p,) in storehelp.query(
        tmp_path, "SELECT pageno FROM dbstat WHERE name='items' ORDER BY pageno")]

    def damage() -> None:  # every other page of the second half of the items
        with open(db, "r+b") as f:
            for page in pages[len(pages) // 2::2]:
                f.seek((page - 1) * 4096)
                f.write(bytes((i * 151 + 7) % 256 for i in range(4096)))

    async def read_all() -> list[StoreError]:
        s = await Store.open(tmp_path, b"a" * 16)
        damage()  # after the check and the open: only item pages are read from now on
        errors: list[StoreError] = []
        after = ""
        for _ in range(10):
            try:
                page = await s.list_items("c", after=after, limit=1000)
            except StoreError as e:
                errors.append(e)
                break
            if not page:
                break
            after = page[-1].key
        try:
            await s.verify("c")
        except StoreError as e:
            errors.append(e)
        assert s.digests()  # the event loop's view is unharmed
        await s.close()
        return errors

    with caplog.at_level("ERROR", logger="hs_gossip.store"):
        errors = anyio.run(read_all, backend="trio")
    assert errors and all(isinstance(e, StoreCorrupt) for e in errors), errors
    assert all(getattr(e, "status", None) == 503 for e in errors)
    damaged = [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert damaged and "restart the agent" in damaged[0].getMessage()
    assert damaged[0].exc_info is None


def _store_with_items(data_dir: Path) -> None:
    async def main() -> None:
        s = await Store.open(data_dir, b"a" * 16)
        await s.put_many("c", {f"k{i}": i for i in range(50)})
        await s.close()

    anyio.run(main, backend="trio")


def _open_fails(data_dir: Path) -> StoreError:
    async def main() -> None:
        s = await Store.open(data_dir, b"a" * 16, ran_before=True)
        await s.close()

    with pytest.raises(StoreError) as caught:
        anyio.run(main, backend="trio")
    return caught.value


def _nothing_moved_aside(data_dir: Path) -> None:
    moved = [p.name for p in data_dir.iterdir() if ".corrupt-" in p.name or ".orphan-" in p.name]
    assert not moved, moved


def test_a_database_locked_by_another_process_is_not_moved_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held elsewhere (a second agent on the same directory) says
    nothing about the file: the open fails clearly and the data stays."""
    from agent.store import check

    monkeypatch.setattr(check, "BUSY_TIMEOUT", 0.2)
    _store_with_items(tmp_path)
    db = tmp_path / DB_FILE
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        err = _open_fails(tmp_path)
        assert "locked" in str(err) and str(db) in str(err), err
        assert "\n" not in str(err)
        _nothing_moved_aside(tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert db.exists()
    assert storehelp.query(tmp_path, "SELECT count(*) FROM items") == [(50,)]


def test_a_directory_in_place_of_the_database_is_an_error_not_damage(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE
    db.mkdir()
    (db / "keep").write_text("mine")
    err = _open_fails(tmp_path)
    assert str(db) in str(err), err
    _nothing_moved_aside(tmp_path)
    assert (db / "keep").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_database_is_not_moved_aside(tmp_path: Path) -> None:
    _store_with_items(tmp_path)
    db = tmp_path / DB_FILE
    db.chmod(0)
    try:
        err = _open_fails(tmp_path)
        assert str(db) in str(err), err
        _nothing_moved_aside(tmp_path)
    finally:
        db.chmod(0o600)
    assert storehelp.query(tmp_path, "SELECT count(*) FROM items") == [(50,)]
