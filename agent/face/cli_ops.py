"""Operator subcommands: ``hs-gossip install-unit``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from agent.face.cli_common import Command, fail
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


COMMANDS: tuple[Command, ...] = (
    Command("install-unit", "install the systemd unit and its env file", cmd_install_unit,
            _install_unit_args),
)
