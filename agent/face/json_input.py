"""Strict JSON in and out of the HTTP API: request bodies read under a size
limit, parsed into values a browser could round-trip, and stored values
checked before they are served.

Rules (the README's "HTTP API" section states them to users):

* a body is read only up to its limit: a ``Content-Length`` over the limit is
  refused before anything is read, a body without one is counted while it
  streams in and refused as soon as it passes the limit (413);
* the bodies being read at once share one process-wide budget,
  :data:`BODY_BUDGET` bytes (:class:`BodyBudget`), so many clients each
  sending a body just under its limit cannot add up: a body grows only while
  the total held fits. When it does not, the latest body to start is refused
  at once with 503 and ``Retry-After`` (its bytes go back to the older ones),
  an older one waits up to :data:`BUDGET_WAIT` seconds for room, then is
  refused the same way. The oldest body always makes progress, so honest
  concurrent writers are served one after another rather than all refused;
  a body alone may grow up to its own limit even past the budget;
* a body is held once while it streams in (the server's chunks, kept as they
  come); once whole it is joined, decoded to text and its bytes dropped
  before parsing, and its share of the budget is held until parsing ends.
  Joining, decoding and parsing run without a pause, so only one body at a
  time is in that step: the process holds at most the budget plus one
  body's parse (its limit, twice, and the parsed value);
* a body is strict UTF-8 (no BOM, no encoded surrogates);
* numbers: integers in msgpack's range (-2**63 .. 2**64-1), floats finite
  (``NaN``, ``Infinity``, ``-Infinity`` and ``1e999`` are refused);
* strings (values and object keys) hold no lone surrogate (``"\\ud800"``);
* nesting is at most :data:`MAX_DEPTH` arrays/objects deep; the check walks
  the value with an explicit stack, and a body nested deeper than the parser's
  own recursion guard is refused the same way (400, not 500).

Nothing here touches the store; :class:`InputError` carries the HTTP status.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import anyio

#: deepest nesting of arrays/objects accepted in a value (the value itself is depth 1)
MAX_DEPTH = 64
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
# decimal digits of the widest accepted integer: longer literals are refused unparsed
_MAX_INT_DIGITS = len(str(INT_MAX)) + 1


#: bytes of request bodies held at once by the whole process (see BodyBudget)
BODY_BUDGET = 24 << 20
#: longest an older body waits for room in the budget before its 503
BUDGET_WAIT = 5.0
#: seconds a client refused for the budget is told to wait (Retry-After)
RETRY_AFTER = 1
_POLL = 0.01


class InputError(Exception):
    """A request refused for its body; ``status`` is 400, 413 or 503 (with
    ``headers``, e.g. Retry-After). Safe to show."""

    def __init__(self, status: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.headers = headers or {}


class BodyBudget:
    """Bytes of request bodies held at once, across every request of the
    process. Readers are ordered by when they started; see the module's rules
    for who waits and who is refused. Polls instead of using events, so it
    runs unchanged under trio and asyncio (a wait is short and rare)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self._held: dict[int, int] = {}  # reader id -> bytes, oldest first
        self._ids = itertools.count()

    @contextmanager
    def reader(self) -> Iterator[_Reader]:
        r = _Reader(self, next(self._ids))
        self._held[r.id] = 0
        try:
            yield r
        finally:
            self.in_use -= self._held.pop(r.id)


class _Reader:
    def __init__(self, budget: BodyBudget, rid: int) -> None:
        self.budget = budget
        self.id = rid

    async def take(self, n: int) -> None:
        """Hold ``n`` more bytes, waiting or refusing (503) as the rules say."""
        b = self.budget
        deadline: float | None = None
        while True:
            mine = b._held[self.id]
            if b.in_use + n <= b.total or b.in_use == mine:
                b._held[self.id] = mine + n
                b.in_use += n
                return
            youngest = next(reversed(b._held))
            now = anyio.current_time()
            if deadline is None:
                deadline = now + BUDGET_WAIT
            if youngest == self.id or now >= deadline:
                raise InputError(
                    503, f"busy: request bodies in flight already hold {b.in_use} bytes "
                         f"(budget {b.total}); retry in {RETRY_AFTER} s",
                    {"Retry-After": str(RETRY_AFTER)})
            await anyio.sleep(_POLL)


