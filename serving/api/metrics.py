"""Prometheus metrics on 127.0.0.1:<port>: engine load, pool pages, tokens, RPC codes, jobs.

Engine and job gauges are read when scraped (a collector), so nothing polls in between.
Each server has its own CollectorRegistry: several servers can live in one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict], jobs: Callable[[], list] | None) -> None:
        self.stats = stats
        self.jobs = jobs
        self._lock = threading.Lock()
        self._last: tuple[float, int] | None = None
        self._rate = 0.0

    def _tokens_per_s(self, total: int) -> float:
        # Rate between consecutive scrapes (at least half a second apart, else the last one).
        now = time.monotonic()
        with self._lock:
            if self._last is None:
                self._last = (now, total)
            elif now - self._last[0] >= 0.5:
                t0, n0 = self._last
                self._rate = max(0.0, (total - n0) / (now - t0))
                self._last = (now, total)
            return self._rate

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        running = GaugeMetricFamily("adapterhub_adapter_running_requests",
                                    "Running requests per adapter ('' = base)", labels=["adapter"])
        waiting = GaugeMetricFamily("adapterhub_adapter_waiting_requests",
                                    "Waiting requests per adapter ('' = base)", labels=["adapter"])
        for name, c in sorted(s.get("per_adapter", {}).items()):
            running.add_metric([name], c.get("running", 0))
            waiting.add_metric([name], c.get("waiting", 0))
        yield running
        yield waiting
        pool = s["pool"]
        pages = GaugeMetricFamily("adapterhub_pool_pages", "Unified pool pages by kind",
                                  labels=["kind"])
        for kind, key in (("free", "free_pages"), ("kv", "kv_pages"),
                          ("adapter", "adapter_pages"), ("activation", "activation_pages")):
            pages.add_metric([kind], pool.get(key, 0))  # activation: co-served fine-tuning
        yield pages
        yield GaugeMetricFamily("adapterhub_pool_pages_total", "Pages in the pool",
                                value=pool["total_pages"])
        yield GaugeMetricFamily("adapterhub_requests_running", "Running requests",
                                value=s["running"])
        yield GaugeMetricFamily("adapterhub_requests_waiting", "Waiting requests",
                                value=s["waiting"])
        yield GaugeMetricFamily("adapterhub_adapters_resident", "Adapters in the pool",
                                value=s["adapters_resident"])
        yield GaugeMetricFamily("adapterhub_adapters_registered", "Adapters in the host store",
                                value=s["adapters_registered"])
        total = s["tokens_generated"]
        yield CounterMetricFamily("adapterhub_generated_tokens", "Tokens generated",
                                  value=total)
        yield GaugeMetricFamily("adapterhub_generated_tokens_per_second",
                                "Generated tokens per second (between scrapes)",
                                value=self._tokens_per_s(total))
        if self.jobs is not None:
            try:
                yield self._jobs()
            except Exception:  # noqa: BLE001 - a busy job store must not fail the scrape
                pass

    def _jobs(self) -> GaugeMetricFamily:
        from serving.api.job_proto import STATES, job_state

        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs():
            state = job_state(job)
            counts[state] = counts.get(state, 0) + 1
        fam = GaugeMetricFamily("adapterhub_finetune_jobs", "Fine-tune jobs by state",
                                labels=["state"])
        for state, n in counts.items():
            fam.add_metric([state], n)
        return fam


class Metrics:
    def __init__(self, stats: Callable[[], dict], jobs: Callable[[], list] | None = None
                 ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats, jobs))
        self.requests = Counter("adapterhub_grpc_requests", "Finished RPCs by method and code",
                                ["method", "code"], registry=self.registry)
        self._http: Any = None
        self.port: int | None = None

    def on_status(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
