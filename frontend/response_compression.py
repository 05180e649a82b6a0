"""Compressed infer responses, when the client asks (``Accept-Encoding``), as Triton
answers tritonclient's ``response_compression_algorithm``.

The whole body is compressed, binary tensors included; the client inflates it first,
so ``Inference-Header-Content-Length`` counts the JSON header as it was before. Level 1:
a tensor of floats hardly compresses at any level, and the event loop pays for each
byte, so the fastest level gives most of what there is to gain.
"""

from __future__ import annotations

import zlib

CODINGS = ("gzip", "deflate")  # ours, in the order preferred at equal weight
LEVEL = 1
MIN_BYTES = 1024  # below this the header and trailer eat most of any gain


def negotiate(accept: str | None, size: int) -> str | None:
    """The coding to answer a body of ``size`` bytes with, for an ``Accept-Encoding``
    header (RFC 9110 12.5.3): the one of ours with the highest weight above 0, gzip on a
    tie; ``*`` stands for any not named. None: send the body as it is (also when it is
    under ``MIN_BYTES``)."""
    if not accept or size < MIN_BYTES:
        return None
    weights: dict[str, float] = {}
    for item in accept.split(","):
        name, _, params = item.partition(";")
        name, q = name.strip().lower(), 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # a weight that cannot be read is no consent
        if name:
            weights[name] = q
    star = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in CODINGS:
        q = weights.get(coding, star)
        if q > best_q:
            best, best_q = coding, q
    return best


def compress(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding``: gzip, or deflate as HTTP means it (zlib-wrapped)."""
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, wbits)
    return c.compress(body) + c.flush()
