"""Operator subcommands: ``hs-gossip install-unit``, ``keygen``, ``keys``.

``keygen`` prints a new cluster key (base64 of 32 random bytes; it never
touches a file, the operator decides where it goes). ``keys`` asks the local
agent's API which keys it uses (fingerprints, never keys), which one seals,
and which peers last sent with each: the check before removing an old key.
``keys --reload`` re-reads the key file first (as SIGHUP does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from agent.face.cli_common import ApiError, Command, add_api_argument, api_get, api_request, fail
from agent.face.unit_files import ENV_PATH, UNIT_PATH, render_env, render_unit


def installed_executable() -> str:
    """Absolute path of the ``hs-gossip`` command running now (a venv's, pip's
    --user one, or /usr/local/bin's), so the unit starts the same install."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "hs-gossip" and argv0.exists():
        return str(argv0.resolve())
    found = shutil.which("hs-gossip")
    if found:
        return str(Path(found).resolve())
    return str(Path(sys.executable).parent / "hs-gossip")


def cmd_install_unit(args: argparse.Namespace) -> int:
    prefix = Path(args.prefix)
    executable = args.exec or installed_executable()
    if not os.path.isabs(executable):
        return fail(f"--exec must be an absolute path, not {executable!r}", 2)
    unit = prefix / UNIT_PATH
    env = prefix / ENV_PATH
    try:
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(render_unit(executable), encoding="utf-8")
        unit.chmod(0o644)
        print(f"wrote {unit} (ExecStart={executable} run)")
        if env.exists():
            print(f"kept existing {env}")
        else:
            env.parent.mkdir(parents=True, exist_ok=True)
            env.write_text(render_env(), encoding="utf-8")
            env.chmod(0o644)
            print(f"wrote {env}")
    except OSError as e:
        return fail(f"cannot install under {prefix}: {e.strerror or e} (run as root?)")
    if str(prefix) == "/":
        print("next: systemctl daemon-reload && systemctl enable --now hs-gossip")
    return 0


def _install_unit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default="/",
                   help="root to install under (default /; for images and tests)")
    p.add_argument("--exec", metavar="PATH",
                   help="hs-gossip executable for ExecStart (default: this one)")


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.net.keyring import generate

    print(generate())
    return 0


def format_keys(status: dict[str, object]) -> str:
    if not status.get("encrypted"):
        return "no cluster key: datagrams are not encrypted (HS_GOSSIP_KEY / HS_GOSSIP_KEYFILE)"
    lines = ["FINGERPRINT       KEY ID    USE       PEERS"]
    keys = status.get("keys")
    for k in keys if isinstance(keys, list) else []:
        peers = k.get("peers", [])
        use = "primary" if k.get("primary") else "accepted"
        shown = ", ".join(p[:8] for p in peers) if peers else "-"
        lines.append(f"{k['fingerprint']:17} {k['key_id']:9} {use:9} {len(peers)}: {shown}")
    return "\n".join(lines)


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.reload:
            code, body = api_request(args, "POST", "/api/keyring/reload")
            if code != 200:
                return fail(f"key reload refused: {body.get('error') if body else code}")
        status = api_get(args, "/api/cluster/status")
    except ApiError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps({"encrypted": status.get("encrypted"), "keys": status.get("keys"),
                          "datagrams_refused": status.get("datagrams_refused")}, indent=2))
    else:
        print(format_keys(status))
    return 0


def _keys_args(p: argparse.ArgumentParser) -> None:
    add_api_argument(p)
    p.add_argument("--reload", action="store_true",
                   help="re-read HS_GOSSIP_KEYFILE first (as SIGHUP does)")
    p.add_argument("--json", action="store_true", help="print JSON")


COMMANDS: tuple[Command, ...] = (
    Command("install-unit", cmd_install_unit, _install_unit_args),
    Command("keygen", cmd_keygen),
    Command("keys", cmd_keys, _keys_args),
)
