"""The systemd unit and its environment file, rendered from one place.

``systemd/hs-gossip.service`` and ``systemd/hs-gossip.env`` in the source tree
are these texts (a test keeps them equal), and ``hs-gossip install-unit``
writes them on a device with ``ExecStart`` pointing at the installed command.
The env file is generated from :data:`agent.config.FIELDS`, so it lists every
variable with its default and meaning.
"""

from __future__ import annotations

import textwrap

from agent.config import FIELDS, PREFIX

UNIT_PATH = "etc/systemd/system/hs-gossip.service"
ENV_PATH = "etc/hs-gossip/env"
DEFAULT_EXEC = "/usr/local/bin/hs-gossip"

UNIT_TEMPLATE = """[Unit]
Description=hs-gossip swarm agent
Documentation=https://pypi.org/project/hs-gossip/
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
EnvironmentFile=-/etc/hs-gossip/env
# SIGHUP re-reads this file for the reloadable settings (log level, format).
Environment=HS_GOSSIP_ENV_FILE=-/etc/hs-gossip/env
Restart=on-failure
RestartSec=2s
TimeoutStartSec=30s
TimeoutStopSec=15s
WatchdogSec=30s
StateDirectory=hs-gossip
StateDirectoryMode=0700
DynamicUser=yes
UMask=0077
LimitNOFILE=4096
MemoryMax=256M
TasksMax=64

# Hardening: the agent needs UDP/TCP sockets, its state directory and nothing else.
# AF_NETLINK lets it list interfaces and addresses; AF_UNIX carries sd_notify.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A thread may lower its own priority (the WAL checkpointer runs niced);
# raising one needs CAP_SYS_NICE, which this unit does not have.
SystemCallFilter=setpriority
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_unit(executable: str = DEFAULT_EXEC) -> str:
    return UNIT_TEMPLATE.replace("{exec_start}", f"{executable} run")


def render_env() -> str:
    out = [
        "# hs-gossip settings, read by the systemd unit (EnvironmentFile=).",
        "# Every variable is listed with its default; uncomment to change one.",
        "# Restart the unit after editing (systemctl restart hs-gossip);",
        "# HS_GOSSIP_LOG_LEVEL and HS_GOSSIP_LOG_FORMAT also apply on",
        "# systemctl reload hs-gossip.",
        "",
    ]
    for var, spec in FIELDS.items():
        for line in textwrap.wrap(spec.help, 76):
            out.append(f"# {line}")
        default = spec.default_text
        value = "" if default.startswith("(") or default.startswith("$") else default
        out.append(f"# default: {default}")
        out.append(f"#{PREFIX}{var}={value}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    # Regenerate the shipped copies: python -m agent.face.unit_files systemd/
    import sys
    from pathlib import Path

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "systemd")
    (out / "hs-gossip.service").write_text(render_unit(), encoding="utf-8")
    (out / "hs-gossip.env").write_text(render_env(), encoding="utf-8")
