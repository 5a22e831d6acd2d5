"""HTTP routes for replicated collections.

``PUT/GET/DELETE /api/collections/{name}/items/{key}``, ``GET /api/collections``,
``GET /api/collections/{name}/items?prefix=&after=&limit=``, ``POST
/api/collections/{name}/items`` (a batch ``{"items": {key: value}}`` in one
transaction) and ``POST /api/collections/{name}/verify[?repair=1]``. Errors are JSON
``{"error": ...}`` with 400 (bad name, key or JSON), 404 (no such item), 413
(body or value over its limit), 507 (disk full: writes refused, reads go on)
or 503 (the database file is damaged: restart the agent; or, with
``Retry-After``, too many request bodies in flight at once). Bodies are read and parsed by
agent.face.json_input, so nothing that is not strict JSON reaches the store.
Versions are shown as ``updated_ms`` (the HLC's wall-clock part, Unix
milliseconds), ``counter`` and ``origin`` (node UUID), so every integer stays
below 2**53. A stored value that cannot be served as JSON (written by an older
agent or a buggy peer) is shown as ``"value": null`` with ``value_error`` and
``value_msgpack_b64`` (its stored bytes), never as a 500.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.core.clock import counter, physical_ms
from agent.face.json_input import InputError, json_problem, read_json
from agent.store import Store, StoreError, check_key, check_name, decode_value, encode_value
from merkle.tree import Item

if TYPE_CHECKING:
    from agent.runtime.forwarding import WriteGate, Written

MAX_PAGE = 1000
MAX_BATCH_ITEMS = 10_000
MAX_BATCH_BODY = 16 << 20


def put_body_limit(max_value: int) -> int:
    """Largest PUT body: JSON may take up to twice the encoded size, plus the envelope."""
    return 2 * max_value + 1024


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def _input_error(e: InputError) -> JSONResponse:
    # a body refused part-way was not read to its end: close the connection
    # rather than reading (and dropping) the rest of it
    headers = {**e.headers, "Connection": "close"} if e.status in (413, 503) else e.headers
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


def _store_error(e: StoreError) -> JSONResponse:
    # a store error may name its own status (e.g. a full disk); otherwise the
    # request itself was refused
    return _error(int(getattr(e, "status", 400)), str(e))


def value_fields(data: bytes | None) -> dict[str, Any]:
    """``{"value": ...}``, or for stored bytes that are not strict JSON
    ``{"value": None, "value_error": why, "value_msgpack_b64": the bytes}``."""
    try:
        value = decode_value(data)
    except Exception as e:  # any undecodable bytes are reported, not raised
        problem: str | None = f"stored value does not decode: {type(e).__name__}"
    else:
        problem = json_problem(value)
        if problem is None:
            return {"value": value}
    return {"value": None, "value_error": f"not representable as JSON: {problem}",
            "value_msgpack_b64": base64.b64encode(data or b"").decode("ascii")}


def item_view(name: str, item: Item) -> dict[str, Any]:
    return {
        "collection": name,
        "key": item.key,
        **value_fields(item.value),
        "deleted": item.deleted,
        "updated_ms": physical_ms(item.hlc),
        "counter": counter(item.hlc),
        "origin": str(uuid.UUID(bytes=item.origin)),
    }


def _path_is_utf8(request: Request) -> bool:
    """The server decodes %XX escapes leniently (invalid UTF-8 becomes U+FFFD,
    so two byte strings would land on one key); the raw path must decode
    strictly."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return True
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _too_large(value: Any, max_value: int, what: str) -> JSONResponse | None:
    n = len(encode_value(value))
    if n > max_value:
        return _error(413, f"{what} is {n} bytes encoded; the limit is {max_value} "
                           "(HS_GOSSIP_MAX_VALUE)")
    return None


def _written(name: str, w: Written) -> JSONResponse:
    """A write that went through agent.runtime.forwarding: forwarded to the
    leader (``leader_position`` set) or kept locally."""
    if w.status != 200:
        return _error(w.status, w.message)
    body: dict[str, Any] = item_view(name, w.item) if w.item is not None else \
        {"collection": name, "written": w.written}
    body["leader_position"] = None if w.position is None else {
        "epoch": w.position.epoch, "seq": w.position.seq, "hash": w.position.hash.hex()}
    return JSONResponse(body)


