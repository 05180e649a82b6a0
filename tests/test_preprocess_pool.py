"""The worker's preprocess pool: side by side once begun, on the caller's thread when not,
errors to the caller, and nothing left reading a slot once a request is answered."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from ringserve.gpu_worker.handlers import BadInput, Handler
from ringserve.gpu_worker.preprocess_pool import PreprocessPool, preprocess_threads

WAIT_S = 10.0


@pytest.fixture
def pools() -> Iterator[list[PreprocessPool]]:
    made: list[PreprocessPool] = []
    yield made
    for pool in made:
        pool.close()


def test_begun_requests_preprocess_side_by_side(pools: list[PreprocessPool]) -> None:
    both_in = threading.Barrier(2, timeout=WAIT_S)  # broken unless two run at once

    def preprocess(key: int, arg: object) -> torch.Tensor:
        both_in.wait()
        return torch.tensor([key])

    pool = PreprocessPool(2, preprocess)
    pools.append(pool)
    pool.start([(1, None), (2, None)])
    assert [int(pool.result(k, None)) for k in (1, 2)] == [1, 2]


def test_one_thread_or_a_request_not_begun_runs_on_the_callers_thread(
    pools: list[PreprocessPool],
) -> None:
    ran_on: list[int] = []

    def preprocess(key: int, arg: object) -> torch.Tensor:
        ran_on.append(threading.get_ident())
        return torch.tensor([key])

    serial = PreprocessPool(1, preprocess)
    parallel = PreprocessPool(2, preprocess)
    pools += [serial, parallel]
    serial.start([(1, None)])  # nothing to begin it on
    assert int(serial.result(1, None)) == 1
    assert int(parallel.result(2, "its header")) == 2  # never begun
    assert ran_on == [threading.get_ident()] * 2


def test_what_preprocess_raises_reaches_the_caller(pools: list[PreprocessPool]) -> None:
    def preprocess(key: int, arg: object) -> torch.Tensor:
        raise BadInput(f"request {key}: could not decode image")

    pool = PreprocessPool(2, preprocess)
    pools.append(pool)
    pool.start([(7, None)])
    with pytest.raises(BadInput, match="request 7"):
        pool.result(7, None)


def test_keep_only_returns_once_nothing_reads_the_others_slots(pools: list[PreprocessPool]) -> None:
    """A request answered without running it (its deadline passed while the batch
    filled) has its answer written into its slot: a task still reading the slot must be
    done first, and one not yet begun must never begin."""
    entered, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def preprocess(key: int, arg: object) -> torch.Tensor:
        if key == 1:
            entered.set()
            release.wait(WAIT_S)
        finished.append(key)
        return torch.tensor([key])

    pool = PreprocessPool(2, preprocess)
    pools.append(pool)
    pool.start([(1, None)])
    assert entered.wait(WAIT_S)
    threading.Timer(0.05, release.set).start()
    pool.keep_only(())
    assert finished == [1]  # keep_only waited for the task reading slot 1

    gate = threading.Event()
    ran: list[int] = []

    def held(key: int, arg: object) -> torch.Tensor:
        ran.append(key)
        return torch.tensor([gate.wait(WAIT_S)])

    both_busy = PreprocessPool(2, held)
    pools.append(both_busy)
    both_busy.start([(1, None), (2, None), (3, None)])  # 3 waits for a thread
    both_busy.keep_only({1, 2})  # 3, not begun: cancelled, never to begin
    gate.set()
    assert bool(both_busy.result(1, None)) and bool(both_busy.result(2, None))
    both_busy.close()
    assert sorted(ran) == [1, 2]


def test_pool_threads_run_torch_single_threaded_in_inference_mode(
    pools: list[PreprocessPool],
) -> None:
    """Two pool threads each with the worker's torch threads fought over the cores (no
    faster than serial); each has one, and the worker's own count stays as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ran = threading.Event()

        def preprocess(key: int, arg: object) -> torch.Tensor:
            ran.set()  # on a pool thread: ``result`` below no longer runs it inline
            return torch.tensor([torch.get_num_threads(), torch.is_inference_mode_enabled()])

        pool = PreprocessPool(2, preprocess)
        pools.append(pool)
        pool.start([(1, None)])
        assert ran.wait(WAIT_S)
        assert pool.result(1, None).tolist() == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_started_later_keep_the_callers_torch_threads(
    pools: list[PreprocessPool],
) -> None:
    """A pool thread's ``set_num_threads(1)`` is also ATen's default for threads that
    have run no parallel op yet: the pool sets the caller's count again once its threads
    are up, or a thread the worker starts later would run its ops on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pools.append(PreprocessPool(2, lambda key, arg: torch.tensor([key])))
        seen: list[int] = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join(WAIT_S)
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


def test_keep_only_leaves_nothing_of_a_batch_behind(pools: list[PreprocessPool]) -> None:
    """A slot's next request must never be answered with the tensor of the one before
    (the header stands for the request here)."""
    pool = PreprocessPool(2, lambda slot, header: torch.tensor([header]))
    pools.append(pool)
    pool.start([(1, 100), (2, 200)])  # begun while a batch filled, then not run
    pool.keep_only(())
    assert int(pool.result(1, 300)) == 300  # slot 1's next request: its own


class _Safe(Handler):
    preprocess_thread_safe = True

    def load(self, device: torch.device) -> None: ...

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def preprocess(self, payload, kind):  # type: ignore[no-untyped-def]
        return super().preprocess(payload, kind)


class _Inherits(_Safe):
    pass


class _Overrides(_Safe):
    def preprocess(self, payload, kind):  # type: ignore[no-untyped-def]
        return super().preprocess(payload, kind)


class _OverridesAndSaysSo(_Overrides):
    preprocess_thread_safe = True

    def preprocess(self, payload, kind):  # type: ignore[no-untyped-def]
        return super().preprocess(payload, kind)


@pytest.mark.parametrize(
    ("handler_type", "threads"),
    [(Handler, 1), (_Safe, 4), (_Inherits, 4), (_Overrides, 1), (_OverridesAndSaysSo, 4)],
)
def test_only_a_preprocess_whose_own_class_says_so_runs_on_threads(
    handler_type: type[Handler], threads: int
) -> None:
    assert preprocess_threads(handler_type, 4) == threads


def test_close_cancels_what_has_not_begun_and_waits_for_what_runs() -> None:
    """A stopping worker closes its pool: a request no thread has picked up is never
    preprocessed, and close returns only once the running ones have finished (nothing
    reads a slot after the worker has let go of the arena)."""
    entered: list[int] = []
    finished: list[int] = []
    release = threading.Event()
    two_in = threading.Barrier(3, timeout=WAIT_S)

    def preprocess(key: int, arg: object) -> torch.Tensor:
        entered.append(key)
        if key in (1, 2):
            two_in.wait()
            release.wait(WAIT_S)
        finished.append(key)
        return torch.tensor([key])

    pool = PreprocessPool(2, preprocess)
    pool.start([(1, None), (2, None), (3, None), (4, None)])
    two_in.wait()  # both threads busy: 3 and 4 wait in the queue
    closer = threading.Thread(target=pool.close)
    closer.start()
    closer.join(0.2)
    still_closing = closer.is_alive()
    release.set()
    closer.join(WAIT_S)
    assert still_closing, "close returned while two requests were still being preprocessed"
    assert sorted(finished) == [1, 2]
    assert sorted(entered) == [1, 2], "a request not begun was preprocessed after close"
