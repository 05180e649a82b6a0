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
        self.handles: list = []
        self._failing: set[int] = set()  # devices whose query failed last time
        if self.nvml is not None:
            try:
                count = self.nvml.nvmlDeviceGetCount()
                self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except Exception as e:  # a GPU fallen off the bus, no permission: serve anyway
                log.warning("NVML: GPU memory per process unavailable: %s", e)
                self.close()
                return
            log.info("NVML: watching GPU memory on %d device(s)", count)

    @property
    def enabled(self) -> bool:
        return bool(self.handles)

    @property
    def every_device_answered(self) -> bool:
        """Whether the last ``used_by_pid`` heard from every device (a pid missing from
        it may be on a device that did not answer)."""
        return not self._failing

    def used_by_pid(self) -> dict[int, int]:
        """Bytes of GPU memory per host pid, summed over devices (one call per sample)."""
        used: dict[int, int] = {}
        if self.nvml is None:
            return used
        for index, handle in enumerate(self.handles):
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
