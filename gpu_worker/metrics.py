"""The worker's Prometheus series, recorded once per batch after its answers are out.

Recorded in the instance's multiprocess files keyed by the control-block index, so a
recycled or restarted worker never makes a counter go backwards (see ipc/prom.py).

Besides the dashboard series (batches, the batch-size histogram, model time), two
counter families carry what Triton's statistics extension reports (frontend/v2_stats.py):
per batch size, executions and the seconds of each stage (``batch_stats``); and per
model, the requests computed and each stage's seconds counted once per request in the
batch, Triton's rule for ``inference_stats`` (a request's compute time is its batch's).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ringserve.ipc.child import ChildSpec
from ringserve.ipc.prom import BATCH_BUCKETS, LATENCY_BUCKETS, use_multiprocess_files

STAGES = ("input", "infer", "output")


class BatchTiming(NamedTuple):
    """One model execution: its rows and requests, and the seconds of its three stages
    (input: the wait for preprocess and the gather, work on the preprocess threads
    while the batch filled not counted; infer: the model; output: answers into the
    slots)."""

    rows: int
    requests: int
    input_s: float
    infer_s: float
    output_s: float


class WorkerMetrics:
    def __init__(self, spec: ChildSpec, model: str) -> None:
        self.enabled = bool(spec.metrics_dir)
        if not self.enabled:
            return
        use_multiprocess_files(spec.metrics_dir, f"worker-c{spec.control_index}")
        from prometheus_client import Counter, Gauge, Histogram

        self.model = model
        worker = str(spec.ident)
        self._batches = Counter(
            "ringserve_batches", "Batches run, by worker slot", ["model", "worker"]
        ).labels(model, worker)
        self._size = Histogram(
            "ringserve_batch_size", "Rows per batch", ["model"], buckets=BATCH_BUCKETS
        ).labels(model)
        self._infer = Histogram(
            "ringserve_inference_duration_seconds",
            "Model time per batch (preprocess excluded)",
            ["model"],
            buckets=LATENCY_BUCKETS,
        ).labels(model)
        # The newest over every worker, dead ones included: v2 stats' ``last_inference``.
        self._last = Gauge(
            "ringserve_last_batch_timestamp_seconds",
            "Wall-clock time of the model's latest batch",
            ["model"],
            multiprocess_mode="max",
        ).labels(model)
        self._by_size_family = Counter(
            "ringserve_batch_stage_seconds",
            "Seconds per stage (input, infer, output) of the batches of each size",
            ["model", "batch_size", "stage"],
        )
        self._runs_family = Counter(
            "ringserve_batch_runs", "Batches run, by batch size (rows)", ["model", "batch_size"]
        )
        self._by_size: dict[int, tuple[Any, ...]] = {}  # rows -> (runs, input, infer, output)
        request_seconds = Counter(
            "ringserve_request_stage_seconds",
            "Seconds per stage of each computed request's batch, summed over requests",
            ["model", "stage"],
        )
        self._per_request = [request_seconds.labels(model, s) for s in STAGES]
        self._requests = Counter(
            "ringserve_computed_requests", "Requests that went through the model", ["model"]
        ).labels(model)

    def batch(self, t: BatchTiming) -> None:
        if not self.enabled:
            return
        self._batches.inc()
        self._size.observe(t.rows)
        self._infer.observe(t.infer_s)
        runs, *by_stage = self._size_children(t.rows)
        runs.inc()
        self._requests.inc(t.requests)
        for seconds, size_child, request_child in zip(
            (t.input_s, t.infer_s, t.output_s), by_stage, self._per_request, strict=True
        ):
            size_child.inc(seconds)
            request_child.inc(seconds * t.requests)

    def _size_children(self, rows: int) -> tuple[Any, ...]:
        """The series of one batch size, looked up once (``labels()`` takes a lock)."""
        children = self._by_size.get(rows)
        if children is None:
            size = str(rows)
            children = (
                self._runs_family.labels(self.model, size),
                *(self._by_size_family.labels(self.model, size, s) for s in STAGES),
            )
            self._by_size[rows] = children
        return children

    def ran_at(self, wall_s: float) -> None:
        if self.enabled:
            self._last.set(wall_s)
