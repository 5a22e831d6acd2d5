"""``GET /metrics`` in Prometheus text format.

A custom collector reads the counters the cores already keep (membership
stats, socket errors, sync and store figures) from one view of the agent
(agent.runtime.view) at scrape time, so no protocol module imports
prometheus_client and nothing is counted twice. A private registry keeps
library defaults out. prometheus_client (and the http.server,
wsgiref and gzip modules it pulls in, ~1.5 MiB) is imported on the first
scrape, so agents nobody scrapes do not pay for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.core.swim import DropReason
from agent.runtime.view import STATUSES, AgentView

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric name without _total, HELP, key in the membership core's stats or
#: the socket's counters): what the SWIM core counts as it works
MEMBERSHIP_COUNTERS = (
    ("hs_gossip_probes", "Probe periods started: one ping to one member", "probes"),
    ("hs_gossip_probes_failed",
     "Probes with no ack, direct or indirect, by the end of their period (target suspected)",
     "probes_failed"),
    ("hs_gossip_suspicion_confirmations",
     "Independent accusers that shortened a running suspicion", "suspicion_confirmations"),
    ("hs_gossip_refutations", "Suspicions of this agent refuted (incarnation raised)",
     "refutations"),
    ("hs_gossip_udp_sent_datagrams", "Membership datagrams sent (pings, acks, gossip, ...)",
     "datagrams_out"),
    ("hs_gossip_udp_sent_bytes", "Membership datagram bytes sent", "bytes_out"),
    ("hs_gossip_udp_received_bytes", "Membership datagram bytes received (opened)", "bytes_in"),
    ("hs_gossip_push_pull_started", "Full-state TCP exchanges started (periodic and joins)",
     "push_pulls_out"),
    ("hs_gossip_push_pull_served", "Full-state TCP exchanges answered for members",
     "push_pull_served"),
    ("hs_gossip_push_pull_merged", "Full-state payloads merged (either side)",
     "push_pull_merged"),
    ("hs_gossip_push_pull_failed", "Full-state TCP exchanges started here that failed",
     "push_pull_failed"),
    ("hs_gossip_member_tombstones_evicted",
     "Tombstones of removed members dropped early because the table of them was full",
     "tombstones_evicted"),
)


class AgentCollector:
    """A prometheus_client collector (duck-typed: it only needs ``collect``).
    Each scrape reads one view of the agent."""

    def __init__(self, view: Callable[[], AgentView]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        return collect(self.view())


def collect(v: AgentView) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    stats = dict(v.counters)
    peers = GaugeMetricFamily("hs_gossip_peers", "Peers by state", labels=["state"])
    peers.add_metric(["healthy"], v.healthy_peers)
    peers.add_metric(["unhealthy"], v.peer_count - v.healthy_peers)
    yield peers

    members = GaugeMetricFamily("hs_gossip_members",
                                "Members by status, this agent included (as hs-gossip members)",
                                labels=["status"])
    by_status = Counter(m.status for m in v.members)
    for status in STATUSES:
        members.add_metric([status], by_status.get(status, 0))
    yield members

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=stats.get(key, 0))

    for name, doc, key in MEMBERSHIP_COUNTERS:
        yield counter(name, doc, key)
    drops = CounterMetricFamily("hs_gossip_dropped_datagrams",
                                "Datagrams and push-pull payloads refused, by cause",
                                labels=["cause"])
    # Every cause the membership core knows, zero included, so a rate()
    # over a cause exists before its first drop.
    for reason in DropReason:
        drops.add_metric([reason.value], stats.get(reason.value, 0))
    for k, n in sorted(stats.items()):
        if k.startswith("drop_"):
            drops.add_metric([k[5:]], n)
    for k in ("send_errors", "receive_errors", "send_family_unreachable"):
        if k in stats:
            drops.add_metric([k], stats[k])
    yield drops

    s = v.sync
    if s is not None:
        yield CounterMetricFamily("hs_gossip_sync_runs", "Sync sessions started and finished",
                                  value=s.runs)
        yield CounterMetricFamily("hs_gossip_sync_failures", "Sync sessions that failed",
                                  value=s.failures)
        yield CounterMetricFamily("hs_gossip_sync_served", "Sync sessions answered",
                                  value=s.served)
        b = CounterMetricFamily("hs_gossip_sync_bytes", "Sync bytes", labels=["direction"])
        b.add_metric(["in"], s.bytes_in)
        b.add_metric(["out"], s.bytes_out)
        yield b
        items = CounterMetricFamily("hs_gossip_sync_items", "Items shipped by sync",
                                    labels=["direction"])
        items.add_metric(["in"], s.items_in)
        items.add_metric(["out"], s.items_out)
        yield items
        hs = CounterMetricFamily("hs_gossip_sync_handshake_failures",
                                 "Sync stream handshakes refused, by cause", labels=["cause"])
        for cause, n in s.handshake_failed:
            hs.add_metric([cause], n)
        yield hs
        yield SummaryMetricFamily("hs_gossip_sync_duration_seconds",
                                  "Duration of the sync sessions started here",
                                  count_value=s.runs, sum_value=s.seconds_total)

    st = v.store
    if st is not None:
        yield SummaryMetricFamily("hs_gossip_store_write_seconds",
                                  "SQLite write transactions (group commits): latency",
                                  count_value=st.batches, sum_value=st.write_seconds)
        yield CounterMetricFamily("hs_gossip_store_operations",
                                  "Store operations", value=st.ops)
        yield GaugeMetricFamily("hs_gossip_collections", "Replicated collections",
                                value=st.collections)
    r = v.replication
    if r is not None:
        rs = dict(r.stats)
        yield CounterMetricFamily("hs_gossip_replication_entries_streamed",
                                  "Change-log entries sent to followers",
                                  value=rs.get("entries_streamed", 0))
        yield CounterMetricFamily("hs_gossip_replication_entries_applied",
                                  "Change-log entries applied from the leader",
                                  value=rs.get("entries_applied", 0))
        yield CounterMetricFamily("hs_gossip_replication_chain_refused",
                                  "Batches from the leader refused: the chain did not verify",
                                  value=rs.get("chain_refused", 0))
        yield CounterMetricFamily("hs_gossip_replication_resyncs",
                                  "DIVERGED or SNAPSHOT_NEEDED answers caught up by Merkle sync",
                                  value=rs.get("resyncs", 0))
        yield CounterMetricFamily(
            "hs_gossip_replication_snapshots",
            "Snapshots started (resumed ones too): received as follower, sent as leader",
            value=sum(rs.get(k, 0) for k in ("snapshots", "snapshots_resumed", "snapshots_sent",
                                             "snapshots_resumed_sent")))
        for key, text in (
                ("snapshots_installed", "Snapshots installed with their roots verified"),
                ("snapshots_refused", "Snapshots refused: a chunk or the roots did not verify"),
                ("epoch_refused", "Frames refused: their epoch is below the highest seen"),
                ("promotions", "Promotions of this agent to leader"),
                ("promotions_refused", "Promotions refused: another agent is further"),
                ("stepped_down", "Times this leader stepped down for a higher epoch")):
            yield CounterMetricFamily(f"hs_gossip_replication_{key}", text,
                                      value=rs.get(key, 0))
        yield GaugeMetricFamily("hs_gossip_replication_followers", "Followers connected",
                                value=len(r.downstream))
        lag = GaugeMetricFamily("hs_gossip_replication_lag_entries",
                                "Entries a follower has not acknowledged", labels=["follower"])
        for d in r.downstream:
            lag.add_metric([d.node_id], d.lag)
        yield lag
        yield GaugeMetricFamily("hs_gossip_replication_applied_seq",
                                "Leader: its log head; follower: the leader's seq applied",
                                value=r.applied_seq)
    yield GaugeMetricFamily("hs_gossip_event_loop_lag_seconds",
                            "Lateness of the last event-loop timer", value=v.loop_lag)
    yield GaugeMetricFamily("hs_gossip_logical_clock", "Lamport clock", value=v.logical_clock)


def routes(view: Callable[[], AgentView]) -> list[Route]:
    registry: Any = None

    async def metrics(request: Request) -> Response:
        nonlocal registry
        from prometheus_client import CollectorRegistry, generate_latest

        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(AgentCollector(view))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
