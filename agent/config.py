"""Configuration: HS_GOSSIP_* environment variables, an optional .env file and
CLI flags, parsed into one frozen :class:`Config`.

Rules:

* Precedence: command-line flags > process environment > .env file > defaults.
* The .env file is ``$HS_GOSSIP_ENV_FILE`` if set (it must then exist, unless
  the value starts with ``-``), else ``./.env`` when present. Lines are
  ``KEY=VALUE``; ``#`` starts a comment; values may be single- or
  double-quoted; ``export KEY=VALUE`` is accepted.
* A malformed value raises :class:`ConfigError`, whose message is one line
  naming the variable, the value and what was expected. The CLI turns it into
  exit code 2 before anything is bound.
* An unknown ``HS_GOSSIP_*`` name is returned as a warning: a typo must not
  pass silently, but must not stop a fleet either.

Every field is described in ``FIELDS`` (name, default, meaning); the README's
configuration table and ``systemd/hs-gossip.env`` follow it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.core.addr import join_host_port
from agent.core.changelog import Retention, parse_retention

PREFIX = "HS_GOSSIP_"


class ConfigError(ValueError):
    """A configuration value is malformed. ``str()`` is one line for the user."""

    def __init__(self, var: str, value: str, expected: str) -> None:
        self.var = var
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {var}={value!r}: expected {expected}")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True)
class Config:
    port: int = 7946
    bind: str = "0.0.0.0"
    advertise: str | None = None
    peers: tuple[HostPort, ...] = ()
    api: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 50050))
    data_dir: Path = field(default_factory=lambda: default_data_dir(os.environ))
    interval: float = 1.0
    ttl: float = 30.0
    suspect_intervals: int = 3
    fanout: int = 3
    max_peers: int = 4096
    node_name: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    log_format: str = "text"
    sync_port: int | None = None
    max_value: int = 1024 * 1024
    max_skew: float = 300.0
    sync_concurrency: int = 2
    tombstone_grace: float = 7 * 24 * 3600.0
    #: how much of the change log is kept (agent.core.changelog.Retention)
    log_retain: Retention = field(default_factory=lambda: Retention(100_000, None))
    discovery: str = "none"
    multicast_group: str = "239.255.77.46"
    multicast_port: int = 7947
    health_url: str | None = None
    health_cmd: str | None = None
    health_interval: float = 10.0
    snapshot_max_age: float = 24 * 3600.0
    #: None: a fresh random seed every start (agent.runtime.rng)
    seed: int | None = None
    #: bearer token the HTTP API requires (None: no token; loopback API only)
    api_token: str | None = field(default=None, repr=False)
    #: cluster keys (32 bytes each, first primary) from HS_GOSSIP_KEY; never shown
    key: tuple[bytes, ...] = field(default=(), repr=False)
    #: file of cluster keys, one per line, first primary (agent.net.keyring)
    keyfile: Path | None = None
    #: swarm name bound into every sealed datagram
    cluster: str = "default"
    #: "leader": serve the change log to followers (agent.runtime.replication)
    role: str = ""
    #: the leader's sync/stream TCP address; set: this agent follows it
    coordinator: HostPort | None = None
    #: etcd client URLs coordinator candidates elect a leader through
    #: (agent.runtime.election); empty: no automatic failover
    etcd: tuple[str, ...] = ()
    #: seconds of the etcd lease a leader holds its term with
    etcd_ttl: int = 5

    @property
    def effective_sync_port(self) -> int:
        return self.sync_port if self.sync_port is not None else self.port


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/hs-gossip, else
    ~/.local/state/hs-gossip."""
    state = environ.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(state.split(":")[0])
    xdg = environ.get("XDG_STATE_HOME")
    home = environ.get("HOME")
    base = Path(xdg) if xdg else (Path(home) if home else Path.home()) / ".local" / "state"
    return base / "hs-gossip"


