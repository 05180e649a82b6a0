"""A model with several outputs answers a tensor set: written by the worker
(``ipc/answer.py``), read by the frontend (``Dispatcher.collect``), each tensor whole and
in declared order, BYTES ones too; one too large for the slot, or a corrupt set, is an
error that says so, never a wrong answer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ringserve.frontend.dispatch import Completed, Dispatcher
from ringserve.ipc import tensor_set, wake
from ringserve.ipc.answer import write_output
from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import DTYPE_CODE_OF, Status


@pytest.fixture
def dispatcher(arena: Arena):
    fds = [wake.new_eventfd() for _ in range(3)]
    d = Dispatcher(arena, 0, fds[0], (fds[1], fds[2]))
    d.adopt_slots()
    yield d
    d.stop()
    for fd in fds:
        os.close(fd)


def submitted(d: Dispatcher, payload: np.ndarray) -> int:
    """A request's slot, claimed by a worker as the ring would have it."""
    slot = d.free.pop()
    d.arena.headers.write_request(
        slot,
        owner=0,
        owner_pid=1,
        model=0,
        kind=1,
        dtype_code=DTYPE_CODE_OF[payload.dtype],
        shape=payload.shape,
        nbytes=payload.nbytes,
        rows=payload.shape[0],
        deadline_ns=0,
        enqueued_ns=1,
        request_id=b"rid",
    )
    np.copyto(d.arena.data_array(slot, payload.dtype, payload.shape), payload)
    d.arena.headers.claim(slot, worker=0, worker_pid=1, attempts=1, now_ns=1)
    return slot


def copied(c: Completed) -> tuple[Status, object, str]:
    """What ``collect`` handed over, copied out of the slot it views."""
    out = c.output
    if isinstance(out, tuple):
        out = tuple(np.array(a) for a in out)
    return c.status, out, c.message


def test_several_outputs_come_back_whole_and_in_order(arena: Arena, dispatcher) -> None:
    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    totals = np.array([[3], [12]], dtype=np.int64)
    labels = np.array([["neg"], [b"pos\xff"]], dtype=object)  # str and raw bytes alike
    empty = np.zeros((2, 0), dtype=np.uint8)
    slot = submitted(dispatcher, np.ones((2, 3), np.float32))
    assert write_output(arena, slot, (scores, totals, labels, empty), 2, 7) is None
    r = arena.headers.read(slot)
    assert r.out_dtype == tensor_set.TENSOR_SET and r.out_shape == (4,)
    assert (r.batch_size, r.batch_id) == (2, 7)
    assert bytes(arena.data(slot)[:24]) == np.ones((2, 3), np.float32).tobytes()  # beside
    status, out, message = dispatcher.collect(slot, copied)
    assert status == Status.OK and message == ""
    got_scores, got_totals, got_labels, got_empty = out
    assert got_scores.dtype == np.float32 and got_scores.tolist() == scores.tolist()
    assert got_totals.dtype == np.int64 and got_totals.tolist() == [[3], [12]]
    assert got_labels.tolist() == [[b"neg"], [b"pos\xff"]]
    assert got_empty.shape == (2, 0)


def test_the_frontend_gets_read_only_views_of_the_slot(arena: Arena, dispatcher) -> None:
    slot = submitted(dispatcher, np.ones((1, 2), np.float32))
    outs = (np.array([[1.5, 2.5]], np.float32), np.array([[9]], np.int32))
    assert write_output(arena, slot, outs, 1, 1) is None

    def check(c: Completed) -> None:
        assert isinstance(c.output, tuple)
        for a in c.output:
            assert not a.flags.writeable
            assert np.shares_memory(a, np.frombuffer(arena.data(slot), np.uint8))

    dispatcher.collect(slot, check)


def test_outputs_too_large_together_are_refused_naming_the_setting(arena: Arena) -> None:
    """Each fits the 4 KiB slot, both together do not: the request fails with the size
    and the setting, and the slot is left unanswered for the caller to fail."""
    half = np.zeros(2048 - 64, np.uint8)[None]
    why = write_output(arena, 0, (half, half.copy()), 1, 1)
    assert why is not None
    assert why.startswith("answer (2 outputs) is 41") and why.endswith("(arena.slot_bytes)")
    assert arena.headers.read(0).status == 0


def test_an_output_that_cannot_travel_is_named(arena: Arena) -> None:
    ok = np.zeros((1, 2), np.float32)
    assert write_output(arena, 0, (ok, np.zeros((1, 1), np.complex64)), 1, 1) == (
        "output 1 has unsupported dtype complex64"
    )
    odd = np.array([[3]], dtype=object)
    assert write_output(arena, 0, (ok, odd), 1, 1) == (
        "output 1: a BYTES element must be bytes or str, not int"
    )


def test_a_corrupt_set_is_an_error_not_an_answer(arena: Arena, dispatcher) -> None:
    slot = submitted(dispatcher, np.ones((1, 2), np.float32))
    outs = (np.zeros((1, 2), np.float32), np.zeros((1, 1), np.int64))
    assert write_output(arena, slot, outs, 1, 1) is None
    at = 64  # beside the 8-byte input
    arena.data(slot)[at : at + 4] = (3).to_bytes(4, "little")  # the count says 3, not 2
    status, out, message = dispatcher.collect(slot, copied)
    assert status == Status.MODEL_ERROR and out is None
    assert message == "corrupt answer: a tensor set of 2 tensors does not say so"


def test_unpack_refuses_sizes_that_disagree() -> None:
    packed = tensor_set.Packed((np.zeros((1, 4), np.float32), np.zeros((2,), np.uint8)))
    buf = memoryview(bytearray(packed.nbytes))
    packed.write(buf)
    assert [a.shape for a in tensor_set.unpack(buf, 2)] == [(1, 4), (2,)]
    with pytest.raises(ValueError, match="does not fit its payload"):
        tensor_set.unpack(buf[:100], 2)
    buf[16:24] = (15).to_bytes(8, "little")  # the first tensor's nbytes: 15, not 16
    with pytest.raises(ValueError, match="tensor 0 of a set is corrupt: its shape and size"):
        tensor_set.unpack(buf, 2)


@pytest.mark.parametrize("row_sizes", [[4000, 4000], [1, 1, 1], [12, 0], [64_000, 4]])
def test_rows_that_fit_is_the_most_rows_whose_set_fits(row_sizes: list[int]) -> None:
    """What v2's config advertises: a request of that many rows is answered, one more
    would not fit (the 413 perf_analyzer -b would meet)."""
    rows = tensor_set.rows_that_fit(64_000, row_sizes)

    def size(n: int) -> int:
        return tensor_set.Packed([np.zeros(n * k, np.uint8) for k in row_sizes]).nbytes

    assert rows == 0 or size(rows) <= 64_000
    assert size(rows + 1) > 64_000
