"""Zero-config LAN discovery over IPv4 multicast (``HS_GOSSIP_DISCOVERY=multicast``).

Every few seconds an agent sends ``b"HSG1" | gossip port (2 bytes) | node_id
(16 bytes)`` to the group; agents that hear it add the sender's address and
port as a seed, and membership does the rest. TTL 1: discovery never leaves
the local link. Anything else arriving on the group port is ignored.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable

import anyio
from anyio.abc import UDPSocket

from agent.net.udp import Addr

log = logging.getLogger("hs_gossip.discovery")
MAGIC = b"HSG1"
ANNOUNCE_EVERY = 2.0


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


async def run(group: str, port: int, gossip_port: int, node_id: bytes,
              found: Callable[[Addr], None]) -> None:
    try:
        sock = await UDPSocket.from_socket(_socket(group, port))
    except OSError as e:
        log.warning("multicast discovery unavailable on %s:%d: %s", group, port, e)
        return
    announce = encode(gossip_port, node_id)
    seen: set[Addr] = set()

    async def sender() -> None:
        while True:
            try:
                await sock.sendto(announce, group, port)
            except (OSError, anyio.BrokenResourceError) as e:
                log.debug("multicast announce failed: %s", e)
            await anyio.sleep(ANNOUNCE_EVERY)

    async with sock, anyio.create_task_group() as tg:
        tg.start_soon(sender)
        while True:
            try:
                data, (host, _) = await sock.receive()
            except (OSError, anyio.BrokenResourceError):
                continue
            msg = decode(data)
            if msg is None or msg[1] == node_id:
                continue
            addr = (host, msg[0])
            if addr not in seen:
                seen.add(addr)
                log.info("discovered agent at %s:%d", *addr)
            found(addr)
