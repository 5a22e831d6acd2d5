"""``hs-gossip promote [--force]``: make the local agent the leader of the
change-log stream, through its API (``POST /api/cluster/promote``).

Exit codes: 0 promoted (the new epoch is printed), 1 refused (the reason is
printed: already the leader, or an agent it can reach is further; ``--force``
promotes anyway) or the agent is not reachable.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.face.cli_common import ApiError, Command, add_api_argument, api_request, fail


def _error(doc: Any, status: int) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    return str(err or f"the agent answered {status}")


def cmd_promote(args: argparse.Namespace) -> int:
    path = "/api/cluster/promote" + ("?force=true" if args.force else "")
    try:
        status, doc = api_request(args, "POST", path)
    except ApiError as e:
        return fail(str(e))
    if status != 200 or not isinstance(doc, dict):
        return fail(f"promotion refused: {_error(doc, status)}"
                    + ("" if args.force or status != 409 else " (--force promotes anyway)"))
    print(f"leader at epoch {doc.get('epoch')}")
    return 0


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="promote even if an agent it can reach is further in the leader's log "
                        "or has seen a higher epoch")
    add_api_argument(p)


COMMANDS: tuple[Command, ...] = (
    Command("promote", cmd_promote, _promote_args),
)