BODIES = BodyBudget(BODY_BUDGET)


def _refuse(msg: str) -> NoReturn:
    raise InputError(400, msg)


async def read_json(headers: Any, stream: AsyncIterator[bytes], limit: int,
                    budget: BodyBudget | None = None) -> Any:
    """The body's JSON document, checked like :func:`parse_body`. Refused with
    413 once the body is known to exceed ``limit`` bytes (by ``Content-Length``
    before reading, else by counting while it streams), with 503 when the
    process-wide budget has no room for it (see the module's rules)."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InputError(400, "Content-Length is not a number") from None
        if n > limit:
            raise InputError(413, f"body of {n} bytes is over the limit of {limit} bytes")
    with (budget or BODIES).reader() as r:
        # the server's own chunks are kept as they come (a growing buffer
        # would copy and fragment); joined once, in one synchronous step
        chunks: list[bytes] = []
        size = 0
        async for chunk in stream:
            if size + len(chunk) > limit:
                raise InputError(413, f"body is over the limit of {limit} bytes")
            await r.take(len(chunk))
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
        chunks.clear()
        text = _decode(body)
        del body  # drop the bytes before parsing: the text is the copy
        return _parse_text(text)


def _decode(body: bytes | bytearray) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("body is not valid UTF-8")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        _refuse("integer out of range (64-bit: -2**63 .. 2**64-1)")
    n = int(text)
    if not INT_MIN <= n <= INT_MAX:
        _refuse("integer out of range (64-bit: -2**63 .. 2**64-1)")
    return n


def _parse_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        _refuse(f"number {text[:40]} is out of range (not a finite double)")
    return f


def _parse_constant(text: str) -> NoReturn:
    _refuse(f"{text} is not JSON (no NaN or Infinity)")


def parse_body(body: bytes) -> Any:
    """The JSON document in ``body``, checked by the rules above (InputError 400)."""
    return _parse_text(_decode(body))


def _parse_text(text: str) -> Any:
    try:
        doc = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                         parse_constant=_parse_constant)
    except RecursionError:
        _refuse(f"JSON nested deeper than {MAX_DEPTH}")
    except ValueError as e:  # JSONDecodeError included
        _refuse(f"not JSON: {e}")
    problem = json_problem(doc)
    if problem is not None:
        _refuse(problem)
    return doc


def json_problem(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` cannot be served as strict JSON, or None when it can.
    Walks with an explicit stack, so depth is checked without recursion; a
    value decoded from storage may hold anything msgpack can (bytes, NaN,
    non-string keys, invalid strings), a parsed body only what the parser let
    through."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is str:
            if not _utf8_ok(v):
                return "string is not valid UTF-8 (lone surrogate)"
        elif t is bool or v is None:
            continue
        elif t is int:
            if not INT_MIN <= v <= INT_MAX:
                return "integer out of range (64-bit: -2**63 .. 2**64-1)"
        elif t is float:
            if not math.isfinite(v):
                return "number is NaN or infinite"
        elif t is list or t is dict:
            if depth > max_depth:
                return f"JSON nested deeper than {max_depth}"
            if t is dict:
                for k, x in v.items():
                    if type(k) is not str:
                        return "object key is not a string"
                    if not _utf8_ok(k):
                        return "object key is not valid UTF-8 (lone surrogate)"
                    if type(x) in (list, dict, str, float, int):
                        stack.append((x, depth + 1))
                    elif not (x is None or type(x) is bool):
                        return f"{type(x).__name__} is not a JSON type"
            else:
                for x in v:
                    if type(x) in (list, dict, str, float, int):
                        stack.append((x, depth + 1))
                    elif not (x is None or type(x) is bool):
                        return f"{type(x).__name__} is not a JSON type"
        else:
            return f"{t.__name__} is not a JSON type"
    return None


def _utf8_ok(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
