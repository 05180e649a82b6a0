"""``torchscript:PATH``: serve a TorchScript archive (``torch.jit.save``) as is.

A TorchScript file carries no description of its inputs, so the tensor specs come from
the model's options (``[models.NAME.options]``), with permissive defaults:

- ``input_dtype`` ("float32") and ``input_shape`` ([-1]): per-row input, -1 = any size;
- ``output_dtype`` ("float32") and ``output_shape`` ([-1]): per-row output; with either
  set, every answer is checked against them (a mismatch is a 500 naming it), with
  neither, answers go out as the archive returns them, and the metadata advertises
  what the start-up probe's row of zeros returned (its dtype; its per-row shape when
  the input shape is fixed, else as many -1 dimensions);
- ``task`` ("tensor"): "classification" makes /predict answer a label and a score;
- ``labels_file`` (none): one label per line, for a classification model;
- ``inputs`` and ``outputs`` (instead of the four above, as Triton's config.pbtxt
  lists them): tables of ``name``, ``dtype`` and ``shape``, one per tensor, for an
  archive whose ``forward`` takes several tensors (given positionally, in the listed
  order) or returns several (a tuple in the listed order, or a dict by name)::

      [[models.bert.options.inputs]]
      name = "INPUT_IDS"
      dtype = "int64"
      shape = [-1]
      [[models.bert.options.inputs]]
      name = "ATTENTION_MASK"
      dtype = "int64"
      shape = [-1]

``preprocess`` is the base one: the payload (already checked against the input spec by
the frontend) becomes a tensor ``[rows, *input_shape]`` without a copy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ringserve.gpu_worker.handlers.base import Handler, OutputContractError, TensorSpec, read_labels
from ringserve.gpu_worker.handlers.weights import WeightsError, reason
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.layout import DTYPES

TASKS = ("tensor", "classification")


def not_an_archive(path: str, error: Exception) -> str:
    """Why ``torch.jit.load`` refused ``path``, with what the file is when that is plain."""
    text = reason(error)
    if "constants.pkl" in text:  # a zip torch.save wrote: a checkpoint, no program
        text += " (a torch.save checkpoint or state_dict? serve it through torchvision:ARCH "
        text += "with weights = PATH, or a python: handler)"
    return f"torchscript:{path} is not a TorchScript archive (torch.jit.save): {text}"


def _spec(name: str, dtype: Any, shape: Any, key: str) -> TensorSpec:
    """Build one spec from option values, failing with the option's name."""
    if dtype not in DTYPES or dtype == "bytes":
        raise ValueError(f"options.{key}_dtype: {dtype!r} is not a tensor dtype")
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise ValueError(f"options.{key}_shape: expected a list of integers, got {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):  # "3", 2.5
        raise ValueError(f"options.{key}_shape: expected a list of integers, got {shape!r}")
    dims = tuple(shape)
    if any(d < -1 or d == 0 for d in dims):
        raise ValueError(f"options.{key}_shape: dimensions are positive or -1, got {shape!r}")
    return TensorSpec(name, dtype, dims)


def _specs(listed: Any, key: str) -> tuple[TensorSpec, ...]:
    """Specs from the ``inputs`` or ``outputs`` option: a list of tables."""
    if not isinstance(listed, list) or not listed or not all(isinstance(t, dict) for t in listed):
        raise ValueError(
            f"options.{key}: expected a list of tables with name, dtype and shape "
            f"([[models.NAME.options.{key}]] in TOML)"
        )
    specs = []
    for i, table in enumerate(listed):
        if unknown := sorted(set(table) - {"name", "dtype", "shape"}):
            raise ValueError(f"options.{key}[{i}]: unknown key {unknown[0]!r} (name, dtype, shape)")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"options.{key}[{i}]: needs a name")
        specs.append(_spec(name, table.get("dtype", "float32"), table.get("shape", [-1]), key))
    return tuple(specs)


class TorchScriptHandler(Handler):
    known_options = frozenset(
        {"input_dtype", "input_shape", "output_dtype", "output_shape", "task", "labels_file"}
        | {"inputs", "outputs"}
    )
    takes_weights = False
    platform = "pytorch_libtorch"

    def __init__(self, settings: ModelSettings, arg: str = "") -> None:
        super().__init__(settings, arg)
        # No retry fixes a directory (a missing file may be storage not mounted yet:
        # retried; no path at all is refused by the config's validation).
        if os.path.isdir(arg):
            raise ValueError(f"torchscript:{arg} is a directory; name the archive file in it")
        opts = settings.options
        for key in ("input", "output"):
            if f"{key}s" in opts and ({f"{key}_dtype", f"{key}_shape"} & set(opts)):
                raise ValueError(
                    f"options.{key}s lists the {key}s; {key}_dtype and {key}_shape are for a "
                    "lone one: set one or the other"
                )
        if "inputs" in opts:
            self.inputs = _specs(opts["inputs"], "inputs")
        else:
            dtype, shape = opts.get("input_dtype", "float32"), opts.get("input_shape", [-1])
            self.inputs = (_spec("INPUT0", dtype, shape, "input"),)
        if "outputs" in opts:
            self.outputs = _specs(opts["outputs"], "outputs")
        else:
            dtype, shape = opts.get("output_dtype", "float32"), opts.get("output_shape", [-1])
            self.outputs = (_spec("OUTPUT0", dtype, shape, "output"),)
        # Without output options the output spec is a placeholder: answers are whatever
        # the archive returns. With one, the declaration is checked on every batch.
        self.output_declared = bool({"output_dtype", "output_shape", "outputs"} & set(opts))
        self.task = str(opts.get("task", "tensor"))
        if self.task not in TASKS:
            raise ValueError(f"options.task: {self.task!r} is not one of {', '.join(TASKS)}")
        self.model: torch.jit.ScriptModule | None = None

    def load(self, device: torch.device) -> None:
        with warnings.catch_warnings():
            # Serving TorchScript is this handler's purpose; upstream's deprecation of
            # torch.jit is not news to the operator on every start.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.load` is", category=FutureWarning
            )
            try:
                model = torch.jit.load(self.arg, map_location=device)
            except torch.OutOfMemoryError:
                raise  # the device is full now: a load failure, retried
            except RuntimeError as e:
                # The file is there (a missing one is a ValueError: retried, storage may
                # not be mounted yet) but is no archive this torch can load: no retry
                # changes it, so it stops the start (WeightsError) instead of retrying
                # until server.startup_timeout_s.
                raise WeightsError(not_an_archive(self.arg, e)) from e
        self.model = model.eval()
        labels_file = self.settings.options.get("labels_file")
        if labels_file:
            labels = read_labels(labels_file)
            classes = self.outputs[0].shape[-1]
            if classes != -1 and len(labels) != classes:
                raise ValueError(f"{labels_file}: {len(labels)} labels for {classes} classes")
            self.labels = labels
        self.device = device

    def infer(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> Any:
        assert self.model is not None, "load() was not called"
        with torch.inference_mode():
            if isinstance(batch, dict):  # several inputs: positionally, in declared order
                out = self.model(*(batch[s.name] for s in self.inputs))
            else:
                out = self.model(batch)
        if len(self.outputs) > 1:
            return out  # a tuple or a dict of them: checked against the declaration
        if not isinstance(out, torch.Tensor):  # "define postprocess" is no help here
            raise OutputContractError(
                f"the TorchScript model returned {type(out).__name__}; declare its outputs "
                "(options.outputs) or script a wrapper whose forward returns one tensor"
            )
        return out
