"""The server's Prometheus metrics, in a registry of its own (one per application, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("yagg_requests", "requests by route and outcome", ["route", "outcome"], registry=r)
        self.jobs = Counter("yagg_jobs_finished", "jobs by how they ended", ["state"], registry=r)
        self.queue_depth = Gauge("yagg_queue_depth", "clips waiting to run", registry=r)
        self.batch_size = Histogram(
            "yagg_batch_size", "clips per compiled call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r
        )
        self.batch_seconds = Histogram("yagg_batch_seconds", "seconds per compiled call, all steps", registry=r)
        self.latency = Histogram(
            "yagg_job_latency_seconds",
            "seconds from submit to the end of a job",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.compile_requests = Counter(
            "yagg_compile_requests", "programs the server needed: compiled, or loaded from the cache", registry=r
        )
        self.cache_hits = Counter("yagg_compile_cache_hits", "programs loaded from the compilation cache", registry=r)
        self.compiles = Gauge(
            "yagg_compiles", "programs XLA compiled (requests minus cache hits); flat once ready", registry=r
        )
        self.model_step = Gauge("yagg_model_step", "training step of the parameters being served", registry=r)
        self.ready_seconds = Gauge("yagg_ready_seconds", "seconds from start to ready (load and warm-up)", registry=r)

        self._requested = self._hits = 0

    def compile_requested(self) -> None:
        self._requested += 1
        self.compile_requests.inc()

    def cache_hit(self) -> None:
        self._hits += 1
        self.cache_hits.inc()

    def render(self) -> bytes:
        self.compiles.set(self._requested - self._hits)
        return generate_latest(self.registry)
