"""Fault injection for tests, as an object the agent is given.

The production code paths never read the environment for faults: the agent
takes a :class:`Faults` (by default :data:`NO_FAULTS`) and acts on its
fields. Only the ``run`` command builds one from the environment, in
:func:`from_environ`, so that a test can start a real agent process with a
fault switched on:

* ``HS_GOSSIP_FAULT_STALL_TICK_AFTER=SECONDS``: the gossip tick loop hangs
  that long after start while everything else (the API) keeps running, which
  is what the systemd watchdog must catch. A value that is not a number is
  logged and ignored.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from agent.config import PREFIX

log = logging.getLogger("hs_gossip")

STALL_TICK_AFTER = PREFIX + "FAULT_STALL_TICK_AFTER"


@dataclass(frozen=True)
class Faults:
    #: seconds after start at which the gossip tick loop hangs for good
    stall_tick_after: float | None = None


NO_FAULTS = Faults()


def from_environ(environ: Mapping[str, str] | None = None) -> Faults:
    """The faults the environment asks for; logs and ignores malformed values."""
    env = os.environ if environ is None else environ
    raw = env.get(STALL_TICK_AFTER)
    if not raw:
        return NO_FAULTS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isnan(seconds):
        log.error("ignoring %s=%r: not a number", STALL_TICK_AFTER, raw)
        return NO_FAULTS
    return Faults(stall_tick_after=seconds)
