"""Network addresses as the rest of the agent passes them around.

An :data:`Addr` is a numeric ``(host, port)`` pair; host names are resolved
by the agent process before an address gets this far. Formatting one for
people and for URLs is :func:`join_host_port`, written once here: IPv6 hosts
are bracketed (``[::1]:7946``) so the port stays unambiguous.
"""

from __future__ import annotations

Addr = tuple[str, int]


def join_host_port(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` when the host is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
