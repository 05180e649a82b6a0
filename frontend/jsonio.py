"""JSON in and out of the request path, with orjson (several times faster than the
standard library on number arrays, and it serialises numpy arrays directly)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import orjson

from ringserve.frontend.errors import HTTPError, bad_request

# Content types whose body is read as JSON: none at all, curl -d's default form type, and
# text/plain, which a browser's or Node's fetch sends with a string body (Triton reads
# every body by its shape, whatever the header says).
JSON_BODY_TYPES = ("", "application/json", "application/x-www-form-urlencoded", "text/plain")


def parse_json(body: bytes | memoryview) -> Any:
    """orjson, falling back to the standard parser for what orjson refuses (NaN and
    Infinity literals, numbers beyond a double, deep nesting), so those get the precise
    error the validators give rather than "malformed"."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    raw = bytes(body)
    try:
        # Decoded strictly here: json.loads of bytes passes surrogates (UTF-8 "ED A0 80")
        # and takes UTF-16, and a str holding a surrogate failed later as a 500.
        doc = json.loads(raw.decode("utf-8-sig"))  # a BOM, as json.loads took it
    except RecursionError:  # nesting deeper than the interpreter's stack allows
        raise bad_request("malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise bad_request(f"malformed JSON: the body is not UTF-8 ({e.reason})") from None
    except ValueError as e:
        raise bad_request(f"malformed JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(raw) and not _is_text(doc):
        # The standard parser takes "\ud800" as a str that no encoder takes back: it
        # failed later, as a 500 (after inference, for a v2 id), not as the client's 400.
        raise bad_request(
            "malformed JSON: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        )
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _is_text(doc: Any) -> bool:
    """Every string in ``doc`` encodes to UTF-8."""
    try:
        json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _fallback(obj: Any) -> Any:
    """What orjson does not serialise itself: non-contiguous or odd-dtype arrays, numpy
    scalars."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dump_json(doc: Any) -> bytes:
    return orjson.dumps(doc, default=_fallback, option=orjson.OPT_SERIALIZE_NUMPY)


def nonfinite(arr: np.ndarray) -> bool:
    """Float data holding NaN or Inf: JSON cannot carry it (orjson would write null, a
    confident-looking answer). A v2 input taken from binary data (as Triton takes it)
    holding some runs alone."""
    return arr.dtype.kind == "f" and not np.isfinite(arr).all()


def utf8_strings(arr: np.ndarray) -> np.ndarray:
    """A BYTES output (object array of bytes) as str in the same shape, for a JSON answer
    (orjson takes no bytes); a 500 saying so when they are not UTF-8."""
    try:
        strings = [b.decode() for b in arr.ravel().tolist()]
    except UnicodeDecodeError:
        raise HTTPError(
            500, "the BYTES output is not UTF-8, which JSON cannot carry: ask for binary_data"
        ) from None
    out = np.empty(arr.shape, dtype=object)
    out.ravel()[:] = strings
    return out
