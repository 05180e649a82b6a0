"""Turn request data into a validated numpy array for a model's declared input.

Everything here runs before shared memory is touched, so a bad request costs nothing
else. Rule for non-finite floats: NaN and ±Inf are refused (422) for float inputs,
because one NaN row can poison the whole batch's numerics in some models (batch norm in
train mode, softmax over a padded batch) and no real client means to send one.
"""

from __future__ import annotations

import functools
from itertools import chain
from typing import Any

import numpy as np

from ringserve.frontend.errors import HTTPError, unprocessable
from ringserve.ipc import bytes_tensor
from ringserve.ipc.tensor_set import PackedBytes

MAX_JSON_DEPTH = 16


def _depth_ok(data: Any, limit: int) -> bool:
    depth, level = 0, [data]
    while level:
        depth += 1
        if depth > limit:
            return False
        level = [x for item in level if isinstance(item, list) for x in item if isinstance(x, list)]
    return True


# What numpy's own message ("setting an array element with a sequence. The requested
# array has an inhomogeneous shape after 1 dimensions...") says, in the client's terms.
RAGGED = (
    '"data" is not a rectangular array: its lists differ in length, or it mixes lists '
    "and single values at one level"
)


def _too_deep() -> HTTPError:
    return unprocessable(f'"data" is nested deeper than {MAX_JSON_DEPTH} levels')


def from_json(data: Any, dtype: str, body: bytes | memoryview | None = None) -> np.ndarray:
    """Nested JSON lists → array of ``dtype`` (422 for ragged, non-numeric or too deep).
    ``body``, the JSON text ``data`` came from, lets the boolean check skip its scan."""
    if dtype == "bytes":
        return strings_from_json(data)
    if not isinstance(data, list | int | float | bool):
        raise unprocessable('"data" must be a number or a (nested) list of numbers')
    # numpy itself stops at 64 dimensions (a ValueError, in microseconds), so the depth
    # is measured only when the array is deep or was refused: not on every request.
    try:
        raw = np.array(data)
    except ValueError:
        if not _depth_ok(data, MAX_JSON_DEPTH):
            raise _too_deep() from None
        raise unprocessable(RAGGED) from None
    if raw.ndim > MAX_JSON_DEPTH:
        raise _too_deep()
    if wanted := json_kind_wanted(raw, dtype, data, body):
        raise unprocessable(f'"data" must hold {wanted} for dtype {dtype}')
    return cast(exact_integers(raw, data, dtype), dtype)


def json_kind_wanted(
    raw: np.ndarray, dtype: str, data: Any, body: bytes | memoryview | None = None
) -> str | None:
    """What JSON ``data`` must hold for an input of ``dtype`` ("booleans" for BOOL,
    "numbers" for the rest) when ``raw`` (numpy's reading of it) holds something else;
    None when it fits. Both routes' rule.

    numpy reads a boolean among numbers as 0 or 1, so ``data`` is scanned for one only
    when ``raw`` has a 0 or a 1 and ``body`` (the JSON text, when given) has a literal:
    a float image pays one vectorised comparison, not a scan."""
    if dtype == "bool":
        return None if raw.dtype.kind == "b" else "booleans"
    if raw.dtype.kind not in "iuf":
        return "numbers"
    # Cheaper test first: searching a small body (0.8 µs for 16 floats) beats the
    # comparison (2.8 µs); on a large one the search costs ~1 ms per MB.
    search_first = body is not None and len(body) <= 4096
    if search_first and not _has_literal(body):
        return None
    if not ((raw == 0) | (raw == 1)).any():
        return None
    if body is not None and not search_first and not _has_literal(body):
        return None
    return "numbers, not booleans" if bool in set(map(type, _leaves(data, raw.ndim))) else None


def _leaves(data: Any, ndim: int) -> Any:
    """The values of ``data``, a rectangular nesting ``ndim`` deep, in order."""
    flat = [data] if ndim == 0 else data
    for _ in range(ndim - 1):
        flat = chain.from_iterable(flat)
    return flat


def _has_literal(body: bytes | memoryview | None) -> bool:
    if body is None:
        return True  # no text to rule one out
    text = body if isinstance(body, bytes) else bytes(body)  # (`in` on a view: items)
    return b"true" in text or b"false" in text


_EXACT_IN_FLOAT = 2.0**53  # float64 holds every integer up to here, and not all past it
# orjson reads an integer literal below -2**63 (or above 2**64 - 1) as a float, rounded:
# -2**63 - 1 arrives as the float -2**63, which int64 holds. So a float this low is refused.
_INT64_MIN_AS_FLOAT = -(2.0**63)


def exact_integers(raw: np.ndarray, data: Any, dtype: str) -> np.ndarray:
    """``raw`` for an integer ``dtype``, with the values exactly as sent: numpy reads a
    list mixing an integer past 2**63 (or a float) with others as float64, which rounds
    every value past 2**53; such data is read again straight into ``dtype`` (422 when a
    value does not fit). Anything else is returned as it is, for ``cast`` to judge."""
    target = _dtype(dtype)
    if raw.dtype.kind != "f" or target.kind not in "iu" or not raw.size:
        return raw
    largest = float(_max_of(np.abs(raw), axis=None))
    if not _EXACT_IN_FLOAT <= largest < np.inf or not np.all(raw == np.round(raw)):
        return raw
    if float(raw.min()) <= _INT64_MIN_AS_FLOAT and any(
        type(x) is float and x <= _INT64_MIN_AS_FLOAT for x in _leaves(data, raw.ndim)
    ):
        raise unprocessable(f"input values out of range for {dtype}: a value below -2**63")
    try:
        return np.array(data, dtype=target)
    except OverflowError:
        raise unprocessable(f"input values out of range for {dtype}") from None


