"""``GET /metrics`` in Prometheus text format.

A custom collector reads the counters the cores already keep (membership
stats, socket errors, sync and store figures) at scrape time, so no protocol
module imports prometheus_client and nothing is counted twice. A private
registry keeps library defaults out. prometheus_client (and the http.server,
wsgiref and gzip modules it pulls in, ~1.5 MiB) is imported on the first
scrape, so agents nobody scrapes do not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from agent.runtime.agent import Agent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector:
    """A prometheus_client collector (duck-typed: it only needs ``collect``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        a = self.agent
        core = a.core
        stats = dict(core.stats)
        if a.sock is not None:
            stats.update(a.sock.stats)

        peers = GaugeMetricFamily("hs_gossip_peers", "Peers by state", labels=["state"])
        healthy = sum(1 for m in core.members.values() if m.healthy)
        peers.add_metric(["healthy"], healthy)
        peers.add_metric(["unhealthy"], len(core.members) - healthy)
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
        for k, v in sorted(stats.items()):
            if k.startswith("drop_"):
                drops.add_metric([k[5:]], v)
        for k in ("send_errors", "receive_errors", "send_family_unreachable"):
            if k in stats:
                drops.add_metric([k], stats[k])
        yield drops

        sync = getattr(a, "sync", None)
        if sync is not None:
            s = sync.stats
            yield CounterMetricFamily("hs_gossip_sync_runs", "Sync sessions started and finished",
                                      value=s.get("sync_runs", 0))
            yield CounterMetricFamily("hs_gossip_sync_failures", "Sync sessions that failed",
                                      value=s.get("sync_failures", 0))
            yield CounterMetricFamily("hs_gossip_sync_served", "Sync sessions answered",
                                      value=s.get("sync_served", 0))
            b = CounterMetricFamily("hs_gossip_sync_bytes", "Sync bytes", labels=["direction"])
            b.add_metric(["in"], s.get("sync_bytes_in", 0))
            b.add_metric(["out"], s.get("sync_bytes_out", 0))
            yield b
            items = CounterMetricFamily("hs_gossip_sync_items", "Items shipped by sync",
                                        labels=["direction"])
            items.add_metric(["in"], s.get("sync_items_in", 0))
            items.add_metric(["out"], s.get("sync_items_out", 0))
            yield items
            yield SummaryMetricFamily("hs_gossip_sync_duration_seconds",
                                      "Duration of the sync sessions started here",
                                      count_value=s.get("sync_runs", 0),
                                      sum_value=sync.seconds_total)

        store = a.store
        if store is not None:
            yield SummaryMetricFamily("hs_gossip_store_write_seconds",
                                      "SQLite write transactions (group commits): latency",
                                      count_value=store.batches, sum_value=store.write_seconds)
            yield CounterMetricFamily("hs_gossip_store_operations",
                                      "Store operations", value=store.ops)
            yield GaugeMetricFamily("hs_gossip_collections", "Replicated collections",
                                    value=len(store.digests()))
        yield GaugeMetricFamily("hs_gossip_event_loop_lag_seconds",
                                "Lateness of the last event-loop timer", value=a.loop_lag)
        yield GaugeMetricFamily("hs_gossip_logical_clock", "Lamport clock", value=core.lc)


def routes(agent: Agent) -> list[Route]:
    registry: Any = None

    async def metrics(request: Request) -> Response:
        nonlocal registry
        from prometheus_client import CollectorRegistry, generate_latest

        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(AgentCollector(agent))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
