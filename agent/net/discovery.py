"""Zero-config LAN discovery over IPv4 multicast (``HS_GOSSIP_DISCOVERY=multicast``).

Every few seconds an agent sends ``b"HSG1" | gossip port (2 bytes) | node_id
(16 bytes)`` to the group; agents that hear it add the sender's address and
port as a seed, and membership does the rest. TTL 1: discovery never leaves
the local link. Anything else arriving on the group port is ignored.

This is the agent's second UDP socket. Its datagrams cross the same seal as
gossip (agent.net.seal, kind DISCOVERY) in :class:`DiscoverySocket`, the only
place here that touches datagram bytes; one the seal refuses to open is
counted (``drop_unopened``) and dropped. With a key the seal also says who
sealed a beacon: one whose node_id is not its authenticated sender (a key
holder speaking for another node) is counted (``drop_sender_mismatch``) and
dropped too.

The group port also answers unicast, from anywhere that can reach it, so
nothing kept per source grows without bound: the addresses already logged
are the last :data:`HEARD_MAX` (:class:`Heard`), and what becomes a seed is
bounded by the caller (agent.runtime.seeds).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable

import anyio
import anyio.lowlevel
from anyio.abc import UDPSocket

from agent.core.addr import Addr
from agent.net.seal import CLEARTEXT, Kind, Seal
from agent.net.udp import only_os_errors

log = logging.getLogger("hs_gossip.discovery")
MAGIC = b"HSG1"
ANNOUNCE_EVERY = 2.0
#: addresses remembered as already announced in the log
HEARD_MAX = 256


def encode(port: int, node_id: bytes) -> bytes:
    return MAGIC + struct.pack(">H", port) + node_id


def decode(data: bytes) -> tuple[int, bytes] | None:
    if len(data) != 22 or not data.startswith(MAGIC):
        return None
    return struct.unpack(">H", data[4:6])[0], data[6:22]


def _socket(group: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Several agents on one host may share the discovery port (not the gossip port).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return s


class DiscoverySocket:
    """Sends to ``group:port`` and receives what arrives on the socket, through
    the seal. Errors are counted, never raised: discovery is best effort."""

    def __init__(self, sock: UDPSocket, group: str, port: int,
                 seal: Seal = CLEARTEXT) -> None:
        self._sock = sock
        self._group = group
        self._port = port
        self._seal = seal
        self.stats: Counter[str] = Counter()

    @classmethod
    async def join(cls, group: str, port: int, seal: Seal = CLEARTEXT) -> DiscoverySocket:
        """Bind the group port and join the group. Raises OSError."""
        return cls(await UDPSocket.from_socket(_socket(group, port)), group, port, seal)

    async def send(self, data: bytes) -> None:
        try:
            await self._sock.sendto(self._seal.seal(data, Kind.DISCOVERY),
                                    self._group, self._port)
        except (OSError, anyio.BrokenResourceError) as e:
            only_os_errors(e)
            self.stats["send_errors"] += 1
            log.debug("multicast announce failed: %s", e)

    async def receive(self) -> tuple[bytes, Addr]:
        """The next opened datagram and its source address."""
        while True:
            try:
                datagram, (host, port) = await self._sock.receive()
            except (OSError, anyio.BrokenResourceError) as e:
                only_os_errors(e)  # a closed socket would otherwise spin here
                self.stats["receive_errors"] += 1
                await anyio.lowlevel.checkpoint()
                continue
            data = self._seal.open(datagram, Kind.DISCOVERY)
            if data is None:
                self.stats["drop_unopened"] += 1
                continue
            # Asked at once, before any await: the seal vouches only for
            # the plaintext its last open returned.
            sender = self._seal.sender(data)
            beacon = decode(data)
            if sender is not None and beacon is not None and beacon[1] != sender:
                self.stats["drop_sender_mismatch"] += 1
                log.debug("beacon from %s names another node; dropped", host)
                continue
            return data, (host, port)

    async def aclose(self) -> None:
        await self._sock.aclose()


class Heard:
    """The agents heard lately, so that each is logged once while it keeps
    announcing: the last ``limit`` addresses, the least recently heard
    forgotten first."""

    def __init__(self, limit: int = HEARD_MAX) -> None:
        self.limit = limit
        self._addrs: dict[Addr, None] = {}  # insertion order: least recent first

    def __len__(self) -> int:
        return len(self._addrs)

    def first(self, addr: Addr) -> bool:
        """Note ``addr``; True when it was not among the remembered ones."""
        new = addr not in self._addrs
        self._addrs.pop(addr, None)  # heard again: now the most recent
        self._addrs[addr] = None
        if len(self._addrs) > self.limit:
            del self._addrs[next(iter(self._addrs))]
        return new


async def run(group: str, port: int, gossip_port: int, node_id: bytes,
              found: Callable[[Addr], None], seal: Seal = CLEARTEXT) -> None:
    try:
        sock = await DiscoverySocket.join(group, port, seal)
    except OSError as e:
        log.warning("multicast discovery unavailable on %s:%d: %s", group, port, e)
        return
    await serve(sock, gossip_port, node_id, found)


async def serve(sock: DiscoverySocket, gossip_port: int, node_id: bytes,
                found: Callable[[Addr], None]) -> None:
    """Announce this agent and report every other agent heard, until cancelled.
    Closes ``sock`` on the way out."""
    announce = encode(gossip_port, node_id)
    heard = Heard()

    async def sender() -> None:
        while True:
            await sock.send(announce)
            await anyio.sleep(ANNOUNCE_EVERY)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            while True:
                data, (host, _) = await sock.receive()
                msg = decode(data)
                if msg is None or msg[1] == node_id:
                    continue
                addr = (host, msg[0])
                if heard.first(addr):
                    log.info("discovered agent at %s:%d", *addr)
                found(addr)
    finally:
        with anyio.CancelScope(shield=True):
            await sock.aclose()
