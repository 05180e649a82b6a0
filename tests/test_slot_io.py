"""The packed header access (ipc/slot_io.py) must agree byte for byte with the numpy
layout it is derived from: what one writes, the other reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support.answers import answer_bytes

from ringserve.frontend.app import hot_routes
from ringserve.frontend.call import AsgiEndpoint, new_request_id
from ringserve.ipc.answer import write_error, write_output
from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import (
    DONE,
    DTYPE_CODE,
    DTYPE_CODE_OF,
    MAX_NDIM,
    RUNNING,
    WRITING,
    Status,
)
from ringserve.ipc.slot_fit import answer_offset, over_slot, row_bytes
from ringserve.ipc.slot_io import Header, span


def test_write_request_is_what_numpy_reads(arena: Arena) -> None:
    rec = arena.slots[2]
    rec["generation"] = 41
    gen = arena.headers.write_request(
        2,
        owner=0,
        owner_pid=1234,
        model=1,
        kind=1,
        dtype_code=DTYPE_CODE["float32"],
        shape=(3, 5),
        nbytes=60,
        rows=3,
        deadline_ns=987654321,
        enqueued_ns=123456789,
        request_id=b"req-1",
    )
    assert gen == 42
    assert int(rec["state"]) == WRITING and int(rec["generation"]) == 42
    assert int(rec["owner_pid"]) == 1234 and int(rec["worker"]) == -1
    assert int(rec["model"]) == 1 and int(rec["kind"]) == 1
    assert int(rec["in_ndim"]) == 2 and list(rec["in_shape"][:3]) == [3, 5, 0]
    assert int(rec["in_nbytes"]) == 60 and int(rec["rows"]) == 3
    assert int(rec["deadline_ns"]) == 987654321 and int(rec["enqueued_ns"]) == 123456789
    assert bytes(rec["request_id"]) == b"req-1"
    h = arena.headers.read(2)
    assert (h.in_shape, h.in_ndim, h.rows, h.generation, h.attempts) == ((3, 5), 2, 3, 42, 0)
    assert (h.out_shape, h.out_nbytes, h.started_ns) == ((), 0, 0)  # cleared for reuse


def test_read_gives_every_header_field_as_numpy_reads_it(arena: Arena) -> None:
    """Each field of ``Header`` from distinct values written through numpy (so a field
    read from its neighbour's place shows), shapes cut to their rank; a corrupt rank
    over MAX_NDIM keeps the whole shape and nothing of the fields after it."""
    rec = arena.slots[3]
    fields = [n for n in Header._fields if n not in ("in_shape", "out_shape")]
    for i, name in enumerate(fields):
        rec[name] = 100 + i
    rec["in_ndim"], rec["out_ndim"] = 3, 2
    rec["in_shape"] = np.arange(1, MAX_NDIM + 1) * 11
    rec["out_shape"] = np.arange(1, MAX_NDIM + 1) * 13
    rec["worker"], rec["owner_pid"], rec["model"] = 7, 8, 1  # not in Header
    h = arena.headers.read(3)
    for name in fields:
        assert getattr(h, name) == int(rec[name]), name
    assert h.in_shape == (11, 22, 33) and h.out_shape == (13, 26)
    rec["in_ndim"], rec["out_ndim"] = MAX_NDIM + 1, 2**32 - 1
    h = arena.headers.read(3)
    assert h.in_shape == tuple(range(11, 11 * MAX_NDIM + 1, 11))
    assert h.out_shape == tuple(range(13, 13 * MAX_NDIM + 1, 13))
    assert (h.in_nbytes, h.out_dtype, h.out_nbytes) == tuple(
        int(rec[n]) for n in ("in_nbytes", "out_dtype", "out_nbytes")
    )


def write_float_row(arena: Arena, slot: int, width: int, request_id: bytes) -> None:
    """A request of one float32 row of ``width`` values into ``slot``."""
    arena.headers.write_request(
        slot,
        owner=0,
        owner_pid=1,
        model=0,
        kind=1,
        dtype_code=DTYPE_CODE_OF[np.dtype("float32")],
        shape=(width,),
        nbytes=4 * width,
        rows=1,
        deadline_ns=0,
        enqueued_ns=10,
        request_id=request_id,
    )


def test_claim_and_answer_round_trip(arena: Arena) -> None:
    write_float_row(arena, 1, 4, b"x")
    arena.headers.claim(1, worker=3, worker_pid=777, attempts=1, now_ns=20)
    rec = arena.slots[1]
    assert int(rec["state"]) == RUNNING and int(rec["worker"]) == 3
    assert int(rec["worker_pid"]) == 777 and int(rec["started_ns"]) == 20
    out = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert write_output(arena, 1, out, batch_size=5, batch_id=9) is None
    r = arena.headers.read(1)
    assert int(rec["state"]) == DONE and r.status == Status.OK
    assert r.out_shape == (2, 3) and r.out_nbytes == 48 and (r.batch_size, r.batch_id) == (5, 9)
    assert r.started_ns == 20 and r.enqueued_ns == 10 and r.finished_ns >= 20
    assert r.in_shape == (4,)  # the request's half is left as it was
    assert answer_bytes(arena, 1) == out.tobytes()


@pytest.mark.parametrize(
    ("in_nbytes", "out_nbytes", "at"),
    [(2000, 2048, 2048), (2000, 2049, 0), (2048, 2048, 2048), (0, 4096, 0), (1, 4032, 64)],
)
def test_an_answer_goes_beside_its_input_exactly_when_both_fit(
    arena: Arena, in_nbytes: int, out_nbytes: int, at: int
) -> None:
    """The worker (``write_output``, inline) and the frontend (``answer_offset``) must
    agree on where an answer lies, at the boundary too; beside, the input stays whole
    and the slot is never marked as losing it."""
    assert answer_offset(in_nbytes, out_nbytes, 4096) == at
    arena.slots["in_nbytes"][1] = in_nbytes
    arena.data(1)[:in_nbytes] = b"i" * in_nbytes
    marked = []
    real = arena.headers.begin_answer
    arena.headers.begin_answer = lambda slot: (marked.append(slot), real(slot))  # type: ignore[method-assign]
    assert write_output(arena, 1, np.full(out_nbytes, 7, np.uint8), 1, 1) is None
    assert bytes(arena.data(1)[at : at + out_nbytes]) == bytes([7] * out_nbytes)
    assert answer_bytes(arena, 1) == bytes([7] * out_nbytes)
    if at:
        assert bytes(arena.data(1)[:in_nbytes]) == b"i" * in_nbytes and marked == []
    else:
        assert marked == [1]


def test_answer_in_place_and_refusals(arena: Arena) -> None:
    view = arena.data_array(0, np.dtype("float32"), (1024,))  # 4 KiB: the whole slot
    with pytest.raises(ValueError, match="does not fit"):
        arena.data_array(0, np.dtype("float32"), (1025,))  # a view never reaches past it
    view[:] = 7.0
    assert arena.holds_in_place(0, view)
    assert arena.holds_in_place(0, view.reshape(2, 512).view(np.int32))  # same bytes
    assert not arena.holds_in_place(1, view)  # another slot's payload
    assert not arena.holds_in_place(0, view.copy())
    assert not arena.holds_in_place(0, view[1:])  # overlaps, shifted by one element
    assert not arena.holds_in_place(0, view.reshape(2, 512)[:, ::2])  # not contiguous
    assert write_output(arena, 0, view, 1, 1) is None  # the model answered in place
    assert (arena.data_array(0, np.dtype("float32"), (1024,)) == 7.0).all()
    other = np.arange(1024, dtype=np.float32)
    assert write_output(arena, 0, other, 1, 1) is None  # not in place: copied
    np.testing.assert_array_equal(arena.data_array(0, np.dtype("float32"), (1024,)), other)
    assert write_output(arena, 0, np.zeros(2048, np.float32), 1, 1) == (
        "output is 8192 bytes; a request slot holds 4096 (arena.slot_bytes)"
    )
    assert write_output(arena, 0, np.zeros((1,) * 9, np.float32), 1, 1) == (
        "output has 9 dimensions; a slot header holds at most 8"
    )
    assert "unsupported" in write_output(arena, 0, np.array(["a"]), 1, 1)
    write_error(arena, 3, Status.BAD_INPUT, b"no good")
    r = arena.headers.read(3)
    assert r.status == Status.BAD_INPUT and answer_bytes(arena, 3) == b"no good"


def test_bytes_output_packed_into_the_slot(arena: Arena) -> None:
    """An object array answers BYTES: packed length-prefixed, shape in the header; an
    element that is neither bytes nor str, or too much to fit, is refused by name."""
    out = np.array([["ab"], [b"\x00"]], dtype=object)
    assert write_output(arena, 2, out, 2, 7) is None
    r = arena.headers.read(2)
    assert (r.status, r.out_dtype, r.out_shape) == (Status.OK, DTYPE_CODE["bytes"], (2, 1))
    assert answer_bytes(arena, 2) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00\x00"
    bad = np.array([b"a", 5], dtype=object)
    assert write_output(arena, 2, bad, 1, 1) == "a BYTES element must be bytes or str, not int"
    big = np.array([b"x" * arena.geometry.slot_bytes], dtype=object)  # + 4 length bytes
    assert write_output(arena, 2, big, 1, 1) == (
        "BYTES output is 4100 bytes; a request slot holds 4096 (arena.slot_bytes)"
    )


def test_an_oversized_input_is_refused_naming_the_setting(arena: Arena) -> None:
    """The 413 a client gets for an input over the slot says what to raise; the slot
    stays free."""
    from ringserve.frontend.dispatch import Dispatcher
    from ringserve.ipc import wake

    fds = [wake.new_eventfd() for _ in range(3)]
    d = Dispatcher(arena, 0, fds[0], (fds[1], fds[2]))
    d.adopt_slots()
    free = len(d.free)
    with pytest.raises(ValueError) as refused:
        d.submit(0, np.zeros(4097, np.uint8), 1, 1, 0, "rid")
    assert str(refused.value) == (
        "input is 4097 bytes; a request slot holds 4096 (arena.slot_bytes)"
    )
    assert len(d.free) == free and not d.pending
    d.stop()
    for fd in fds:
        os.close(fd)


def test_over_slot_names_size_limit_and_key() -> None:
    assert over_slot("input", 1204224, 1048576) == (
        "input is 1204224 bytes; a request slot holds 1048576 (arena.slot_bytes)"
    )


@pytest.mark.parametrize(
    ("dtype", "shape", "size"),
    [
        ("float32", (3, 224, 224), 602112),  # one row in the 1 MiB default slot
        ("uint8", (28, 28), 784),
        ("float64", (), 8),  # a scalar row
        ("float32", (3, -1, -1), None),  # dynamic: unknown until a request comes
        ("bytes", (1,), None),  # BYTES elements have no fixed size
        ("float32", (0, 4), 0),  # an empty row
    ],
)
def test_row_bytes(dtype: str, shape: tuple[int, ...], size: int | None) -> None:
    assert row_bytes(dtype, shape) == size


def test_span_skips_padding_and_refuses_disorder() -> None:
    off, st = span("model", "in_shape")
    assert off == 40 and st.size == 120 - 40  # model, kind, in_dtype, in_ndim, in_shape
    with pytest.raises(ValueError):
        span("in_shape", "model")


def test_request_ids_are_uuid_shaped_and_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_hot_routes_spell_out_each_model() -> None:
    async def handler(call):  # pragma: no cover - never called here
        raise AssertionError

    from starlette.routing import Route

    routes = [
        Route("/predict", AsgiEndpoint(handler), methods=["POST"]),
        Route(
            "/v2/models/{name}/versions/{version}/infer", AsgiEndpoint(handler), methods=["POST"]
        ),
        Route("/health", lambda r: None),
    ]
    hot = hot_routes(object(), routes, ["a", "b"])  # type: ignore[arg-type]
    assert set(hot.routes) == {
        ("POST", "/predict"),
        ("POST", "/v2/models/a/versions/1/infer"),
        ("POST", "/v2/models/b/versions/1/infer"),
    }
    assert hot.routes[("POST", "/v2/models/b/versions/1/infer")][1] == {
        "name": "b",
        "version": "1",
    }


def test_a_slot_keeps_the_longest_request_id_the_frontends_take(arena: Arena) -> None:
    """256 characters reach the worker's and supervisor's log lines whole (the slot kept
    128 bytes, so their lines named an id no access log had); a longer UTF-8 one is cut
    on a character boundary, not into U+FFFD."""
    from ringserve.frontend.call import MAX_REQUEST_ID_CHARS

    def stored(rid: str) -> bytes:
        write_float_row(arena, 0, 1, rid.encode())
        return bytes(arena.slots[0]["request_id"])

    longest = "r" * MAX_REQUEST_ID_CHARS
    assert stored(longest) == longest.encode()
    cut = stored("a" + "é" * 200)  # 401 bytes
    assert cut.decode() == "a" + "é" * 127  # 255 bytes: the next "é" would not fit


class _Recording:
    """A ``struct.Struct`` that also records where each ``pack_into`` stored what."""

    def __init__(self, real: object, stores: list[tuple[int, tuple]]) -> None:
        self._real, self._stores = real, stores

    def pack_into(self, buf: object, offset: int, *values: object) -> None:
        self._real.pack_into(buf, offset, *values)  # type: ignore[attr-defined]
        self._stores.append((offset, values))

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple]]:
    """Every store the slot header code makes, in order: (byte offset, values)."""
    import struct

    from ringserve.ipc import slot_io

    out: list[tuple[int, tuple]] = []
    for name, value in list(vars(slot_io).items()):
        if isinstance(value, struct.Struct):
            monkeypatch.setattr(slot_io, name, _Recording(value, out))
    return out


@pytest.mark.parametrize("how", ["write_output", "write_error"])
def test_done_is_the_last_store_of_an_answer(
    arena: Arena, stores: list[tuple[int, tuple]], how: str
) -> None:
    """Readers check ``state`` first (layout.py): a frontend that sees DONE reads the
    status and output at once, in another process. So ``state = DONE`` must be the last
    store of an answer, after the status (a DONE slot still marked ANSWERING reads as no
    status at all) and after the output's header."""
    arena.slots[1]["state"] = RUNNING
    if how == "write_output":
        assert write_output(arena, 1, np.arange(6, dtype=np.float32).reshape(2, 3), 2, 9) is None
    else:
        write_error(arena, 1, Status.MODEL_ERROR, b"it broke")
    state_at = arena.headers.base + 1 * arena.headers.stride + span("state")[0]
    assert stores, "the answer made no stores through slot_io (the recorder saw nothing)"
    assert stores[-1] == (state_at, (DONE,)), f"stores after state = DONE: {stores}"
    assert [s for s in stores[:-1] if s[0] == state_at] == []  # DONE is stored once


def test_running_is_the_last_store_of_a_claim(
    arena: Arena, stores: list[tuple[int, tuple]]
) -> None:
    """A claimed slot's worker and attempts are read by whoever sees RUNNING (the
    supervisor recovering a dead worker's slots): they are stored before the state."""
    arena.headers.claim(2, worker=3, worker_pid=4321, attempts=1, now_ns=5)
    state_at = arena.headers.base + 2 * arena.headers.stride + span("state")[0]
    assert stores[-1] == (state_at, (RUNNING,)), f"stores after state = RUNNING: {stores}"
