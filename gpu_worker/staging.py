"""A page-locked staging buffer for the copy of a batch to a GPU.

Copies from pinned host memory run asynchronously (``non_blocking``) and at full
bandwidth; from pageable memory the driver stages them through a pinned buffer of its
own. Pinning costs milliseconds, so the buffer is kept and reused.

One flat byte buffer for every dtype and row shape (and for every input of a model of
several, each in its own stretch), grown to the largest batch seen: a
buffer per (dtype, row shape) grew without bound for an input with a dimension of any
size (a text model's sequence length), each one page-locked (never swapped, counted in
the worker's USS, and so toward its recycle limit). Reuse is safe because the worker
reads each batch's output back to the host (a synchronising copy) before the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

_ALIGN = 64  # bytes: any dtype's view of the buffer starts aligned


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


def _unpin_freed() -> None:
    """Give back the pinned blocks torch's host allocator keeps for reuse once freed (a
    smaller buffer outgrown: it would stay page-locked beside the new one)."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # (private: absent, keep them)
    if empty is not None:
        empty()


class PinnedStaging:
    def __init__(
        self,
        pin: Callable[[torch.Tensor], torch.Tensor] = _pin,
        unpin_freed: Callable[[], None] = _unpin_freed,
    ) -> None:
        self._pin, self._unpin_freed = pin, unpin_freed
        self._buf = torch.empty(0, dtype=torch.uint8)

    @property
    def capacity(self) -> int:
        """Bytes held."""
        return self._buf.numel()

    def gather(self, tensors: Sequence[torch.Tensor], min_rows: int = 0) -> torch.Tensor:
        """The rows of ``tensors`` concatenated into the buffer (one copy). When it
        grows, it grows to hold at least ``min_rows`` such rows, so that the batches
        that follow (up to ``max_batch_size``) do not each pin a larger one."""
        return self.gather_named({"": tensors}, min_rows)[""]

    def gather_named(
        self, parts: Mapping[str, Sequence[torch.Tensor]], min_rows: int = 0
    ) -> dict[str, torch.Tensor]:
        """``gather`` for a model of several inputs: each name's rows concatenated into
        its own stretch of the one buffer (each starting aligned)."""
        layout, at, grow_to = [], 0, 0
        for name, tensors in parts.items():
            first = tensors[0]
            rows = sum(int(t.shape[0]) for t in tensors)
            row_shape = tuple(first.shape[1:])
            row_bytes = first.element_size() * math.prod(row_shape)
            nbytes = rows * row_bytes
            layout.append((name, tensors, at, rows, row_shape, nbytes))
            end, at = at + nbytes, _aligned(at + nbytes)
            grow_to += _aligned(max(rows, min_rows) * row_bytes)
        if end > self.capacity:
            self._grow(max(end, grow_to, 2 * self.capacity))  # (few re-pins)
        out = {}
        for name, tensors, start, rows, row_shape, nbytes in layout:
            view = self._buf[start : start + nbytes].view(tensors[0].dtype)
            out[name] = torch.cat(list(tensors), out=view.view(rows, *row_shape))
        return out

    def _grow(self, nbytes: int) -> None:
        want = _aligned(nbytes)
        outgrown, self._buf = self.capacity, torch.empty(0, dtype=torch.uint8)
        if outgrown:
            self._unpin_freed()
        self._buf = self._pin(torch.empty(want, dtype=torch.uint8))
