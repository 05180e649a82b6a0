"""The supervisor's own counters (recycles, restarts, re-queued and poison requests),
recorded with prometheus-client's multiprocess files like every other process so the
frontend that answers a scrape includes them."""

from __future__ import annotations

import signal

from ringserve.ipc.config import Settings
from ringserve.ipc.errors import ExitCode

# Reasons created at zero: Prometheus' increase() cannot see a series' first sample,
# so a counter that appeared already at 1 hid the first recycle of each kind after every
# start. Restart reasons are open-ended (a signal, an exit code); these are the usual,
# spelled as ExitCode.describe spells an exit, or as the supervisor names its kills.
RECYCLE_REASONS = (
    "uss_limit",
    "uss_trend",
    "gpu_limit",
    "gpu_trend",
    "max_requests",
    "max_age",
    "admin",
    "reload",
)
_KILLS = ("heartbeat_timeout", "start_timeout")  # Arbiter._check_children
UNASKED_EXIT = "unasked_exit"  # exit 0 nobody asked for (ExitHandling._on_exit)
_DEATHS = (ExitCode.ERROR, -signal.SIGKILL)
RESTART_REASONS = {
    "frontend": (*map(ExitCode.describe, _DEATHS), *_KILLS),
    "worker": (
        *map(
            ExitCode.describe,
            (
                *_DEATHS,
                -signal.SIGSEGV,
                ExitCode.MODEL_LOAD,
                ExitCode.MODEL_CONFIG,
                ExitCode.CUDA_INIT,
                ExitCode.DEVICE_FAULT,
            ),
        ),
        *_KILLS,
        UNASKED_EXIT,
    ),
}


class SupervisorStats:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.totals: dict[str, int] = {}

    def open(self, metrics_dir: str) -> None:
        from ringserve.ipc.prom import use_multiprocess_files

        use_multiprocess_files(metrics_dir, "supervisor")
        from prometheus_client import Counter, Gauge

        self._recycles = Counter(
            "ringserve_worker_recycles", "Planned worker recycles", ["model", "reason"]
        )
        self._restarts = Counter(
            "ringserve_process_restarts",
            "Unplanned restarts after a death (model: the worker's; empty for frontends)",
            ["role", "model", "reason"],
        )
        self._requeued = Counter(
            "ringserve_requeued_requests", "Requests re-queued after their worker died", ["model"]
        )
        self._poison = Counter(
            "ringserve_poison_requests", "Requests failed after two worker deaths", ["model"]
        )
        info = Gauge(
            "ringserve_build_info",
            "Build information",
            ["version", "torch_version", "device"],
            multiprocess_mode="max",
        )
        limit = Gauge(
            "ringserve_worker_memory_limit_bytes",
            "Configured worker USS limit",
            ["model"],
            multiprocess_mode="max",
        )
        gpu_limit = Gauge(
            "ringserve_worker_gpu_memory_limit_bytes",
            "Configured worker GPU allocated limit",
            ["model"],
            multiprocess_mode="max",
        )
        from importlib.metadata import PackageNotFoundError, version

        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "unknown"
        from ringserve import __version__

        devices = sorted({d for m in self.settings.models for d in m.devices})
        info.labels(__version__, torch_version, ",".join(devices)).set(1)
        for reason in RESTART_REASONS["frontend"]:
            self._restarts.labels("frontend", "", reason)
        for m in self.settings.models:
            for reason in RESTART_REASONS["worker"]:
                self._restarts.labels("worker", m.name, reason)
            for reason in RECYCLE_REASONS:
                self._recycles.labels(m.name, reason)
            self._requeued.labels(m.name)
            self._poison.labels(m.name)
            limit.labels(m.name).set(self.settings.memory.uss_limit_mb * 2**20)
            gpu_limit.labels(m.name).set(self.settings.memory.gpu_allocated_limit_mb * 2**20)

    def _count(self, key: str, n: int = 1) -> None:
        self.totals[key] = self.totals.get(key, 0) + n

    def recycled(self, model: str, reason: str) -> None:
        self._recycles.labels(model, reason).inc()
        self._count(f"recycles:{reason}")

    def restarted(self, role: str, reason: str, model: str = "") -> None:
        self._restarts.labels(role, model, reason).inc()
        self._count(f"restarts:{role}:{reason}")

    def requeued(self, model: str, n: int) -> None:
        self._requeued.labels(model).inc(n)
        self._count("requeued", n)

    def poisoned(self, model: str, n: int) -> None:
        self._poison.labels(model).inc(n)
        self._count("poisoned", n)
