#!/usr/bin/env bash
# System tools some tests use: iproute2 (network namespaces for the LAN
# discovery test), systemd (systemd-analyze checks the unit) and etcd-server
# (the leader election tests start a real etcd on loopback). Idempotent;
# does nothing when they are present, and only warns when it cannot install
# (not root, no apt-get): those tests then skip and say why.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: missing ${need[*]}; not root or no apt-get, the tests that need them will skip" >&2
    exit 0
fi
echo "setup-system: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "setup-system: could not install ${need[*]}; the tests that need them will skip" >&2
fi
