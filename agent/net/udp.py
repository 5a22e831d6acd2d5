"""The gossip UDP socket: the one place where datagrams enter and leave.

* One dual-stack AF_INET6 socket (IPV6_V6ONLY=0) when binding the wildcard
  address, falling back to AF_INET where IPv6 is off; a specific address gets
  a socket of its own family.
* No SO_REUSEADDR: a second process must not be able to bind the same port
  and steal datagrams.
* Addresses are numeric on both sides of this module: IPv4-mapped IPv6
  sources (``::ffff:10.0.0.5``) are reported as plain IPv4, and IPv4
  destinations are mapped when the socket is IPv6.
* Receives use a 65535-byte buffer (a shorter one silently truncates).
* A failed sendto (unreachable network, full buffer) is counted, not raised.
* Every datagram crosses the seal (agent.net.seal) on its way out and in; one
  that the seal refuses to open is counted (``drop_unopened``) and dropped.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter

import anyio
import anyio.lowlevel
from anyio.abc import UDPSocket

from agent.core.addr import Addr
from agent.net.seal import CLEARTEXT, Kind, Seal


def _make_socket(bind: str, port: int) -> socket.socket:
    ip = ipaddress.ip_address(bind)
    if ip.version == 4 and ip.is_unspecified and socket.has_ipv6:
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            pass
        else:
            try:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
                return s
            except OSError:
                s.close()
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((bind, port))
    except OSError:
        s.close()
        raise
    return s


def normalize(host: str) -> str:
    """Plain IPv4 for mapped addresses, drop any IPv6 scope id."""
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def only_os_errors(e: BaseException) -> None:
    """anyio reports any OSError of a socket call as BrokenResourceError,
    though a UDP socket survives an unreachable peer. Re-raise anything else."""
    if isinstance(e, anyio.BrokenResourceError) and not isinstance(e.__cause__, OSError):
        raise e


class GossipSocket:
    def __init__(self, sock: UDPSocket, family: int, seal: Seal = CLEARTEXT) -> None:
        self._sock = sock
        self._family = family
        self._seal = seal
        self.stats: Counter[str] = Counter()
        # anyio sockets refuse concurrent senders; the receive and tick loops both send.
        self._send_lock = anyio.Lock()

    @classmethod
    async def bind(cls, bind: str, port: int, seal: Seal = CLEARTEXT) -> GossipSocket:
        raw = _make_socket(bind, port)
        family = raw.family
        return cls(await UDPSocket.from_socket(raw), family, seal)

    @property
    def local_port(self) -> int:
        return int(self._sock.extra(anyio.abc.SocketAttribute.local_port))

    def _dest(self, host: str) -> str | None:
        if ":" in host:
            # An IPv4 socket cannot reach an IPv6 peer (anyio would mark the
            # socket broken); gossip through dual-stack peers still links them.
            return host if self._family == socket.AF_INET6 else None
        return "::ffff:" + host if self._family == socket.AF_INET6 else host

    async def send(self, data: bytes, addr: Addr) -> None:
        """Checkpoint. Never raises OSError: failures are counted."""
        dest = self._dest(addr[0])
        if dest is None:
            self.stats["send_family_unreachable"] += 1
            return
        datagram = self._seal.seal(data, Kind.GOSSIP)
        try:
            async with self._send_lock:
                await self._sock.sendto(datagram, dest, addr[1])
        except (OSError, anyio.BrokenResourceError) as e:
            only_os_errors(e)
            self.stats["send_errors"] += 1

    async def receive(self) -> tuple[bytes, Addr]:
        """The next opened datagram and its numeric source address."""
        while True:
            try:
                datagram, (host, port) = await self._sock.receive()
            except (OSError, anyio.BrokenResourceError) as e:
                # ICMP errors from an earlier send can surface here.
                only_os_errors(e)
                self.stats["receive_errors"] += 1
                await anyio.lowlevel.checkpoint()
                continue
            data = self._seal.open(datagram, Kind.GOSSIP)
            if data is None:
                self.stats["drop_unopened"] += 1
                continue
            return data, (normalize(host), port)

    async def aclose(self) -> None:
        await self._sock.aclose()
