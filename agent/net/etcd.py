"""A small client for etcd's v3 JSON gateway: leases and the one leader key.

Only what a leader election needs, spoken over the gRPC gateway that every
etcd 3.4+ serves on its client URLs (``POST /v3/...``, JSON bodies, keys and
values base64, 64-bit integers as decimal strings).

Rules:

* Endpoints are tried in order, starting from the last one that answered; an
  endpoint that cannot be reached, times out or answers 5xx / gRPC
  UNAVAILABLE is skipped for the next one. An answer from etcd itself (lease
  not found, bad request) is final and raised as :class:`EtcdError`.
* Every request has one total deadline (``timeout``): connect, send and read
  together, so a stalled endpoint cannot hold a keepalive past its lease.
* Answers are read up to ``MAX_RESPONSE`` bytes and must be a JSON object;
  anything else is an :class:`EtcdError` naming the endpoint and the path.
* Requests that may be retried on another endpoint are safe to repeat:
  ``campaign`` recognises the key as its own when an earlier attempt already
  created it with the same lease; a repeated ``grant`` at worst leaves an
  unused lease that expires after its TTL.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

#: Largest answer read from etcd: a leader key's value is small, and no call
#: here asks for more than one key.
MAX_RESPONSE = 256 * 1024

#: gRPC status codes that mean "this endpoint cannot serve now, try another".
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE


class EtcdError(Exception):
    """A call failed. ``str()`` is one line naming what and where."""


class EtcdUnreachable(EtcdError):
    """No endpoint answered in time."""


@dataclass(frozen=True)
class Leader:
    """The holder of a leader key: its value, the key's create revision (the
    fencing epoch) and the lease keeping it alive."""

    value: bytes
    epoch: int
    lease_id: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EtcdError(f"etcd answer: {what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdError(f"etcd answer: {what} is not valid base64") from None


def _int(value: object, what: str, default: int | None = None) -> int:
    """A 64-bit integer as the gateway writes it (a decimal string; fields at
    zero are left out, hence ``default``)."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdError(f"etcd answer: {what} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise EtcdError(f"etcd answer: {what} is not an integer") from None


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


