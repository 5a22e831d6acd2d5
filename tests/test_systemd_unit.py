"""The systemd unit and env file: kept in step with the code, installable, and
accepted by systemd's own checks (``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import FIELDS, PREFIX, load
from agent.face.unit_files import render_env, render_unit
from tests.agents import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_shipped_files_are_the_rendered_ones() -> None:
    # After changing FIELDS or the unit: python -m agent.face.unit_files systemd/
    assert (REPO / "systemd" / "hs-gossip.service").read_text() == render_unit()
    assert (REPO / "systemd" / "hs-gossip.env").read_text() == render_env()


def test_env_file_lists_every_variable_with_its_real_default() -> None:
    text = render_env()
    values: dict[str, str] = {}
    for var in FIELDS:
        m = re.search(rf"^#{PREFIX}{var}=(.*)$", text, re.M)
        assert m, f"{PREFIX}{var} missing from the env file"
        if m.group(1):
            values[PREFIX + var] = m.group(1)
    # Uncommenting every documented default must change nothing.
    documented, _ = load(environ=values, cwd=REPO / "systemd")
    defaults, _ = load(environ={}, cwd=REPO / "systemd")
    assert documented == defaults


def _install(tmp_path: Path) -> Path:
    r = run_cli("install-unit", "--prefix", str(tmp_path))
    assert r.returncode == 0, r.stderr
    return tmp_path / "etc/systemd/system/hs-gossip.service"


def test_install_unit_points_at_this_install_and_keeps_an_edited_env(tmp_path: Path) -> None:
    unit = _install(tmp_path)
    exec_start = re.search(r"^ExecStart=(\S+) run$", unit.read_text(), re.M)
    assert exec_start and Path(exec_start.group(1)).is_file()
    env = tmp_path / "etc/hs-gossip/env"
    assert env.read_text() == render_env()
    env.write_text("HS_GOSSIP_PORT=9000\n")
    r = run_cli("install-unit", "--prefix", str(tmp_path))
    assert r.returncode == 0 and "kept existing" in r.stdout
    assert env.read_text() == "HS_GOSSIP_PORT=9000\n"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd'; "
                    "run .ci/setup-system.sh as root)")
    return tool


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _install(tmp_path)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _install(tmp_path)
    r = subprocess.run([tool, "security", "--offline=yes", str(unit)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
