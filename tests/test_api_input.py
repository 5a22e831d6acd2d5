"""Hostile input to the HTTP API: values JSON cannot round-trip, bodies too
large or nested too deep, names and keys that only look valid, methods a path
does not take, and values already stored that JSON cannot carry. Every answer
is a JSON error with the right status, never a 500, and the agent's memory
stays bounded while it refuses a 50 MB body."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from agent.face.collections_api import item_view, value_fields
from agent.face.json_input import (
    MAX_DEPTH,
    BodyBudget,
    InputError,
    json_problem,
    parse_body,
    read_json,
)
from agent.store import StoreError, check_name
from merkle.tree import Item
from tests.agents import AgentProc, free_port
from tests.storehelp import direct_writer, transaction

# (what, raw JSON text of the value) for values a browser could not round-trip
BAD_VALUES = [
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
    ("-Infinity", "-Infinity"),
    ("2**64", str(2 ** 64)),
    ("-2**63-1", str(-(2 ** 63) - 1)),
    ("1e999", "1e999"),
    ("lone surrogate", '"\\ud800"'),
    ("lone surrogate key", '{"\\udfff": 1}'),
    ("2000 deep", "[" * 2000 + "]" * 2000),
    (f"{MAX_DEPTH + 1} deep", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)),
]


# --- the parser and the stored-value check, in process -------------------------------


@pytest.mark.parametrize(("what", "text"), BAD_VALUES, ids=[w for w, _ in BAD_VALUES])
def test_parse_body_refuses(what: str, text: str) -> None:
    with pytest.raises(InputError) as e:
        parse_body(('{"value": ' + text + "}").encode())
    assert e.value.status == 400


def test_parse_body_accepts_the_bounds() -> None:
    doc = parse_body(json.dumps({"value": [2 ** 64 - 1, -(2 ** 63), 1.5e308, "\U0001f600",
                                           {"k": None}]}).encode())
    assert doc["value"][0] == 2 ** 64 - 1
    deep: Any = 0
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert parse_body(json.dumps(deep).encode()) == deep


def test_parse_body_refuses_bytes_that_are_not_utf8() -> None:
    for raw in (b'"\xff"', b'"\xed\xa0\x80"', b'\xef\xbb\xbf{"value": 1}'):
        with pytest.raises(InputError):
            parse_body(raw)


def test_json_problem_on_decoded_values() -> None:
    assert json_problem({"a": [1, "x", None, True, 2.5]}) is None
    assert json_problem(float("nan")) is not None
    assert json_problem(b"raw") is not None
    assert json_problem({1: "int key"}) is not None
    assert json_problem([[[[0]]]], max_depth=3) is not None


def test_check_name_is_an_exact_match() -> None:
    check_name("c1")
    for bad in ("c1\n", "c1\n\n", "\nc1", "c 1", ""):
        with pytest.raises(StoreError):
            check_name(bad)


@pytest.mark.parametrize("stored", [
    msgpack.packb(float("nan")),
    msgpack.packb({"x": float("inf")}),
    msgpack.packb(b"\x00\x01", use_bin_type=True),
    msgpack.packb({1: 2}),
    b"\xa1\xff",  # a msgpack str whose byte is not UTF-8
    b"\xc1",  # a byte msgpack never uses
])
def test_stored_value_that_is_not_json_is_flagged(stored: bytes) -> None:
    view = item_view("c", Item("k", 1 << 16, bytes(16), False, stored))
    assert view["value"] is None
    assert view["value_error"].startswith("not representable as JSON")
    assert base64.b64decode(view["value_msgpack_b64"]) == stored
    json.dumps(view, allow_nan=False)  # what the response encoder does
    assert value_fields(msgpack.packb([1, "a"])) == {"value": [1, "a"]}


# --- a real agent ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    data = tmp_path_factory.mktemp("api-input") / "a"
    data.mkdir()
    # written before the agent starts, as an older agent or a peer could have:
    # msgpack carries NaN and raw bytes, JSON does not
    with direct_writer(data, bytes(range(16))) as w, transaction(w):
        w.put("legacy", "nan", float("nan"))
        w.put("legacy", "bytes", b"\x00raw")
        w.put("legacy", "ok", {"fine": 1})
    a = AgentProc("a", "127.0.0.252", free_port(kind=socket.SOCK_DGRAM), data, {})
    try:
        yield a.start()
    finally:
        a.stop()


def raw(agent: AgentProc, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    c = http.client.HTTPConnection("127.0.0.1", agent.api_port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        # every answer, error or not, is JSON
        return r.status, json.loads(data), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


@pytest.mark.parametrize(("what", "text"), BAD_VALUES, ids=[w for w, _ in BAD_VALUES])
def test_put_refuses_values_json_cannot_round_trip(agent: AgentProc, what: str,
                                                   text: str) -> None:
    status, body, _ = raw(agent, "PUT", "/api/collections/bad/items/k",
                          ('{"value": ' + text + "}").encode())
    assert status == 400, body
    assert isinstance(body["error"], str)
    status, body, _ = raw(agent, "POST", "/api/collections/bad/items",
                          ('{"items": {"ok": 1, "k": ' + text + "}}").encode())
    assert status == 400, body
    assert isinstance(body["error"], str)
    # nothing of the refused batch was stored, the agent still answers
    assert raw(agent, "GET", "/api/collections/bad/items/ok")[0] == 404
    assert raw(agent, "GET", "/healthz")[0] == 200


def test_value_over_the_limit_is_413(agent: AgentProc) -> None:
    big = json.dumps({"value": "x" * ((1 << 20) + 10)}).encode()
    status, body, _ = raw(agent, "PUT", "/api/collections/big/items/k", big)
    assert status == 413, body
    status, body, _ = raw(agent, "POST", "/api/collections/big/items",
                          json.dumps({"items": {"k": "x" * ((1 << 20) + 10)}}).encode())
    assert status == 413, body


def _peak_rss_kib(pid: int) -> int:
    """The process's peak resident size so far (VmHWM), so a short-lived
    buffer counts even if it is freed before we look."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _send_huge(agent: AgentProc, method: str, path: str, chunked: bool,
               total: int = 50 << 20) -> tuple[int, Any, float]:
    """Send a ``total``-byte body (announced by Content-Length, or chunked
    without one) until the agent answers or closes; returns (status, body, seconds)."""
    s = socket.create_connection(("127.0.0.1", agent.api_port), timeout=10)
    t0 = time.monotonic()
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n")
                + "\r\n")
        s.sendall(head.encode())
        block = b"[" + b"1," * (1 << 19)  # 1 MiB of a JSON array that never ends
        sent = 0
        try:
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the agent answered and closed while we were still sending
        resp = b""
        while b"\r\n\r\n" not in resp or not _complete(resp):
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    head_text, _, payload = resp.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ", 2)[1])
    return status, json.loads(payload), elapsed


