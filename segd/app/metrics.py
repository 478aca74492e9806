"""Prometheus metrics: request counters and stage histograms recorded as requests pass, plus a
collector that reads live per-model state (queue depth, backend, readiness, worker restarts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from segd.app.service import ModelService
    from segd.sources.runner import SourceManager

disable_created_metrics()  # the *_created series only double the output

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, service: ModelService, sources: SourceManager | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "segd_requests", "HTTP requests by route, status and model",
            ["route", "status", "model"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "segd_request_seconds", "HTTP request latency by route",
            ["route"], buckets=STAGE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.stages = Histogram(
            "segd_stage_seconds", "Pipeline stage latency by model and stage",
            ["model", "stage"], buckets=STAGE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(ServiceCollector(service))
        if sources is not None:
            self.registry.register(SourceCollector(sources))

    def observe_stages(self, model: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(model, stage).observe(ms / 1000.0)


class ServiceCollector(Collector):
    def __init__(self, service: ModelService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("segd_queue_depth", "Requests admitted per model (in flight + waiting)", labels=["model"])
        ready = GaugeMetricFamily("segd_model_ready", "1 when the model is loaded, self-tested and its device present", labels=["model"])
        backend = GaugeMetricFamily("segd_model_backend", "Backend serving each model (value 1)", labels=["model", "backend"])
        restarts = CounterMetricFamily("segd_tpu_worker_restarts", "Edge TPU worker process restarts", labels=["model"])
        fallbacks = CounterMetricFamily("segd_cpu_fallbacks", "Requests served by the CPU twin after an Edge TPU failure", labels=["model"])
        per_device: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "requests": CounterMetricFamily("segd_tpu_device_requests", "Invocations sent to each Edge TPU", labels=["model", "device"]),
            "errors": CounterMetricFamily("segd_tpu_device_errors", "Invocations that failed on each Edge TPU (retried on another)", labels=["model", "device"]),
            "restarts": CounterMetricFamily("segd_tpu_device_worker_restarts", "Worker restarts per Edge TPU", labels=["model", "device"]),
            "up": GaugeMetricFamily("segd_tpu_device_up", "1 when the Edge TPU's worker is serving and the device present", labels=["model", "device"]),
            "in_flight": GaugeMetricFamily("segd_tpu_device_in_flight", "Invocations running on each Edge TPU", labels=["model", "device"]),
            "p50": GaugeMetricFamily("segd_tpu_device_latency_p50_seconds", "Median invoke latency per Edge TPU (last 1024)", labels=["model", "device"]),
        }  # fmt: skip
        for name, slot in self.service.slots.items():
            worker = slot.worker_info() or {}
            for dev in worker.get("devices", []):
                labels = [name, dev["device"]]
                per_device["requests"].add_metric(labels, float(dev["requests"]))
                per_device["errors"].add_metric(labels, float(dev["errors"]))
                per_device["restarts"].add_metric(labels, float(dev["restarts"] or 0))
                per_device["up"].add_metric(labels, 1.0 if dev["state"] == "ready" else 0.0)
                per_device["in_flight"].add_metric(labels, float(dev["in_flight"]))
                if dev["latency_ms"]:
                    per_device["p50"].add_metric(labels, dev["latency_ms"]["p50"] / 1000.0)
            queue.add_metric([name], slot.queued)
            ready.add_metric([name], 1.0 if slot.ready else 0.0)
            backend.add_metric([name, slot.primary.backend if slot.primary else "none"], 1.0)
            restarts.add_metric([name], float(worker.get("restarts", 0)))
            fallbacks.add_metric([name], float(slot.fallbacks))
        yield from (queue, ready, backend, restarts, fallbacks, *per_device.values())
        yield from self._memory_and_decoders()

    def _memory_and_decoders(self) -> Iterator[Metric]:
        budget = self.service.memory_budget
        used = GaugeMetricFamily("segd_memory_budget_used_bytes", "Bytes charged to the requests being processed (from their image headers)")
        used.add_metric([], float(budget.used))
        limit = GaugeMetricFamily("segd_memory_budget_bytes", "The memory budget of all requests in process (setting memory_budget)")
        limit.add_metric([], float(budget.limit))
        yield from (used, limit)
        pool = self.service.decode_pool
        if pool is not None:
            info = pool.describe()
            running = GaugeMetricFamily("segd_decoder_workers_running", "Image decode worker processes running")
            running.add_metric([], float(info["running"]))
            crashes = CounterMetricFamily("segd_decoder_crashes", "Decode workers lost on an image (crash or timeout; the request got 400)")
            crashes.add_metric([], float(info["crashes"]))
            yield from (running, crashes)


class SourceCollector(Collector):
    """Per-camera state: connected, frames by outcome, reconnects, age of the last frame."""

    def __init__(self, sources: SourceManager) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("segd_source_up", "1 while the camera is streaming", labels=["source"])
        frames = CounterMetricFamily("segd_source_frames", "Camera frames by outcome (received, segmented, dropped, failed)", labels=["source", "outcome"])
        reconnects = CounterMetricFamily("segd_source_reconnects", "Camera reconnects", labels=["source"])
        age = GaugeMetricFamily("segd_source_frame_age_seconds", "Seconds since the last segmented frame", labels=["source"])
        for name, s in self.sources.sources.items():
            up.add_metric([name], 1.0 if s.state == "streaming" else 0.0)
            for outcome, n in (("received", s.received), ("segmented", s.segmented), ("dropped", s.dropped), ("failed", s.failed)):
                frames.add_metric([name, outcome], float(n))
            reconnects.add_metric([name], float(s.reconnects))
            frame_age = s.frame_age()
            if frame_age is not None:
                age.add_metric([name], frame_age)
        yield from (up, frames, reconnects, age)
