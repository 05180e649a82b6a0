"""No busy waiting, on a worker's two waits: between batches (its epoll set) and while
a batch fills (``select``, to the microsecond). Each must sleep in the kernel until a
push signals the model's eventfd or the timeout passes. The idle server test sees a
poll loop between batches as wake-ups; a fill wait happens only under load, where a
spin of a few milliseconds a batch hides in the worker's busy share, so it is checked
here in-process, by the CPU a wait with nothing to wake it takes."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

from ringserve.gpu_worker.process import Worker
from ringserve.ipc import wake

WAIT_S = 0.3


@pytest.fixture
def worker():
    """The state ``Worker._wait_for_work`` reads, with real fds."""
    efd, interrupt = wake.new_eventfd(), wake.signal_wakeup_pipe()
    stub = SimpleNamespace(
        model_efd=efd, interrupt_fd=interrupt, _idle_wait=wake.Sleeper(efd, interrupt)
    )
    yield stub
    stub._idle_wait.close()
    for fd in (efd, interrupt):
        os.close(fd)


@pytest.mark.parametrize("between_batches", [True, False], ids=["idle", "fill"])
def test_a_wait_with_nothing_to_wake_it_sleeps(worker, between_batches: bool) -> None:
    cpu = time.thread_time()
    Worker._wait_for_work(worker, WAIT_S, between_batches)  # type: ignore[arg-type]
    used = time.thread_time() - cpu
    # Sleeping, a wait costs microseconds of CPU; a poll loop, its whole length.
    assert used < WAIT_S / 5, f"{used * 1000:.0f} ms of CPU in a {WAIT_S * 1000:.0f} ms wait"


@pytest.mark.parametrize("between_batches", [True, False], ids=["idle", "fill"])
def test_a_push_ends_the_wait_and_is_drained(worker, between_batches: bool) -> None:
    threading.Timer(0.05, wake.signal, (worker.model_efd,)).start()
    Worker._wait_for_work(worker, 30.0, between_batches)  # type: ignore[arg-type]
    assert wake.drain(worker.model_efd) == 0, "the wake-up was left for the next wait"