def _complete(resp: bytes) -> bool:
    head, _, payload = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(payload) >= int(line.split(b":")[1])
    return False


@pytest.mark.parametrize(("method", "path"), [("PUT", "/api/collections/huge/items/k"),
                                              ("POST", "/api/collections/huge/items")],
                         ids=["put", "batch"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_50mb_body_is_refused_early_with_bounded_memory(agent: AgentProc, method: str,
                                                         path: str, chunked: bool) -> None:
    assert agent.proc is not None
    before = _peak_rss_kib(agent.proc.pid)
    status, body, elapsed = _send_huge(agent, method, path, chunked)
    after = _peak_rss_kib(agent.proc.pid)
    assert status == 413, body
    assert "limit" in body["error"]
    assert elapsed < 10
    # a chunked batch is counted up to its 16 MiB limit before the refusal
    bound = (40 << 10) if method == "POST" and chunked else (20 << 10)
    assert after - before < bound, (before, after)
    assert raw(agent, "GET", "/healthz")[0] == 200


def _send_into(answers: list[tuple[int, Any, float]], agent: AgentProc) -> None:
    answers.append(_send_huge(agent, "POST", "/api/collections/huge/items", chunked=True))


def test_eight_chunked_50mb_batches_at_once_share_one_budget(tmp_path: Path) -> None:
    """Each chunked batch may grow to its 16 MiB limit before its 413; eight at
    once would hold 128 MiB but for the process-wide budget (24 MiB): a fresh
    agent's peak grows by well under that, every answer is a quick JSON 413 or
    503, and every refused connection is closed (none left parked on its
    unread body)."""
    data = tmp_path / "b"
    data.mkdir()
    b = AgentProc("b", "127.0.0.251", free_port(kind=socket.SOCK_DGRAM), data, {})
    b.start()
    try:
        assert b.proc is not None
        fd_dir = Path(f"/proc/{b.proc.pid}/fd")
        assert raw(b, "PUT", "/api/collections/c/items/k", b'{"value": 1}')[0] == 200
        fds = len(list(fd_dir.iterdir()))
        before = _peak_rss_kib(b.proc.pid)
        statuses = []
        for _ in range(3):
            answers: list[tuple[int, Any, float]] = []
            threads = [threading.Thread(target=_send_into, args=(answers, b))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(answers) == 8
            for status, body, elapsed in answers:
                statuses.append(status)
                assert status in (413, 503), body
                assert isinstance(body["error"], str)
                assert elapsed < 5, (status, elapsed)  # 10: the client gave up sending
        after = _peak_rss_kib(b.proc.pid)
        assert after - before < (40 << 10), (before, after, statuses)
        assert 503 in statuses
        deadline = time.monotonic() + 5
        while len(list(fd_dir.iterdir())) > fds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(fd_dir.iterdir())) <= fds
        # the budget is whole again: an honest batch goes through
        status, body, _ = raw(b, "POST", "/api/collections/c/items",
                              json.dumps({"items": {f"k{i}": "x" * 1000
                                                    for i in range(5000)}}).encode())
        assert status == 200, body
    finally:
        b.stop()


async def _feed(chunks: int, size: int = 1 << 20) -> AsyncIterator[bytes]:
    """``chunks`` MiB of JSON whitespace and then the document ``1``."""
    for _ in range(chunks):
        yield b" " * size
        await trio.sleep(0.001)
    yield b"1"


def test_body_budget_refuses_the_youngest_and_lets_the_oldest_finish() -> None:
    budget = BodyBudget(4 << 20)
    results: dict[str, Any] = {}

    async def send(name: str, chunks: int, delay: float) -> None:
        await trio.sleep(delay)
        try:
            results[name] = await read_json({}, _feed(chunks), 16 << 20, budget)
        except InputError as e:
            results[name] = (e.status, e.headers.get("Retry-After"))

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(send, "old", 6, 0.0)  # alone, it may pass the budget
            n.start_soon(send, "young", 3, 0.0005)

    trio.run(main)
    assert results == {"old": 1, "young": (503, "1")}
    assert budget.in_use == 0
    # with the budget whole again, a body that fits is read
    assert trio.run(read_json, {}, _feed(3), 16 << 20, budget) == 1


def test_errors_are_json_405_and_404(agent: AgentProc) -> None:
    status, body, headers = raw(agent, "PATCH", "/api/collections/c/items/k", b"{}")
    assert status == 405 and body == {"error": "method not allowed"}
    assert {"GET", "PUT", "DELETE"} <= set(headers["allow"].replace(" ", "").split(","))
    status, body, _ = raw(agent, "DELETE", "/api/swarm/peers")
    assert status == 405 and "error" in body
    status, body, _ = raw(agent, "GET", "/no/such/path")
    assert status == 404 and body["error"] == "not found"


def test_name_with_trailing_newline_is_refused(agent: AgentProc) -> None:
    status, body, _ = raw(agent, "PUT", "/api/collections/c1%0A/items/k", b'{"value": 1}')
    assert status == 400, body
    status, body, _ = raw(agent, "GET", "/api/collections")
    assert all("\n" not in c["name"] for c in body)


def test_key_that_is_not_utf8_is_refused(agent: AgentProc) -> None:
    for key in ("%FF", "a%C3", "%ED%A0%80"):
        status, body, _ = raw(agent, "PUT", f"/api/collections/keys/items/{key}",
                              b'{"value": 1}')
        assert status == 400, (key, body)
    assert raw(agent, "GET", "/api/collections/keys/items")[0] == 200
    status, body, _ = raw(agent, "GET", "/api/collections/keys/items")
    assert body["items"] == []
    # a real UTF-8 key, percent-encoded, is fine
    status, body, _ = raw(agent, "PUT", "/api/collections/keys/items/caf%C3%A9",
                          b'{"value": 1}')
    assert status == 200 and body["key"] == "café"


def test_stored_values_json_cannot_carry_are_served_flagged(agent: AgentProc) -> None:
    status, body, _ = raw(agent, "GET", "/api/collections/legacy/items/nan")
    assert status == 200, body
    assert body["value"] is None and "not representable" in body["value_error"]
    assert msgpack.unpackb(base64.b64decode(body["value_msgpack_b64"])) != 0  # NaN
    status, page, _ = raw(agent, "GET", "/api/collections/legacy/items")
    assert status == 200, page
    by_key = {i["key"]: i for i in page["items"]}
    assert by_key["ok"]["value"] == {"fine": 1} and "value_error" not in by_key["ok"]
    assert by_key["bytes"]["value"] is None and by_key["bytes"]["value_error"]
    assert by_key["nan"]["value_error"]


@pytest.mark.filterwarnings("ignore:Using `httpx`")
def test_500_carries_no_details_to_the_client(caplog: pytest.LogCaptureFixture) -> None:
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from agent.face.api import build_app

    async def broken(request: Any) -> Any:
        raise RuntimeError("secret detail /var/lib/x")

    app = build_app(lambda: None, [Route("/broken", broken)])  # type: ignore[arg-type, return-value]
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/broken")
        assert r.status_code == 500 and r.json() == {"error": "internal error"}
        assert "secret" not in r.text and "Traceback" not in r.text
        r = client.post("/broken", content=b"x" * 100, headers={"Content-Length": "99999999"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
    assert any("secret detail" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_cli_get_of_a_flagged_value_says_why(agent: AgentProc) -> None:
    from tests.agents import run_cli

    api = f"127.0.0.1:{agent.api_port}"
    r = run_cli("get", "legacy", "nan", "--api", api)
    assert r.returncode == 1 and "not representable as JSON" in r.stderr, r
    assert len(r.stderr.splitlines()) == 1
    r = run_cli("get", "legacy", "nan", "--full", "--api", api)
    assert r.returncode == 0 and json.loads(r.stdout)["value_msgpack_b64"]
    r = run_cli("get", "legacy", "ok", "--api", api)
    assert r.returncode == 0 and json.loads(r.stdout) == {"fine": 1}
