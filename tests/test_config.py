"""Configuration: precedence, .env files, and one-line errors with exit code 2."""

from __future__ import annotations

import logging
import os
import stat
import uuid
from pathlib import Path

import pytest

from agent.config import FIELDS, ConfigError, HostPort, load
from agent.runtime import faults, identity, snapshot
from agent.runtime.files import atomic_write
from tests.agents import run_cli


def test_defaults(tmp_path: Path) -> None:
    cfg, warnings = load(environ={"HOME": str(tmp_path)}, cwd=tmp_path)
    assert cfg.port == 7946 and cfg.bind == "0.0.0.0" and cfg.ttl == 30.0
    assert cfg.interval == 1.0 and cfg.api == HostPort("127.0.0.1", 50050)
    assert cfg.data_dir == tmp_path / ".local/state/hs-gossip"
    assert warnings == []


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    cfg, _ = load(environ={"STATE_DIRECTORY": "/var/lib/hs-gossip:/other"}, cwd=tmp_path)
    assert cfg.data_dir == Path("/var/lib/hs-gossip")


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nexport HS_GOSSIP_PORT=1111\nHS_GOSSIP_TTL='12'\n"
        "HS_GOSSIP_NODE_NAME=\"from file\"\nHS_GOSSIP_INTERVAL=0.5  # fast\n")
    cfg, _ = load(environ={"HS_GOSSIP_PORT": "2222"}, cwd=tmp_path)
    assert (cfg.port, cfg.ttl, cfg.node_name, cfg.interval) == (2222, 12.0, "from file", 0.5)
    cfg, _ = load(environ={"HS_GOSSIP_PORT": "2222"}, overrides={"port": "3333"}, cwd=tmp_path)
    assert cfg.port == 3333


def test_explicit_env_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.env"
    f.write_text("HS_GOSSIP_PEERS=a.example:7946, [::1]:7000 ,10.0.0.1:1\n")
    cfg, _ = load(environ={"HS_GOSSIP_ENV_FILE": str(f)}, cwd=tmp_path)
    assert cfg.peers == (HostPort("a.example", 7946), HostPort("::1", 7000),
                         HostPort("10.0.0.1", 1))
    with pytest.raises(ConfigError, match="HS_GOSSIP_ENV_FILE"):
        load(environ={"HS_GOSSIP_ENV_FILE": str(tmp_path / "missing")}, cwd=tmp_path)


def test_unknown_variable_is_a_warning(tmp_path: Path) -> None:
    _, warnings = load(environ={"HS_GOSSIP_PROT": "1"}, cwd=tmp_path)
    assert any("HS_GOSSIP_PROT" in w for w in warnings)


