"""GPU memory per process from NVML (``nvidia-ml-py``), on hosts that have it.

NVML's ``usedGpuMemory`` for a pid includes the CUDA context and the caching
allocator's reserve (FACTS.md), so it is reported beside the worker's own
``memory_allocated``/``memory_reserved`` rather than used for leak decisions. On a
CPU host (no library, no driver) ``GpuWatch`` is simply disabled: no error, no cost.
"""

from __future__ import annotations

import contextlib
import logging
from types import ModuleType

log = logging.getLogger("ringserve.supervisor")


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml  # provided by the optional nvidia-ml-py dependency
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on CPU hosts
        log.debug("NVML unavailable: %s", e)
        return None
    return pynvml


class GpuWatch:
    def __init__(self, nvml: ModuleType | None = None) -> None:
        self.nvml = nvml if nvml is not None else _load_nvml()
        self.handles: dict[int, object] = {}  # device index -> NVML handle
        self._failing: set[int] = set()  # devices whose query failed last time
        self._unwatched: set[int] = set()  # devices NVML gave no handle for at start
        if self.nvml is None:
            return
        try:
            count = self.nvml.nvmlDeviceGetCount()
        except Exception as e:  # no permission, a driver in a bad state: serve anyway
            log.warning("NVML: GPU memory per process unavailable: %s", e)
            self.close()
            return
        for i in range(count):
            try:
                self.handles[i] = self.nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as e:  # a GPU fallen off the bus: watch the others
                self._unwatched.add(i)
                log.warning("NVML: GPU %d is not watched: %s", i, e)
        if not self.handles:
            if count:
                log.warning("NVML: GPU memory per process unavailable: no device answered")
            self.close()
            return
        log.info("NVML: watching GPU memory on %d of %d device(s)", len(self.handles), count)

    @property
    def enabled(self) -> bool:
        return bool(self.handles)

    @property
    def every_device_answered(self) -> bool:
        """Whether the last ``used_by_pid`` heard from every device (a pid missing from
        it may be on a device that did not answer)."""
        return not self._failing and not self._unwatched

    def used_by_pid(self) -> dict[int, int]:
        """Bytes of GPU memory per host pid, summed over devices (one call per sample)."""
        used: dict[int, int] = {}
        if self.nvml is None:
            return used
        for index, handle in self.handles.items():
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception as e:
                # Once per spell of failures, not at every sample (every few seconds).
                if index not in self._failing:
                    self._failing.add(index)
                    log.warning("NVML query of GPU %d failed: %s (again: not logged)", index, e)
                continue
            if index in self._failing:
                self._failing.discard(index)
                log.info("NVML query of GPU %d works again", index)
            for p in procs:
                mem = p.usedGpuMemory
                if mem is not None:  # None when the driver hides it (no permission)
                    used[p.pid] = used.get(p.pid, 0) + int(mem)
        return used

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None