def routes(store: Store, max_value: int,
           writes: Callable[[], WriteGate | None] | None = None) -> list[Route]:
    """``writes()``: the agent's write gate once replication runs: while
    this agent follows a leader, writes go through it
    (agent.runtime.forwarding) and reads of a key written there wait for it."""

    def gate() -> WriteGate | None:
        return None if writes is None else writes()
    async def list_collections(request: Request) -> JSONResponse:
        return JSONResponse([
            {"name": c.name, "state_hash": c.state_hash.hex(), "vector_count": c.count,
             "tombstones": c.total - c.count, "tombstone_horizon_ms": physical_ms(c.horizon)}
            for c in store.digests()
        ])

    def _target(request: Request) -> tuple[str, str] | JSONResponse:
        name = request.path_params["name"]
        key = request.path_params.get("key", "x")
        if not _path_is_utf8(request):
            return _error(400, "the path is not valid UTF-8 once %XX escapes are decoded")
        try:
            check_name(name)
            check_key(key)
        except StoreError as e:
            return _error(400, str(e))
        return name, key

    async def put_item(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            doc = await read_json(request.headers, request.stream(), put_body_limit(max_value))
        except InputError as e:
            return _input_error(e)
        if not isinstance(doc, dict) or "value" not in doc:
            return _error(400, 'body must be a JSON object with a "value" field')
        refused = _too_large(doc["value"], max_value, "value")
        if refused is not None:
            return refused
        try:
            if (g := gate()) is not None:
                return _written(t[0], await g.put(t[0], t[1], doc["value"]))
            item = await store.put(t[0], t[1], doc["value"])
        except StoreError as e:
            return _store_error(e)
        return JSONResponse(item_view(t[0], item))

    async def get_item(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            if (g := gate()) is not None:
                await g.settle(*t)
            item = await store.get(*t)
        except StoreError as e:  # a damaged database: 503, see agent.store.store
            return _store_error(e)
        if item is None or item.deleted:
            return _error(404, f"no item {t[1]!r} in collection {t[0]!r}")
        return JSONResponse(item_view(t[0], item))

    async def delete_item(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            if (g := gate()) is not None:
                return _written(t[0], await g.delete(*t))
            item = await store.delete(*t)
        except StoreError as e:  # a full disk: 507
            return _store_error(e)
        if item is None:
            return _error(404, f"no item {t[1]!r} in collection {t[0]!r}")
        return JSONResponse(item_view(t[0], item))

    async def list_items(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_PAGE:
            return _error(400, f"limit must be between 1 and {MAX_PAGE}")
        try:
            items = await store.list_items(t[0], q.get("prefix", ""), q.get("after", ""),
                                           limit)
        except StoreError as e:  # a damaged database: 503
            return _store_error(e)
        body: dict[str, Any] = {"items": [item_view(t[0], i) for i in items]}
        body["next_after"] = items[-1].key if len(items) == limit else None
        return JSONResponse(body)

    async def put_batch(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            doc = await read_json(request.headers, request.stream(), MAX_BATCH_BODY)
        except InputError as e:
            return _input_error(e)
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, dict) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            return _error(400, f'"items" must map 1-{MAX_BATCH_ITEMS} keys to values')
        for key, value in items.items():
            refused = _too_large(value, max_value, f"value of {key!r}")
            if refused is not None:
                return refused
        try:
            if (g := gate()) is not None:
                return _written(t[0], await g.put_many(t[0], items))
            changed = await store.put_many(t[0], items)
        except StoreError as e:
            return _store_error(e)
        return JSONResponse({"collection": t[0], "written": changed})

    async def verify(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            report = await store.verify(t[0], repair=request.query_params.get("repair") == "1")
        except StoreError as e:
            return _error(int(getattr(e, "status", 404)), str(e))
        return JSONResponse(report)

    Handler = Callable[[Request], Awaitable[JSONResponse]]

    def by_method(handlers: dict[str, Handler]) -> Handler:
        # one route per path, so a 405 lists every allowed method in Allow
        handlers = {**handlers, "HEAD": handlers["GET"]} if "GET" in handlers else handlers

        async def dispatch(request: Request) -> JSONResponse:
            return await handlers[request.method](request)
        return dispatch

    items_path = "/api/collections/{name}/items"
    return [
        Route("/api/collections", list_collections, methods=["GET"]),
        Route("/api/collections/{name}/verify", verify, methods=["POST"]),
        Route(items_path, by_method({"GET": list_items, "POST": put_batch}),
              methods=["GET", "POST"]),
        Route(items_path + "/{key:path}",
              by_method({"GET": get_item, "PUT": put_item, "DELETE": delete_item}),
              methods=["GET", "PUT", "DELETE"]),
    ]