@pytest.mark.parametrize("var,value", [
    ("HS_GOSSIP_PORT", "99999"), ("HS_GOSSIP_PORT", "abc"), ("HS_GOSSIP_BIND", "nowhere"),
    ("HS_GOSSIP_PEERS", "10.0.0.1"), ("HS_GOSSIP_PEERS", "host:70000"),
    ("HS_GOSSIP_API", "localhost"), ("HS_GOSSIP_INTERVAL", "0"), ("HS_GOSSIP_TTL", "-1"),
    ("HS_GOSSIP_LOG_LEVEL", "loud"), ("HS_GOSSIP_FANOUT", "0"), ("HS_GOSSIP_MAX_VALUE", "1G"),
])
def test_bad_values_name_the_variable(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(environ={var: value}, cwd=tmp_path)
    assert var in str(e.value) and value in str(e.value) and "expected" in str(e.value)


def test_every_field_has_a_working_default(tmp_path: Path) -> None:
    for var, spec in FIELDS.items():
        if spec.default_text.startswith(("(", "$")):
            continue
        cfg, _ = load(environ={"HS_GOSSIP_" + var: spec.default_text}, cwd=tmp_path)
        assert getattr(cfg, spec.attr) == getattr(load(environ={}, cwd=tmp_path)[0], spec.attr)


@pytest.mark.parametrize("env,var", [
    ({"HS_GOSSIP_PORT": "70000"}, "HS_GOSSIP_PORT"),
    ({"HS_GOSSIP_PEERS": "seed-without-port"}, "HS_GOSSIP_PEERS"),
    ({"HS_GOSSIP_DATA_DIR": "/proc/hs-gossip-cannot-write"}, "HS_GOSSIP_DATA_DIR"),
])
def test_run_stops_with_exit_2_and_one_line(tmp_path: Path, env: dict[str, str], var: str) -> None:
    env = {"HS_GOSSIP_DATA_DIR": str(tmp_path / "d"), "HS_GOSSIP_API": "127.0.0.1:0", **env}
    out = run_cli("run", env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and var in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_unwritable_data_dir_as_non_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        ro = Path("/proc/hs-gossip")  # root can write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
    out = run_cli("run", env={"HS_GOSSIP_DATA_DIR": str(ro / "x")}, cwd=tmp_path)
    assert out.returncode == 2 and "HS_GOSSIP_DATA_DIR" in out.stderr


def test_identity_is_kept_and_incarnation_grows(tmp_path: Path) -> None:
    a = identity.load_for_start(tmp_path)
    b = identity.load_for_start(tmp_path)
    assert a.node_id == b.node_id and b.incarnation == a.incarnation + 1
    assert a.node_id.version == 4


def test_corrupt_identity_is_an_error_not_a_new_node(tmp_path: Path) -> None:
    (tmp_path / identity.FILENAME).write_text("{not json")
    with pytest.raises(identity.IdentityError, match="corrupt"):
        identity.load_for_start(tmp_path)
    out = run_cli("run", env={"HS_GOSSIP_DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    assert out.returncode == 2 and "corrupt" in out.stderr
    assert (tmp_path / identity.FILENAME).read_text() == "{not json"


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each os.fsync was called on: "file" or "dir"."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_atomic_write_syncs_the_file_then_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "state.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # The rename is only durable once the directory is synced, after the file.
    assert synced == ["file", "dir", "file", "dir"]
    # Both state files are written through it.
    synced.clear()
    identity.save(tmp_path, identity.Identity(uuid.uuid4(), 3))
    snapshot.save(tmp_path, [("aa", "10.0.0.1", 7946, 1.0)], lc=1)
    assert synced == ["file", "dir", "file", "dir"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_fault_injection_comes_from_one_function(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    var = "HS_GOSSIP_FAULT_STALL_TICK_AFTER"
    assert faults.from_environ({}) == faults.NO_FAULTS == faults.Faults()
    assert faults.from_environ({var: "1.5"}) == faults.Faults(stall_tick_after=1.5)
    with caplog.at_level(logging.ERROR, logger="hs_gossip"):
        assert faults.from_environ({var: "soon"}) == faults.NO_FAULTS
    assert f"ignoring {var}='soon': not a number" in caplog.text
    # Recognised by the config loader, so not warned about as a typo.
    _, warnings = load(environ={var: "1.5"}, cwd=tmp_path)
    assert warnings == []


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = run_cli("run", env={"HS_GOSSIP_DATA_DIR": str(tmp_path), "HS_GOSSIP_BIND":
                                  "127.0.0.1", "HS_GOSSIP_PORT": str(port),
                                  "HS_GOSSIP_API": "127.0.0.1:0"}, cwd=tmp_path)
    assert out.returncode == 1
    assert "HS_GOSSIP_PORT" in out.stderr and "Traceback" not in out.stderr


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("hs-gossip ")


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [v for v in FIELDS if f"`HS_GOSSIP_{v}`" not in readme]
    assert not missing


def test_env_file_dash_prefix_is_optional_but_plain_path_is_required(tmp_path: Path) -> None:
    missing = tmp_path / "nope.env"
    cfg, _ = load(environ={"HS_GOSSIP_ENV_FILE": f"-{missing}"}, cwd=tmp_path)
    assert cfg.port == 7946
    with pytest.raises(ConfigError, match="HS_GOSSIP_ENV_FILE"):
        load(environ={"HS_GOSSIP_ENV_FILE": str(missing)}, cwd=tmp_path)
    present = tmp_path / "agent.env"
    present.write_text("HS_GOSSIP_PORT=8000\n")
    cfg, _ = load(environ={"HS_GOSSIP_ENV_FILE": f"-{present}"}, cwd=tmp_path)
    assert cfg.port == 8000
