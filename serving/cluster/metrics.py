"""Per-replica Prometheus gauges: which adapters are resident where, load, loads and jobs.

Registered beside the server's EngineCollector (which shows the cluster-wide sums) on the
same CollectorRegistry; read from the directory's view when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("adapterhub.cluster")


class ClusterCollector(Collector):
    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Any]:
        try:
            replicas = self.backend.replicas()
        except Exception:  # noqa: BLE001 - an unreachable directory must not fail the scrape
            log.warning("cannot read the replica directory", exc_info=True)
            return
        yield GaugeMetricFamily("adapterhub_replicas", "Live engine replicas",
                                value=len(replicas))
        count = GaugeMetricFamily("adapterhub_replica_adapters_resident",
                                  "Adapters in a replica's device pool", labels=["replica"])
        which = GaugeMetricFamily("adapterhub_replica_adapter_resident",
                                  "1 for each adapter resident on a replica",
                                  labels=["replica", "adapter"])
        registered = GaugeMetricFamily("adapterhub_replica_adapters_registered",
                                       "Adapters in a replica's host store", labels=["replica"])
        running = GaugeMetricFamily("adapterhub_replica_requests_running",
                                    "Running requests per replica", labels=["replica"])
        waiting = GaugeMetricFamily("adapterhub_replica_requests_waiting",
                                    "Waiting requests per replica", labels=["replica"])
        jobs = GaugeMetricFamily("adapterhub_replica_finetune_jobs_running",
                                 "Fine-tune jobs running on a replica", labels=["replica"])
        pool_loads = CounterMetricFamily("adapterhub_replica_adapter_pool_loads",
                                         "Adapter copies into a replica's pool (cold loads)",
                                         labels=["replica"])
        host_loads = CounterMetricFamily("adapterhub_replica_adapter_host_loads",
                                         "Adapters a replica read into its host store",
                                         labels=["replica"])
        for rid, snap in sorted(replicas.items()):
            stats = snap.get("stats", {})
            resident = snap.get("resident", [])
            count.add_metric([rid], len(resident))
            for name in resident:
                which.add_metric([rid, name], 1)
            registered.add_metric([rid], stats.get("adapters_registered", 0))
            running.add_metric([rid], stats.get("running", 0))
            waiting.add_metric([rid], stats.get("waiting", 0))
            jobs.add_metric([rid], len(snap.get("jobs", [])))
            pool_loads.add_metric([rid], stats.get("adapter_loads", 0))
            host_loads.add_metric([rid], snap.get("host_loads", 0))
        yield from (count, which, registered, running, waiting, jobs, pool_loads, host_loads)
