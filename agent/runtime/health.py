"""Application health probe: ``HS_GOSSIP_HEALTH_URL`` (2xx is healthy) and/or
``HS_GOSSIP_HEALTH_CMD`` (exit 0 is healthy), every ``HS_GOSSIP_HEALTH_INTERVAL``
seconds. Each probe has a timeout of the interval (at most 10 s); a probe that
hangs counts as a failure and a command is killed. With both set, both must pass.
The result rides in heartbeats and shows per peer as ``app_healthy``."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

import anyio

log = logging.getLogger("hs_gossip.health")


def _url_ok(url: str, timeout: float) -> bool:
    import urllib.error  # only agents with a health URL pay for urllib
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(200 <= r.status < 300)
    except urllib.error.HTTPError:
        return False
    except (OSError, ValueError):
        return False


async def probe(url: str | None, cmd: str | None, timeout: float) -> bool:
    ok = True
    if url:
        ok = await anyio.to_thread.run_sync(_url_ok, url, timeout)
    if ok and cmd:
        try:
            with anyio.fail_after(timeout):
                result = await anyio.run_process(cmd, check=False,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL)
            ok = result.returncode == 0
        except TimeoutError:
            ok = False
        except OSError as e:
            log.warning("health command failed to start: %s", e)
            ok = False
    return ok


async def run(url: str | None, cmd: str | None, interval: float,
              report: Callable[[bool], None]) -> None:
    last: bool | None = None
    timeout = min(interval, 10.0)
    while True:
        ok = await probe(url, cmd, timeout)
        if ok != last:
            log.log(logging.INFO if ok else logging.WARNING,
                    "application health: %s", "healthy" if ok else "FAILING")
            last = ok
        report(ok)
        await anyio.sleep(interval)
