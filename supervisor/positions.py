"""The supervisor's configured positions (a worker or frontend id that outlives the
processes that fill it) and the recycles in progress."""

from __future__ import annotations

from dataclasses import dataclass

from ringserve.supervisor.children import Child


@dataclass
class Replacement:
    """Start ``new`` for ``old``; once ``new`` is ready, stop ``old``. Nothing drops."""

    old: Child
    reason: str
    new: Child | None = None
    deadline: float = 0.0


@dataclass
class WorkerSlot:
    """A configured worker position (stable id across restarts and recycles)."""

    ident: int
    model_index: int
    child: Child | None = None
    failures: int = 0  # consecutive deaths before becoming ready
    restart_at: float | None = None
    restarts: int = 0
    last_exit_reason: str = ""
    last_recycle_reason: str = ""
    last_error: str = ""  # what its last process recorded before failing to start
    retired: bool = False  # scaled down: do not restart
    waits_for_record: bool = False  # said once: its start waits for a free control record

    def retire(self) -> None:
        """Drained or scaled down: not restarted, also not when a back-off it waits out
        after a failed start ends (its restart time, left due, started it anyway)."""
        self.retired = True
        self.restart_at = None

    def revive(self, now: float) -> None:
        """A drained or scaled-down position wanted again: its next process starts
        fresh, so the last one's recycle reason is not shown as its own."""
        self.retired = False
        self.restart_at = now
        self.last_recycle_reason = ""


def rank_in_model(workers: list[WorkerSlot], slot: WorkerSlot) -> int:
    """The position's place among its model's positions, in the order they were made:
    stable across restarts, recycles and scaling (a scale-down retires the last ones,
    a scale-up revives them before it adds more), so a position keeps its device."""
    same = [w for w in workers if w.model_index == slot.model_index]
    return next(i for i, w in enumerate(same) if w is slot)


@dataclass
class FrontendSlot:
    ident: int
    child: Child | None = None
    restarts: int = 0
    last_exit_reason: str = ""
    restart_at: float | None = None
    failures: int = 0  # consecutive deaths before becoming ready
    rolling: bool = False  # stopped for a rolling restart: respawn on exit
