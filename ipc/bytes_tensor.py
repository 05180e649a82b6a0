"""BYTES tensors in a slot: Triton's length-prefixed form, shared by the frontend's v2
codec (which reads it off the wire) and the worker (which hands the elements to the
handler).

Each element is a 4-byte little-endian length and then that many bytes, row-major, no
padding: the form ``binary_data`` already uses, so a binary request's bytes go into the
slot as they came (``check``ed, not unpacked and packed again). The element count comes from the shape in the slot header.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

_LEN = struct.Struct("<I")


def pack(items: np.ndarray | list[Any]) -> bytes:
    """BYTES elements (bytes or str, any shape, row-major) → length-prefixed binary;
    TypeError naming the first element that is neither (``bytes(5)`` would be five
    zero bytes, not an error), or a str that UTF-8 cannot hold."""
    flat = np.asarray(items, dtype=object).ravel()
    parts = []
    for item in flat:
        if isinstance(item, str):
            try:
                b = item.encode()
            except UnicodeEncodeError as e:  # (a str decoded with surrogateescape)
                raise TypeError(f"a BYTES element is a str that is not UTF-8: {e}") from None
        elif isinstance(item, bytes | bytearray | memoryview):
            b = bytes(item)
        else:
            raise TypeError(f"a BYTES element must be bytes or str, not {type(item).__name__}")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _spans(buf: bytes | memoryview | np.ndarray, count: int | None) -> tuple[memoryview, list]:
    """Walk the length prefixes: (a byte view, each element's (start, end)); ValueError,
    saying where, if the framing is broken or (given ``count``) the number is not it."""
    view = memoryview(buf).cast("B")
    spans: list[tuple[int, int]] = []
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 4:
            raise ValueError(f"BYTES data is truncated: {end - pos} bytes left for a length")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if n > end - pos:
            raise ValueError(f"BYTES element of {n} bytes runs past the end of its data")
        spans.append((pos, pos + n))
        pos += n
        if count is not None and len(spans) > count:
            raise ValueError(f"BYTES data holds more than the {count} elements of its shape")
    if count is not None and len(spans) != count:
        raise ValueError(f"BYTES data holds {len(spans)} elements; its shape needs {count}")
    return view, spans


def check(buf: bytes | memoryview | np.ndarray, count: int) -> None:
    """Validate length-prefixed binary without building its elements (the frontend
    passes a valid binary request's bytes on as they came)."""
    _spans(buf, count)


def elements(buf: bytes | memoryview | np.ndarray, count: int | None = None) -> list[memoryview]:
    """Length-prefixed binary → each element as a view of ``buf`` (no copy: for readers
    done with them before ``buf`` changes); ValueError as ``unpack``."""
    view, spans = _spans(buf, count)
    return [view[a:b] for a, b in spans]


def unpack(buf: bytes | memoryview | np.ndarray, count: int | None = None) -> np.ndarray:
    """Length-prefixed binary → 1-D object array of ``bytes``; ValueError, saying where,
    if it is malformed or (given ``count``) holds another number of elements."""
    items = elements(buf, count)
    arr = np.empty(len(items), dtype=object)
    arr[:] = [bytes(v) for v in items]
    return arr


def packed(items: np.ndarray | list[Any]) -> np.ndarray:
    """``pack`` as a uint8 array, the form a slot payload is submitted in."""
    return np.frombuffer(pack(items), dtype=np.uint8)
