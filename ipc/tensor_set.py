"""Several tensors in one slot: the request of a model that declares several inputs,
and the answer of one that declares several outputs.

A slot header describes one tensor (dtype, shape, bytes). A text model takes token ids
and an attention mask; a detector answers boxes, scores and labels. Such a request or
answer is a small self-describing set instead: the header says ``TENSOR_SET`` with
shape ``(count,)``, and the payload holds a table of ``count`` entries (dtype code,
shape, bytes) followed by each tensor's bytes, each starting on a cache line. BYTES
tensors go in Triton's length-prefixed form, as a lone BYTES tensor does. The names are
not carried: writer and reader both know the model's declaration, and the set holds the
tensors in declared order.

A model of one input and one output keeps the plain one-tensor slot: this costs its
requests nothing.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ringserve.ipc import bytes_tensor
from ringserve.ipc.layout import DTYPE_CODE, DTYPE_CODE_OF, MAX_NDIM, numpy_dtype

TENSOR_SET = 255  # the out_dtype of an answer that is a tensor set; no dtype has this code
_COUNT = struct.Struct("<I4x")
_ENTRY = struct.Struct(f"<BB6xQ{MAX_NDIM}q")  # dtype code, ndim, nbytes, shape
_BYTES = DTYPE_CODE["bytes"]
_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class PackedBytes(NamedTuple):
    """A BYTES tensor already in its length-prefixed form (as a v2 request brings it):
    its shape, and its bytes as uint8."""

    shape: tuple[int, ...]
    data: np.ndarray


class Packed:
    """The tensors of one answer, ready to copy: their codes, shapes and bytes, and the
    set's total size (known before anything is written, so an answer too large for the
    slot is refused without touching it)."""

    def __init__(self, tensors: Sequence[np.ndarray | PackedBytes], what: str = "output") -> None:
        """TypeError naming the tensor whose dtype cannot travel (or whose BYTES element
        is neither bytes nor str); ValueError for one with too many dimensions."""
        self.entries: list[tuple[int, tuple[int, ...], np.ndarray | bytes]] = []
        for i, t in enumerate(tensors):
            if isinstance(t, PackedBytes):
                self.entries.append((_BYTES, t.shape, t.data))
                continue
            if t.ndim > MAX_NDIM:
                raise ValueError(
                    f"{what} {i} has {t.ndim} dimensions; a slot holds at most {MAX_NDIM}"
                )
            if t.dtype.hasobject:
                try:
                    self.entries.append((_BYTES, t.shape, bytes_tensor.pack(t)))
                except TypeError as e:
                    raise TypeError(f"{what} {i}: {e}") from None
                continue
            code = DTYPE_CODE_OF.get(t.dtype)
            if code is None:
                raise TypeError(f"{what} {i} has unsupported dtype {t.dtype.name}")
            self.entries.append((code, t.shape, t))
        self.offsets, self.nbytes = _layout([_nbytes(data) for _, _, data in self.entries])

    def write(self, buf: memoryview) -> None:
        """Copy the set into ``buf`` (at least ``nbytes`` long)."""
        _COUNT.pack_into(buf, 0, len(self.entries))
        for i, ((code, shape, data), at) in enumerate(zip(self.entries, self.offsets, strict=True)):
            n = _nbytes(data)
            dims = (*shape, *(0,) * (MAX_NDIM - len(shape)))
            _ENTRY.pack_into(buf, _COUNT.size + i * _ENTRY.size, code, len(shape), n, *dims)
            if isinstance(data, bytes):
                buf[at : at + n] = data
            else:
                dest = np.ndarray(data.shape, data.dtype, buffer=buf, offset=at)
                np.copyto(dest, data)


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each tensor of these byte sizes starts in a set, and the set's size."""
    at = _aligned(_COUNT.size + _ENTRY.size * len(sizes))
    offsets = []
    for n in sizes:
        offsets.append(at)
        at = _aligned(at + n)
    return offsets, at


def rows_that_fit(slot_bytes: int, row_sizes: Sequence[int]) -> int:
    """The most rows whose answer, a set of tensors of ``row_sizes`` bytes a row each,
    fits ``slot_bytes`` (its table and alignment included): what v2's config tells
    clients a request may carry."""
    rows = slot_bytes // max(1, sum(row_sizes))
    while rows > 0 and _layout([rows * n for n in row_sizes])[1] > slot_bytes:
        rows -= 1
    return rows


def _nbytes(data: np.ndarray | bytes) -> int:
    return len(data) if isinstance(data, bytes) else data.nbytes


def unpack(buf: memoryview, count: int, read_only: bool = True) -> tuple[np.ndarray, ...]:
    """The ``count`` tensors of a set in ``buf``: views of it (read-only unless the
    reader is the worker, whose handler may be given them as torch tensors), except
    BYTES tensors (object arrays of ``bytes``, copies). ValueError if the set is
    corrupt."""
    if len(buf) < _COUNT.size or _COUNT.unpack_from(buf, 0)[0] != count:
        raise ValueError(f"a tensor set of {count} tensors does not say so")
    end = _COUNT.size + _ENTRY.size * count
    if end > len(buf):
        raise ValueError(f"a tensor set of {count} tensors does not fit its payload")
    out = []
    for i in range(count):
        code, ndim, n, *dims = _ENTRY.unpack_from(buf, _COUNT.size + i * _ENTRY.size)
        at = _aligned(end)
        end = at + n
        if ndim > MAX_NDIM or code >= len(DTYPE_CODE) or end > len(buf):
            raise ValueError(f"tensor {i} of a set is corrupt")
        shape = tuple(dims[:ndim])
        if code == _BYTES:
            arr = bytes_tensor.unpack(buf[at:end], math.prod(shape)).reshape(shape)
        else:
            dtype = numpy_dtype(code)
            if dtype.itemsize * math.prod(shape) != n:
                raise ValueError(f"tensor {i} of a set is corrupt: its shape and size differ")
            arr = np.ndarray(shape, dtype, buffer=buf, offset=at)
            arr.flags.writeable = not read_only
        out.append(arr)
    return tuple(out)
