"""A worker's host heap keeps what a batch frees for the next batch (fixed glibc malloc
thresholds, ``WORKER_MALLOC``), and gives back what loading its model freed
(``release_free_heap``). Counted in page faults and RSS, never in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_e2e_core import HANDLER_ENV

from ringserve.ipc.child import ChildSpec
from ringserve.supervisor.children import child_environment

pytestmark = pytest.mark.skipif(os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc")

# What a forward does to the heap: two large activations live at once, freed, and a
# small block kept; page faults per round, after three rounds of warm-up.
FAULTS_PER_BATCH = """
import resource, numpy as np
def batch():
    a = np.ones(30 << 18, np.float32); b = np.ones(30 << 18, np.float32)
    kept = np.ones(1 << 16, np.float32)
    del a, b
    return kept
for _ in range(3): batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20): batch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def _untuned() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
    }


def _faults_per_batch(env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_BATCH],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_worker_reuses_the_memory_a_batch_freed() -> None:
    worker_env = child_environment(ChildSpec("worker", 0, 0, "/dev/shm/x", "{}", 1), _untuned())
    # glibc's own thresholds give the 60 MB back and fault it in again (thousands of
    # pages); the worker's keep it.
    assert _faults_per_batch(_untuned()) > 500
    assert _faults_per_batch(worker_env) < 50


RELEASE = """
import numpy as np, psutil
from ringserve.gpu_worker.host_heap import release_free_heap
rss = lambda: psutil.Process().memory_info().rss >> 20
scratch = np.ones(300 << 18, np.float32)  # 300 MB, every page touched
del scratch
kept = rss()
released = release_free_heap()
print(kept, rss(), released)
"""


def test_what_loading_freed_goes_back_to_the_kernel() -> None:
    env = child_environment(ChildSpec("worker", 0, 0, "/dev/shm/x", "{}", 1), _untuned())
    out = subprocess.run(
        [sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kept, after, released = out.stdout.split()
    assert int(kept) - int(after) > 250, out.stdout  # held by the heap, then given back
    assert released == "True"


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
