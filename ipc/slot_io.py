"""Packed reads and writes of slot headers, for the request path.

``arena.slots`` (a numpy record array) defines the layout and serves the vectorised
scans (supervisor, metrics). But one field of one record through numpy costs about a
microsecond, and a request touches some forty fields across frontend and worker. The
request path instead moves whole spans of a header with one precompiled ``struct`` call
each: writing a request's complete header costs about as much as two numpy field stores.
Every format here is derived from ``SLOT_HEADER`` itself, so it cannot drift from the
layout.

Ordering rules are those of ``layout.py``: a writer stores every other field first and
``state`` last, as its own store.
"""

from __future__ import annotations

import struct
import time
from typing import NamedTuple

import numpy as np

from ringserve.ipc import layout as L

_CODES = {"<u4": "I", "<i4": "i", "<u8": "Q", "<i8": "q"}


def _code(dtype: np.dtype) -> str:
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return f"{int(np.prod(shape))}{_CODES[base.str]}"
    if dtype.kind == "S":
        return f"{dtype.itemsize}s"
    return _CODES[dtype.str]


def span(*names: str) -> tuple[int, struct.Struct]:
    """(offset, Struct) covering ``names``: consecutive fields of SLOT_HEADER, in order,
    with any padding between them skipped."""
    fields = L.SLOT_HEADER.fields
    start = fields[names[0]][1]
    fmt, pos = "<", start
    for name in names:
        dtype, off = fields[name][0], fields[name][1]
        if off < pos:
            raise ValueError(f"{name} is not after the previous field")
        fmt += "x" * (off - pos) + _code(dtype)
        pos = off + dtype.itemsize
    return start, struct.Struct(fmt)


_NAMES = L.SLOT_HEADER.names
_WHOLE_OFF, _WHOLE = span(*_NAMES)
_STATE_OFF, _U4 = span("state")
_GEN_OFF, _U8 = span("generation")
_ATTEMPTS_OFF = L.SLOT_HEADER.fields["attempts"][1]
_CLAIM_OFF, _CLAIM = span("worker", "worker_pid")
_STARTED_OFF, _I8 = span("started_ns")
_OUT_OFF, _OUT = span("out_dtype", "out_ndim", "out_shape", "out_nbytes")
_FINISHED_OFF = L.SLOT_HEADER.fields["finished_ns"][1]
_BATCH_OFF, _BATCH = span("batch_size", "batch_id")
_STATUS_OFF = L.SLOT_HEADER.fields["status"][1]
_IN_NBYTES_OFF = L.SLOT_HEADER.fields["in_nbytes"][1]
_ANSWERING = L.STATUS_ANSWERING  # (a module global: one lookup on the answer path)
_OWNER_OFF = L.SLOT_HEADER.fields["owner"][1]
_CANCEL_OFF = L.SLOT_HEADER.fields["cancel"][1]
_ZERO_SHAPE = (0,) * L.MAX_NDIM

assert _WHOLE_OFF == 0 and _WHOLE.size <= L.SLOT_HEADER_BYTES


def _fit_id(request_id: bytes) -> bytes:
    """``request_id`` (UTF-8) cut to the slot's field on a character boundary."""
    if len(request_id) <= L.REQUEST_ID_BYTES:
        return request_id
    return request_id[: L.REQUEST_ID_BYTES].decode(errors="ignore").encode()


class Header(NamedTuple):
    """One slot's header from one unpack, shapes cut to their rank. ``in_ndim`` is kept as
    written: the worker bounds-checks it before trusting ``in_shape``."""

    state: int
    status: int
    cancel: int
    attempts: int
    generation: int
    owner: int
    kind: int
    in_dtype: int
    in_ndim: int
    in_shape: tuple[int, ...]
    in_nbytes: int
    out_dtype: int
    out_shape: tuple[int, ...]
    out_nbytes: int
    deadline_ns: int
    enqueued_ns: int
    started_ns: int
    finished_ns: int
    rows: int
    batch_size: int
    batch_id: int


# ``read`` unpacks Header's fields straight in Header's order (the layout's), the fields
# it leaves out skipped as padding, plus ``out_ndim`` to cut ``out_shape``; Header is then
# built from slices of that tuple. Field by field (an itemgetter each side of the shapes)
# cost 1.31 µs hot; slices 0.88, and a request reads a header twice.
_READ_NAMES = (*Header._fields[:12], "out_ndim", *Header._fields[12:])
_READ_OFF, _READ = span(*_READ_NAMES)
_MAX_NDIM = L.MAX_NDIM
# Positions in ``_READ``'s tuple: in_ndim, its shape's MAX_NDIM values, in_nbytes,
# out_dtype, out_ndim, its shape's MAX_NDIM values, the rest.
_IN_NDIM = _READ_NAMES.index("in_ndim")
_IN_SHAPE, _IN_END = _IN_NDIM + 1, _IN_NDIM + 1 + _MAX_NDIM
_IN_NBYTES, _OUT_DTYPE, _OUT_NDIM = _IN_END, _IN_END + 1, _IN_END + 2
_OUT_SHAPE, _OUT_END = _OUT_NDIM + 1, _OUT_NDIM + 1 + _MAX_NDIM
assert _READ_OFF == 0 and _READ_NAMES[_IN_NDIM + 2 : _IN_NDIM + 6] == (
    "in_nbytes",
    "out_dtype",
    "out_ndim",
    "out_shape",
)
_tuple_new = tuple.__new__


