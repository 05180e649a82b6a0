"""Handlers used only by tests: a slow one (deadlines, full queues, disconnects) and a
poisonous one (raises on 13, kills its process on 666)."""

from __future__ import annotations

import os
import time

import torch

from ringserve.gpu_worker.handlers.base import Handler, TensorSpec


class Slow(Handler):
    """Identity that sleeps ``input[0, 0]`` milliseconds per batch (capped at 10 s)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(min(float(batch[:, 0].max()), 10_000) / 1000)
        return batch


class Poison(Handler):
    """Identity, except a row starting with 13 raises and one starting with 666 kills us."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        first = batch[:, 0]
        if bool((first == 666).any()):
            os._exit(99)
        if bool((first == 13).any()):
            raise ValueError("13 is unlucky")
        return batch * 1


class Leaky(Handler):
    """Identity that keeps 1 MiB per batch forever: a real, private, growing leak."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)
    hoard: list = []  # the leak is the point

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        chunk = bytearray(2**20)
        chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page: counted in USS
        self.hoard.append(chunk)
        return batch


class FailsToLoad(Handler):
    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        raise RuntimeError("weights file is corrupt")

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class ThreadCount(Handler):
    """Sleeps ``input[0, 0]`` milliseconds, then answers the torch threads it ran with."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(min(float(batch[:, 0].max()), 10_000) / 1000)
        return torch.full((batch.shape[0], 1), float(torch.get_num_threads()))
