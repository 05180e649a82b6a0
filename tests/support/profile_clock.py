"""The batch profile on a virtual clock (``test_profile``, ``test_cuda_path``): a fake
model whose every run advances the clock by a cost we choose, so rates, order and
budget are exact. The ``clock`` fixture (``conftest.py``) puts it in place."""

from __future__ import annotations

import time as _time

import pytest
import torch

from ringserve.gpu_worker import profile
from ringserve.gpu_worker.handlers.base import Handler, TensorSpec
from ringserve.ipc.config import BatchingSettings, ModelSettings


class VirtualClock:
    """Stands in for the ``time`` module inside ``profile``."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:  # wall clock: a day after any file's mtime here
        return _time.time() + 86400 + self.now


def use_virtual_clock(monkeypatch: pytest.MonkeyPatch, cache_home: str) -> VirtualClock:
    """``profile``'s clock made virtual, and its cache put under ``cache_home``."""
    vc = VirtualClock()
    monkeypatch.setattr(profile, "time", vc)
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home)
    return vc


class CostModel(Handler):
    """A model whose run of batch size n costs ``cost(n, k)`` virtual seconds (k: how
    many runs came before it)."""

    inputs = (TensorSpec("x", "float32", (4,)),)

    def __init__(self, clock: VirtualClock, cost) -> None:
        super().__init__(ModelSettings(name="m", handler="fake"))
        self.clock, self.cost, self.sizes = clock, cost, []

    def load(self, device: torch.device) -> None:
        pass

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost(batch.shape[0], len(self.sizes))
        self.sizes.append(batch.shape[0])
        return batch


def settings(max_batch: int, handler: str = "fake") -> ModelSettings:
    return ModelSettings(
        name="m", handler=handler, batching=BatchingSettings(max_batch_size=max_batch)
    )
