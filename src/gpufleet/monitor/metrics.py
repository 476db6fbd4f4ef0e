"""The platform's Prometheus metrics, shared by the API and the worker processes.

``gpufleet serve`` runs workers as separate processes, so metrics use prometheus-client's
multiprocess mode: ``metrics_setup.use_multiprocess_dir`` sets ``PROMETHEUS_MULTIPROC_DIR``
before the metrics are created (before this module is imported, which is why ``serve`` calls
it first), every process writes its samples there, and ``/metrics`` adds them up.
Without it (tests, a single process) the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Task latencies run from milliseconds (a small model, an idle queue) to many minutes (a batch
# backlog), so the buckets span 5 ms to 1 h.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600,
)  # fmt: skip

HTTP_REQUESTS = Counter(
    "gpufleet_http_requests_total",
    "HTTP requests served, by route template and status code.",
    ["method", "route", "status"],
)
TASKS_SUBMITTED = Counter(
    "gpufleet_tasks_submitted_total", "Tasks accepted by the API.", ["model", "lane"]
)
TASKS_FINISHED = Counter(
    "gpufleet_tasks_finished_total",
    "Tasks ended by workers, by final status (succeeded, failed, cancelled).",
    ["model", "lane", "status"],
)
TASK_SECONDS = Histogram(
    "gpufleet_task_seconds",
    "Task latency by stage: queue_wait (submit to claim), inference (the batch's predict "
    "call), total (submit to result).",
    ["model", "lane", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "gpufleet_batch_size",
    "Inputs per predict call.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (counters and histograms stay)."""
    if os.environ.get(_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def exposition(extra: CollectorRegistry | None = None) -> bytes:
    """The text format of every process's metrics, plus ``extra`` (scrape-time collectors)."""
    if os.environ.get(_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(DEFAULT_REGISTRY)
    if extra is not None:
        body += generate_latest(extra)
    return body


def finished_by_model() -> dict[str, int]:
    """``gpufleet_tasks_finished_total`` summed by model over every process, as ``/metrics``
    adds it up: the tasks this server's workers have ended since it started."""
    if os.environ.get(_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        families = list(registry.collect())
    else:
        families = list(TASKS_FINISHED.collect())
    out: dict[str, int] = {}
    for family in families:
        if family.name != "gpufleet_tasks_finished":
            continue
        for sample in family.samples:
            if sample.name == "gpufleet_tasks_finished_total":
                model = sample.labels["model"]
                out[model] = out.get(model, 0) + int(sample.value)
    return out
