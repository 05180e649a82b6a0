"""The worker's host heap: what loading the model freed goes back to the kernel, once.

A worker runs with fixed glibc malloc thresholds (``WORKER_MALLOC`` in
``supervisor/children.py``) so that the memory a batch frees stays in the heap for the
next batch instead of coming back as fresh, zeroed pages (thousands of page faults per
image on a CPU). Kept, too, would be what loading the model freed (a checkpoint read
into memory, weights before they moved to the GPU): up to the model's size again, held
for the worker's life. ``release_free_heap`` hands that back before the worker serves.
"""

from __future__ import annotations

import ctypes


def release_free_heap() -> bool:
    """``malloc_trim(0)``: every free page of every malloc arena back to the kernel.
    Returns whether memory was released; False without glibc (nothing to do there)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))
