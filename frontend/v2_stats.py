"""Triton-style inference statistics (``GET /v2/models/{name}/stats``) for perf_analyzer.

Server-wide, whichever frontend answers: everything comes from the Prometheus
multiprocess files of the frontends (request counts and end-to-end and queue time) and
of the workers (what each model execution took, per batch size; see
gpu_worker/metrics.py). Those files are kept per process slot, so a recycled or
restarted worker carries on from its predecessor's counts: nothing goes backwards, and
perf_analyzer's deltas between two samples stay sound across a recycle. Workers record a
batch just after its answers go out, so ``inference_count`` is never allowed below the
request count.

Mapping, with Triton's meaning of each field:
- ``success``: 200 answers and their end-to-end time in the frontend; ``fail``: the
  other answers and theirs; ``queue``: enqueue → a worker's claim, per request.
- ``compute_input``: preprocess (decode, cast) and gathering the batch, as far as the
  batch waited for them (images preprocessed on other threads while it filled cost it
  nothing; a GPU copy is asynchronous, so it lands in the next); ``compute_infer``: the model, with the copy
  back; ``compute_output``:
  writing the answers into their slots. In ``inference_stats`` these count requests,
  each charged its whole batch's time (Triton's rule), so ns / count is the compute time
  a request saw; in ``batch_stats`` they count executions of each batch size.
- ``inference_count``: rows run; ``execution_count``: batches run (both summed over
  ``batch_stats``, so the three always agree); ``last_inference``: the newest batch's
  wall-clock time, in milliseconds.
- ``memory_usage``: what the model's live workers hold now, from the supervisor's last
  memory sample in shared memory: ``CPU`` their USS summed (the memory that stopping them
  frees; Triton reports what loading took, which a leak never moves), ``GPU`` on the
  model's device their NVML figure (context and allocator cache; the allocator's reserve
  while NVML is off). ``response_stats`` stays empty: no model here is decoupled.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ringserve.frontend.app import FrontendState
from ringserve.ipc.control import running
from ringserve.ipc.layout import Role

# Summed [count, seconds] per model and stat, from histograms' _count and _sum.
_HISTOGRAMS = {
    "ringserve_request_duration_seconds": "success",
    "ringserve_queue_wait_seconds": "queue",
}
_LAST_BATCH = "ringserve_last_batch_timestamp_seconds"
_STAGES = {"input": "compute_input", "infer": "compute_infer", "output": "compute_output"}


def _duration(count: float = 0, seconds: float = 0.0) -> dict[str, int]:
    return {"count": int(count), "ns": round(seconds * 1e9)}


class _Model:
    """What the metric files say of one model."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self.fail = [0.0, 0.0]  # answers, seconds
        self.last = 0.0
        self.computed = 0.0  # requests through the model
        self.request_stage: dict[str, float] = defaultdict(float)
        self.runs: dict[int, float] = defaultdict(float)  # batch size -> executions
        self.size_stage: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))


def _prometheus(metrics_dir: str) -> dict[str, _Model]:
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[str, _Model] = defaultdict(_Model)
    for metric in MultiProcessCollector(None, metrics_dir).collect():
        name, stat = metric.name, _HISTOGRAMS.get(metric.name)
        for s in metric.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            m = out[model]
            if stat is not None:
                if s.name.endswith("_count"):
                    m.sums[stat][0] += s.value
                elif s.name.endswith("_sum"):
                    m.sums[stat][1] += s.value
            elif name == _LAST_BATCH:
                m.last = max(m.last, s.value)
            elif name == "ringserve_requests" and s.labels.get("code") != "200":
                if s.name.endswith("_total"):
                    m.fail[0] += s.value
            elif not s.name.endswith("_total"):
                continue  # a counter's _created sample
            elif name == "ringserve_failed_request_seconds":
                m.fail[1] += s.value
            elif name == "ringserve_computed_requests":
                m.computed += s.value
            elif name == "ringserve_request_stage_seconds":
                m.request_stage[s.labels["stage"]] += s.value
            elif name == "ringserve_batch_runs":
                m.runs[int(s.labels["batch_size"])] += s.value
            elif name == "ringserve_batch_stage_seconds":
                m.size_stage[int(s.labels["batch_size"])][s.labels["stage"]] += s.value
    return out


def _batch_stats(m: _Model) -> list[dict[str, Any]]:
    return [
        {
            "batch_size": size,
            **{
                field: _duration(m.runs[size], m.size_stage[size][stage])
                for stage, field in _STAGES.items()
            },
        }
        for size in sorted(m.runs)
        if m.runs[size]
    ]


def memory_usage(state: FrontendState, name: str) -> list[dict[str, Any]]:
    """Triton's ``memory_usage`` for one model (see the module docstring); [] until the
    supervisor has sampled a worker of it."""
    index = state.settings.model_index(name)
    ctl = state.arena.control
    workers = ctl[running(ctl) & (ctl["role"] == Role.WORKER) & (ctl["model"] == index)]
    usage = []
    host = int(workers["uss"].sum())
    if host:
        usage.append({"type": "CPU", "id": 0, "byte_size": host})
    held = np.maximum(workers["gpu_nvml"], workers["gpu_reserved"])
    for gpu_id in np.unique(workers["device"][workers["device"] >= 0]):  # (-1: a CPU)
        gpu = int(held[workers["device"] == gpu_id].sum())  # its workers on that GPU
        if gpu:
            usage.append({"type": "GPU", "id": int(gpu_id), "byte_size": gpu})
    return usage


def model_stats(state: FrontendState, names: list[str]) -> list[dict[str, Any]]:
    prom = _prometheus(state.metrics.metrics_dir)
    result = []
    for name in names:
        m = prom.get(name) or _Model()
        success = m.sums["success"]
        batches = sum(m.runs.values())
        rows = sum(size * runs for size, runs in m.runs.items())
        result.append(
            {
                "name": name,
                "version": "1",
                "last_inference": int(m.last * 1000),
                "inference_count": max(int(rows), int(success[0])),
                "execution_count": int(batches),
                "inference_stats": {
                    "success": _duration(*success),
                    "fail": _duration(*m.fail),
                    "queue": _duration(*m.sums["queue"]),
                    **{
                        field: _duration(m.computed, m.request_stage[stage])
                        for stage, field in _STAGES.items()
                    },
                    "cache_hit": _duration(),
                    "cache_miss": _duration(),
                },
                "response_stats": {},
                "batch_stats": _batch_stats(m),
                "memory_usage": memory_usage(state, name),
            }
        )
    return result