# --- value parsers: each raises ValueError with the "expected" text --------


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError("a port number 1-65535") from None
    if not 1 <= n <= 65535:
        raise ValueError("a port number 1-65535")
    return n


def _port_or_zero(text: str) -> int:
    """Port 0 asks the OS for a free port: handy for tests and demos."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError("a port number 0-65535") from None
    if not 0 <= n <= 65535:
        raise ValueError("a port number 0-65535")
    return n


def _positive_float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"a number of seconds between {lo:g} and {hi:g}") from None
        if not lo <= v <= hi:
            raise ValueError(f"a number of seconds between {lo:g} and {hi:g}")
        return v

    return parse


def _int_range(lo: int, hi: int, what: str = "an integer") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ValueError(f"{what} between {lo} and {hi}") from None
        if not lo <= v <= hi:
            raise ValueError(f"{what} between {lo} and {hi}")
        return v

    return parse


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ValueError("a numeric IPv4 or IPv6 address such as 0.0.0.0 or ::") from None


def _advertise(text: str) -> str:
    text = text.strip()
    if not text or any(c.isspace() for c in text) or "/" in text:
        raise ValueError("an IP address or hostname that other agents can reach")
    return text.strip("[]")


def parse_host_port(text: str, *, allow_zero: bool = False) -> HostPort:
    """``host:port``, ``[v6]:port``. Raises ValueError on anything else."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("host:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("host:port")
    if not host or any(c.isspace() for c in host):
        raise ValueError("host:port")
    port = _port_or_zero(port_text) if allow_zero else _port(port_text)
    return HostPort(host, port)


def _peers(text: str) -> tuple[HostPort, ...]:
    items = [p for p in (s.strip() for s in text.split(",")) if p]
    out = []
    for item in items:
        try:
            out.append(parse_host_port(item))
        except ValueError:
            raise ValueError(
                f"a comma-separated list of host:port seeds (bad entry {item!r})"
            ) from None
    return tuple(out)


def _api(text: str) -> HostPort:
    try:
        return parse_host_port(text, allow_zero=True)
    except ValueError:
        raise ValueError("host:port for the HTTP API, such as 127.0.0.1:50050") from None


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("a directory path")
    return Path(text).expanduser()


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        v = text.strip().lower()
        if v not in options:
            raise ValueError("one of " + ", ".join(options))
        return v

    return parse


def _log_level(text: str) -> str:
    v = text.strip().upper()
    if v == "WARN":
        v = "WARNING"
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("one of debug, info, warning, error, critical")
    return v


def _name(text: str) -> str:
    v = text.strip()
    if not 1 <= len(v.encode()) <= 64 or not v.isprintable():
        raise ValueError("1-64 bytes of printable text")
    return v


def _size(text: str) -> int:
    units = {"": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20}
    t = text.strip().lower()
    num = t.rstrip("kmib")
    unit = t[len(num):]
    try:
        v = int(num) * units[unit]
    except (ValueError, KeyError):
        raise ValueError("a size in bytes (suffix K or M allowed) between 1K and 64M") from None
    if not 1024 <= v <= 64 << 20:
        raise ValueError("a size in bytes (suffix K or M allowed) between 1K and 64M")
    return v


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _url(text: str) -> str | None:
    t = text.strip()
    if not t:
        return None
    if not (t.startswith("http://") or t.startswith("https://")):
        raise ValueError("an http:// or https:// URL")
    return t


def _token(text: str) -> str | None:
    t = text.strip()
    if not t:
        return None
    if not 16 <= len(t) <= 256 or not t.isascii() or not t.isprintable() or " " in t:
        raise ValueError("16-256 printable ASCII characters without spaces "
                         "(for example: openssl rand -hex 32)")
    return t


