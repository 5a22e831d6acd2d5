"""Leader election through etcd: the lease rule (pure, table-tested), the
JSON-gateway client and the election loop against a real etcd started on
loopback (skipped, saying why, where the ``etcd`` binary is absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent.config import ConfigError, load
from agent.core.lease import Term, begin_term, keepalive_period, safety_margin, valid_until
from agent.net.etcd import MAX_RESPONSE, EtcdClient, EtcdError, EtcdUnreachable
from agent.runtime.election import Election, LeaderWatch
from tests.agents import free_port

TTL = 2  # etcd's smallest lease with its default timing: keeps these tests short


def run(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend="trio")


# --- the lease rule -----------------------------------------------------------


@pytest.mark.parametrize(("ttl", "margin"), [
    (2, 0.5), (5, 1.0), (10, 2.0), (60, 5.0), (300, 5.0), (1, 1 / 3),
])
def test_safety_margin(ttl: float, margin: float) -> None:
    assert safety_margin(ttl) == pytest.approx(margin)
    # A healthy leader never lapses between two keepalives.
    assert keepalive_period(ttl) < ttl - safety_margin(ttl)


def _term(until: float = 104.0, sent: float = 100.0) -> Term:
    return Term(epoch=7, lease_id=1, margin=1.0, until=until, renewed_sent_at=sent)


@pytest.mark.parametrize(("sent", "ttl_left", "answered", "until"), [
    # counted from when the keepalive was SENT, however late the answer
    (101.0, 5, 101.01, 105.0),
    (101.0, 5, 103.9, 105.0),
    # a longer TTL granted by etcd counts as granted
    (101.0, 10, 101.5, 110.0),
    # an answer for an older keepalive never shortens the term
    (99.0, 5, 101.0, 104.0),
    # the lease is gone: the term is over
    (101.0, 0, 101.1, None),
    # the limit passed before the answer came: over, even though etcd renewed
    (102.0, 5, 104.0, None),
    (102.0, 5, 104.5, None),
])
def test_renewal_table(sent: float, ttl_left: int, answered: float,
                       until: float | None) -> None:
    term = _term().renewed(sent, ttl_left, answered)
    if until is None:
        assert term is None
    else:
        assert term is not None and term.until == pytest.approx(until)
        assert term.epoch == 7


@pytest.mark.parametrize(("now", "leader"), [
    (100.0, True), (103.999, True), (104.0, False), (104.5, False), (200.0, False),
])
def test_is_leader_until_the_limit(now: float, leader: bool) -> None:
    assert _term().is_leader(now) is leader


@pytest.mark.parametrize(("sent", "ttl", "won", "until"), [
    (10.0, 5, 10.2, 14.0),      # limit = sent + ttl - margin (1 s at 5 s)
    (10.0, 2, 10.2, 11.5),      # margin 0.5 s at 2 s
    (10.0, 5, 13.99, 14.0),
    (10.0, 5, 14.0, None),      # the campaign answered after the limit: unusable
])
def test_begin_term_table(sent: float, ttl: int, won: float, until: float | None) -> None:
    term = begin_term(3, 9, sent, ttl, won)
    if until is None:
        assert term is None
    else:
        assert term is not None and term.until == pytest.approx(until)
        assert term.until == valid_until(sent, ttl, safety_margin(ttl))
        assert term.next_keepalive(ttl) == pytest.approx(sent + ttl / 3)


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(("text", "endpoints"), [
    ("", ()),
    ("http://127.0.0.1:2379", ("http://127.0.0.1:2379",)),
    ("http://localhost:2379/, https://etcd1.example:2379",
     ("http://localhost:2379", "https://etcd1.example:2379")),
    ("http://[::1]:2379", ("http://[::1]:2379",)),
    ("https://10.0.0.2:2379", ("https://10.0.0.2:2379",)),
    ("http://10.0.0.2:2379", None),        # clear text beyond loopback
    ("http://etcd.local:2379", None),
    ("ftp://127.0.0.1:2379", None),
    ("127.0.0.1:2379", None),
    ("http://127.0.0.1:2379/v3", None),
    ("https://user:pw@etcd:2379", None),
    ("https://etcd:99999", None),
])
def test_etcd_endpoints_setting(text: str, endpoints: tuple[str, ...] | None) -> None:
    if endpoints is None:
        with pytest.raises(ConfigError, match="HS_GOSSIP_ETCD"):
            load(environ={"HS_GOSSIP_ETCD": text})
    else:
        assert load(environ={"HS_GOSSIP_ETCD": text})[0].etcd == endpoints


@pytest.mark.parametrize(("text", "ttl"), [
    (None, 5), ("2", 2), ("300", 300), ("1", None), ("301", None), ("2.5", None), ("x", None),
])
def test_etcd_ttl_setting(text: str | None, ttl: int | None) -> None:
    env = {} if text is None else {"HS_GOSSIP_ETCD_TTL": text}
    if ttl is None:
        with pytest.raises(ConfigError, match="HS_GOSSIP_ETCD_TTL"):
            load(environ=env)
    else:
        assert load(environ=env)[0].etcd_ttl == ttl


# --- the client's transport rules, against fake endpoints ----------------------


def test_answers_are_bounded_and_must_be_json_objects() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "big":
            return httpx.Response(200, content=b"[" + b"1," * MAX_RESPONSE + b"1]")
        if host == "html":
            return httpx.Response(200, content=b"<html>")
        if host == "list":
            return httpx.Response(200, json=[1])
        raise AssertionError(host)

    async def main() -> None:
        for host, words in (("big", "larger than"), ("html", "not JSON"),
                            ("list", "not a JSON object")):
            async with EtcdClient([f"http://{host}:2379"], timeout=2,
                                  transport=httpx.MockTransport(handler)) as c:
                with pytest.raises(EtcdError, match=words):
                    await c.grant(5)

    run(main)


def test_unavailable_endpoints_are_skipped_and_etcd_errors_are_final() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        seen.append(host)
        if host == "down":
            raise httpx.ConnectError("refused", request=request)
        if host == "proxy":
            return httpx.Response(502, content=b"<html>bad gateway</html>")
        if host == "noleader":
            return httpx.Response(503, json={"error": "etcdserver: no leader", "code": 14})
        if host == "bad":
            return httpx.Response(400, json={"message": "illegal base64 data", "code": 3})
        return httpx.Response(200, json={"ID": "42", "TTL": "5"})

    async def main() -> None:
        async with EtcdClient(["http://down", "http://proxy", "http://noleader", "http://ok"],
                              timeout=2, transport=httpx.MockTransport(handler)) as c:
            assert await c.grant(5) == 42
            assert seen == ["down", "proxy", "noleader", "ok"]
            seen.clear()
            assert await c.grant(5) == 42
            assert seen == ["ok"], "the endpoint that answered is asked first"
        async with EtcdClient(["http://bad", "http://ok"], timeout=2,
                              transport=httpx.MockTransport(handler)) as c:
            seen.clear()
            with pytest.raises(EtcdError, match="illegal base64"):
                await c.grant(5)
            assert seen == ["bad"], "an answer from etcd is not retried elsewhere"
        async with EtcdClient(["http://down", "http://proxy"], timeout=2,
                              transport=httpx.MockTransport(handler)) as c:
            with pytest.raises(EtcdUnreachable, match=r"down.*proxy"):
                await c.grant(5)

    run(main)


def test_a_stalled_endpoint_is_cut_at_the_timeout() -> None:
    async def main() -> None:
        async def stall(request: httpx.Request) -> httpx.Response:
            await anyio.sleep(30)
            raise AssertionError("not cut")

        async with EtcdClient(["http://stall"], timeout=0.3,
                              transport=httpx.MockTransport(stall)) as c:
            t0 = time.monotonic()
            with pytest.raises(EtcdUnreachable):
                await c.keepalive(1)
            assert time.monotonic() - t0 < 2

    run(main)


# --- a real etcd ----------------------------------------------------------------


def _etcd_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; "
                    ".ci/setup-system.sh installs it)")
    data = tmp_path_factory.mktemp("etcd")
    client_url = f"http://127.0.0.1:{free_port()}"
    peer_url = f"http://127.0.0.1:{free_port()}"
    log = (data / "etcd.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--name", "default", "--data-dir", str(data / "data"),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"default={peer_url}", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not _etcd_ready(client_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("etcd did not start: "
                            + Path(data / "etcd.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        yield client_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _key() -> str:
    return f"/test/{uuid.uuid4().hex}/leader"


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` every 10 ms; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)
    return time.monotonic()


def _start(tg: Any, election: Election) -> anyio.CancelScope:
    scope = anyio.CancelScope()

    async def runner() -> None:
        with scope:
            await election.run()

    tg.start_soon(runner)
    return scope


def test_client_campaign_leader_resign(etcd: str) -> None:
    async def main() -> None:
        key = _key()
        # A dead endpoint first: skipped for the live one.
        dead = f"http://127.0.0.1:{free_port()}"
        async with EtcdClient([dead, etcd], timeout=2) as c:
            mine = await c.grant(TTL)
            theirs = await c.grant(TTL)
            assert await c.keepalive(mine) == TTL
            epoch = await c.campaign(key, b"10.0.0.2:7946", mine)
            assert epoch is not None and epoch > 0
            # asked again (a retry after a lost answer): still ours, same epoch
            assert await c.campaign(key, b"10.0.0.2:7946", mine) == epoch
            assert await c.campaign(key, b"10.0.0.3:7946", theirs) is None
            holder = await c.leader(key)
            assert holder is not None
            assert (holder.value, holder.epoch, holder.lease_id) == (b"10.0.0.2:7946", epoch, mine)
            assert await c.resign(key, theirs) is False
            assert await c.resign(key, mine) is True
            assert await c.leader(key) is None
            # the next holder's epoch is higher: the key's create revision
            again = await c.campaign(key, b"10.0.0.3:7946", theirs)
            assert again is not None and again > epoch
            await c.revoke(theirs)
            assert await c.leader(key) is None, "revoking the lease deletes its key"
            await c.revoke(theirs)  # already gone: not an error
            assert await c.keepalive(theirs) == 0
            assert await c.delete(key) == 0

    run(main)


def test_failover_when_the_leader_stops_keeping_alive(etcd: str) -> None:
    async def main() -> None:
        key = _key()
        async with EtcdClient([etcd], 2) as ca, EtcdClient([etcd], 2) as cb, \
                EtcdClient([etcd], 2) as cw, anyio.create_task_group() as tg:
            a = Election(ca, key, b"A", ttl=TTL)
            b = Election(cb, key, b"B", ttl=TTL)
            seen: list[bytes | None] = []
            watch = LeaderWatch(cw, key, interval=0.05,
                                on_change=lambda h: seen.append(h and h.value))
            sa = _start(tg, a)
            await _until(lambda: a.is_leader(), 10, "A elected")
            sb = _start(tg, b)
            tg.start_soon(watch.run)
            first = a.epoch
            assert first is not None
            holder = await cw.leader(key)
            assert holder is not None and holder.epoch == first, "epoch = create revision"
            await _until(lambda: watch.current is not None, 5, "the watch sees a leader")
            assert watch.current is not None and watch.current.value == b"A"
            # A keeps its term across several keepalive rounds while B waits.
            await anyio.sleep(TTL * 1.5)
            assert a.is_leader() and not b.is_leader() and a.epoch == first

            sa.cancel()  # A's process dies: no more keepalives, nothing revoked
            killed = time.monotonic()
            gone_at: list[float] = []

            async def key_gone() -> None:
                while (h := await cw.leader(key)) is not None and h.value == b"A":
                    await anyio.sleep(0.02)
                gone_at.append(time.monotonic())

            tg.start_soon(key_gone)
            a_off = await _until(lambda: not a.is_leader(), TTL + 1, "A stops leading")
            b_on = await _until(lambda: b.is_leader(), TTL + 2, "B takes over")
            assert b_on - killed <= TTL + 1, f"takeover took {b_on - killed:.2f}s"
            assert b.epoch is not None and b.epoch > first
            await _until(lambda: bool(gone_at), 2, "the key seen changing")
            # A stopped before etcd could let its lease go.
            assert a_off < gone_at[0]
            assert a.term is not None and b_on - a.term.until >= a.term.margin
            await _until(lambda: watch.current is not None and watch.current.value == b"B",
                         2, "the watch sees B")
            assert seen[0] == b"A" and seen[-1] == b"B"
            sb.cancel()
            tg.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("how", ["key deleted", "lease revoked"])
def test_leader_steps_down_when_it_loses_the_key(etcd: str, how: str) -> None:
    async def main() -> None:
        key = _key()
        changes: list[int | None] = []
        async with EtcdClient([etcd], 2) as ca, EtcdClient([etcd], 2) as cb, \
                EtcdClient([etcd], 2) as admin, anyio.create_task_group() as tg:
            # A longer lease for A: it must step down well before its limit.
            a = Election(ca, key, b"A", ttl=5, on_change=changes.append)
            _start(tg, a)
            await _until(lambda: a.is_leader(), 10, "A elected")
            first = a.epoch
            assert first is not None
            holder = await admin.leader(key)
            assert holder is not None
            if how == "key deleted":
                assert await admin.delete(key) == 1
            else:
                await admin.revoke(holder.lease_id)
            assert a.term is not None
            limit = a.term.until  # no keepalive can extend it any more
            b = Election(cb, key, b"B", ttl=TTL)
            _start(tg, b)
            await _until(lambda: b.is_leader(), TTL + 2, "B elected")
            # A notices at its next keepalive (every ttl/3), before its limit.
            off = await _until(lambda: not a.is_leader(), keepalive_period(5) + 1,
                               "A steps down")
            assert off < limit, "stepped down, not merely lapsed"
            assert changes[:2] == [first, None]
            assert b.epoch is not None and b.epoch > first
            tg.cancel_scope.cancel()

    run(main)


def test_resign_hands_over_at_once(etcd: str) -> None:
    async def main() -> None:
        key = _key()
        async with EtcdClient([etcd], 2) as ca, EtcdClient([etcd], 2) as cb, \
                anyio.create_task_group() as tg:
            a = Election(ca, key, b"A", ttl=TTL)
            sa = _start(tg, a)
            await _until(lambda: a.is_leader(), 10, "A elected")
            b = Election(cb, key, b"B", ttl=TTL)
            _start(tg, b)
            await anyio.sleep(0.5)
            assert not b.is_leader()
            sa.cancel()
            await a.resign()
            assert not a.is_leader() and a.epoch is None
            t0 = time.monotonic()
            await _until(lambda: b.is_leader(), TTL, "B elected")
            # no lease to wait out: B's next campaign round wins
            assert time.monotonic() - t0 < 1.0
            tg.cancel_scope.cancel()

    run(main)
