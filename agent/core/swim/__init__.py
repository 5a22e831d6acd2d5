"""SWIM + Lifeguard membership core, sans-I/O (see :mod:`agent.core.swim.protocol`).

One concept per module: ``codec`` (datagrams and push-pull payloads),
``broadcasts`` (transmit-limited queue), ``suspicion`` (timeout maths),
``awareness`` (local health), ``params`` (timings and bounds), ``members``
(the table's records), ``events`` (timers, outputs, outcomes, drop reasons),
``table`` (the rules that change the table), ``exchange`` (joining and
push-pull) and ``protocol`` (the :class:`Swim` state machine: probes,
datagrams, timers).
"""

from agent.core.swim.events import (
    DigestsChanged,
    DropReason,
    Event,
    IncarnationRaised,
    MemberExpired,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberRecovered,
    MemberRestarted,
    MemberSuspected,
    PushPull,
    Send,
    SetTimer,
    Timer,
    TimerKind,
)
from agent.core.swim.members import ALIVE, DEAD, LEFT, STATUS_NAMES, SUSPECT, Member, SelfInfo
from agent.core.swim.params import Params
from agent.core.swim.protocol import Swim

__all__ = [
    "ALIVE",
    "DEAD",
    "LEFT",
    "STATUS_NAMES",
    "SUSPECT",
    "DigestsChanged",
    "DropReason",
    "Event",
    "IncarnationRaised",
    "Member",
    "MemberExpired",
    "MemberFailed",
    "MemberJoined",
    "MemberLeft",
    "MemberRecovered",
    "MemberRestarted",
    "MemberSuspected",
    "Params",
    "PushPull",
    "SelfInfo",
    "Send",
    "SetTimer",
    "Swim",
    "Timer",
    "TimerKind",
]
