"""Per-process control blocks: heartbeat, state, counters and supervisor commands.

Each child owns one CONTROL record (index handed to it by the supervisor) and is its
only writer, except ``command``/``command_seq`` which only the supervisor writes. The
heartbeat is stamped by the child after every batch and on every idle wake, on a channel
separate from the request ring, so liveness never depends on traffic.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ringserve.ipc import wake
from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import ERROR_BYTES, Command, ProcState, Role


class ControlBlock:
    """The calling process's own record. ``supervisor_efd``: rung on each change of
    state, so the supervisor promotes a ready child (and hands a recycle or a rolling
    restart on) when it happens, not at its next tick; -1 = none."""

    def __init__(self, arena: Arena, index: int, supervisor_efd: int = -1) -> None:
        self.index = index
        self.rec = arena.control[index]
        self._seen_seq = int(self.rec["command_seq"])
        self._supervisor_efd = supervisor_efd

    def register(self, role: Role, ident: int, model: int = -1) -> None:
        rec = self.rec
        now = time.monotonic_ns()
        for field in (
            "requests",
            "batches",
            "rows",
            "inflight",
            "busy_ns",
            "ready_ns",
            "gpu_allocated",
            "gpu_reserved",
            "trim_rss_before",
            "trim_rss_after",
        ):
            rec[field] = 0
        rec["role"] = role
        rec["ident"] = ident
        rec["model"] = model
        rec["pid"] = os.getpid()
        rec["started_ns"] = now
        rec["heartbeat_ns"] = now
        rec["state"] = ProcState.STARTING

    def beat(self) -> None:
        self.rec["heartbeat_ns"] = time.monotonic_ns()

    def set_state(self, state: ProcState) -> None:
        if state == ProcState.READY:
            self.rec["ready_ns"] = time.monotonic_ns()
        self.rec["state"] = state
        self.beat()
        if self._supervisor_efd >= 0:
            wake.signal(self._supervisor_efd)

    def take_command(self) -> Command:
        """The supervisor's newest command if not yet seen, else NONE."""
        seq = int(self.rec["command_seq"])
        if seq == self._seen_seq:
            return Command.NONE
        self._seen_seq = seq
        return Command(int(self.rec["command"]))

    def ack(self) -> None:
        self.rec["ack_seq"] = self._seen_seq

    def record_error(self, error: BaseException) -> None:
        """Why this process cannot start, for the supervisor to read after it exits."""
        self.rec["error"] = error_bytes(f"{type(error).__name__}: {error}")


def error_bytes(text: str) -> bytes:
    """``text`` as UTF-8 cut to ``ERROR_BYTES`` on a character boundary, one line."""
    raw = " ".join(text.split()).encode()[:ERROR_BYTES]
    return raw.decode(errors="ignore").encode()


def error_text(field: np.bytes_ | bytes) -> str:
    return bytes(field).decode(errors="replace")


def read_error(arena: Arena, index: int) -> str:
    """Supervisor side: what a child recorded with ``record_error`` ("" if nothing)."""
    return error_text(arena.control[index]["error"])


def send_command(arena: Arena, index: int, command: Command) -> int:
    """Supervisor side: post a command; returns its sequence number for ack checks."""
    rec = arena.control[index]
    seq = int(rec["command_seq"]) + 1
    rec["command"] = command
    rec["command_seq"] = seq  # last: the child reads seq first, then command
    return seq


def running(control: np.ndarray) -> np.ndarray:
    """Which records belong to processes that run now: a role and a pid, not stopped (a
    record being handed to a new process reads as not yet running). A mask, for the
    caller to narrow before it copies any record out."""
    return (
        (control["role"] != Role.NONE)
        & (control["state"] != ProcState.STOPPED)
        & (control["pid"] != 0)
    )


def reset(arena: Arena, index: int) -> None:
    """Supervisor side: clear a record before handing the index to a new process."""
    arena.control[index] = np.zeros((), dtype=arena.control.dtype)
    arena.control[index]["model"] = -1
    arena.control[index]["device"] = -1  # (0 would read as cuda:0)
