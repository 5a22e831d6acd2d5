"""``hs-gossip members`` and ``hs-gossip join``, through the local API.

``members`` prints every member the local agent knows, itself included, as
``serf members`` does: aligned columns NAME ADDRESS STATUS INCARNATION ROLE
AGE, one member per line; ``--status`` keeps some statuses, ``--json``
prints the API's answer (``GET /api/swarm/members``) unchanged.
``join HOST:PORT ...`` asks the agent to contact those addresses now
(``POST /api/swarm/join``); addresses are checked here first, so a typo is a
usage error (exit 2) without a round trip.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from agent.config import parse_host_port
from agent.face.cli_common import ApiError, Command, add_api_argument, api_request, fail

#: as agent.runtime.view.STATUSES (not imported: the CLI does not load the runtime)
STATUSES = ("alive", "suspect", "dead", "left")
#: as agent.face.swarm_api.MAX_JOIN
MAX_JOIN = 16


def _statuses(text: str) -> str:
    """``--status``: one status or a comma-separated list (argparse type)."""
    asked = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in asked if s not in STATUSES]
    if bad or not asked:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a status (one or more of {', '.join(STATUSES)}, comma-separated)")
    return ",".join(asked)


def _address(text: str) -> str:
    """A join address (argparse type)."""
    try:
        return str(parse_host_port(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (such as 10.0.0.5:7946 or [fd00::5]:7946)") from None


def age(secs: float) -> str:
    """``AGE`` column: 42s, 5m, 3h, 2d."""
    s = max(0, int(secs))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


def format_members(members: list[dict[str, Any]]) -> str:
    """The members table, columns aligned (the agent's own row is the one
    with ``self``, listed first by the API)."""
    rows = [("NAME", "ADDRESS", "STATUS", "INCARNATION", "ROLE", "AGE")]
    for m in members:
        rows.append((m.get("name") or "-", m.get("addr") or "-", m["status"],
                     str(m["incarnation"]), m["role"], age(m["age_secs"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _error(doc: Any, status: int) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    return str(err or f"the agent answered {status}")


def cmd_members(args: argparse.Namespace) -> int:
    path = "/api/swarm/members"
    if args.status:
        path += "?" + urllib.parse.urlencode({"status": args.status})
    try:
        status, doc = api_request(args, "GET", path)
    except ApiError as e:
        return fail(str(e))
    if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("members"), list):
        return fail(f"members: {_error(doc, status)}")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_members(doc["members"]))
    return 0


def _members_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", type=_statuses, metavar="STATUS",
                   help=f"only members with this status ({', '.join(STATUSES)}; "
                        "several: comma-separated)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    add_api_argument(p)


def cmd_join(args: argparse.Namespace) -> int:
    addrs = list(dict.fromkeys(args.addrs))
    if len(addrs) > MAX_JOIN:
        return fail(f"join: {len(addrs)} addresses, at most {MAX_JOIN} at a time", 2)
    try:
        status, doc = api_request(args, "POST", "/api/swarm/join", {"addrs": addrs})
    except ApiError as e:
        return fail(str(e))
    if status != 200 or not isinstance(doc, dict):
        return fail(f"join refused: {_error(doc, status)}", 2 if status == 400 else 1)
    accepted = doc.get("accepted") or []
    print(f"contacting {', '.join(accepted)}; `hs-gossip members` shows who answers")
    return 0


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("addrs", nargs="+", type=_address, metavar="HOST:PORT",
                   help="gossip address of an agent of the swarm to join")
    add_api_argument(p)


COMMANDS: tuple[Command, ...] = (
    Command("members", cmd_members, _members_args),
    Command("join", cmd_join, _join_args),
)
