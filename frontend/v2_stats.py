"""Triton-style inference statistics (``GET /v2/models/{name}/stats``) for perf_analyzer.

Two sources, both server-wide, whichever frontend answers:

Everything comes from the Prometheus multiprocess files of the frontends (request
counts and summed durations: end to end, queue wait, claim to answer) and of the workers
(``ringserve_batch_size``: batches run and their rows, for ``execution_count`` and
``inference_count``; the newest batch's wall-clock time, for ``last_inference``). Those
files are kept per process slot, so a recycled or restarted worker carries on from its
predecessor's counts: nothing goes backwards, and perf_analyzer's deltas between two
samples stay sound across a recycle. Workers record a batch just after its answers go
out, so ``inference_count`` is never allowed below the request count.

Mapping: ``success`` = 200 answers and their end-to-end time; ``fail`` = other answers
(no time); ``queue`` = enqueue → worker claim; ``compute_infer`` = claim → answer (gather,
model, write back; ringserve does not split input/output copies, so those are 0 ns).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ringserve.frontend.app import FrontendState

_SECONDS = {
    "ringserve_request_duration_seconds": "success",
    "ringserve_queue_wait_seconds": "queue",
    "ringserve_inference_duration_seconds": "compute_infer",
    "ringserve_batch_size": "batches",  # count: batches; sum: rows
}
_LAST_BATCH = "ringserve_last_batch_timestamp_seconds"


def _duration(count: float = 0, seconds: float = 0.0) -> dict[str, int]:
    return {"count": int(count), "ns": round(seconds * 1e9)}


def _prometheus(metrics_dir: str) -> dict[str, dict[str, list[float]]]:
    """{model: {stat: [count, sum]}}, plus "fail" from the request counter and "last"
    (the newest batch's time, seconds since the epoch)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for metric in MultiProcessCollector(None, metrics_dir).collect():
        stat = _SECONDS.get(metric.name)
        for s in metric.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if metric.name == _LAST_BATCH:
                out[model]["last"][1] = max(out[model]["last"][1], s.value)
            elif stat is not None and s.name.endswith("_count"):
                out[model][stat][0] += s.value
            elif stat is not None and s.name.endswith("_sum"):
                out[model][stat][1] += s.value
            elif (
                metric.name == "ringserve_requests"
                and s.name.endswith("_total")
                and s.labels.get("code") != "200"
            ):
                out[model]["fail"][0] += s.value
    return out


def model_stats(state: FrontendState, names: list[str]) -> list[dict[str, Any]]:
    prom = _prometheus(state.metrics.metrics_dir)
    result = []
    for name in names:
        p = prom.get(name, {})
        success = p.get("success", [0, 0.0])
        batches, rows = p.get("batches", [0, 0.0])
        infer = p.get("compute_infer", [0, 0.0])
        result.append(
            {
                "name": name,
                "version": "1",
                "last_inference": int(p.get("last", [0, 0.0])[1] * 1000),
                "inference_count": max(int(rows), int(success[0])),
                "execution_count": int(batches),
                "inference_stats": {
                    "success": _duration(*success),
                    "fail": _duration(p.get("fail", [0])[0]),
                    "queue": _duration(*p.get("queue", [0, 0.0])),
                    "compute_input": _duration(infer[0]),
                    "compute_infer": _duration(*infer),
                    "compute_output": _duration(infer[0]),
                    "cache_hit": _duration(),
                    "cache_miss": _duration(),
                },
                "batch_stats": [],
            }
        )
    return result
