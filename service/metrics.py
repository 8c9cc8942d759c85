"""Prometheus metrics gathered across processes.

Replicas run in other processes (and on other nodes), so no single process-local registry sees
every batch. Each process keeps a ``MetricsBuffer``: recording is a dict update under a lock,
and a background task sends what accumulated to the ``MetricsHub`` deployment about once a
second. The hub owns one ``prometheus_client`` registry and renders it for ``GET /metrics``.
A lost flush loses a second of samples, never a request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ray import serve

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class MetricDef:
    kind: str               # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


# Every metric the service exports, in one table. Names follow Prometheus conventions.
METRICS: dict[str, MetricDef] = {
    "vfm_requests": MetricDef("counter", "HTTP requests answered, by model, route and status code.",
                              ("model", "route", "status")),
    "vfm_request_latency_seconds": MetricDef("histogram", "Time from request arrival at the ingress to the "
                                             "answer, by model and route.", ("model", "route"), LATENCY_BUCKETS),
    "vfm_queue_depth": MetricDef("gauge", "Requests accepted by the ingress for a model and not answered yet.",
                                 ("model",)),
    "vfm_batch_size": MetricDef("histogram", "Images per model call (dynamic batching), by model and task.",
                                ("model", "task"), BATCH_BUCKETS),
    "vfm_inference_latency_seconds": MetricDef("histogram", "Time of one batched model call, by model and task.",
                                               ("model", "task"), LATENCY_BUCKETS),
    "vfm_sam_cache_hits": MetricDef("counter", "SAM segment requests whose image embedding was cached.",
                                    ("model",)),
    "vfm_sam_cache_misses": MetricDef("counter", "SAM requests whose image embedding was not cached: the encoder "
                                      "ran, or a prompt by image_id alone was a 404 unknown_image_id.", ("model",)),
    "vfm_model_ready": MetricDef("gauge", "1 when a configured model serves, 0 when it is unavailable.",
                                 ("model",)),
}


class MetricsHub:
    """The one registry; a Serve deployment with a single replica (see ``app.py``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and no dashboard uses them
        self.registry = CollectorRegistry()
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        self.metrics: dict[str, Any] = {}
        for name, d in METRICS.items():
            kwargs: dict[str, Any] = {"buckets": d.buckets} if d.kind == "histogram" else {}
            self.metrics[name] = kinds[d.kind](name, d.help, d.labels, registry=self.registry, **kwargs)

    def record(self, batch: dict[str, list]) -> int:
        """Apply one flush: ``{"inc": [(name, labels, value)], "set": [...], "observe": [(name, labels, [v...])]}``."""
        n = 0
        for name, labels, value in batch.get("inc", ()):
            self.metrics[name].labels(*labels).inc(value)
            n += 1
        for name, labels, value in batch.get("set", ()):
            self.metrics[name].labels(*labels).set(value)
            n += 1
        for name, labels, values in batch.get("observe", ()):
            child = self.metrics[name].labels(*labels)
            for v in values:
                child.observe(v)
            n += len(values)
        return n

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsBuffer:
    """Per-process accumulator; ``inc``/``observe`` never block on the network."""

    def __init__(self, hub: Any, flush_s: float = 1.0):
        self._hub = hub
        self._flush_s = flush_s
        self._lock = threading.Lock()
        self._inc: dict[tuple, float] = defaultdict(float)
        self._set: dict[tuple, float] = {}
        self._observe: dict[tuple, list[float]] = defaultdict(list)
        self._task: asyncio.Task | None = None

    def inc(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        with self._lock:
            self._inc[(name, labels)] += value
        self._ensure_task()

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._set[(name, labels)] = value
        self._ensure_task()

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._observe[(name, labels)].append(float(value))
        self._ensure_task()

    def _take(self) -> dict[str, list]:
        with self._lock:
            batch = {"inc": [(n, l, v) for (n, l), v in self._inc.items()],
                     "set": [(n, l, v) for (n, l), v in self._set.items()],
                     "observe": [(n, l, v) for (n, l), v in self._observe.items()]}
            self._inc.clear()
            self._set.clear()
            self._observe.clear()
        return batch

    async def flush(self) -> None:
        batch = self._take()
        if any(batch.values()):
            try:
                await self._hub.record.remote(batch)
            except Exception as exc:  # metrics must never take a request down
                log.warning("metrics flush failed (%s samples lost): %s", sum(map(len, batch.values())), exc)

    def _ensure_task(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called from a worker thread: the loop's next record starts the task
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()


# The hub is a tiny actor: no CPU reservation, one replica so every sample lands in one registry.
MetricsHubDeployment = serve.deployment(
    MetricsHub, name="metrics", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # a flush a second from every process is not news
)
