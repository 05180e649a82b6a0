"""The request ring of one model: a FIFO of ``(slot, generation)`` entries in shared
memory, guarded by a robust process-shared mutex in the ring's header.

Layout (see ``layout.py`` for where it sits in the arena)::

    +------+------+----------+-----+-------------+---------------------------------------+
    | head | tail | sleepers | pad | lock (64 B) | entries[capacity]: u64 = slot<<32|gen32 |
    +------+------+----------+-----+-------------+---------------------------------------+

``head`` and ``tail`` only grow; ``tail - head`` is the depth. capacity == n_slots and a
slot is in at most one ring at most once (pushed when it becomes QUEUED, removed when
popped), so the ring cannot overflow.

The lock is a robust mutex (``robust_mutex.py`` says why): when its holder dies, the
next locker gets it, and finds the ring as the transitions below leave it.

Transitions done under the lock, and why each order is safe if the holder dies midway:

* push (frontend): ``entries[tail] = e``; ``tail += 1``; ``state = QUEUED``. Dying before
  the last store leaves a WRITING slot that ``pop`` skips and the next owner frees.
* pop (worker): for each entry from ``head``: skip it unless the slot is QUEUED with the
  same generation; else claim it (``worker``, ``attempts += 1``, ``state = RUNNING``);
  finally ``head`` moves past everything examined. Dying before ``head`` moves leaves
  RUNNING slots that are still in the ring; ``requeue_from_dead`` handles both cases.
* requeue_from_dead (supervisor): every RUNNING slot of the dead worker goes back to
  QUEUED (pushed again unless still in the ring), or, if it already had two attempts,
  DONE with status POISON (CANCELLED if its client is gone). One whose answer the worker
  had begun to write over its input (``STATUS_ANSWERING``: the input is partly
  overwritten; an answer that fits beside the input never sets it) is DONE with
  MODEL_ERROR: run again, it would answer for the wrong input.

A holder that is alive but frozen (SIGSTOP, a debugger, the cgroup freezer) keeps the
lock until the supervisor's heartbeat check kills it, and only then does the kernel hand
it on. Whoever must not stall meanwhile waits with a bound: the frontend's event loop
(``lock_wait_s``, then a thread takes the push over), a worker (it beats between waits,
so only the frozen holder looks hung) and the supervisor (``held(timeout_s)``; it must
keep ticking to end the freeze).
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from ringserve.ipc.answer import CANCELLED_MESSAGE, write_error
from ringserve.ipc.arena import Arena
from ringserve.ipc.errors import QueueFull, RingLockTimeout
from ringserve.ipc.layout import (
    CONTROL,
    CONTROL_BYTES,
    QUEUED,
    RING_HEADER,
    RING_HEADER_BYTES,
    STATUS_ANSWERING,
    SlotState,
    Status,
)
from ringserve.ipc.robust_mutex import RobustMutex
from ringserve.ipc.slot_io import Header
from ringserve.ipc.testhooks import pause_point

_GEN_MASK = 0xFFFF_FFFF
_tuple_new = tuple.__new__  # a named tuple without its Python-level __new__ (0.1 µs less)
MAX_ATTEMPTS = 2


def entry(slot: int, generation: int) -> int:
    return (slot << 32) | (generation & _GEN_MASK)


class Recovered(NamedTuple):
    """What ``requeue_from_dead`` did with each RUNNING slot of a dead worker."""

    requeued: list[int]
    poisoned: list[int]  # DONE, POISON: its second worker died too
    cancelled: list[int]  # DONE, CANCELLED: nobody waits for it (its client left)
    lost: list[int]  # DONE, MODEL_ERROR: the worker died writing its answer over the input


LOST_MESSAGE = (
    b"the worker died while writing this request's answer, over its input: "
    b"it cannot be run again, send it again"
)


class Claimed(NamedTuple):
    slot: int
    rows: int  # at least 1
    attempts: int  # counting this claim
    request: Header  # the header as claimed (one unpack serves the whole batch step)


_HT = struct.Struct("<QQ")  # head, tail
_U4 = struct.Struct("<I")
_U8 = struct.Struct("<Q")
_SLEEPERS_OFF = RING_HEADER.fields["sleepers"][1]
_ASLEEP_OFF = CONTROL.fields["asleep"][1]
assert RING_HEADER.fields["head"][1] == 0 and RING_HEADER.fields["tail"][1] == 8


class RequestRing:
    """One model's FIFO of queued slots. Create one per process per model.

    The header and entries are read and written with ``struct`` on the arena buffer
    (a numpy scalar access costs ~1 µs; these run several times per request).
    """

    def __init__(self, arena: Arena, model: int) -> None:
        self.arena = arena
        self.model = model
        self._buf = arena.buffer
        self._base = arena.ring_offset(model)
        self._entries_off = self._base + RING_HEADER_BYTES
        self._cap = arena.geometry.ring_capacity
        self._n_slots = arena.geometry.n_slots
        self._control_off = arena.geometry.offsets()["control"]
        self._mutex = arena.ring_mutex(model)
        # Bound methods: push and pop take the lock with no attribute walk.
        self._lock = self._mutex.lock
        self._unlock = self._mutex.unlock

    @property
    def owner_deaths(self) -> int:
        """Times this process found the lock's holder dead (and carried on)."""
        return self._mutex.owner_deaths

    def close(self) -> None:
        self._mutex.close()

    def locked(self) -> RobustMutex:
        """The lock as a context manager, for the cold paths; push and pop call
        ``_lock``/``_unlock`` directly (the ``with`` costs more than the lock itself)."""
        return self._mutex

    @contextlib.contextmanager
    def held(self, timeout_s: float | None) -> Iterator[None]:
        """The lock, after at most ``timeout_s`` of waiting (None: no bound); raises
        RingLockTimeout."""
        self._take(timeout_s)
        try:
            yield
        finally:
            self._unlock()

    def _take(self, timeout_s: float | None) -> None:
        if timeout_s is None:
            self._lock()
        elif not self._mutex.lock_within(timeout_s):
            raise RingLockTimeout(f"ring lock of model {self.model} held over {timeout_s:g} s")

    def wait_for_lock_with(self, interval_s: float, meanwhile: Callable[[], None]) -> None:
        """Make every lock wait of this ring call ``meanwhile`` each ``interval_s`` it
        goes on (a worker's heartbeat): waiting on a frozen holder is not being hung."""
        mutex = self._mutex

        def lock() -> None:
            if mutex.try_lock():
                return
            while not mutex.lock_within(interval_s):
                meanwhile()

        self._lock = lock

    def depth(self) -> int:
        """Entries waiting (a lock-free read: exact enough for bounds and metrics)."""
        head, tail = _HT.unpack_from(self._buf, self._base)
        return tail - head

    def _entry(self, i: int) -> int:
        return _U8.unpack_from(self._buf, self._entries_off + 8 * (i % self._cap))[0]

    def _append(self, slot: int, generation: int) -> None:
        head, tail = _HT.unpack_from(self._buf, self._base)
        if tail - head >= self._cap:
            raise QueueFull("ring is full")  # unreachable by construction; never corrupt
        _U8.pack_into(
            self._buf, self._entries_off + 8 * (tail % self._cap), entry(slot, generation)
        )
        _U8.pack_into(self._buf, self._base + 8, tail + 1)

    def _sleepers(self) -> int:
        return _U4.unpack_from(self._buf, self._base + _SLEEPERS_OFF)[0]

    def push(self, slot: int, max_depth: int | None = None) -> bool:
        """Publish a WRITING slot (header and payload already written) as QUEUED.

        Returns True when a worker is (about to be) asleep and must be signalled: the
        caller then writes the model's eventfd; under load nobody sleeps and the syscall
        (and the needless wake-up it causes) is saved. Raises QueueFull at ``max_depth``.
        """
        sleeping, refused = self.push_many([slot], max_depth)
        if refused:
            raise QueueFull(f"queue of model {self.model} is at its depth limit {max_depth}")
        return sleeping

    def push_many(
        self, slots: list[int], max_depth: int | None = None, lock_wait_s: float | None = None
    ) -> tuple[bool, list[int]]:
        """``push`` for several slots under one lock round trip, in order; returns
        (a worker must be signalled, the slots refused because the depth limit was hit).
        With ``lock_wait_s``, raises RingLockTimeout (nothing pushed) if the lock stays
        held that long."""
        headers = self.arena.headers
        self._take(lock_wait_s)
        try:
            # Nobody else pushes or pops while we hold the lock: one depth read serves.
            room = len(slots) if max_depth is None else max(0, max_depth - self.depth())
            for slot in slots[:room]:
                self._append(slot, headers.generation(slot))
                pause_point("ring.push.before_state")
                headers.set_state(slot, QUEUED)
            return room > 0 and self._sleepers() > 0, slots[room:]
        finally:
            self._unlock()

    def going_to_sleep(self, worker: int) -> None:
        """A worker holding part of a batch will wait on the eventfd for more.

        Counted under the lock, so a push that follows sees it and signals; a push that
        came first is seen by the caller's check of ``depth``. The next ``pop`` must pass
        ``woke=True``. (An empty ``pop`` counts itself with ``sleep_if_empty``.)
        """
        self._lock()
        try:
            self._set_asleep(worker, True)
        finally:
            self._unlock()

    def _set_asleep(self, worker: int, asleep: bool) -> None:
        """Count ``worker`` in or out of ``sleepers`` (under the lock), with its own
        control-record flag saying whether it is counted: so uncounting twice is harmless
        and the supervisor can uncount a worker that died asleep. The flag is set after
        the count and cleared before it, so a death between the two stores can only
        leave one sleeper too many (an extra signal), never a missing one (a lost wake).
        """
        flag = self._control_off + worker * CONTROL_BYTES + _ASLEEP_OFF
        counted = _U4.unpack_from(self._buf, flag)[0] != 0
        if asleep == counted:
            return
        count = self._base + _SLEEPERS_OFF
        if asleep:
            _U4.pack_into(self._buf, count, self._sleepers() + 1)
            _U4.pack_into(self._buf, flag, 1)
        else:
            _U4.pack_into(self._buf, flag, 0)
            _U4.pack_into(self._buf, count, max(0, self._sleepers() - 1))

    def pop(
        self,
        max_rows: int,
        worker: int,
        worker_pid: int,
        fresh_only: bool = False,
        *,
        woke: bool = False,
        sleep_if_empty: bool = False,
    ) -> list[Claimed]:
        """Claim queued slots in FIFO order, up to ``max_rows`` rows (at least one slot).

        A slot that was already claimed once (its worker died) is returned alone, so a
        poison input cannot take a whole batch down with it again; ``fresh_only`` (topping
        up a batch) stops before such a slot instead.

        The sleep protocol rides on the same lock round trip: ``sleep_if_empty`` counts
        the caller as a sleeper when nothing was claimed (it must then wait on the
        eventfd, and pass ``woke=True`` to its next pop, which uncounts it first). Under
        the lock no push can fall between "found nothing" and "counted": it signals.
        """
        headers = self.arena.headers
        out: list[Claimed] = []
        rows = 0
        self._lock()
        try:
            if woke:
                self._set_asleep(worker, False)
            head, tail = _HT.unpack_from(self._buf, self._base)
            now = time.monotonic_ns()
            while head < tail:
                e = self._entry(head)
                slot, gen = e >> 32, e & _GEN_MASK
                if slot >= self._n_slots:  # corrupt (no pusher writes one): never read it
                    head += 1
                    continue
                req = headers.read(slot)
                if req.state != QUEUED or (req.generation & _GEN_MASK) != gen:
                    head += 1  # stale entry (cancelled, reclaimed, or a half-done push)
                    continue
                n = max(1, req.rows)
                retried = req.attempts > 0
                if (out or fresh_only) and (rows + n > max_rows or retried):
                    break
                headers.claim(slot, worker, worker_pid, req.attempts + 1, now)
                out.append(_tuple_new(Claimed, (slot, n, req.attempts + 1, req)))
                rows += n
                head += 1
                pause_point("ring.pop.claimed")
                if retried:
                    break
            _U8.pack_into(self._buf, self._base, head)
            if sleep_if_empty and not out:
                self._set_asleep(worker, True)
        finally:
            self._unlock()
        return out

    def requeue_from_dead(
        self, worker: int, poison_message: bytes, lock_wait_s: float | None = None
    ) -> Recovered:
        """Recover the RUNNING slots of a dead worker: re-queued, or finished as poison
        or (its client gone: nobody would read an answer) as cancelled.

        A worker that died counted as a sleeper (its usual state when idle) is uncounted
        too, or every later push would signal a wake-up nobody needs. With
        ``lock_wait_s``, raises RingLockTimeout (nothing changed) if the lock stays held
        that long: call again later.
        """
        slots = self.arena.slots
        done = Recovered([], [], [], [])
        with self.held(lock_wait_s):
            self._set_asleep(worker, False)
            mine = np.flatnonzero(
                (slots["state"] == SlotState.RUNNING)
                & (slots["worker"] == worker)
                & (slots["model"] == self.model)
            )
            if len(mine) == 0:
                return done
            head, tail = _HT.unpack_from(self._buf, self._base)
            waiting = {self._entry(i) for i in range(head, tail)}
            for slot in (int(s) for s in mine):
                rec = slots[slot]
                rec["worker"] = -1
                if rec["cancel"]:
                    write_error(self.arena, slot, Status.CANCELLED, CANCELLED_MESSAGE)
                    done.cancelled.append(slot)
                    continue
                if int(rec["status"]) == STATUS_ANSWERING:
                    write_error(self.arena, slot, Status.MODEL_ERROR, LOST_MESSAGE)
                    done.lost.append(slot)
                    continue
                if int(rec["attempts"]) >= MAX_ATTEMPTS:
                    write_error(self.arena, slot, Status.POISON, poison_message)
                    done.poisoned.append(slot)
                    continue
                if entry(slot, int(rec["generation"])) not in waiting:
                    self._append(slot, int(rec["generation"]))
                rec["state"] = SlotState.QUEUED
                done.requeued.append(slot)
        return done
