"""Strict JSON in and out of the HTTP API: request bodies read under a size
limit, parsed into values a browser could round-trip, and stored values
checked before they are served.

Rules (the README's "HTTP API" section states them to users):

* a body is read only up to its limit: a ``Content-Length`` over the limit is
  refused before anything is read, a body without one is counted while it
  streams in and refused as soon as it passes the limit (413);
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

import json
import math
from collections.abc import AsyncIterator
from typing import Any, NoReturn

#: deepest nesting of arrays/objects accepted in a value (the value itself is depth 1)
MAX_DEPTH = 64
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
# decimal digits of the widest accepted integer: longer literals are refused unparsed
_MAX_INT_DIGITS = len(str(INT_MAX)) + 1


class InputError(Exception):
    """A request refused for its body; ``status`` is 400 or 413. Safe to show."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


def _refuse(msg: str) -> NoReturn:
    raise InputError(400, msg)


async def read_limited(headers: Any, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, refused with 413 once it is known to exceed ``limit`` bytes:
    by ``Content-Length`` before reading, else by counting while it streams."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InputError(400, "Content-Length is not a number") from None
        if n > limit:
            raise InputError(413, f"body of {n} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise InputError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("body is not valid UTF-8")
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
