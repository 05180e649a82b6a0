"""Triton-style inference statistics (``GET /v2/models/{name}/stats``) for perf_analyzer.

Two sources, both server-wide, whichever frontend answers:

- the Prometheus multiprocess files every frontend records into (``metrics.py``): request
  counts and summed durations (end to end, queue wait, claim-to-answer); they never go
  backwards, so perf_analyzer's deltas between two samples are sound;
- the workers' control blocks: rows and batches run (``inference_count``,
  ``execution_count``). These restart from zero when a worker is recycled, so across a
  recycle they under-count; they are never allowed to go below the request count. The
  newest of their latest-batch stamps is ``last_inference``.

Mapping: ``success`` = 200 answers and their end-to-end time; ``fail`` = other answers
(no time); ``queue`` = enqueue → worker claim; ``compute_infer`` = claim → answer (gather,
model, write back; ringserve does not split input/output copies, so those are 0 ns).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ringserve.frontend.app import FrontendState
from ringserve.ipc.layout import Role

_SECONDS = {
    "ringserve_request_duration_seconds": "success",
    "ringserve_queue_wait_seconds": "queue",
    "ringserve_inference_duration_seconds": "compute_infer",
}


def _duration(count: float = 0, seconds: float = 0.0) -> dict[str, int]:
    return {"count": int(count), "ns": round(seconds * 1e9)}


def _prometheus(metrics_dir: str) -> dict[str, dict[str, list[float]]]:
    """{model: {stat: [count, seconds]}} plus "fail" from the request counter."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for metric in MultiProcessCollector(None, metrics_dir).collect():
        stat = _SECONDS.get(metric.name)
        for s in metric.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            if stat is not None and s.name.endswith("_count"):
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
    ctl = state.arena.control
    workers = ctl[ctl["role"] == Role.WORKER]
    result = []
    for name in names:
        info = state.catalog.get(name)
        assert info is not None
        p = prom.get(name, {})
        mine = workers[workers["model"] == info.index]
        success = p.get("success", [0, 0.0])
        rows = max(int(mine["rows"].sum()), int(success[0]))
        batches = int(mine["batches"].sum())
        infer = p.get("compute_infer", [0, 0.0])
        result.append(
            {
                "name": name,
                "version": "1",
                "last_inference": int(mine["last_batch_ms"].max(initial=0)),
                "inference_count": rows,
                "execution_count": batches,
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
