"""``identity``: returns its input. For tests and for measuring the server's own overhead."""

from __future__ import annotations

import torch

from ringserve.gpu_worker.handlers.base import Handler, TensorSpec


class IdentityHandler(Handler):
    platform = "identity"
    known_options = frozenset()
    takes_weights = False
    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch
