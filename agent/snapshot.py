"""Known peers saved in the data dir, to rejoin when the seeds are down
(as Serf's snapshot does).

``peers.json`` holds, per peer, its gossip address and when it was last seen
alive (Unix seconds). It is written atomically (temp file, fsync, rename) every
30 s and at shutdown. At start, entries younger than
``HS_GOSSIP_SNAPSHOT_MAX_AGE`` become extra seeds. A corrupt file is logged and
ignored: losing the snapshot only means waiting for the configured seeds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from agent.udp import Addr

log = logging.getLogger("hs_gossip.snapshot")
FILENAME = "peers.json"
MAX_ENTRIES = 256


def save(data_dir: Path, peers: list[tuple[str, str, int, float]]) -> None:
    """``peers``: (node_id, host, port, last_seen_unix). Newest first, capped."""
    peers = sorted(peers, key=lambda p: -p[3])[:MAX_ENTRIES]
    doc = {"version": 1, "saved": time.time(),
           "peers": [{"node_id": n, "host": h, "port": p, "last_seen": round(t, 3)}
                     for n, h, p, t in peers]}
    path = data_dir / FILENAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(data_dir: Path, max_age: float, now: float | None = None) -> list[Addr]:
    path = data_dir / FILENAME
    now = time.time() if now is None else now
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["peers"]
        out: list[Addr] = []
        for e in entries:
            if now - float(e["last_seen"]) <= max_age:
                out.append((str(e["host"]), int(e["port"])))
        return out
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable peer snapshot %s: %s", path, e)
        return []
