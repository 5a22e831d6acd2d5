"""Command line: ``hs-gossip run | peers | members | join | status | promote | demo |
put | get | del | ls | verify | install-unit | keygen | keys | --version``.

Errors are one line on stderr, never a traceback. Exit codes: 0 ok, 1 runtime
failure (port taken, agent not reachable), 2 bad configuration or usage.
The parser is built from one explicit registry, :data:`REGISTRY`: each
subcommand's name, help line and the module whose ``COMMANDS`` table runs it
(this one, agent.face.cli_members, agent.face.cli_data, agent.face.cli_ops
or agent.face.cli_cluster). A command module is imported only when one of its
commands is chosen, so ``hs-gossip run`` does not carry the code of the other
commands. Their shared helpers live in
agent.face.cli_common, so no command module imports this one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from agent import __version__
from agent.config import FIELDS, PREFIX, Config, ConfigError, check_data_dir, load
from agent.face.cli_common import (
    ApiError,
    Command,
    Listing,
    UsageError,
    add_api_argument,
    api_get,
    fail,
)

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from agent.runtime.view import AgentView, ApiServer, Controls
    from agent.store import Store


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


def http_api(cfg: Config) -> ApiServer:
    """The agent's HTTP API (agent.face.api), imported when the agent starts
    serving: Starlette is the slow part of start-up."""

    async def serve(view: Callable[[], AgentView], store: Store,
                    shutdown: Callable[[], Awaitable[object]], *,
                    task_status: TaskStatus[int], controls: Controls | None = None) -> None:
        from agent.face.api import serve_api

        await serve_api(cfg, view, store, shutdown, task_status=task_status,
                        controls=controls)

    return serve


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

    from agent.runtime import faults, identity
    from agent.runtime.agent import Agent
    from agent.runtime.errors import StartupError

    try:
        ident = identity.load_for_start(cfg.data_dir)
    except identity.IdentityError as e:
        return fail(str(e), 2)
    except OSError as e:
        return fail(f"cannot write identity in {cfg.data_dir} (HS_GOSSIP_DATA_DIR): {e}", 2)

    import anyio

    agent = Agent(cfg, ident, api=http_api(cfg), faults=faults.from_environ())
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


def _leaves(eg: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


# --- peers, status -------------------------------------------------------------


def _age(now: float, ts: float) -> str:
    d = max(0.0, now - ts)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago"


def format_peers(body: dict[str, Any], now: float) -> str:
    """The peers table. The address column is the peer's gossip address (UDP
    host:port), the one thing known to answer: its HTTP API usually listens on
    the peer's own loopback only."""
    rows = [("NODE", "NAME", "GOSSIP ADDR", "ROLE", "HEALTHY", "CLOCK", "COLLECTIONS",
             "LAST SEEN")]
    for p in body["peers"]:
        rows.append((
            p["node_id"][:8], p.get("name") or "-", p["gossip_addr"], p["role"],
            "yes" if p["healthy"] else "NO", str(p["logical_clock"]),
            str(len(p["collections"])), _age(now, p["last_seen_secs"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append(f"{body['peer_count']} peer(s)")
    return "\n".join(lines)


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
    add_api_argument(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")


def cmd_status(args: argparse.Namespace) -> int:
    try:
        body = api_get(args, "/api/cluster/status")
    except ApiError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for k, v in body.items():
            # nested parts (seeds, keys, ...) as JSON, not Python's repr
            print(f"{k:16} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


# --- demo ------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.face.demo import run_demo

    return run_demo(args.n, args.interval, args.duration)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return v


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, default=5, help="number of agents (default 5)")
    p.add_argument("--interval", type=_seconds, default=0.5,
                   help="heartbeat interval of the demo agents (default 0.5 s)")
    p.add_argument("--duration", type=_seconds, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")


# --- the parser ------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("run", cmd_run, _add_run_arguments),
    Command("peers", cmd_peers, _peers_args),
    Command("status", cmd_status, _peers_args),
    Command("demo", cmd_demo, _demo_args),
)

_DATA = "agent.face.cli_data"
_MEMBERS = "agent.face.cli_members"
_OPS = "agent.face.cli_ops"
_CLUSTER = "agent.face.cli_cluster"

#: every subcommand, in the order ``--help`` lists them
REGISTRY: tuple[Listing, ...] = (
    Listing("run", "run the agent in the foreground", __name__),
    Listing("peers", "list the peers the local agent knows", __name__),
    Listing("members", "list every member, this agent included, with its status "
            "(alive, suspect, dead, left)", _MEMBERS),
    Listing("join", "join a swarm now: hs-gossip join HOST:PORT [HOST:PORT ...]", _MEMBERS),
    Listing("status", "show the local agent's identity and role", __name__),
    Listing("promote", "make the local agent the stream's leader (a higher epoch): "
            "hs-gossip promote [--force]", _CLUSTER),
    Listing("demo", "start N agents on loopback and show a live peers table", __name__),
    Listing("put", "write an item: hs-gossip put COLLECTION KEY JSON", _DATA),
    Listing("get", "read an item: hs-gossip get COLLECTION KEY", _DATA),
    Listing("del", "delete an item: hs-gossip del COLLECTION KEY", _DATA),
    Listing("ls", "list collections, or the items of one: hs-gossip ls [COLLECTION]", _DATA),
    Listing("verify", "rebuild a collection's hash tree from its items and compare", _DATA),
    Listing("install-unit", "install the systemd unit and its env file", _OPS),
    Listing("keygen", "print a new cluster key (base64 of 32 random bytes)", _OPS),
    Listing("keys", "list the cluster keys in use (fingerprints) and which peers use each",
            _OPS),
)


def command(listing: Listing) -> Command:
    """The table row of a listed command, importing its module."""
    table: tuple[Command, ...] = importlib.import_module(listing.module).COMMANDS
    for c in table:
        if c.name == listing.name:
            return c
    raise LookupError(f"{listing.module} has no command {listing.name!r}")


def chosen(argv: list[str]) -> str | None:
    """The subcommand named on a command line: its first argument that is not
    an option (the top-level options, ``-h`` and ``--version``, take no value)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if not arg.startswith("-"):
            return arg
    return None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hs-gossip: <prog>: <message>``, exit 2
    (argparse's default prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]  # "" for the top-level parser
        where = f"{command}: " if command else ""
        self.exit(2, f"hs-gossip: {where}{message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None,
                 registry: tuple[Listing, ...] = REGISTRY) -> argparse.ArgumentParser:
    """The parser for ``argv`` (default ``sys.argv[1:]``): every listed
    command is a choice with its help line; only the chosen one gets its
    arguments and handler, so only its module is imported."""
    name = chosen(sys.argv[1:] if argv is None else argv)
    parser = Parser(
        prog="hs-gossip", description="Gossip swarm agent for edge devices.")
    parser.add_argument("--version", action="version", version=f"hs-gossip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for listing in registry:
        p = sub.add_parser(listing.name, help=listing.help, description=listing.help)
        if listing.name != name:
            continue
        c = command(listing)
        if c.add_arguments is not None:
            c.add_arguments(p)
        p.set_defaults(handler=c.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except UsageError as e:
        return fail(str(e), 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
