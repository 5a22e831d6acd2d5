"""Command line: ``hs-gossip run | peers | status | demo | --version``.

Errors are one line on stderr, never a traceback. Exit codes: 0 ok, 1 runtime
failure (port taken, agent not reachable), 2 bad configuration or usage.
Other modules add subcommands through :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config import FIELDS, PREFIX, ConfigError, check_data_dir, load

Handler = Callable[[argparse.Namespace], int]

#: name -> (help, handler). A handler returns the exit code and may carry an
#: ``add_arguments(parser)`` attribute.
COMMANDS: dict[str, tuple[str, Handler]] = {}


def command(name: str, help: str) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        COMMANDS[name] = (help, fn)
        return fn

    return wrap


def fail(msg: str, code: int = 1) -> int:
    print(f"hs-gossip: {msg}", file=sys.stderr)
    return code


def setup_logging(level: str, fmt: str) -> None:
    try:
        from agent.runtime.logging_setup import configure
    except ImportError:
        logging.basicConfig(level=level, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        configure(level, fmt)


# --- run -------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    for var, spec in FIELDS.items():
        flag = "--" + spec.attr.replace("_", "-")
        p.add_argument(flag, dest=spec.attr, metavar=var,
                       help=f"{spec.help} (env {PREFIX}{var}, default {spec.default_text})")


@command("run", "run the agent in the foreground")
def cmd_run(args: argparse.Namespace) -> int:
    overrides = {spec.attr: getattr(args, spec.attr) for spec in FIELDS.values()
                 if getattr(args, spec.attr, None) is not None}
    try:
        cfg, warnings = load(overrides=overrides)
        check_data_dir(cfg.data_dir)
    except ConfigError as e:
        return fail(str(e), 2)
    setup_logging(cfg.log_level, cfg.log_format)
    log = logging.getLogger("hs_gossip")
    for w in warnings:
        log.warning("%s", w)

    from agent.runtime import identity
    from agent.runtime.agent import Agent
    from agent.runtime.errors import StartupError

    try:
        ident = identity.load_for_start(cfg.data_dir)
    except identity.IdentityError as e:
        return fail(str(e), 2)
    except OSError as e:
        return fail(f"cannot write identity in {cfg.data_dir} (HS_GOSSIP_DATA_DIR): {e}", 2)

    import anyio

    agent = Agent(cfg, ident)
    for hook in AGENT_HOOKS:
        hook(agent)
    try:
        anyio.run(agent.run, backend="trio")
    except StartupError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as eg:
        startup = [e for e in _leaves(eg) if isinstance(e, StartupError)]
        if startup:
            return fail(str(startup[0]), 1)
        raise
    return 0


cmd_run.add_arguments = _add_run_arguments  # type: ignore[attr-defined]

#: Functions called with the Agent before it runs (store, sync, metrics...).
AGENT_HOOKS: list[Callable[[Any], None]] = []


def _leaves(eg: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


# --- API clients -------------------------------------------------------------


def _add_api_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="HOST:PORT",
                   help="agent API address (default: $HS_GOSSIP_API or 127.0.0.1:50050)")


def api_base(args: argparse.Namespace) -> str:
    if getattr(args, "api", None):
        text = str(args.api)
    else:
        try:
            cfg, _ = load()
        except ConfigError as e:
            raise SystemExit(fail(str(e), 2)) from None
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
    agent cannot be reached."""
    import urllib.error  # not imported by the agent process itself
    import urllib.request

    url = api_base(args) + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"error": e.reason}
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ApiError(f"cannot reach the agent at {url}: {reason} (is it running?)") from None


def api_get(args: argparse.Namespace, path: str) -> Any:
    status, body = api_request(args, "GET", path)
    if status != 200:
        raise ApiError(f"GET {path} answered {status}: {body}")
    return body


def _age(now: float, ts: float) -> str:
    d = max(0.0, now - ts)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago"


def format_peers(body: dict[str, Any], now: float) -> str:
    rows = [("NODE", "NAME", "API", "ROLE", "HEALTHY", "CLOCK", "COLLECTIONS", "LAST SEEN")]
    for p in body["peers"]:
        rows.append((
            p["node_id"][:8], p.get("name") or "-", p["addr"], p["role"],
            "yes" if p["healthy"] else "NO", str(p["logical_clock"]),
            str(len(p["collections"])), _age(now, p["last_seen_secs"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append(f"{body['peer_count']} peer(s)")
    return "\n".join(lines)


@command("peers", "list the peers the local agent knows")
def cmd_peers(args: argparse.Namespace) -> int:
    import time

    try:
        body = api_get(args, "/api/swarm/peers")
    except ApiError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(format_peers(body, time.time()))
    return 0


def _peers_args(p: argparse.ArgumentParser) -> None:
    _add_api_argument(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")


cmd_peers.add_arguments = _peers_args  # type: ignore[attr-defined]


@command("status", "show the local agent's identity and role")
def cmd_status(args: argparse.Namespace) -> int:
    try:
        body = api_get(args, "/api/cluster/status")
    except ApiError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for k, v in body.items():
            print(f"{k:16} {v}")
    return 0


cmd_status.add_arguments = _peers_args  # type: ignore[attr-defined]


@command("demo", "start N agents on loopback and show a live peers table")
def cmd_demo(args: argparse.Namespace) -> int:
    from agent.face.demo import run_demo

    return run_demo(args.n, args.interval, args.duration)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=5, help="number of agents (default 5)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="heartbeat interval of the demo agents (default 0.5 s)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")


cmd_demo.add_arguments = _demo_args  # type: ignore[attr-defined]


def _load_plugins() -> None:
    """Subcommands and agent hooks living in other modules register themselves on import."""
    import agent.face.cli_data
    import agent.face.cli_ops  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="hs-gossip", description="Gossip swarm agent for edge devices.")
    parser.add_argument("--version", action="version", version=f"hs-gossip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments = getattr(handler, "add_arguments", None)
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
