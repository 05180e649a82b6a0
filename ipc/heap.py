"""glibc malloc's thresholds, fixed for each process role.

glibc returns a freed block over its mmap threshold to the kernel and trims a free heap
top over its trim threshold, and it moves both with whatever was last freed, so what a
process keeps depends on its history. Each role fixes them for its own job:

- ``FRONTEND`` gives every block of 128 KiB or more back when freed. With the moving
  threshold, one 2 MB JSON body left a frontend 15 MB larger for good
  (``tests/test_faults_hostile.py``).
- ``WORKER`` keeps what a batch frees for the next batch. With the moving thresholds,
  a forward's large activations (resnet50 at batch 8: blocks of 25 MB) went back to the
  kernel and came back as fresh, zeroed pages on most batches: 3,000-5,000 page faults
  per image, 8-13 % of the raw batch-8 loop's time on the 2-core VM, or none on a lucky
  heap (docs/benchmarks.md). Fixed, the heap stays at the largest batch's working set,
  as a GPU's caching allocator keeps device memory. It would also keep what loading the
  model freed (a checkpoint read into memory, weights before they moved to the GPU), so
  a worker calls ``release_free_memory`` once it has loaded.

Where the operator set a threshold in the environment, glibc read it at start and it
stays.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
FRONTEND = {M_MMAP_THRESHOLD: 128 * 1024}
# Blocks up to 1 GiB come from the heap, and a free heap top is kept up to 2 GiB
# (mallopt takes an int): far past resnet50's activations at batch 32.
WORKER = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: (1 << 31) - 1}
_THRESHOLDS = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
_LIBC = ctypes.CDLL(None)  # the C library this process runs on (without glibc: no mallopt)


def set_by_operator(env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``env`` sets one of glibc malloc's thresholds: a ``MALLOC_*_`` variable,
    or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``."""
    tunables = env.get("GLIBC_TUNABLES", "")
    return any(
        f"glibc.malloc.{name}" in tunables or f"MALLOC_{name.upper()}_" in env
        for name in _THRESHOLDS
    )


def set_thresholds(values: Mapping[int, int]) -> bool:
    """``mallopt(param, value)`` for each item (fixing one turns glibc's moving ones off),
    unless the operator set thresholds or this is not glibc; True if all were set."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None or set_by_operator():
        return False
    return all(mallopt(param, value) == 1 for param, value in values.items())


def release_free_memory() -> bool:
    """``malloc_trim(0)``: every free page of every malloc arena back to the kernel;
    True if memory was released."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))
