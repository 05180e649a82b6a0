"""Finishing a slot: the RUNNING → DONE transition, with an output or an error message.

Workers finish the slots they claimed; the supervisor finishes those of a dead worker
(poison) or of a model that can no longer be served. The answer goes beside the input
when both fit (``slot_fit.answer_offset``), so a worker that dies while writing it leaves
the input whole and the request is run again. Where the answer must go over the input,
the slot is first marked as being answered (``SlotHeaders.begin_answer``): a worker that
dies from there on must not have the request re-run on what it left. Then header and
payload are written, ``state = DONE`` last (``SlotHeaders.write_result``), then the
caller signals the owning frontend.
"""

from __future__ import annotations

import numpy as np

from ringserve.ipc import bytes_tensor, tensor_set
from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import DTYPE_CODE, DTYPE_CODE_OF, MAX_NDIM, STATUS_OK, Status
from ringserve.ipc.slot_fit import answer_offset, over_slot
from ringserve.ipc.testhooks import pause_point

_BYTES = DTYPE_CODE["bytes"]
IN_PLACE_CHECK_BYTES = 64 * 1024  # below this, copying is cheaper than checking


def no_workers(model: str) -> str:
    """Why a model whose last worker was drained refuses requests (503), in the frontend
    and in what the supervisor answers for the requests it had queued."""
    return (
        f"model {model!r} has no workers: its last one was drained "
        f"(ringserve ctl scale {model} N serves it again)"
    )


def failing_to_load(model: str, error: str) -> str:
    """Why a model whose workers keep failing to start refuses requests (503), in the
    frontend and in what the supervisor answers for the requests it had queued."""
    why = f" ({error})" if error else ""
    return f"model {model!r} is not ready: its workers fail to load it{why}"


CANCELLED_MESSAGE = b"cancelled by the client"  # its client left, or its deadline passed
DEADLINE_MESSAGE = b"deadline passed before inference"


def write_error(arena: Arena, slot: int, status: Status, message: bytes) -> None:
    """Finish a slot with an error status and a UTF-8 message as its payload."""
    msg = message[: arena.geometry.slot_bytes]
    at = _start_answer(arena, slot, len(msg))
    arena.data(slot)[at : at + len(msg)] = msg
    arena.headers.write_result(slot, int(status), _BYTES, (len(msg),), len(msg))


def _start_answer(arena: Arena, slot: int, nbytes: int) -> int:
    """Where the answer of ``nbytes`` goes in ``slot``; marks the slot as losing its
    input first when that is over the input."""
    at = answer_offset(arena.headers.in_nbytes(slot), nbytes, arena.geometry.slot_bytes)
    if at == 0:
        arena.headers.begin_answer(slot)
    return at


def write_output(
    arena: Arena,
    slot: int,
    out: np.ndarray | tuple[np.ndarray, ...],
    batch_size: int,
    batch_id: int,
) -> str | None:
    """Copy ``out`` into the slot and finish it OK; returns why it could not, if so.

    An object array is a BYTES output: its elements (bytes or str) go in packed, in
    Triton's length-prefixed form, with the array's shape in the header. A tuple is the
    outputs of a model that declares several: they go in as a tensor set.
    """
    if type(out) is tuple:
        return _write_tensor_set(arena, slot, out, batch_size, batch_id)
    if out.dtype.hasobject:
        return _write_bytes_output(arena, slot, out, batch_size, batch_id)
    nbytes = out.nbytes
    if nbytes > arena.geometry.slot_bytes or out.ndim > MAX_NDIM:
        return _unfit(arena, out, nbytes, "output")
    code = DTYPE_CODE_OF.get(out.dtype)
    if code is None:
        return f"unsupported output dtype {out.dtype.name}"
    at = _start_answer(arena, slot, nbytes)
    # An output the model left in place over the input (identity) is already there.
    if at or nbytes < IN_PLACE_CHECK_BYTES or not arena.holds_in_place(slot, out):
        np.copyto(arena.data_array(slot, out.dtype, out.shape, at), out)
    pause_point("answer.written")
    arena.headers.write_result(slot, STATUS_OK, code, out.shape, nbytes, batch_size, batch_id)
    return None


def _write_bytes_output(
    arena: Arena, slot: int, out: np.ndarray, batch_size: int, batch_id: int
) -> str | None:
    try:
        packed = bytes_tensor.pack(out)
    except TypeError as e:
        return str(e)
    if len(packed) > arena.geometry.slot_bytes or out.ndim > MAX_NDIM:
        return _unfit(arena, out, len(packed), "BYTES output")
    at = _start_answer(arena, slot, len(packed))
    arena.data(slot)[at : at + len(packed)] = packed
    arena.headers.write_result(
        slot, STATUS_OK, _BYTES, out.shape, len(packed), batch_size, batch_id
    )
    return None


def _write_tensor_set(
    arena: Arena, slot: int, outs: tuple[np.ndarray, ...], batch_size: int, batch_id: int
) -> str | None:
    try:
        packed = tensor_set.Packed(outs)
    except (TypeError, ValueError) as e:
        return str(e)
    if packed.nbytes > arena.geometry.slot_bytes:
        return over_slot(f"answer ({len(outs)} outputs)", packed.nbytes, arena.geometry.slot_bytes)
    at = _start_answer(arena, slot, packed.nbytes)
    packed.write(arena.data(slot)[at : at + packed.nbytes])
    pause_point("answer.written")
    arena.headers.write_result(
        slot, STATUS_OK, tensor_set.TENSOR_SET, (len(outs),), packed.nbytes, batch_size, batch_id
    )
    return None


def _unfit(arena: Arena, out: np.ndarray, nbytes: int, what: str) -> str:
    """Why ``out`` (``nbytes`` in the slot) cannot go in: too many dimensions for the
    header, or too many bytes for the slot, named with the setting that fixes that.
    Called only on refusal, so the answer path keeps its one comparison."""
    if out.ndim > MAX_NDIM:
        return f"{what} has {out.ndim} dimensions; a slot header holds at most {MAX_NDIM}"
    return over_slot(what, nbytes, arena.geometry.slot_bytes)
