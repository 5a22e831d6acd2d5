"""What the SWIM core hands back to its shell: timers, datagrams, TCP exchanges,
outcome events and the reasons it refuses input.

Rules:

* Timers are verbs (what to do when the deadline passes); outcome events are
  nouns (what happened to a member). Both are frozen dataclasses, so a shell
  or a simulator can log, compare and replay them.
* A :class:`SetTimer` is a request: "call ``handle_timer(timer, now)`` at
  ``deadline``". The core never cancels a timer; it ignores the ones that
  became stale (a probe that was already acked, a suspicion already refuted),
  so a shell may keep every timer it was given in a plain heap.
* Every refused input is counted under one :class:`DropReason`; the values
  are short snake_case strings used as metric labels and as keys of
  ``Swim.stats``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.core.addr import Addr


class TimerKind(enum.Enum):
    #: start the next probe period
    PROBE = "probe"
    #: key=probe seq: direct ack missing -> indirect probes (for a relayed
    #: probe: the target did not answer -> NACK to the requester)
    PROBE_TIMEOUT = "probe_timeout"
    #: key=probe seq: period over, no ack -> suspect the target
    PROBE_END = "probe_end"
    #: send pending broadcasts to ``gossip_fanout`` members (armed only while
    #: the broadcast queue is not empty)
    GOSSIP = "gossip"
    #: key=node_id: suspicion ran out -> declare dead
    SUSPECT_TIMEOUT = "suspect_timeout"
    #: periodic full-state exchange with one random member
    PUSH_PULL = "push_pull"
    #: key=node_id: remove a dead/left entry, or drop its tombstone
    REAP = "reap"
    #: retry seeds not yet reached
    JOIN = "join"


@dataclass(frozen=True)
class Timer:
    kind: TimerKind
    key: bytes | int = 0


@dataclass(frozen=True)
class SetTimer:
    """Call ``handle_timer(timer, now)`` at ``deadline`` (stale ones are ignored)."""

    deadline: float
    timer: Timer


@dataclass(frozen=True)
class Send:
    """One datagram."""

    addr: Addr
    data: bytes


@dataclass(frozen=True)
class PushPull:
    """Open a TCP exchange to ``addr``'s host on ``tcp_port`` (0: the same
    number as ``addr``'s gossip port, as for a seed): send ``data``, hand the
    reply to ``Swim.receive_push_pull_reply``, or call
    ``Swim.push_pull_failed(addr, now)``."""

    addr: Addr
    data: bytes
    tcp_port: int = 0


class DropReason(enum.Enum):
    DECODE_TRUNCATED = "decode_truncated"
    DECODE_VERSION = "decode_version"
    DECODE_TYPE = "decode_type"
    DECODE_FIELD = "decode_field"
    DECODE_TOO_BIG = "decode_too_big"
    RATE_LIMITED = "rate_limited"
    SENDER_MISMATCH = "sender_mismatch"
    NOT_FOR_US = "not_for_us"
    STALE_INCARNATION = "stale_incarnation"
    INCARNATION_JUMP = "incarnation_jump"
    TABLE_FULL = "table_full"
    UNKNOWN_PROBE = "unknown_probe"
    DEAD_STAYS_DEAD = "dead_stays_dead"
    #: our own datagram or push-pull came back (we are in our seed list)
    FROM_SELF = "from_self"
    #: an update about a member we do not know that only its own word may create
    UNKNOWN_MEMBER = "unknown_member"
    #: too many indirect probes in flight for others
    RELAY_BUSY = "relay_busy"
    #: an entry without a usable address
    NO_ADDRESS = "no_address"
    #: a logical clock far ahead of ours (forged or corrupted)
    LC_JUMP = "lc_jump"
    #: we are leaving: nothing more is answered
    LEAVING = "leaving"
    #: DIGESTS older than the version we hold (hearsay behind the member's word)
    STALE_DIGESTS = "stale_digests"
    #: news we already hold (a repeated DEAD or LEFT at the same incarnation)
    DUPLICATE = "duplicate"
    #: an ACK from neither the probed member nor a helper we asked (forged or late)
    WRONG_ACKER = "wrong_acker"
    #: a PING_REQ from an address that is not a known ALIVE member's
    UNKNOWN_REQUESTER = "unknown_requester"


# --- outcome events (nouns) ---------------------------------------------------


@dataclass(frozen=True)
class MemberJoined:
    node_id: bytes
    addr: Addr


@dataclass(frozen=True)
class MemberRestarted:
    """A member we held as dead or left came back with a higher incarnation."""

    node_id: bytes
    incarnation: int


@dataclass(frozen=True)
class MemberSuspected:
    node_id: bytes


@dataclass(frozen=True)
class MemberRecovered:
    """Suspect -> alive (the member refuted)."""

    node_id: bytes


@dataclass(frozen=True)
class MemberFailed:
    """Declared dead (suspicion ran out, or a DEAD update)."""

    node_id: bytes


@dataclass(frozen=True)
class MemberLeft:
    node_id: bytes


@dataclass(frozen=True)
class MemberExpired:
    """Removed from the table (its tombstone stays another ``ttl``)."""

    node_id: bytes


@dataclass(frozen=True)
class IncarnationRaised:
    """We refuted (or changed our card); the shell persists the incarnation."""

    incarnation: int
    #: "refutation", or what of our card changed ("role")
    reason: str = "refutation"


@dataclass(frozen=True)
class DigestsChanged:
    """A member's collection digests changed: the shell plans Merkle sync."""

    node_id: bytes


Event = (
    MemberJoined | MemberRestarted | MemberSuspected | MemberRecovered | MemberFailed
    | MemberLeft | MemberExpired | IncarnationRaised | DigestsChanged
)
