"""The frontend's ring client: put a request into a slot, await its answer, free the slot.

Runs on the event loop thread: the ring lock is held for microseconds, so it is taken
inline rather than in an executor. Only when it stays held (a process frozen while it
holds it, until the supervisor's heartbeat check kills that one) does a thread take the
model's pushes over, so the loop, and every other model and endpoint, keeps serving.
Completion is an eventfd per frontend that workers signal after each batch; its reader
callback resolves the futures of every pending slot that is DONE. A request whose client
left or whose deadline passed is *abandoned*: its ``cancel`` flag is set and the slot is
freed once a worker (or the supervisor) marks it DONE — never earlier, because a worker
may still be writing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np

from ringserve.ipc import bytes_tensor, tensor_set, wake
from ringserve.ipc.arena import Arena
from ringserve.ipc.errors import QueueFull, RingLockTimeout
from ringserve.ipc.layout import (
    DONE,
    DTYPE_CODE,
    DTYPE_CODE_OF,
    FREE,
    SlotState,
    Status,
    numpy_dtype,
)
from ringserve.ipc.ring import RequestRing
from ringserve.ipc.slot_fit import answer_offset, over_slot
from ringserve.ipc.tensor_set import TENSOR_SET

log = logging.getLogger("ringserve.frontend")
R = TypeVar("R")
# How long a push may hold the event loop up waiting for a ring's lock; past it a thread
# takes the model's pushes over. Its waits are bounded too, so it sees our own stop.
LOOP_LOCK_WAIT_S = 0.005
THREAD_LOCK_WAIT_S = 0.25
STALL_WARNING_S = 1.0
REFUSED = "refused"  # a pending future's result: the queue was at its depth limit
# Up to this many pending slots, DONE is checked one struct read each; beyond it one
# vectorised numpy gather is cheaper.
_SCALAR_SCAN = 8
_BYTES = DTYPE_CODE["bytes"]


class Completed(NamedTuple):
    status: Status
    output: np.ndarray | tuple[np.ndarray, ...] | None  # a read-only view of the slot,
    # valid inside ``collect``; a BYTES output is an object array of ``bytes`` (a copy);
    # a model with several outputs answers a tuple of them, in declared order
    message: str  # error text for non-OK statuses
    batch_size: int
    batch_id: int
    queue_wait_s: float
    inference_s: float
    attempts: int


@dataclass
class _Stall:
    """A model whose ring lock stayed held: its pushes go through a thread, in order."""

    since: float = field(default_factory=time.monotonic)
    backlog: list[int] = field(default_factory=list)  # submitted while the thread waits
    warned: bool = False


class Dispatcher:
    def __init__(
        self,
        arena: Arena,
        frontend_id: int,
        done_efd: int,
        model_efds: tuple[int, ...],
        max_queue_depth: int = 0,
        model_names: tuple[str, ...] = (),
    ) -> None:
        self.arena = arena
        self._slot_bytes = arena.geometry.slot_bytes
        self.frontend_id = frontend_id
        self.done_efd = done_efd
        self.model_efds = model_efds
        self.max_queue_depth = max_queue_depth or None
        self.rings = [RequestRing(arena, m) for m in range(arena.geometry.n_models)]
        self.owned = arena.frontend_slots(frontend_id)
        self.free: list[int] = []
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.submitted = 0  # requests queued by this process, for ctl status (REQS)
        self.orphans: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        self._to_push: list[list[int]] = [[] for _ in range(arena.geometry.n_models)]
        self._push_scheduled = False
        self._stopped = False
        self._names = model_names or tuple(str(m) for m in range(arena.geometry.n_models))
        self._stalls: dict[int, _Stall] = {}
        self._stall_pool: ThreadPoolExecutor | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def adopt_slots(self) -> int:
        """Take over our slot range from a previous (dead) owner; returns slots orphaned.

        Slots a worker may still touch (QUEUED, RUNNING) are cancelled and freed when
        DONE; everything else is free at once.
        """
        slots = self.arena.slots
        for s in self.owned:
            state = int(slots["state"][s])
            if state in (SlotState.QUEUED, SlotState.RUNNING):
                slots["cancel"][s] = 1
                self.orphans.add(s)
            else:
                self._release(s)
        return len(self.orphans)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.done_efd, self._on_done)
        self._on_done()  # anything finished while we were starting

    def stop(self) -> None:
        self._stopped = True
        if self._loop is not None:
            self._loop.remove_reader(self.done_efd)
        if self._stall_pool is not None:  # its threads see the stop within one wait
            self._stall_pool.shutdown(wait=True)
        for ring in self.rings:
            ring.close()

    @property
    def inflight(self) -> int:
        return len(self.pending)

    @property
    def capacity(self) -> int:
        return len(self.owned)

    # -- the request path ------------------------------------------------------------------

    def submit(
        self,
        model: int,
        payload: np.ndarray | tuple[np.ndarray | tensor_set.PackedBytes, ...],
        kind: int,
        rows: int,
        deadline_ns: int,
        request_id: str,
        dtype_name: str | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> tuple[int, asyncio.Future[None]]:
        """Write one request into a free slot and queue it; returns the slot and the
        future that resolves when it is DONE (or to REFUSED).

        ``payload`` is copied exactly once, into shared memory (a tuple: a model's
        several inputs, in declared order, as one tensor set). ``dtype_name`` and
        ``shape`` describe it where its bytes are not a plain array of that shape: an
        encoded image, or a BYTES tensor in its length-prefixed form. Raises QueueFull
        when no slot is free. The ring push happens at once when nothing else is in
        flight, else at the end of this event-loop pass (``_push_now``, one push for all
        the requests of the pass); the future resolves to REFUSED if the model's queue
        was at its depth limit then. It is returned, not looked up in ``pending``: a push
        made at once may have refused the slot and dropped it from there already.
        """
        if not self.free:
            raise QueueFull(
                f"all {len(self.owned)} request slots of this frontend are busy (arena.slots "
                "is split evenly between the frontends)"
            )
        if type(payload) is tuple:  # a model's several inputs: one tensor set
            packed = tensor_set.Packed(payload, "input")
            code, shape, nbytes = TENSOR_SET, (len(payload),), packed.nbytes
        else:
            packed, nbytes = None, payload.nbytes
            code = DTYPE_CODE[dtype_name] if dtype_name else DTYPE_CODE_OF[payload.dtype]
            shape = payload.shape if shape is None else shape
        if nbytes > self.arena.geometry.slot_bytes:
            what = "input" if packed is None else f"request ({len(payload)} inputs)"
            raise ValueError(over_slot(what, nbytes, self.arena.geometry.slot_bytes))
        slot = self.free.pop()
        try:
            self.arena.headers.write_request(
                slot,
                owner=self.frontend_id,
                owner_pid=self._pid,
                model=model,
                kind=kind,
                dtype_code=code,
                shape=shape,
                nbytes=nbytes,
                rows=rows,
                deadline_ns=deadline_ns,
                enqueued_ns=time.monotonic_ns(),
                request_id=request_id.encode(),
            )
            if packed is not None:
                packed.write(self.arena.data(slot)[:nbytes])
            elif nbytes:
                np.copyto(self.arena.data_array(slot, payload.dtype, payload.shape), payload)
        except BaseException:
            self._release(slot)  # never queued: a header that does not fit keeps no slot
            raise
        assert self._loop is not None
        idle = not self.pending  # nothing else in flight: no company to wait for
        self._to_push[model].append(slot)
        fut = self.pending[slot] = self._loop.create_future()
        self.submitted += 1
        if not self._push_scheduled:
            if idle:
                self._push_now()  # a lone request goes out now, not after a loop pass
            else:
                self._loop.call_soon(self._push_now)
                self._push_scheduled = True
        return slot, fut

    def _push_now(self) -> None:
        """Queue everything submitted in this event-loop pass: under load that is many
        requests sharing one ring-lock round trip and one worker wake-up (eventfd write).
        A request over the queue's depth limit is freed and its future says REFUSED."""
        self._push_scheduled = False
        if self._stopped:
            return
        for model, slots in enumerate(self._to_push):
            if not slots:
                continue
            self._to_push[model] = []
            stall = self._stalls.get(model)
            if stall is not None:
                stall.backlog.extend(slots)  # after what the thread is pushing: in order
            else:
                self._push(model, slots)

    def _push(self, model: int, slots: list[int]) -> None:
        try:
            sleeping, refused = self.rings[model].push_many(
                slots, self.max_queue_depth, LOOP_LOCK_WAIT_S
            )
        except RingLockTimeout:
            stall = self._stalls[model] = _Stall()
            self._push_from_thread(model, slots, stall)
            return
        self._pushed(model, sleeping, refused)

    def _pushed(self, model: int, sleeping: bool, refused: list[int]) -> None:
        for slot in refused:
            self.orphans.discard(slot)  # abandoned before it was ever queued
            self._release(slot)
            fut = self.pending.pop(slot, None)
            if fut is not None and not fut.done():
                fut.set_result(REFUSED)
        if sleeping:
            wake.signal(self.model_efds[model])

    # -- a ring lock that stays held -------------------------------------------------------

    def _push_from_thread(self, model: int, slots: list[int], stall: _Stall) -> None:
        assert self._loop is not None
        if self._stall_pool is None:
            self._stall_pool = ThreadPoolExecutor(len(self.rings), "ringserve-push")
        done = self._loop.run_in_executor(self._stall_pool, self._push_waiting, model, slots, stall)
        done.add_done_callback(lambda f: self._pushed_from_thread(model, stall, f))

    def _push_waiting(
        self, model: int, slots: list[int], stall: _Stall
    ) -> tuple[bool, list[int]] | None:
        """(In the thread.) Push once the lock is free; None if we stopped first."""
        while not self._stopped:
            try:
                return self.rings[model].push_many(slots, self.max_queue_depth, THREAD_LOCK_WAIT_S)
            except RingLockTimeout:
                if not stall.warned and time.monotonic() - stall.since > STALL_WARNING_S:
                    stall.warned = True
                    log.warning(
                        "the ring lock of model %s has been held for over %g s (a frozen "
                        "process holds it; the supervisor's heartbeat check ends that): its "
                        "requests wait, everything else is served",
                        self._names[model],
                        STALL_WARNING_S,
                    )
        return None

    def _pushed_from_thread(
        self, model: int, stall: _Stall, done: asyncio.Future[tuple[bool, list[int]] | None]
    ) -> None:
        if done.cancelled() or self._stopped:
            return
        del self._stalls[model]
        try:
            result = done.result()
        finally:  # the thread's slots are in the ring (or lost to an error): these follow
            if stall.backlog:
                self._push(model, stall.backlog)
        if result is None:
            return
        self._pushed(model, *result)
        if stall.warned:
            log.warning(
                "the ring lock of model %s is free again after %.1f s",
                self._names[model],
                time.monotonic() - stall.since,
            )

    def collect(self, slot: int, use: Callable[[Completed], R]) -> R:
        """Hand a DONE slot's answer to ``use``, then free the slot; returns what ``use``
        returns (or raises what it raises: the slot is freed either way).

        The output is a read-only view of the slot, not a copy: ``use`` encodes the
        response straight from shared memory and must not keep the view.
        """
        self.pending.pop(slot, None)
        r = self.arena.headers.read(slot)
        status, message = Status(r.status), ""
        output: np.ndarray | tuple[np.ndarray, ...] | None = None
        at = answer_offset(r.in_nbytes, r.out_nbytes, self._slot_bytes)
        if status != Status.OK:
            message = bytes(self.arena.data(slot)[at : at + r.out_nbytes]).decode(errors="replace")
        elif r.out_dtype == TENSOR_SET:  # a model with several outputs: all of them
            try:
                output = tensor_set.unpack(
                    self.arena.data(slot)[at : at + r.out_nbytes], r.out_shape[0]
                )
            except ValueError as e:
                status, message = Status.MODEL_ERROR, f"corrupt answer: {e}"
        elif r.out_dtype == _BYTES:
            try:  # a BYTES output: Python objects, so unpacked (a copy), not viewed
                output = bytes_tensor.unpack(
                    self.arena.data(slot)[at : at + r.out_nbytes], math.prod(r.out_shape)
                ).reshape(r.out_shape)
            except ValueError as e:
                status, message = Status.MODEL_ERROR, f"corrupt BYTES output: {e}"
        else:
            output = self.arena.data_array(slot, numpy_dtype(r.out_dtype), r.out_shape, at)
            output.flags.writeable = False
        ok = status == Status.OK
        try:
            return use(
                Completed(
                    status=status,
                    output=output,
                    message=message,
                    batch_size=r.batch_size,
                    batch_id=r.batch_id,
                    queue_wait_s=max(0, r.started_ns - r.enqueued_ns) / 1e9,
                    inference_s=max(0, r.finished_ns - r.started_ns) / 1e9 if ok else 0.0,
                    attempts=r.attempts,
                )
            )
        finally:
            self._release(slot)

    def abandon(self, slot: int, answered: asyncio.Future[None]) -> None:
        """The client is gone or its deadline passed: cancel, free when safe.

        ``answered`` is the request's future from ``submit``: a slot whose request was
        already settled here (refused at the depth limit: freed at once) may hold
        another request by now, which must not be cancelled nor freed under it."""
        if self.pending.get(slot) is not answered:
            return
        del self.pending[slot]
        if not answered.done():
            answered.cancel()
        if self.arena.headers.state(slot) == DONE:
            self._release(slot)
            return
        self.arena.headers.set_cancel(slot)
        self.orphans.add(slot)

    # -- internals -------------------------------------------------------------------------

    def _release(self, slot: int) -> None:
        self.arena.headers.set_state(slot, FREE)
        self.free.append(slot)

    def _on_done(self) -> None:
        wake.drain(self.done_efd)
        if len(self.pending) <= _SCALAR_SCAN:
            state = self.arena.headers.state
            done = [s for s in self.pending if state(s) == DONE]
        else:
            keys = np.fromiter(self.pending, dtype=np.intp, count=len(self.pending))
            done = keys[self.arena.slots["state"][keys] == DONE].tolist()
        for slot in done:
            fut = self.pending[slot]
            if not fut.done():
                fut.set_result(None)
        if not self.orphans:
            return
        states = self.arena.slots["state"]
        for slot in [s for s in self.orphans if int(states[s]) == DONE]:
            self.orphans.discard(slot)
            self._release(slot)
