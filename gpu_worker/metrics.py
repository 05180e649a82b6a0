"""The worker's Prometheus series: batches, batch sizes and inference time, per batch.

Recorded in the instance's multiprocess files keyed by the control-block index, so a
recycled or restarted worker never makes a counter go backwards (see ipc/prom.py)."""

from __future__ import annotations

from ringserve.ipc.child import ChildSpec
from ringserve.ipc.prom import BATCH_BUCKETS, LATENCY_BUCKETS, use_multiprocess_files


class WorkerMetrics:
    def __init__(self, spec: ChildSpec, model: str) -> None:
        self.enabled = bool(spec.metrics_dir)
        if not self.enabled:
            return
        use_multiprocess_files(spec.metrics_dir, f"worker-c{spec.control_index}")
        from prometheus_client import Counter, Gauge, Histogram

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

    def batch(self, rows: int, seconds: float) -> None:
        if self.enabled:
            self._batches.inc()
            self._size.observe(rows)
            self._infer.observe(seconds)

    def ran_at(self, wall_s: float) -> None:
        if self.enabled:
            self._last.set(wall_s)
