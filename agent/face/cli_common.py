"""What every CLI command module shares: the :class:`Command` table row, the
:class:`Listing` registry row, the one-line error (:func:`fail`) and the
client of the local HTTP API.

Command modules (cli, cli_data, cli_ops) import this and never each other.
agent.face.cli lists every subcommand (name, help, module) in its registry and
imports a command module only when one of its commands is chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import ConfigError, load, parse_host_port

#: runs a parsed command line, returns the exit code
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``hs-gossip NAME ...``; its help line is in the registry
    (:class:`Listing`)."""

    name: str
    run: Handler
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


@dataclass(frozen=True)
class Listing:
    """One line of ``hs-gossip --help``: a subcommand's name and help, and the
    module whose ``COMMANDS`` table holds it."""

    name: str
    help: str
    module: str


def fail(msg: str, code: int = 1) -> int:
    """Print the one-line error on stderr; returns the exit code."""
    print(f"hs-gossip: {msg}", file=sys.stderr)
    return code


class UsageError(Exception):
    """A command line our own checks refuse: one line on stderr, exit 2
    (agent.face.cli.main prints it)."""


def api_address(text: str) -> str:
    """``--api``: ``host:port``, ``[v6]:port`` or an ``http(s)://host:port`` URL.
    An argparse type: a bad address is a usage error."""
    if text.startswith(("http://", "https://")):
        url = urllib.parse.urlsplit(text)
        try:
            port = url.port
        except ValueError:
            port = -1
        if not url.hostname or port == -1 or url.query or url.fragment:
            raise argparse.ArgumentTypeError(f"{text!r} is not http://HOST:PORT")
        return text.rstrip("/")
    try:
        hp = parse_host_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (such as 127.0.0.1:50050)") from None
    return str(hp)


def add_api_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="HOST:PORT", type=api_address,
                   help="agent API address (default: $HS_GOSSIP_API or 127.0.0.1:50050)")


def api_base(args: argparse.Namespace) -> str:
    if getattr(args, "api", None):
        text = str(args.api)
    else:
        try:
            cfg, _ = load()
        except ConfigError as e:
            raise UsageError(str(e)) from None
        text = str(cfg.api)
    if text.startswith("http://") or text.startswith("https://"):
        return text.rstrip("/")
    host, _, port = text.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"http://{host}:{port}"


class ApiError(Exception):
    pass


def api_request(args: argparse.Namespace, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    """Call the local API; returns (status, decoded JSON). ApiError when the
    agent cannot be reached. Sends ``HS_GOSSIP_API_TOKEN`` from the
    environment as a bearer token when it is set."""
    import http.client  # not imported by the agent process itself
    import urllib.error
    import urllib.request

    url = api_base(args) + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("HS_GOSSIP_API_TOKEN", "").strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"error": e.reason}
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise ApiError(f"cannot reach the agent at {url}: {reason} (is it running?)") from None


def api_get(args: argparse.Namespace, path: str) -> Any:
    status, body = api_request(args, "GET", path)
    if status != 200:
        raise ApiError(f"GET {path} answered {status}: {body}")
    return body
