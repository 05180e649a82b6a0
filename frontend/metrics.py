"""Prometheus metrics: per-request series recorded by this frontend, plus one scrape of the
whole server.

Every ringserve process records counters and histograms with prometheus-client's
multiprocess mode, its files keyed by the process's control-block index (stable across
restarts of that process, never a pid: FACTS.md), so counters never go backwards and
files never pile up. Gauges (slots by state, queue depth, per-process memory, workers
ready) are read from shared memory at scrape time, so a gone process's gauges vanish with
it. Whichever frontend gets the scrape renders the whole server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import psutil

from ringserve.frontend.dispatch import Completed
from ringserve.ipc.arena import Arena
from ringserve.ipc.config import Settings
from ringserve.ipc.control import running
from ringserve.ipc.layout import ProcState, Role, SlotState, Status
from ringserve.ipc.prom import LATENCY_BUCKETS
from ringserve.supervisor.fds import fd_usage
from ringserve.supervisor.memory import sample_process

MetricT = TypeVar("MetricT")
HTTP_REFUSED_CODES = (400, 408, 431)  # what frontend/http_guard.py answers itself
CREATED_CODES = ("200", "500", "503", "504")  # per model, before the first request


class FrontendMetrics:
    def __init__(self, settings: Settings, arena: Arena, metrics_dir: str) -> None:
        from prometheus_client import Counter, Histogram

        self.settings = settings
        self.arena = arena
        self.metrics_dir = metrics_dir
        self.requests = Counter(
            "ringserve_requests", "HTTP requests by model and status code", ["model", "code"]
        )
        self.duration = Histogram(
            "ringserve_request_duration_seconds",
            "Time to answer a successful (200) request, in the frontend; time spent on "
            "errors (a 504 at the deadline too) is in ringserve_failed_request_seconds_total",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.failed_seconds = Counter(
            "ringserve_failed_request_seconds",
            "Time spent on requests answered with an error, in the frontend",
            ["model"],
        )
        self.queue_wait = Histogram(
            "ringserve_queue_wait_seconds",
            "Time from enqueue to a worker's claim",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.deadline_expired = Counter(
            "ringserve_deadline_expired",
            "Requests that missed their deadline (every 504 of an inference route)",
            ["model"],
        )
        self.cancelled_total = Counter(
            "ringserve_cancelled_requests",
            "Requests whose client went away once they were queued (one that leaves while "
            "sending its body is a 499 in ringserve_requests_total only: nothing was queued)",
            ["model"],
        )
        self.rejected_total = Counter(
            "ringserve_rejected_requests",
            "Requests refused with 503 for want of room: the model's queue at "
            "arena.max_queue_depth, or every request slot of the frontend that took the "
            "request busy (arena.slots is split between the frontends)",
            ["model"],
        )
        self.http_refused_total = Counter(
            "ringserve_http_refused",
            "Requests the HTTP layer answered before any route saw them (so in no model's "
            "series): 400 unparseable, 408 head not received within server.read_timeout_s, "
            "431 head over the size limit",
            ["code"],
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Created at zero: increase() and rate() cannot see a series' first sample, so
        # the first 504s or refusals after a start were in no graph and no alert.
        for code in HTTP_REFUSED_CODES:
            self._child(self.http_refused_total, str(code))
        for m in settings.models:
            for code in CREATED_CODES:
                self._child(self.requests, m.name, code)
            for counter in (
                self.failed_seconds,
                self.deadline_expired,
                self.cancelled_total,
                self.rejected_total,
            ):
                self._child(counter, m.name)

    # -- recording (the request path: a few microseconds each) ---------------------------

    def request(self, model: str, code: int, seconds: float) -> None:
        self._child(self.requests, model, str(code)).inc()
        if code == 200:
            self._child(self.duration, model).observe(seconds)
        else:
            self._child(self.failed_seconds, model).inc(seconds)

    def completed(self, model: str, c: Completed) -> None:
        """A worker's answer (the frontend's own 504 timer counts in ``deadline``)."""
        if c.batch_size:  # it reached a worker
            self._child(self.queue_wait, model).observe(c.queue_wait_s)
        if c.status == Status.DEADLINE:  # the worker popped it past its deadline
            self.deadline(model)

    def _child(self, metric: MetricT, *labels: str) -> MetricT:
        """``metric.labels(*labels)``, looked up once per series: labels() takes a lock
        and builds its key on every call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def deadline(self, model: str) -> None:
        self._child(self.deadline_expired, model).inc()

    def cancelled(self, model: str) -> None:
        self._child(self.cancelled_total, model).inc()

    def rejected(self, model: str) -> None:
        self._child(self.rejected_total, model).inc()

    def http_refused(self, code: int) -> None:
        self._child(self.http_refused_total, str(code)).inc()

    # -- scraping ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.metrics_dir)
        registry.register(ArenaCollector(self.settings, self.arena))
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _start_time(pid: int) -> float | None:
    """When ``pid`` started, from the kernel's record (boot time plus start ticks): the
    same figure whichever frontend answers the scrape, and at every scrape (a monotonic
    start converted with the clock of the moment moved in the 7th digit)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def one_per_process(live: np.ndarray) -> list[np.void]:
    """One control record per (role, id): while a worker is replaced, its old and new
    process share the id, and two samples of one series is invalid exposition. The one
    serving wins (READY), then the newer."""
    best: dict[tuple[int, int], tuple[tuple[bool, int], np.void]] = {}
    for rec in live:
        key = (int(rec["role"]), int(rec["ident"]))
        rank = (int(rec["state"]) == ProcState.READY, int(rec["started_ns"]))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, rec)
    return [rec for _, rec in best.values()]


# (control record field, metric, help) of the per-process gauges the supervisor samples.
_MEMORY_GAUGES = (
    (
        "rss",
        "ringserve_process_resident_memory_bytes",
        "RSS (counts shared memory in every mapper)",
    ),
    (
        "uss",
        "ringserve_process_unique_memory_bytes",
        "USS: private memory this process wrote (not clean library pages), what a leak grows",
    ),
    ("pss", "ringserve_process_proportional_memory_bytes", "PSS: shared pages split among mappers"),
)
_FD_GAUGES = (
    (
        "open_fds",
        "ringserve_process_open_fds",
        "Open file descriptors (each client connection takes one)",
    ),
    (
        "max_fds",
        "ringserve_process_max_fds",
        "RLIMIT_NOFILE soft limit: at it, a frontend closes every new connection at once",
    ),
)


class ArenaCollector:
    """Gauges read from shared memory at scrape time."""

    def __init__(self, settings: Settings, arena: Arena) -> None:
        self.settings = settings
        self.arena = arena

    def _profile_choices(self) -> Iterator[object]:
        """Each model's batch size as its start-up profile chose it, beside what its
        workers aim at now (``ringserve_worker_preferred_batch_size``): they differ once
        a worker served a larger size faster (``size_tuner.py``). From the model's
        published spec: none before a worker is ready, nor when the config sets one."""
        from prometheus_client.core import GaugeMetricFamily

        chosen = GaugeMetricFamily(
            "ringserve_profile_preferred_batch_size",
            "The start-up profile's choice of batch size (absent when the config sets one)",
            labels=["model"],
        )
        for i, m in enumerate(self.settings.models):
            spec = self.arena.model_spec(i) or {}
            if spec.get("batch_profile"):  # (a profile ran: it chose a size)
                size = spec.get("preferred_by_profile") or spec["preferred_batch_size"]
                chosen.add_metric([m.name], float(size))
        yield chosen

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import GaugeMetricFamily

        slots = GaugeMetricFamily(
            "ringserve_ring_slots", "Request slots by state", labels=["state"]
        )
        counts = np.bincount(self.arena.slots["state"], minlength=len(SlotState))
        for st in SlotState:
            slots.add_metric([st.name.lower()], float(counts[st]))
        yield slots
        intake = GaugeMetricFamily(
            "ringserve_intake_open",
            "1 while the server takes new requests; 0 while it drains (SIGTERM, ctl drain) "
            "or is paused (ctl pause), when its 503s are planned",
        )
        intake.add_metric([], float(not (self.arena.draining or self.arena.paused)))
        yield intake
        names = [m.name for m in self.settings.models]
        depth = GaugeMetricFamily(
            "ringserve_queue_depth", "Requests waiting in the model's ring", labels=["model"]
        )
        cap = GaugeMetricFamily(
            "ringserve_queue_capacity",
            "Requests the model's queue could hold now: its depth plus the free request "
            "slots, at most arena.max_queue_depth (depth = capacity: new requests get 503; "
            "a frontend whose own share of the slots is busy refuses sooner, counted in "
            "ringserve_rejected_requests_total)",
            labels=["model"],
        )
        limit = self.settings.arena.max_queue_depth or self.settings.arena.slots
        for i, name in enumerate(names):
            head, _ = self.arena.ring_view(i)
            queued = int(head["tail"][0]) - int(head["head"][0])
            depth.add_metric([name], float(queued))
            # Not arena.slots: the slots that running batches and unread answers hold
            # can never queue, so depth / slots stayed under the alert's 0.8 while
            # every request was refused.
            cap.add_metric([name], float(min(limit, queued + int(counts[SlotState.FREE]))))
        yield depth
        yield cap
        inflight = GaugeMetricFamily(
            "ringserve_inflight_requests", "Requests holding a slot (queued, running or done)"
        )
        inflight.add_metric(
            [],
            float(
                counts[SlotState.QUEUED]
                + counts[SlotState.RUNNING]
                + counts[SlotState.DONE]
                + counts[SlotState.WRITING]
            ),
        )
        yield inflight
        ctl = self.arena.control
        live = ctl[running(ctl)]
        ready = GaugeMetricFamily("ringserve_workers_ready", "Ready workers", labels=["model"])
        configured = GaugeMetricFamily(
            "ringserve_workers_configured", "Configured workers", labels=["model"]
        )
        for i, m in enumerate(self.settings.models):
            n = int(
                (
                    (live["role"] == Role.WORKER)
                    & (live["model"] == i)
                    & (live["state"] == ProcState.READY)
                ).sum()
            )
            ready.add_metric([m.name], float(n))
            configured.add_metric([m.name], float(self.arena.model_word(i, "workers")))
        yield ready
        yield configured
        yield from self._profile_choices()

        def per_process(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["role", "id", "model"])

        fams = {key: per_process(name, doc) for key, name, doc in _MEMORY_GAUGES}
        fds = {key: per_process(name, doc) for key, name, doc in _FD_GAUGES}
        start = per_process(
            "ringserve_process_start_time_seconds", "Process start (seconds since the epoch)"
        )
        gpu_alloc = GaugeMetricFamily(
            "ringserve_worker_gpu_allocated_bytes",
            "torch.cuda.memory_allocated",
            labels=["model", "worker"],
        )
        gpu_nvml = GaugeMetricFamily(
            "ringserve_worker_gpu_nvml_used_bytes",
            "NVML usedGpuMemory (CUDA context + allocator cache)",
            labels=["model", "worker"],
        )
        gpu_res = GaugeMetricFamily(
            "ringserve_worker_gpu_reserved_bytes",
            "torch.cuda.memory_reserved",
            labels=["model", "worker"],
        )
        aim = GaugeMetricFamily(
            "ringserve_worker_preferred_batch_size",
            "Rows per batch the worker's batcher aims at: batching.preferred_batch_size if "
            "set, else the start-up profile's choice or a larger size it served faster "
            "under load (max_batch_size where no profile ran)",
            labels=["model", "worker"],
        )
        beat = per_process(
            "ringserve_process_heartbeat_age_seconds",
            "Seconds since the process last beat (a worker beats after every batch and "
            "idle wake): the supervisor kills it past worker.heartbeat_timeout_s",
        )
        import time

        now = time.monotonic()
        epoch_offset = time.time() - now
        for rec in one_per_process(live):
            role = Role(int(rec["role"])).name.lower()
            model = names[int(rec["model"])] if rec["role"] == Role.WORKER else ""
            labels = [role, str(int(rec["ident"])), model]
            for key, fam in (*fams.items(), *fds.items()):
                if int(rec[key]):
                    fam.add_metric(labels, float(rec[key]))
            started = _start_time(int(rec["pid"]))
            start.add_metric(labels, started or int(rec["started_ns"]) / 1e9 + epoch_offset)
            if int(rec["heartbeat_ns"]):
                beat.add_metric(labels, max(0.0, now - int(rec["heartbeat_ns"]) / 1e9))
            if rec["role"] == Role.WORKER:
                wl = [model, str(int(rec["ident"]))]
                if int(rec["batch_target"]):
                    aim.add_metric(wl, float(rec["batch_target"]))
                if int(rec["gpu_nvml"]):
                    gpu_nvml.add_metric(wl, float(rec["gpu_nvml"]))
                if int(rec["gpu_reserved"]):
                    gpu_alloc.add_metric(wl, float(rec["gpu_allocated"]))
                    gpu_res.add_metric(wl, float(rec["gpu_reserved"]))
        # The supervisor watches every other process, and none watches it: read here, at
        # scrape time (smaps_rollup of a process without torch: about a millisecond).
        supervisor_pid = int(self.arena.header["supervisor_pid"])
        sample = sample_process(supervisor_pid)
        if sample is not None:
            labels = ["supervisor", "0", ""]
            for key, fam in fams.items():
                fam.add_metric(labels, float(getattr(sample, key)))
            started = _start_time(supervisor_pid)
            if started:
                start.add_metric(labels, started)
            usage = fd_usage(supervisor_pid)
            if usage is not None and usage.limit:
                fds["open_fds"].add_metric(labels, float(usage.open))
                fds["max_fds"].add_metric(labels, float(usage.limit))
        yield from fams.values()
        yield from fds.values()
        yield start
        yield beat
        yield gpu_alloc
        yield gpu_res
        yield gpu_nvml
        yield aim
