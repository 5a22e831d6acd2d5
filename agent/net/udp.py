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
* Idle cost: an idle agent's CPU is mostly the event loop's cost per wakeup,
  so the non-blocking socket is driven directly: a send is one sendto with no
  yield (it waits only while the socket buffer is full), and a receive waits
  for readability only when nothing is queued. A datagram that was already
  queued is returned after one yield, so a flood cannot starve other tasks.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections import Counter

import anyio
import anyio.lowlevel

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


@functools.lru_cache(maxsize=1024)
def normalize(host: str) -> str:
    """Plain IPv4 for mapped addresses, drop any IPv6 scope id. Cached: it
    runs on every received datagram, and parsing an address costs more than
    the rest of the receive path; the few addresses a swarm uses repeat."""
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
    def __init__(self, sock: socket.socket, seal: Seal = CLEARTEXT) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._family = sock.family
        self._seal = seal
        self.stats: Counter[str] = Counter()
        # Only one task may wait for writability at a time (the receive and
        # tick loops both send); the common path takes no lock.
        self._send_lock = anyio.Lock()

    @classmethod
    async def bind(cls, bind: str, port: int, seal: Seal = CLEARTEXT) -> GossipSocket:
        return cls(_make_socket(bind, port), seal)

    @property
    def local_port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _dest(self, host: str) -> str | None:
        if ":" in host:
            # An IPv4 socket cannot reach an IPv6 peer; gossip through
            # dual-stack peers still links them.
            return host if self._family == socket.AF_INET6 else None
        return "::ffff:" + host if self._family == socket.AF_INET6 else host

    async def send(self, data: bytes, addr: Addr) -> None:
        """Never raises OSError: failures are counted. Yields only while the
        socket buffer is full (so a burst of sends does not spin)."""
        dest = self._dest(addr[0])
        if dest is None:
            self.stats["send_family_unreachable"] += 1
            return
        datagram = self._seal.seal(data, Kind.GOSSIP)
        target = (dest, addr[1])
        try:
            self._sock.sendto(datagram, target)
            return
        except BlockingIOError:
            pass
        except OSError:
            self.stats["send_errors"] += 1
            return
        async with self._send_lock:
            while True:
                await anyio.wait_writable(self._sock)
                try:
                    self._sock.sendto(datagram, target)
                    return
                except BlockingIOError:
                    continue
                except OSError:
                    self.stats["send_errors"] += 1
                    return

    async def receive(self) -> tuple[bytes, Addr]:
        """Checkpoint. The next opened datagram and its numeric source address."""
        waited = False
        while True:
            if self._sock.fileno() < 0:
                raise anyio.ClosedResourceError
            try:
                datagram, src = self._sock.recvfrom(65535)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                waited = True
                continue
            except OSError:
                # ICMP errors from an earlier send can surface here.
                self.stats["receive_errors"] += 1
                await anyio.lowlevel.checkpoint()
                waited = True
                continue
            if not waited:
                # Queued already: let the other tasks run before handling it.
                await anyio.lowlevel.checkpoint()
                waited = True
            data = self._seal.open(datagram, Kind.GOSSIP)
            if data is None:
                self.stats["drop_unopened"] += 1
                waited = False  # a flood of forgeries must yield too
                continue
            host = src[0] if self._family == socket.AF_INET else normalize(src[0])
            return data, (host, src[1])

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()
