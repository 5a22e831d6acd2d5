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

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.runtime.view import AgentView

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=stats.get(key, 0))

    yield counter("hs_gossip_heartbeats_received", "Heartbeats received", "heartbeats_in")
    yield counter("hs_gossip_heartbeats_sent", "Heartbeats sent", "heartbeats_out")
    yield counter("hs_gossip_udp_received_bytes", "Gossip bytes received", "bytes_in")
    yield counter("hs_gossip_udp_sent_bytes", "Gossip bytes sent", "bytes_out")
    yield counter("hs_gossip_refutations", "Suspicions of this agent refuted", "refutations")
    drops = CounterMetricFamily("hs_gossip_dropped_datagrams", "Datagrams dropped, by cause",
                                labels=["cause"])
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