def strings_from_json(data: Any) -> np.ndarray:
    """Nested JSON lists of strings → object array of their UTF-8 bytes, for a model with
    a BYTES input (422 for ragged, non-string or too deep)."""
    if not isinstance(data, list | str):
        raise unprocessable('"data" must be a string or a (nested) list of strings')
    if not _depth_ok(data, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        arr = np.array(data, dtype=object)  # ragged lists mostly stay lists: refused below
    except ValueError:
        raise unprocessable(RAGGED) from None
    flat = arr.ravel().tolist()
    if not all(isinstance(x, str) for x in flat):
        raise unprocessable('"data" must hold strings in a rectangular array (a BYTES input)')
    out = np.empty(arr.shape, dtype=object)
    try:
        out.ravel()[:] = [x.encode() for x in flat]
    except UnicodeEncodeError:
        raise unprocessable('"data" holds a string that is not valid Unicode') from None
    return out


@functools.cache
def _float_max(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).max)


_dtype = functools.cache(np.dtype)
_max_of = np.maximum.reduce  # ``ndarray.max`` without its Python-level wrapper


def cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the model's dtype, refusing values it cannot hold."""
    target = _dtype(dtype)
    # The common case (JSON floats for a float model) in one reduction: NaN fails the
    # comparison, Inf and values the target cannot hold exceed its max.
    if (arr.dtype.kind == "f" and target.kind == "f" and arr.size) and float(
        _max_of(np.abs(arr), axis=None)
    ) <= _float_max(target):
        return np.ascontiguousarray(arr, dtype=target)
    if (arr.dtype.kind == "f" and target.kind in "iub") and (
        not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
    ):
        raise unprocessable(f"input must hold integers for dtype {dtype}")
    if target.kind == "f" and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise unprocessable("input holds NaN or Inf, which ringserve refuses")
    if arr.size and target.kind in "iuf" and arr.dtype.kind in "iuf" and arr.dtype != target:
        # Compared as Python numbers, exactly: a value the target cannot hold would wrap
        # (integers) or become Inf (floats, e.g. 1e39 as float32) in the cast below.
        if target.kind == "f":
            lo, hi = -float(np.finfo(target).max), float(np.finfo(target).max)
            low, high = float(arr.min()), float(arr.max())
        else:
            info = np.iinfo(target)
            lo, hi, low, high = info.min, info.max, int(arr.min()), int(arr.max())
        if low < lo or high > hi:
            raise unprocessable(f"input values out of range for {dtype}")
    return np.ascontiguousarray(arr, dtype=target)


def _matches(shape: tuple[int, ...], spec_shape: list[int]) -> bool:
    """``-1`` in the spec matches any size >= 1."""
    if len(shape) != len(spec_shape):
        return False
    for got, want in zip(shape, spec_shape, strict=True):
        if (got < 1) if want < 0 else (got != want):
            return False
    return True


def fit_shape(
    arr: np.ndarray, spec_shape: list[int], max_rows: int
) -> tuple[np.ndarray, int, bool]:
    """Match an array to the per-row shape; returns (array with batch dim, rows, batched).

    Accepts one row (``spec_shape``) or a batch (``[rows, *spec_shape]``); ``-1`` in the
    spec matches any size >= 1.
    """
    if _matches(arr.shape, spec_shape):
        return arr.reshape(1, *arr.shape), 1, False
    if arr.ndim == len(spec_shape) + 1 and _matches(arr.shape[1:], spec_shape):
        rows = arr.shape[0]
        if rows < 1:
            raise unprocessable("a batch needs at least one row")
        if rows > max_rows:
            raise HTTPError(422, f"batch of {rows} rows exceeds max_batch_size {max_rows}")
        return arr, rows, True
    dims = ", ".join("N" if d < 0 else str(d) for d in spec_shape)
    batch = f"[rows, {dims}]" if dims else "[rows]"
    raise unprocessable(
        f"input shape {list(arr.shape)} does not match the model's: one row [{dims}] "
        f"or a batch {batch}"
    )


def several_from_json(
    data: Any, specs: list[dict[str, Any]], max_rows: int, body: bytes | memoryview | None = None
) -> tuple[tuple[np.ndarray | PackedBytes, ...], int, bool]:
    """The /predict ``data`` of a model with several inputs: an object with each input by
    name, each read and fitted as a lone input is. Returns them in declared order (a
    BYTES one length-prefixed), with the rows and whether they came as a batch, which
    every input must agree on."""
    names = [str(s["name"]) for s in specs]
    if not isinstance(data, dict) or set(data) != set(names):
        got = f"keys {', '.join(sorted(map(str, data)))}" if isinstance(data, dict) else "no object"
        raise unprocessable(
            f'"data" must be an object with the model\'s inputs {", ".join(names)} ({got})'
        )
    parts: list[np.ndarray | PackedBytes] = []
    fits: dict[str, tuple[int, bool]] = {}
    for spec, name in zip(specs, names, strict=True):
        try:
            arr = from_json(data[name], str(spec["dtype"]), body)
            arr, rows, batched = fit_shape(arr, list(spec["shape"]), max_rows)
        except HTTPError as e:
            raise HTTPError(e.status, f"input {name}: {e.message}") from None
        fits[name] = (rows, batched)
        parts.append(
            PackedBytes(arr.shape, bytes_tensor.packed(arr)) if arr.dtype.hasobject else arr
        )
    if len(set(fits.values())) > 1:
        said = ", ".join(
            f"{n}: {r} row{'s' * (r != 1)}{'' if b else ' (one row)'}" for n, (r, b) in fits.items()
        )
        raise unprocessable(f"the inputs disagree on their rows ({said})")
    rows, batched = fits[names[0]]
    return tuple(parts), rows, batched