class EtcdClient:
    """``endpoints`` are base URLs (``http://127.0.0.1:2379``); ``timeout`` is
    the total time one request may take on one endpoint. Use as an async
    context manager, or call :meth:`aclose`."""

    def __init__(self, endpoints: list[str], timeout: float = 2.0,
                 *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._preferred = 0
        # The system trust store (what an operator adds a site CA to), not a
        # bundled one; redirects are not followed: an endpoint answers itself.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), transport=transport,
            verify=ssl.create_default_context(), follow_redirects=False,
            headers={"content-type": "application/json"})

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport ---------------------------------------------------------

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that answers; the
        answer's JSON object. Raises EtcdError / EtcdUnreachable."""
        payload = json.dumps(body).encode()
        failures: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            index = (self._preferred + i) % n
            base = self.endpoints[index]
            try:
                status, raw = await self._post(base + path, payload)
            except (httpx.HTTPError, OSError, TimeoutError) as e:
                failures.append(f"{base}: {type(e).__name__} {e}".strip())
                continue
            if status >= 500:
                # etcd's own 5xx are JSON; a proxy's may not be: either way
                # this endpoint cannot serve, so the next one is asked.
                failures.append(f"{base}: HTTP {status}")
                continue
            answer = self._decode(base, path, raw)
            if status != 200 and answer.get("code") in _UNAVAILABLE_CODES:
                failures.append(f"{base}: HTTP {status} {answer.get('message', '')}".strip())
                continue
            self._preferred = index
            if status != 200:
                raise EtcdError(f"etcd {base}{path}: HTTP {status}: "
                                f"{answer.get('message') or answer.get('error') or 'error'}")
            return answer
        raise EtcdUnreachable(f"etcd {path}: no endpoint answered ({'; '.join(failures)})")

    async def _post(self, url: str, payload: bytes) -> tuple[int, bytes]:
        with anyio.fail_after(self.timeout):
            async with self._http.stream("POST", url, content=payload) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        raise EtcdError(f"etcd {url}: answer larger than {MAX_RESPONSE} bytes")
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks)

    @staticmethod
    def _decode(base: str, path: str, raw: bytes) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise EtcdError(f"etcd {base}{path}: answer is not JSON") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd {base}{path}: answer is not a JSON object")
        return answer

    # --- leases --------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its ID. etcd raises a TTL below its
        minimum (2 s by default) to that minimum, never lowers one: the lease
        lives at least ``ttl`` seconds after etcd granted it."""
        answer = await self.call("/v3/lease/grant", {"TTL": int(ttl)})
        if answer.get("error"):
            raise EtcdError(f"etcd lease grant: {answer['error']}")
        lease_id = _int(answer.get("ID"), "lease ID")
        if lease_id <= 0:
            raise EtcdError("etcd lease grant: no lease ID in the answer")
        return lease_id

    async def keepalive(self, lease_id: int) -> int:
        """Renew a lease once; the TTL it was renewed to, 0 when the lease no
        longer exists (expired or revoked)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": lease_id})
        # A streaming call: the gateway wraps each message as {"result": ...}
        # or {"error": ...}.
        if "error" in answer and "result" not in answer:
            err = answer["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise EtcdError(f"etcd lease keepalive: {message}")
        result = answer.get("result", answer)
        if not isinstance(result, dict):
            raise EtcdError("etcd lease keepalive: no result in the answer")
        return max(0, _int(result.get("TTL"), "lease TTL", 0))

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (deleting the keys attached to it). A lease that is
        already gone is not an error."""
        try:
            await self.call("/v3/lease/revoke", {"ID": lease_id})
        except EtcdUnreachable:
            raise
        except EtcdError as e:
            if "lease not found" not in str(e):
                raise

    # --- the leader key ------------------------------------------------------

    async def campaign(self, key: str | bytes, value: bytes, lease_id: int) -> int | None:
        """Create ``key`` with ``value`` attached to ``lease_id`` if it does
        not exist. The key's create revision (the fencing epoch) when this
        lease holds it, None when another lease does."""
        k = _b64(_key_bytes(key))
        answer = await self.call("/v3/kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
            "failure": [{"request_range": {"key": k}}],
        })
        if answer.get("succeeded"):
            # The key was created by this transaction: its create revision is
            # the transaction's revision.
            header = answer.get("header")
            if not isinstance(header, dict):
                raise EtcdError("etcd txn: no header in the answer")
            return _int(header.get("revision"), "revision")
        holder = self._holder_from_txn(answer)
        if holder is not None and holder.lease_id == lease_id:
            return holder.epoch  # an earlier attempt of ours already won
        return None

    async def leader(self, key: str | bytes) -> Leader | None:
        """The key's current holder, None when nobody holds it."""
        answer = await self.call("/v3/kv/range", {"key": _b64(_key_bytes(key))})
        return self._first_kv(answer)

    async def resign(self, key: str | bytes, lease_id: int) -> bool:
        """Delete ``key`` if ``lease_id`` still holds it; True if it did."""
        k = _b64(_key_bytes(key))
        answer = await self.call("/v3/kv/txn", {
            "compare": [{"key": k, "target": "LEASE", "lease": str(lease_id)}],
            "success": [{"request_delete_range": {"key": k}}],
        })
        return bool(answer.get("succeeded"))

    async def delete(self, key: str | bytes) -> int:
        """Delete ``key`` whoever holds it (an operator's forced resignation);
        the number of keys deleted."""
        answer = await self.call("/v3/kv/deleterange", {"key": _b64(_key_bytes(key))})
        return _int(answer.get("deleted"), "deleted", 0)

    def _holder_from_txn(self, answer: dict[str, Any]) -> Leader | None:
        responses = answer.get("responses")
        if not isinstance(responses, list) or not responses:
            return None
        first = responses[0]
        if not isinstance(first, dict) or not isinstance(first.get("response_range"), dict):
            return None
        return self._first_kv(first["response_range"])

    @staticmethod
    def _first_kv(answer: dict[str, Any]) -> Leader | None:
        kvs = answer.get("kvs")
        if not kvs:
            return None
        if not isinstance(kvs, list) or not isinstance(kvs[0], dict):
            raise EtcdError("etcd answer: kvs is not a list of objects")
        kv = kvs[0]
        return Leader(
            value=_unb64(kv.get("value", ""), "value"),
            epoch=_int(kv.get("create_revision"), "create_revision"),
            lease_id=_int(kv.get("lease"), "lease", 0),
        )