class SlotHeaders:
    """Struct-speed access to the slot headers of one arena mapping."""

    def __init__(self, buf: memoryview, slots_offset: int) -> None:
        self.buf = buf
        self.base = slots_offset
        self.stride = L.SLOT_HEADER_BYTES

    def _off(self, slot: int) -> int:
        return self.base + slot * self.stride

    # -- single fields -------------------------------------------------------------------

    def state(self, slot: int) -> int:
        return _U4.unpack_from(self.buf, self.base + slot * self.stride)[0]

    def set_state(self, slot: int, state: int) -> None:
        _U4.pack_into(self.buf, self.base + slot * self.stride, state)

    def generation(self, slot: int) -> int:
        return _U8.unpack_from(self.buf, self._off(slot) + _GEN_OFF)[0]

    def owner(self, slot: int) -> int:
        return _U4.unpack_from(self.buf, self._off(slot) + _OWNER_OFF)[0]

    def cancelled(self, slot: int) -> bool:
        """Read live, not from a header read earlier: a client may leave (or its
        deadline pass) while its request waits in a worker's batch."""
        return bool(_U4.unpack_from(self.buf, self._off(slot) + _CANCEL_OFF)[0])

    def set_cancel(self, slot: int) -> None:
        _U4.pack_into(self.buf, self._off(slot) + _CANCEL_OFF, 1)

    # -- frontend: write a request -------------------------------------------------------

    def write_request(
        self,
        slot: int,
        *,
        owner: int,
        owner_pid: int,
        model: int,
        kind: int,
        dtype_code: int,
        shape: tuple[int, ...],
        nbytes: int,
        rows: int,
        deadline_ns: int,
        enqueued_ns: int,
        request_id: bytes,
    ) -> int:
        """The whole header of a fresh request in one store, left in state WRITING;
        returns the slot's new generation."""
        off = self._off(slot)
        generation = _U8.unpack_from(self.buf, off + _GEN_OFF)[0] + 1
        ndim = len(shape)
        _WHOLE.pack_into(
            self.buf,
            off,
            L.WRITING,  # state
            L.STATUS_OK,  # status
            0,  # cancel
            0,  # attempts
            generation,
            owner,
            owner_pid,
            -1,  # worker
            0,  # worker_pid
            model,
            kind,
            dtype_code,
            ndim,
            *shape,
            *_ZERO_SHAPE[ndim:],
            nbytes,
            0,  # out_dtype
            0,  # out_ndim
            *_ZERO_SHAPE,
            0,  # out_nbytes
            deadline_ns,
            enqueued_ns,
            0,  # started_ns
            0,  # finished_ns
            rows,
            0,  # batch_size
            0,  # batch_id
            _fit_id(request_id),
        )
        return generation

    # -- worker: claim and answer; anyone: read ----------------------------------------------------

    def claim(self, slot: int, worker: int, worker_pid: int, attempts: int, now_ns: int) -> None:
        """QUEUED → RUNNING for ``worker`` (under the ring lock)."""
        off = self._off(slot)
        _CLAIM.pack_into(self.buf, off + _CLAIM_OFF, worker, worker_pid)
        _U4.pack_into(self.buf, off + _ATTEMPTS_OFF, attempts)
        _I8.pack_into(self.buf, off + _STARTED_OFF, now_ns)
        _U4.pack_into(self.buf, off, L.RUNNING)

    def read(self, slot: int) -> Header:
        v = _READ.unpack_from(self.buf, self.base + slot * self.stride)
        n, m = v[_IN_NDIM], v[_OUT_NDIM]
        # A rank over MAX_NDIM (a corrupt header) keeps every value of the shape and
        # nothing after it; the worker bounds-checks ``in_ndim`` itself.
        in_shape = v[_IN_SHAPE : _IN_SHAPE + n] if n <= _MAX_NDIM else v[_IN_SHAPE:_IN_END]
        out_shape = v[_OUT_SHAPE : _OUT_SHAPE + m] if m <= _MAX_NDIM else v[_OUT_SHAPE:_OUT_END]
        # tuple.__new__, not ``Header(...)``: the named tuple's Python-level __new__
        # costs 0.4 µs more.
        return _tuple_new(
            Header,
            (*v[:_IN_SHAPE], in_shape, v[_IN_NBYTES], v[_OUT_DTYPE], out_shape, *v[_OUT_END:]),
        )

    def in_nbytes(self, slot: int) -> int:
        return _U8.unpack_from(self.buf, self._off(slot) + _IN_NBYTES_OFF)[0]

    def begin_answer(self, slot: int) -> None:
        """Mark a RUNNING slot as being answered, before its input is overwritten."""
        _U4.pack_into(self.buf, self.base + slot * self.stride + _STATUS_OFF, _ANSWERING)

    def write_result(
        self,
        slot: int,
        status: int,
        dtype_code: int,
        shape: tuple[int, ...],
        nbytes: int,
        batch_size: int = 0,
        batch_id: int = 0,
    ) -> None:
        """Output header, then ``state = DONE`` as the last store."""
        off = self._off(slot)
        ndim = len(shape)
        _OUT.pack_into(
            self.buf, off + _OUT_OFF, dtype_code, ndim, *shape, *_ZERO_SHAPE[ndim:], nbytes
        )
        _I8.pack_into(self.buf, off + _FINISHED_OFF, time.monotonic_ns())
        _BATCH.pack_into(self.buf, off + _BATCH_OFF, batch_size, batch_id)
        _U4.pack_into(self.buf, off + _STATUS_OFF, status)
        _U4.pack_into(self.buf, off, L.DONE)
