"""What fits in one request slot, and how to say so when something does not.

Every request travels in one fixed-size slot of the arena (``arena.slot_bytes``): its
input, and then its output over it. An input or output too large for the slot can only
be fixed by raising that setting, so the refusals name it.
"""

from __future__ import annotations

import math

import numpy as np

SLOT_BYTES_KEY = "arena.slot_bytes"


def over_slot(what: str, nbytes: int, slot_bytes: int) -> str:
    """The refusal for ``what`` (e.g. "input") of ``nbytes`` that a slot cannot hold:
    the size, the limit and the setting that raises it, so the fix is in the message."""
    return f"{what} is {nbytes} bytes; a request slot holds {slot_bytes} ({SLOT_BYTES_KEY})"


def row_bytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of one row of per-row ``shape``; None when not known in advance (a dynamic
    dimension, -1, or a BYTES tensor)."""
    if dtype == "bytes" or any(d < 0 for d in shape):
        return None
    return np.dtype(dtype).itemsize * math.prod(shape)


def rows_per_request(slot_bytes: int, tensors: list[tuple[str, tuple[int, ...]]]) -> int | None:
    """The most rows one request can carry: its input, then its output over it, must fit
    one slot. None when no tensor's row size is known in advance."""
    sizes = [n for dtype, shape in tensors if (n := row_bytes(dtype, shape))]
    return min(slot_bytes // n for n in sizes) if sizes else None
