"""A batch's images preprocessed on several threads, started while the batch fills.

A worker decoded a batch's images one after another on its own thread: on this
project's 2-core VM, resnet50 at concurrency 8 spent ~10 ms of each ~283 ms batch cycle
decoding eight JPEGs with the second core idle; on a GPU host, where the forward takes
a few ms, serial decoding bounds the images per second. Here each image request's
preprocess is a task on the model's ``threads`` threads, each running torch with one
thread of its own (two threads of two torch threads each measured no faster than
serial: they fought over the cores), and a request's task starts as soon as the worker
begins to wait for company for it, so its decoding overlaps the wait.

Only for a handler that declares ``preprocess_thread_safe`` (ringserve's image handlers
do); any other preprocess runs on the worker's thread, one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch


def _one_torch_thread() -> None:
    # OpenMP's thread count is per calling thread: this sets the pool thread's own (and
    # the default of threads created later), never the worker thread's, set at start.
    torch.set_num_threads(1)


class PreprocessPool:
    """Runs ``preprocess(key, arg)`` for requests (key: the slot; arg: its header), on
    ``threads`` threads once started, else on the caller's thread when asked for."""

    def __init__(self, threads: int, preprocess: Callable[[int, Any], torch.Tensor]) -> None:
        self._preprocess = preprocess
        self._pool = (
            ThreadPoolExecutor(threads, "preprocess", initializer=_one_torch_thread)
            if threads > 1
            else None
        )
        self._started: dict[int, Future[torch.Tensor]] = {}

    def start(self, requests: Iterable[tuple[int, Any]]) -> None:
        """Begin the requests not yet begun (none without threads)."""
        if self._pool is None:
            return
        for key, arg in requests:
            if key not in self._started:
                self._started[key] = self._pool.submit(self._run, key, arg)

    def result(self, key: int, arg: Any) -> torch.Tensor:
        """The request's tensor, or what its preprocess raised. A request not begun (or
        not yet picked up by a thread) runs here, now."""
        future = self._started.pop(key, None)
        if future is None or future.cancel():
            return self._preprocess(key, arg)
        return future.result()

    def forget(self, key: int) -> None:
        """Before a request is answered without running it: its task must not read the
        slot after that (the answer is written there), so it is cancelled or waited for."""
        future = self._started.pop(key, None)
        if future is not None and not future.cancel():
            wait([future])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, key: int, arg: Any) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: the worker thread's does not reach here
            return self._preprocess(key, arg)
