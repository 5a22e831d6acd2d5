"""HTTP routes for replicated collections.

``PUT/GET/DELETE /api/collections/{name}/items/{key}``, ``GET /api/collections``,
``GET /api/collections/{name}/items?prefix=&after=&limit=``, ``POST
/api/collections/{name}/items`` (a batch ``{"items": {key: value}}`` in one
transaction) and ``POST /api/collections/{name}/verify[?repair=1]``. Errors are JSON
``{"error": ...}`` with 400 (bad name, key, size or JSON), 404 (no such item)
or 413 (body too large). Versions are shown as ``updated_ms`` (the HLC's
wall-clock part, Unix milliseconds), ``counter`` and ``origin`` (node UUID), so
every integer stays below 2**53.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.core.clock import counter, physical_ms
from agent.store import Store, StoreError, check_key, check_name, decode_value
from merkle.tree import Item

MAX_PAGE = 1000
MAX_BATCH_ITEMS = 10_000
MAX_BATCH_BODY = 16 << 20


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def item_view(name: str, item: Item) -> dict[str, Any]:
    return {
        "collection": name,
        "key": item.key,
        "value": decode_value(item.value),
        "deleted": item.deleted,
        "updated_ms": physical_ms(item.hlc),
        "counter": counter(item.hlc),
        "origin": str(uuid.UUID(bytes=item.origin)),
    }


def routes(store: Store, max_value: int) -> list[Route]:
    async def list_collections(request: Request) -> JSONResponse:
        return JSONResponse([
            {"name": c.name, "state_hash": c.state_hash.hex(), "vector_count": c.count,
             "tombstones": c.total - c.count, "tombstone_horizon_ms": physical_ms(c.horizon)}
            for c in store.digests()
        ])

    def _target(request: Request) -> tuple[str, str] | JSONResponse:
        name = request.path_params["name"]
        key = request.path_params.get("key", "x")
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
        body = await request.body()
        if len(body) > 2 * max_value + 1024:
            return _error(413, f"body larger than the value limit ({max_value} bytes encoded)")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'body must be JSON: {"value": ...}')
        if not isinstance(doc, dict) or "value" not in doc:
            return _error(400, 'body must be a JSON object with a "value" field')
        try:
            item = await store.put(t[0], t[1], doc["value"])
        except StoreError as e:
            return _error(400, str(e))
        return JSONResponse(item_view(t[0], item))

    async def get_item(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        item = await store.get(*t)
        if item is None or item.deleted:
            return _error(404, f"no item {t[1]!r} in collection {t[0]!r}")
        return JSONResponse(item_view(t[0], item))

    async def delete_item(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        item = await store.delete(*t)
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
        items = await store.list_items(t[0], q.get("prefix", ""), q.get("after", ""), limit)
        body: dict[str, Any] = {"items": [item_view(t[0], i) for i in items]}
        body["next_after"] = items[-1].key if len(items) == limit else None
        return JSONResponse(body)

    async def put_batch(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        body = await request.body()
        if len(body) > MAX_BATCH_BODY:
            return _error(413, f"batch body larger than {MAX_BATCH_BODY} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, 'body must be JSON: {"items": {"key": value, ...}}')
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, dict) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            return _error(400, f'"items" must map 1-{MAX_BATCH_ITEMS} keys to values')
        try:
            changed = await store.put_many(t[0], items)
        except StoreError as e:
            return _error(400, str(e))
        return JSONResponse({"collection": t[0], "written": changed})

    async def verify(request: Request) -> JSONResponse:
        t = _target(request)
        if isinstance(t, JSONResponse):
            return t
        try:
            report = await store.verify(t[0], repair=request.query_params.get("repair") == "1")
        except StoreError as e:
            return _error(404, str(e))
        return JSONResponse(report)

    return [
        Route("/api/collections", list_collections, methods=["GET"]),
        Route("/api/collections/{name}/verify", verify, methods=["POST"]),
        Route("/api/collections/{name}/items", put_batch, methods=["POST"]),
        Route("/api/collections/{name}/items", list_items, methods=["GET"]),
        Route("/api/collections/{name}/items/{key:path}", get_item, methods=["GET"]),
        Route("/api/collections/{name}/items/{key:path}", put_item, methods=["PUT"]),
        Route("/api/collections/{name}/items/{key:path}", delete_item, methods=["DELETE"]),
    ]
