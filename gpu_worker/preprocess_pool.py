"""A batch's images preprocessed on several threads, started while the batch fills.

A worker decoded a batch's images one after another on its own thread: where the
forward is short (a GPU host, a small model) that serial decoding bounds the images per
second. Here each image request's preprocess is a task on the model's ``threads``
threads, each running torch with one thread of its own (two threads of two torch
threads each measured no faster than serial: they fought over the cores), and a
request's task starts as soon as the worker begins to wait for company for it, so its
decoding overlaps the wait. The default digits model with 640x480 JPEGs at concurrency 8
on the 2-core VM: +33 % requests/s. resnet50 there: no change, as the frontends and the
load generator take the other core while its images are prepared (docs/benchmarks.md).

Only for a handler that declares ``preprocess_thread_safe`` (ringserve's image handlers
do); any other preprocess runs on the worker's thread, one request at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from ringserve.gpu_worker.handlers.base import Handler
from ringserve.ipc.slot_io import Header

START_TIMEOUT_S = 30.0


def preprocess_threads(handler_type: type[Handler], threads: int) -> int:
    """``threads`` if the class that defines the handler's ``preprocess`` declares it
    thread-safe, else 1: a subclass overriding a safe ``preprocess`` has not said so."""
    owner = next(c for c in handler_type.__mro__ if "preprocess" in vars(c))
    return threads if vars(owner).get("preprocess_thread_safe", False) else 1


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # this thread's OpenMP count, and ATen's default (below)
    # ATen sets a thread's count from its default at the thread's first torch call that
    # asks (this one): were that after the caller restores its own, this thread got it.
    torch.get_num_threads()


class PreprocessPool:
    """Runs ``preprocess(slot, header)`` for requests, on ``threads`` threads once
    started, else on the caller's thread when its result is asked for."""

    def __init__(self, threads: int, preprocess: Callable[[int, Header], torch.Tensor]) -> None:
        self._preprocess = preprocess
        self._started: dict[int, Future[torch.Tensor]] = {}
        self._pool: ThreadPoolExecutor | None = None
        if threads > 1:
            self._pool = ThreadPoolExecutor(threads, "preprocess", initializer=_one_torch_thread)
            _start_every_thread(self._pool, threads)

    @property
    def threaded(self) -> bool:
        return self._pool is not None

    def start(self, requests: Iterable[tuple[int, Header]]) -> None:
        """Begin the requests not yet begun (none without threads)."""
        if self._pool is None:
            return
        for slot, header in requests:
            if slot not in self._started:
                self._started[slot] = self._pool.submit(self._run, slot, header)

    def result(self, slot: int, header: Header) -> torch.Tensor:
        """The request's tensor, or what its preprocess raised. A request not begun (or
        not yet picked up by a thread) runs here, now."""
        future = self._started.pop(slot, None)
        if future is None or future.cancel():
            return self._preprocess(slot, header)
        return future.result()

    def keep_only(self, slots: Container[int]) -> None:
        """Cancel, or wait for, every begun request but ``slots`` (those the batch runs):
        the others are answered without running (expired, cancelled), and a task must
        not read a slot once its answer is written there, nor be found by the slot's
        next request."""
        for slot in [s for s in self._started if s not in slots]:
            future = self._started.pop(slot)
            if not future.cancel():
                wait([future])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, slot: int, header: Header) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: the worker thread's does not reach here
            return self._preprocess(slot, header)


def _start_every_thread(pool: ThreadPoolExecutor, threads: int) -> None:
    """Every thread now, not at the first image: a thread's ``set_num_threads(1)`` also
    becomes ATen's default for any thread that has not run a parallel op yet, so the
    caller's count is set again once they all have."""
    own = torch.get_num_threads()
    everyone = threading.Barrier(threads + 1, timeout=START_TIMEOUT_S)
    for _ in range(threads):
        pool.submit(everyone.wait)  # each blocks a thread: a new one per submit
    everyone.wait()
    torch.set_num_threads(own)
