"""The handler interface: how a model plugs into a worker.

A handler lives only inside a worker process (the only place torch is imported). The
worker calls, in order: ``load(device)`` once before it reports ready; then per batch
``preprocess`` for each request, ``infer`` on the concatenated batch, and
``postprocess`` on the batch output. ``describe()`` is published into shared memory so
frontends (which never import torch) can validate requests and serve metadata.

Contract:
- one or more input tensors and one or more output tensors per request; the first
  dimension is the batch;
- ``preprocess`` turns one request's payload into a tensor of shape
  ``[rows, *inputs[0].shape]``; it raises ``BadInput`` for input it refuses. The payload
  is a numpy array already checked against ``inputs[0]`` by the frontend (a private
  copy that it may change in place, as ``infer`` may its batch, since the request's slot
  must stay intact for a retry after a crash); or encoded image bytes; or, for an input
  declared ``"bytes"`` (KServe v2 BYTES), an object array of ``bytes`` in the request's
  shape (such a handler must define ``preprocess``). A model that declares several
  inputs is given a dict of such arrays by input name and returns a dict of tensors
  (the base ``preprocess`` converts each); ``infer`` then gets a dict of batched tensors;
- ``preprocess`` runs on the worker's thread unless the handler sets
  ``preprocess_thread_safe``: then a batch's images may be preprocessed on several
  threads at once (each with one torch thread);
- ``infer`` must not keep references to its input (the batch buffer is reused);
- ``postprocess`` returns a numpy array whose first dimension matches the batch (for an
  output declared ``"bytes"``, an object array of ``bytes`` or ``str``); a handler that
  declares several outputs returns a dict of such arrays by output name, or a tuple of
  them in declared order (the base ``postprocess`` converts a dict or tuple of tensors
  from ``infer``). Each request is answered every output (ipc/tensor_set.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ringserve.ipc.config import ModelSettings
from ringserve.ipc.errors import ConfigError
from ringserve.ipc.layout import PayloadKind


class BadInput(ValueError):
    """The request's input is refused; its message goes back to the client with a 400."""


class OutputContractError(TypeError):
    """What the handler returned breaks its contract (``preprocess`` not a tensor,
    ``infer`` not one tensor) or its own declaration (``gpu_worker/output_contract.py``):
    the requests involved fail with a 500 naming it, logged once; the handler, not a
    request, is at fault."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, one of ringserve.ipc.layout.DTYPES
    shape: tuple[int, ...]  # per-row shape; -1 marks a dynamic dimension


class Handler(ABC):
    """Base class of every model handler (built-in or ``python:module:Class``)."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    platform: str = "pytorch_libtorch"
    accepts_images: bool = False
    # Its ``preprocess`` may run on several threads at once: the worker then preprocesses
    # a batch's images side by side on the model's ``threads`` (each with one torch
    # thread), beginning while the batch fills (gpu_worker/preprocess_pool.py).
    preprocess_thread_safe: bool = False
    task: str = "tensor"  # "classification": /predict answers {"label", "score"}
    labels: tuple[str, ...] = ()
    # Answers are checked against ``outputs[0]`` (dtype and per-row shape); False where
    # that spec is a placeholder, not a declaration (TorchScript without output options).
    output_declared: bool = True
    # The ``[models.NAME.options]`` keys it reads: any other is a typo, refused at start
    # as an unknown config key is. None: any (a handler of yours reads what it likes).
    known_options: frozenset[str] | None = None
    # False: it reads no ``weights`` file (identity, a TorchScript archive that holds its
    # own), so one set for it (``--weights`` sets every model's) is said to be unused.
    takes_weights: bool = True

    def __init__(self, settings: ModelSettings, arg: str = "") -> None:
        self.settings = settings
        self.arg = arg
        self.device = torch.device("cpu")

    @abstractmethod
    def load(self, device: torch.device) -> None:
        """Load weights onto ``device``. Called once before the worker is ready."""

    def preprocess(self, payload: Any, kind: PayloadKind) -> torch.Tensor | dict[str, torch.Tensor]:
        """One request's payload → ``[rows, *input shape]`` tensor (CPU; the worker moves
        it); a model with several inputs is given a dict of arrays by input name, and
        returns a dict of tensors."""
        if kind == PayloadKind.IMAGE:
            raise BadInput(f"model {self.settings.name} does not take images")
        if isinstance(payload, dict):
            return {name: torch.from_numpy(a) for name, a in payload.items()}
        return torch.from_numpy(payload)

    @abstractmethod
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the model on a batch already on ``self.device``."""

    def postprocess(
        self, output: Any
    ) -> np.ndarray | dict[str, np.ndarray] | tuple[np.ndarray, ...]:
        """The batch output as a numpy array on the host (an array passes as is); for a
        model that declares several outputs, a dict of them by name or a tuple in
        declared order, each converted so."""
        if len(self.outputs) > 1:
            if isinstance(output, dict):
                return {k: host_array(v) for k, v in output.items()}
            if isinstance(output, tuple | list):
                return tuple(host_array(v) for v in output)
        return host_array(output)

    def describe(self) -> dict[str, Any]:
        """Metadata published to frontends (KServe v2 metadata and model config)."""
        return {
            "name": self.settings.name,
            "platform": self.platform,
            "inputs": [asdict(s) for s in self.inputs],
            "outputs": [asdict(s) for s in self.outputs],
            "accepts_images": self.accepts_images,
            "task": self.task,
            "labels": list(self.labels),
            "max_batch_size": self.settings.batching.max_batch_size,
            "device": str(self.device),
        }


def host_array(output: object) -> np.ndarray:
    """One output of ``infer`` as a numpy array on the host (an array passes as is)."""
    if isinstance(output, np.ndarray):
        return output
    if not isinstance(output, torch.Tensor):
        raise OutputContractError(
            f"infer returned {type(output).__name__}; it must return one torch.Tensor "
            "with the batch first, or for a model with several outputs a dict of them by "
            "name (or define postprocess to turn what it returns into numpy arrays)"
        )
    if output.device.type != "cpu":
        output = output.cpu()
    return output.numpy(force=output.requires_grad)  # force: detach when needed


def int_option(settings: ModelSettings, key: str, default: int, minimum: int = 1) -> int:
    """Option ``key`` as an integer of at least ``minimum``, read once at start: a bad one
    (``"abc"``, ``2.5``, ``0``) stops the start naming it, where ``int()`` failed without
    the key's name, or, read per request, failed every request instead."""
    value = settings.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"models.{settings.name}.options.{key}: expected an integer of at least "
            f"{minimum} (got {value!r})"
        )
    return value


def bool_option(settings: ModelSettings, key: str, default: bool | None) -> bool | None:
    """Option ``key`` as true or false (``bool("false")`` was true)."""
    value = settings.options.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(
            f"models.{settings.name}.options.{key}: expected true or false (got {value!r})"
        )
    return value


def read_labels(path: str) -> tuple[str, ...]:
    """One label per line; blank lines at the end are ignored."""
    return tuple(Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n"))
