"""Timing and bounds of the SWIM core, with the LAN defaults and their trade-offs.

Rules: every field has a default from :meth:`Params.lan`; times are seconds of
the shell's monotonic clock; the core scales ``probe_interval``,
``probe_timeout`` and suspicion timeouts by the Lifeguard awareness
multiplier (score + 1), so an agent that is itself slow stretches its own
verdicts instead of accusing healthy members.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    #: one probe per period. Shorter detects failures sooner and costs one
    #: ping + one ack (~70 bytes each) more per agent per period.
    probe_interval: float = 1.0
    #: wait this long for a direct ack before asking others (indirect probe).
    #: Must exceed a normal round trip; longer = fewer indirect probes on slow
    #: links, but less time left in the period for the indirect ones.
    probe_timeout: float = 0.5
    #: members asked to probe an unresponsive target for us. More = fewer
    #: false suspicions behind one bad link, more datagrams when one fails.
    indirect_checks: int = 3
    #: suspicion lasts suspicion_mult * log10(N) * probe_interval at least,
    #: and suspicion_mult - 2 independent accusers corroborate it.
    #: Higher = fewer false deaths under loss, slower detection. memberlist
    #: uses 4; 3 here, because retried probes and the last check of an
    #: uncorroborated suspect already keep false deaths at none at 20-40 %
    #: loss (docs/PROTOCOL.md), and it declares a death 2 s sooner at N = 100.
    suspicion_mult: int = 3
    #: without confirmations a suspicion lasts this multiple of the minimum;
    #: independent confirmations shorten it towards the minimum (Lifeguard).
    suspicion_max_mult: float = 6.0
    #: floor of the minimum suspicion timeout (small swarms: log10(N) ~ 0)
    suspicion_min: float = 2.0
    #: while broadcasts are queued, send them every gossip_interval to
    #: gossip_fanout random members. Nothing is sent when the queue is empty.
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    #: each update is sent retransmit_mult * ceil(log10(N+1)) times. Higher =
    #: more robust dissemination under loss, more bytes per change.
    retransmit_mult: int = 4
    #: broadcasts kept queued (the oldest beyond this are dropped; push-pull
    #: repairs what is lost)
    max_broadcasts: int = 1024
    #: full-state TCP exchange with one random member, scaled up above 32
    #: members (x ceil(log2(N/32)) + 1) so the swarm's total stays flat.
    #: Shorter repairs lost gossip sooner and costs a whole table per exchange.
    push_pull_interval: float = 30.0
    #: open the periodic exchange with our own entry and a 16-byte hash of our
    #: table; the peer answers the same way when its hash matches, with its
    #: whole table otherwise (and we then send ours). Agreeing tables cost
    #: ~2 entries instead of 2N; a mismatch costs one more round trip.
    push_pull_summary: bool = True
    #: a join exchange not yet answered (nor reported failed) counts as in
    #: flight this long: its seed is not asked again meanwhile. Retrying a
    #: seed that is merely slow (a swarm starting at once) piles exchanges on
    #: it and slows every join; the shell's own exchange timeout is 10 s.
    push_pull_timeout: float = 10.0
    #: one early push-pull this long after the first seed answered: members
    #: that joined at the same time are missing from each other's seed tables
    #: and would otherwise wait for gossip or the next full push-pull. It goes
    #: to the seed that answered, which every joiner exchanged tables with.
    join_catch_up: float = 5.0
    #: once its first seed answered, a joiner sends its ALIVE straight to
    #: this many random members (every member of a swarm this small): with
    #: 4 x ceil(log10(N + 1)) transmissions per update, gossip alone can pass a
    #: member of a small swarm by for seconds. Above it the seed's gossip
    #: spreads the joiner and a join costs the same whatever N (memberlist
    #: sends nothing directly; a swarm restarting at once would otherwise
    #: cost N^2 datagrams).
    join_announce: int = 128
    #: a member not alive and not confirmed alive for ttl is removed; its
    #: tombstone stays another ttl (HS_GOSSIP_TTL)
    ttl: float = 30.0
    #: first retry of unreached seeds; doubles up to join_retry_max. Once
    #: joined, seeds that are not members are retried every join_retry_max.
    join_retry: float = 1.0
    join_retry_max: float = 30.0
    #: seed addresses kept and retried (configured ones first, then the most
    #: recent discovered ones)
    max_seeds: int = 64
    #: Lifeguard local health: the score runs 0 .. max_awareness - 1, so timeouts
    #: are multiplied by at most max_awareness
    max_awareness: int = 8
    #: members held (all statuses); unknown members beyond are refused
    max_members: int = 4096
    #: datagrams accepted per second from one source address (burst: twice)
    max_datagrams_per_source: int = 100
    #: indirect probes we run for others at once
    max_relays: int = 64
    #: full digest lists sent to one member on request, at most once per
    #: this many seconds (a mismatch that cannot be repaired does not loop)
    digests_answer_every: float = 5.0

    @classmethod
    def lan(cls) -> Params:
        """The defaults: a LAN or a good WAN, one probe per second."""
        return cls()
