"""A model's CPU threads, shared among its workers (``models.*.threads_shared``).

On a CPU, two workers with two torch threads each, on two cores, oversubscribe them
whenever both run a batch: an OpenMP thread waits at every barrier for a sibling the
kernel has preempted. One worker with two threads avoids that but runs one batch at a
time, which is the slower use of the cores under load (resnet50 on this project's 2-core
VM, concurrency 8: 1 worker x 2 threads 7.8-8.1 img/s, 2 workers x 1 thread 10.2-10.6;
the raw model at its best batch size, 2 threads, 8.3-9.8). Two workers with one thread
each lose at low load instead: a lone request runs on one core (211 against 133 ms).

Shared, ``threads`` is the model's budget: a worker that runs alone uses all of it, and
while k of the model's workers run batches each uses ``threads // k``. Each worker
announces its batch in its own control record (``inflight``: rows it is running) before
it counts its siblings, so two that start together both see two and neither
oversubscribes. Nothing is locked: the count is a hint, read once per batch, and a
record left set by a dead worker is cleared by the supervisor when it reaps it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import ProcState, Role


class ThreadShare:
    """Sets this worker's torch threads before each batch; does nothing unless shared."""

    def __init__(
        self,
        arena: Arena,
        control_index: int,
        model_index: int,
        budget: int,
        enabled: bool,
        backlog: Callable[[], int] = lambda: 0,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        c = arena.control
        # Column views of the control table, taken once: indexing a structured array by
        # field name costs microseconds per call.
        self._role, self._model, self._state = c["role"], c["model"], c["state"]
        self._inflight = c["inflight"]
        self.index = control_index
        self.model_index = model_index
        self.budget = max(1, budget)
        self.enabled = enabled and self.budget > 1
        self.backlog = backlog
        self.set_threads = set_threads
        self.threads = self.budget

    def workers(self) -> tuple[int, int]:
        """(live workers of this model, those running a batch now, this one included
        once it has announced its own)."""
        # Live: STARTING (its warm-up profile runs batches), READY or DRAINING.
        live = (
            self._of_model()
            & (self._state >= ProcState.STARTING)
            & (self._state <= ProcState.DRAINING)
        )
        return int(np.count_nonzero(live)), int(np.count_nonzero(live & (self._inflight > 0)))

    def enter(self, rows: int, runners: int = 1) -> int:
        """Announce a batch of ``rows`` and take this worker's share; returns the threads.
        ``runners``: count at least this many workers running (the warm-up profile
        measures the share each worker gets under load).

        Work still queued behind this batch counts as a second runner: an idle sibling
        is about to take it, and a batch cannot change its thread count once started (a
        worker that began alone with every thread and was joined mid-batch would
        oversubscribe the cores until it ends). Unshared, nothing reads the announcement,
        so nothing is written.
        """
        if not self.enabled:
            return self.threads
        self._inflight[self.index] = max(1, rows)
        live, running = self.workers()
        if running < 2 <= live and self.backlog() > 0:
            running = 2
        running = max(running, runners)
        threads = max(1, self.budget // max(1, running))
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads
        return threads

    def batch_limit(self, target: int, queued: int) -> int:
        """How many rows to take when ``queued`` wait: shared threads are sized for every
        worker running a batch (the warm-up profile measured that share), so with k
        ready workers idle (this one included) take ceil(queued / k), leaving the rest to
        the siblings, rather than one worker taking everything while they wait.
        Resnet50 on this project's 2-core VM, 8 queued: two batches of 4 on a thread
        each beat one batch of 8 on both (1 thread: 6.1 rows/s per worker at batch 4;
        2 threads: 10.8 rows/s at batch 8)."""
        if not self.enabled or queued <= 1:
            return target
        ready_idle = self._of_model() & (self._state == ProcState.READY) & (self._inflight == 0)
        idle = int(np.count_nonzero(ready_idle))
        return target if idle < 2 else max(1, min(target, -(-queued // idle)))

    def _of_model(self) -> np.ndarray:
        """Mask of the control records that are workers of this model."""
        return (self._role == Role.WORKER) & (self._model == self.model_index)

    def leave(self) -> None:
        if self.enabled:
            self._inflight[self.index] = 0
