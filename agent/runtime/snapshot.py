"""Known peers saved in the data dir, to rejoin when the seeds are down
(as Serf's snapshot does).

``peers.json`` holds, per peer, its gossip address and when it was last seen
alive (Unix seconds), and this agent's logical clock so that it never runs
backwards across a restart. It is written with agent.runtime.files.atomic_write
every 30 s and at shutdown. At start, entries younger than
``HS_GOSSIP_SNAPSHOT_MAX_AGE`` become extra seeds. A corrupt file is logged and
ignored: losing the snapshot only means waiting for the configured seeds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.addr import Addr
from agent.runtime.files import atomic_write

log = logging.getLogger("hs_gossip.snapshot")
FILENAME = "peers.json"
MAX_ENTRIES = 256


@dataclass
class Snapshot:
    peers: list[Addr] = field(default_factory=list)
    lc: int = 0


def save(data_dir: Path, peers: list[tuple[str, str, int, float]], lc: int = 0) -> None:
    """``peers``: (node_id, host, port, last_seen_unix). Newest first, capped."""
    peers = sorted(peers, key=lambda p: -p[3])[:MAX_ENTRIES]
    doc = {"version": 1, "saved": time.time(), "lc": lc,
           "peers": [{"node_id": n, "host": h, "port": p, "last_seen": round(t, 3)}
                     for n, h, p, t in peers]}
    atomic_write(data_dir / FILENAME, json.dumps(doc).encode())


def load(data_dir: Path, max_age: float, now: float | None = None) -> Snapshot:
    """Entries last seen more than ``max_age`` seconds ago are left out."""
    path = data_dir / FILENAME
    now = time.time() if now is None else now
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out = Snapshot(lc=max(0, int(doc.get("lc", 0))))
        for e in doc["peers"][:MAX_ENTRIES]:
            if now - float(e["last_seen"]) <= max_age:
                out.peers.append((str(e["host"]), int(e["port"])))
        return out
    except FileNotFoundError:
        return Snapshot()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable peer snapshot %s: %s", path, e)
        return Snapshot()
