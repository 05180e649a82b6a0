"""What fits in one request slot, and how to say so when something does not.

Every request travels in one fixed-size slot of the arena (``arena.slot_bytes``): its
input, and then its output, beside the input when both fit, else over it. An input or
output too large for the slot can only be fixed by raising that setting, so the refusals
name it.
"""

from __future__ import annotations

import math

import numpy as np

SLOT_BYTES_KEY = "arena.slot_bytes"


def over_slot(what: str, nbytes: int, slot_bytes: int) -> str:
    """The refusal for ``what`` (e.g. "input") of ``nbytes`` that a slot cannot hold:
    the size, the limit and the setting that raises it, so the fix is in the message."""
    return f"{what} is {nbytes} bytes; a request slot holds {slot_bytes} ({SLOT_BYTES_KEY})"


ANSWER_ALIGN = 64  # a cache line: an answer beside its input never shares the input's last line
_ALIGN_MASK = ANSWER_ALIGN - 1
assert ANSWER_ALIGN & _ALIGN_MASK == 0  # a power of two, for the mask


def answer_offset(in_nbytes: int, out_nbytes: int, slot_bytes: int) -> int:
    """Where a slot's answer starts in its payload: just past the input when both fit,
    else at 0, over the input.

    Beside the input, the input stays whole until ``state = DONE``: a worker that dies
    while writing the answer leaves a request that can run again. Over it, that worker
    leaves neither input nor answer, and the request fails (``STATUS_ANSWERING``). Writer
    and reader both derive the offset from the header's two sizes, so it needs no field.
    """
    beside = (in_nbytes + _ALIGN_MASK) & ~_ALIGN_MASK  # (align_up, without its call)
    return beside if beside + out_nbytes <= slot_bytes else 0


def row_bytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of one row of per-row ``shape``; None when not known in advance (a dynamic
    dimension, -1, or a BYTES tensor)."""
    if dtype == "bytes" or any(d < 0 for d in shape):
        return None
    return np.dtype(dtype).itemsize * math.prod(shape)


def rows_per_request(slot_bytes: int, tensors: list[tuple[str, tuple[int, ...]]]) -> int | None:
    """The most rows one request can carry: its input, and its output (over the input
    when not beside it), must fit one slot. None when no tensor's row size is known in advance."""
    sizes = [n for dtype, shape in tensors if (n := row_bytes(dtype, shape))]
    return min(slot_bytes // n for n in sizes) if sizes else None