def _keys(text: str) -> tuple[bytes, ...]:
    """Comma-separated keys, each base64 of 32 bytes (the rule of key files,
    agent.net.keyring); the first is primary."""
    out: list[bytes] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            raw = base64.b64decode(part.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("base64 of 32 random bytes (hs-gossip keygen); "
                             "several comma-separated, the first primary")
        out.append(raw)
    return tuple(out)


def _role(text: str) -> str:
    v = text.strip().lower()
    if v not in ("", "leader", "candidate"):
        raise ValueError("leader, candidate (with HS_GOSSIP_ETCD), or empty (a follower "
                         "names its leader in HS_GOSSIP_COORDINATOR or finds it in etcd)")
    return v


def _coordinator(text: str) -> HostPort | None:
    if not text.strip():
        return None
    try:
        return parse_host_port(text)
    except ValueError:
        raise ValueError("host:port of the leader's TCP sync port (its HS_GOSSIP_SYNC_PORT, "
                         "which is its HS_GOSSIP_PORT number unless set), or empty") from None


def _etcd_endpoints(text: str) -> tuple[str, ...]:
    """Comma-separated etcd client URLs, ``scheme://host:port``. Plain http://
    only to a loopback address (an etcd or etcd proxy on this machine): the
    leader key decides which agent accepts writes, and a forged answer on the
    network would make a second leader. Elsewhere https://, verified against
    the system's trust store."""
    expected = ("comma-separated etcd client URLs such as http://127.0.0.1:2379 "
                "(http:// only to a loopback address, else https://)")
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            url = urlsplit(part)
            port = url.port
        except ValueError:
            raise ValueError(expected) from None
        if (url.scheme not in ("http", "https") or not url.hostname or url.username
                or url.password or url.path not in ("", "/") or url.query or url.fragment
                or port == 0):
            raise ValueError(expected)
        if url.scheme == "http" and not is_loopback(url.hostname):
            raise ValueError(f"https:// for {url.hostname}: plain http:// to etcd only "
                             "on loopback (leases and the leader key must not be forgeable)")
        out.append(f"{url.scheme}://{url.netloc}")
    return tuple(out)


def _optional_path(text: str) -> Path | None:
    return Path(text.strip()).expanduser() if text.strip() else None


def _cluster(text: str) -> str:
    t = text.strip()
    if not 1 <= len(t.encode()) <= 64 or not t.isprintable():
        raise ValueError("a name of 1-64 printable characters")
    return t


def _multicast_group(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError("an IPv4 multicast address such as 239.255.77.46") from None
    if addr.version != 4 or not addr.is_multicast:
        raise ValueError("an IPv4 multicast address such as 239.255.77.46")
    return str(addr)


@dataclass(frozen=True)
class FieldSpec:
    attr: str
    parse: Callable[[str], Any]
    default_text: str
    help: str


FIELDS: dict[str, FieldSpec] = {
    spec.attr.upper(): spec
    for spec in (
        FieldSpec("port", _port, "7946", "UDP gossip port (TCP sync uses the same number)"),
        FieldSpec("bind", _ip, "0.0.0.0",
                  "address to bind gossip and sync; dual-stack where IPv6 is on"),
        FieldSpec("advertise", _advertise, "(unset)",
                  "address other agents should use for this one; "
                  "default: the source address they see"),
        FieldSpec("peers", _peers, "(empty)",
                  "comma-separated host:port seeds; hostnames resolved at start, "
                  "re-resolved on failure"),
        FieldSpec("api", _api, "127.0.0.1:50050", "host:port of the local HTTP API"),
        FieldSpec("data_dir", _path, "$STATE_DIRECTORY or ~/.local/state/hs-gossip",
                  "state directory: identity, database, peer snapshot"),
        FieldSpec("interval", _positive_float(0.05, 60), "1.0",
                  "probe period in seconds: each agent probes one member per period"),
        FieldSpec("ttl", _positive_float(0.5, 86400), "30",
                  "seconds a peer not confirmed alive (suspect or failed) stays listed"),
        FieldSpec("suspect_intervals", _int_range(1, 100), "3",
                  "suspicion multiplier: a suspect is failed after at least "
                  "SUSPECT_INTERVALS x log10(N) intervals unless it refutes"),
        FieldSpec("fanout", _int_range(1, 16), "3",
                  "members each gossip round goes to (every 0.2 s, only while there is news)"),
        FieldSpec("max_peers", _int_range(2, 100000), "4096",
                  "cap on the member table (every status)"),
        FieldSpec("node_name", _name, "(hostname)", "human-readable name of this agent"),
        FieldSpec("log_level", _log_level, "info", "debug, info, warning, error"),
        FieldSpec("log_format", _choice("text", "json"), "text",
                  "text or json, one line per event on stdout"),
        FieldSpec("sync_port", _port_or_zero, "(same as PORT)", "TCP port for Merkle sync"),
        FieldSpec("max_value", _size, "1M", "largest accepted item value, encoded"),
        FieldSpec("max_skew", _positive_float(1, 86400 * 365), "300",
                  "seconds a remote clock may run ahead before its writes are refused"),
        FieldSpec("sync_concurrency", _int_range(1, 64), "2", "sync sessions at once"),
        FieldSpec("tombstone_grace", _positive_float(1, 86400 * 3650), "604800",
                  "age in seconds a tombstone must reach before it may be purged"),
        FieldSpec("log_retain", parse_retention, "100000",
                  "change log kept: a number of entries and/or an age (unit s, m, h "
                  "or d), comma-separated, such as 100000 or 100000,7d; older entries "
                  "are compacted away (the newest is always kept)"),
        FieldSpec("discovery", _choice("none", "multicast"), "none",
                  "none, or multicast for zero-config LAN discovery"),
        FieldSpec("multicast_group", _multicast_group, "239.255.77.46",
                  "IPv4 group for multicast discovery"),
        FieldSpec("multicast_port", _port, "7947", "UDP port for multicast discovery"),
        FieldSpec("health_url", _url, "(unset)",
                  "HTTP URL of the application's health check; 2xx means healthy"),
        FieldSpec("health_cmd", _optional_text, "(unset)",
                  "shell command for the application health check; exit 0 means healthy"),
        FieldSpec("health_interval", _positive_float(0.1, 3600), "10",
                  "seconds between application health checks"),
        FieldSpec("snapshot_max_age", _positive_float(1, 86400 * 365), "86400",
                  "saved peers older than this are not used to rejoin"),
        FieldSpec("seed", _int_range(0, 2**64 - 1), "(random)",
                  "debugging aid: one integer that every random choice (peer picks, "
                  "tick jitter) derives from, for reproducible runs; never in "
                  "production, agents sharing a seed pick the same peers"),
        FieldSpec("api_token", _token, "(unset)",
                  "bearer token the HTTP API requires on every route but /healthz "
                  "(Authorization: Bearer TOKEN; hs-gossip commands send it); required "
                  "when HS_GOSSIP_API is not a loopback address"),
        FieldSpec("key", _keys, "(unset)",
                  "cluster key, base64 of 32 random bytes (hs-gossip keygen): every "
                  "datagram and stream is encrypted and authenticated with it (several "
                  "comma-separated: the first seals, all open); unset and no KEYFILE: "
                  "no encryption, and keyed agents ignore this one"),
        FieldSpec("keyfile", _optional_path, "(unset)",
                  "file of cluster keys, one base64 key per line (# comments allowed); "
                  "the first seals, all open; re-read on SIGHUP and POST "
                  "/api/keyring/reload, for rotation without downtime"),
        FieldSpec("cluster", _cluster, "default",
                  "swarm name bound into every sealed datagram: swarms with one key "
                  "but different names never mix"),
        FieldSpec("role", _role, "(empty)",
                  "leader: this agent is the coordinator, serving its change log to "
                  "followers on its sync port; candidate (needs HS_GOSSIP_ETCD): it "
                  "campaigns in etcd and is the coordinator while it holds the lease, "
                  "a follower of the elected one otherwise; empty: a follower (of "
                  "HS_GOSSIP_COORDINATOR, or of the leader etcd names) or neither"),
        FieldSpec("coordinator", _coordinator, "(unset)",
                  "host:port of the leader's TCP sync port (the same number as its "
                  "gossip port unless it sets HS_GOSSIP_SYNC_PORT): this agent streams "
                  "the leader's change log, role Follower while connected and Edge when "
                  "not; gossip and Merkle sync go on underneath"),
        FieldSpec("etcd", _etcd_endpoints, "(unset)",
                  "comma-separated etcd client URLs (v3 API, etcd 3.4+): coordinator "
                  "candidates campaign there for a lease and the leader key's revision "
                  "is the epoch; everyone else finds the leader there. http:// only to "
                  "a loopback address, else https://"),
        FieldSpec("etcd_ttl", _int_range(2, 300, "a whole number of seconds"), "5",
                  "seconds of the etcd lease behind a leader's term (2-300): a leader "
                  "that stops renewing it is replaced within about this time, and stops "
                  "accepting writes a safety margin before it could expire"),
    )
}

#: Variables read outside the Config (recognised, so not warned about).
#: FAULT_STALL_TICK_AFTER (seconds) is fault injection, read only by
#: agent.runtime.faults.from_environ for the ``run`` command: the gossip tick
#: loop hangs that long after start, to prove the systemd watchdog notices.
EXTRA_VARS = {"ENV_FILE", "FAULT_STALL_TICK_AFTER"}

#: Variables whose values never appear in error messages.
SECRET_VARS = {"KEY"}

#: Settings a running agent applies again on SIGHUP; the rest need a restart.
RELOADABLE = ("LOG_LEVEL", "LOG_FORMAT")


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse a .env file. Raises ConfigError naming HS_GOSSIP_ENV_FILE on I/O or
    syntax errors, with the line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{PREFIX}ENV_FILE", str(path), f"a readable file ({e})") from None
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"{PREFIX}ENV_FILE", str(path), f"KEY=VALUE on line {n}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


def env_file_path(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """The .env file to read, or None. ``$HS_GOSSIP_ENV_FILE`` must exist unless
    it starts with ``-`` (optional, as in systemd's ``EnvironmentFile=-``);
    without it, ``./.env`` is read when present."""
    file_var = env.get(f"{PREFIX}ENV_FILE")
    if file_var:
        if file_var.startswith("-"):
            path = Path(file_var[1:])
            return path if path.is_file() else None
        return Path(file_var)
    default = (cwd or Path.cwd()) / ".env"
    return default if default.is_file() else None


def load(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[Config, list[str]]:
    """Build the Config. ``overrides`` maps field names (``port``) or variable
    names (``HS_GOSSIP_PORT``) to raw text from CLI flags. Returns the config and
    a list of warnings. Raises ConfigError."""
    env = dict(os.environ if environ is None else environ)
    merged: dict[str, str] = {}
    env_path = env_file_path(env, cwd)
    if env_path is not None:
        merged.update(
            {k: v for k, v in parse_env_file(env_path).items() if k.startswith(PREFIX)}
        )
    merged.update({k: v for k, v in env.items() if k.startswith(PREFIX)})
    for k, v in (overrides or {}).items():
        name = k if k.startswith(PREFIX) else PREFIX + k.upper()
        merged[name] = v

    warnings: list[str] = []
    values: dict[str, Any] = {}
    for var, raw in sorted(merged.items()):
        suffix = var[len(PREFIX):]
        spec = FIELDS.get(suffix)
        if spec is None:
            if suffix not in EXTRA_VARS:
                warnings.append(f"unknown variable {var} ignored (typo?)")
            continue
        try:
            values[spec.attr] = spec.parse(raw)
        except ValueError as e:
            shown = "(hidden)" if suffix in SECRET_VARS else raw
            raise ConfigError(var, shown, str(e)) from None
    if "data_dir" not in values:
        values["data_dir"] = default_data_dir(env)
    cfg = Config(**values)
    check_api_exposure(cfg)
    check_replication(cfg)
    if cfg.ttl <= 2 * cfg.interval:
        warnings.append(
            f"{PREFIX}TTL={cfg.ttl:g} is not above two probe intervals "
            f"({2 * cfg.interval:g}s): suspects are dropped before most of the swarm "
            "has probed them")
    return cfg, warnings


def load_reloadable(environ: Mapping[str, str] | None = None,
                    cwd: Path | None = None) -> dict[str, Any]:
    """The RELOADABLE settings as SIGHUP sees them. Unlike at start, the env
    file wins over the environment here: it is what an operator edits, and
    systemd's EnvironmentFile= copied its old values into the environment.
    Raises ConfigError."""
    env = dict(os.environ if environ is None else environ)
    raw = {k: env[PREFIX + k] for k in RELOADABLE if PREFIX + k in env}
    env_path = env_file_path(env, cwd)
    if env_path is not None:
        from_file = parse_env_file(env_path)
        raw.update({k: from_file[PREFIX + k] for k in RELOADABLE if PREFIX + k in from_file})
    out: dict[str, Any] = {}
    for key, text in raw.items():
        spec = FIELDS[key]
        try:
            out[spec.attr] = spec.parse(text)
        except ValueError as e:
            raise ConfigError(PREFIX + key, text, str(e)) from None
    return out


class ExposedApiError(ConfigError):
    """The API would listen beyond loopback without a token."""

    def __init__(self, api: HostPort) -> None:
        ValueError.__init__(
            self, f"HS_GOSSIP_API={api} is not a loopback address: set HS_GOSSIP_API_TOKEN "
            "(a bearer token every API call must then send) or bind HS_GOSSIP_API to "
            "127.0.0.1")
        self.var, self.value = f"{PREFIX}API", str(api)
        self.expected = "a loopback address, or HS_GOSSIP_API_TOKEN"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost; any other name may resolve
    beyond this machine and counts as exposed."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_exposure(cfg: Config) -> None:
    """An API bound beyond loopback needs a token. ExposedApiError if not."""
    if cfg.api_token is None and not is_loopback(cfg.api.host):
        raise ExposedApiError(cfg.api)


def check_replication(cfg: Config) -> None:
    """A leader follows nobody; an elected leader is found in etcd, never
    fixed. ConfigError on a combination that cannot work."""
    if cfg.role == "candidate" and not cfg.etcd:
        raise ConfigError(f"{PREFIX}ROLE", cfg.role,
                          f"{PREFIX}ETCD set: a candidate campaigns for the lease in etcd")
    if cfg.etcd and cfg.role == "leader":
        raise ConfigError(f"{PREFIX}ROLE", cfg.role,
                          f"candidate or empty with {PREFIX}ETCD: the leader is elected there, "
                          "not fixed")
    if cfg.etcd and cfg.coordinator is not None:
        raise ConfigError(f"{PREFIX}COORDINATOR", str(cfg.coordinator),
                          f"unset with {PREFIX}ETCD: followers find the leader in etcd")
    if cfg.role == "leader" and cfg.coordinator is not None:
        raise ConfigError(f"{PREFIX}COORDINATOR", str(cfg.coordinator),
                          f"no coordinator on a leader ({PREFIX}ROLE=leader): a leader "
                          "follows nobody; unset one of the two")


def check_data_dir(path: Path) -> None:
    """Create the data dir if needed and prove it is writable. ConfigError if not."""
    var = f"{PREFIX}DATA_DIR"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(var, str(path), f"a writable directory ({reason})") from None
