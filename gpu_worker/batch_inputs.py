"""A request's or a batch's input as a handler sees it: one tensor, or, for a model that
declares several inputs (a text model's token ids and attention mask), a dict of tensors
by name, each with the rows first. The worker's batch path (rows, grouping, batching,
moving to the device) works on either through these functions, so the one-input path
stays a plain tensor with nothing added to it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ringserve.gpu_worker.handlers.base import OutputContractError

Inputs = torch.Tensor | dict[str, torch.Tensor]


def rows(x: Inputs) -> int:
    """The rows of ``x``: its first dimension (every tensor of a dict has the same)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    return int(next(iter(x.values())).shape[0])


def checked_rows(x: Inputs) -> int | str:
    """The rows of what ``preprocess`` returned, or why it has none: a scalar, an empty
    dict, or tensors that disagree on their rows (which no batch could hold)."""
    if isinstance(x, torch.Tensor):
        return "a scalar" if x.dim() == 0 else int(x.shape[0])
    if not x:
        return "an empty dict"
    counts = {name: (-1 if t.dim() == 0 else int(t.shape[0])) for name, t in x.items()}
    if len(set(counts.values())) > 1 or -1 in counts.values():
        said = ", ".join(f"{n}: {'a scalar' if c < 0 else c}" for n, c in counts.items())
        return f"tensors of different rows ({said})"
    return next(iter(counts.values()))


def group_key(x: Inputs) -> tuple:
    """What requests must share to be batched together: each tensor's dtype and per-row
    shape (and, for a dict, its names)."""
    if isinstance(x, torch.Tensor):
        return (x.dtype, tuple(x.shape[1:]))
    return tuple((name, t.dtype, tuple(t.shape[1:])) for name, t in x.items())


def concat(parts: Sequence[Inputs]) -> Inputs:
    """The batch of ``parts`` (of one group): their rows one after another."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    return {name: torch.cat([p[name] for p in parts]) for name in first}  # type: ignore[index]


def to_device(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    return {name: t.to(device, non_blocking=True) for name, t in x.items()}


def owned(x: Inputs, lo: int, hi: int) -> Inputs:
    """``x`` with any tensor that views shared memory between ``lo`` and ``hi`` (a
    request's slot, which must stay intact for a retry) replaced by a copy."""
    if isinstance(x, torch.Tensor):
        return x.clone() if lo <= x.data_ptr() < hi else x
    return {name: t.clone() if lo <= t.data_ptr() < hi else t for name, t in x.items()}


def expand(row: Inputs, size: int) -> Inputs:
    """``size`` copies of one row, as one batch (the profile's sample batches)."""
    if isinstance(row, torch.Tensor):
        return row.expand(size, *row.shape[1:]).contiguous()
    return {name: t.expand(size, *t.shape[1:]).contiguous() for name, t in row.items()}


def as_inputs(x: object) -> Inputs:
    """What ``preprocess`` returned, as a batch part: a tensor (a numpy array is taken
    without a copy), or a dict of them by name; anything else fails its request."""
    if isinstance(x, dict) and x and all(isinstance(k, str) for k in x):
        return {name: as_tensor(t) for name, t in x.items()}
    return as_tensor(x)


def as_tensor(x: object) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) and not x.dtype.hasobject:
        return torch.from_numpy(x)
    raise OutputContractError(
        f"preprocess returned {type(x).__name__}; it must return a torch.Tensor of shape "
        "[rows, *input shape] (or a numpy array), or for a model with several inputs a "
        "dict of them by name"
    )
