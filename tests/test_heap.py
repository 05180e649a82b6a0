"""glibc malloc's thresholds per process role (``ipc/heap.py``): a worker keeps what a
batch frees for the next batch, gives back what its model load freed, and an operator's
own thresholds stay. Counted in page faults and RSS, never in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_e2e_core import HANDLER_ENV

from ringserve.ipc import heap

pytestmark = pytest.mark.skipif(os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc")


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not heap.set_by_operator({k: v})}
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


# What a forward does to the heap: two large activations live at once, then freed, and a
# small block kept; page faults per round after three rounds of warm-up.
FAULTS_PER_BATCH = """
import resource, sys, numpy as np
from ringserve.ipc import heap
fixed = heap.set_thresholds(heap.WORKER) if sys.argv[1] == "worker" else None
def batch():
    a = np.ones(30 << 18, np.float32); b = np.ones(30 << 18, np.float32)
    kept = np.ones(1 << 16, np.float32)
    del a, b
    return kept
for _ in range(3): batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20): batch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20, fixed)
"""


def test_a_worker_heap_reuses_what_a_batch_freed() -> None:
    # glibc's moving thresholds hand the 60 MB back and fault it in again (thousands of
    # pages a batch); the worker's fixed ones keep it.
    assert int(_run(FAULTS_PER_BATCH, "glibc")[0]) > 500
    faults, fixed = _run(FAULTS_PER_BATCH, "worker")
    assert int(faults) < 50 and fixed == "True"


def test_the_operators_thresholds_stay() -> None:
    faults, fixed = _run(FAULTS_PER_BATCH, "worker", env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert fixed == "False" and int(faults) > 500  # theirs: trim at 128 KiB, as they asked


@pytest.mark.parametrize(
    ("env", "theirs"),
    [
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
        ({"MALLOC_TOP_PAD_": "0"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.mmap_threshold=65536"}, True),
        ({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),
        ({}, False),
    ],
)
def test_which_settings_are_the_operators_thresholds(env: dict[str, str], theirs: bool) -> None:
    assert heap.set_by_operator(env) is theirs


RELEASE = """
import sys, numpy as np, psutil
from ringserve.ipc import heap
rss = lambda: psutil.Process().memory_info().rss >> 20
role, mb = sys.argv[1], int(sys.argv[2])
fixed = role != "glibc" and heap.set_thresholds(getattr(heap, role))
# mb MB, every page touched, twice: glibc's own threshold (up to 32 MB) serves the
# first block from its own mmap and then rises to its size, so the second is the heap's.
for _ in range(2):
    scratch = np.ones(mb << 18, np.float32)
    del scratch
freed = rss()
print(freed, heap.release_free_memory(), rss())
"""


def test_a_worker_heap_keeps_a_big_block_until_released() -> None:
    kept, released, after = _run(RELEASE, "WORKER", "300")
    assert int(kept) - int(after) > 250 and released == "True"


def test_a_frontend_heap_gives_a_big_block_back_when_freed() -> None:
    freed, _, after = _run(RELEASE, "FRONTEND", "20")
    assert int(freed) - int(after) < 5  # nothing was left to release
    freed, _, after = _run(RELEASE, "glibc", "20")  # glibc's own threshold
    assert int(freed) - int(after) > 15  # the second block stayed until released


# A big block freed below a small one still in use (a parsed body's buffer, then a
# small object kept): the heap cannot trim it from its top, so only a block the
# threshold sent to its own mmap goes back.
PINNED = """
import ctypes, sys, psutil
from ringserve.ipc import heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss >> 20
role, mb = sys.argv[1], int(sys.argv[2])
role == "glibc" or heap.set_thresholds(getattr(heap, role))
kept = []
for _ in range(2):
    big = libc.malloc(mb << 20)
    ctypes.memset(big, 1, mb << 20)
    kept.append(libc.malloc(120 << 10))  # in use, above it (too big for a hole)
    held = rss()
    libc.free(big)
print(held, rss())
"""


def test_a_frontend_heap_gives_back_a_block_freed_under_one_in_use() -> None:
    """Every block of 128 KiB or more goes back when freed, wherever it lies in the
    heap: a threshold above a body's size keeps it for good below whatever was
    allocated after it."""
    held, after = _run(PINNED, "FRONTEND", "20")
    assert int(held) - int(after) > 15, (held, after)
    held, after = _run(PINNED, "glibc", "20")  # glibc's own threshold: kept
    assert int(held) - int(after) < 5, (held, after)


def test_a_workers_batches_reuse_their_memory(start_server) -> None:
    server = start_server(
        "--model", "m=python:support.fake_handlers:CountsPageFaults", env=HANDLER_ENV, frontends=1
    )
    with server.client() as c:
        faults = [
            c.post("/v1/models/m/predict", json={"data": [1.0]}).json()["result"][0]
            for _ in range(6)
        ]
    assert max(faults[2:]) < 50, faults  # glibc's own thresholds: thousands every batch


def test_a_worker_serves_without_the_memory_its_model_load_freed(start_server, tmp_path) -> None:
    rss_file = tmp_path / "rss"
    server = start_server(
        "--model",
        "m=python:support.fake_handlers:FreesMemoryAtLoad",
        *("--set", f"models.m.options.rss_file={rss_file}"),
        *("--set", "models.m.options.mb=400"),
        env=HANDLER_ENV,
        frontends=1,
    )
    (pid,) = server.pids("worker")
    grown = psutil.Process(pid).memory_info().rss - int(Path(rss_file).read_text())
    assert grown < 200 << 20, f"the worker holds {grown >> 20} MB more than before its load"
