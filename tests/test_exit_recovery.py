"""What the supervisor does with a dead worker's requests (``ExitHandling``'s slot
recovery), on a real arena: the re-queued ones wake the model's sleeping workers, and
the ones it finishes itself (poison) wake the frontend that waits for them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
from test_ipc import make_arena, produce

from ringserve.ipc import wake
from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState, Status
from ringserve.ipc.ring import RequestRing
from ringserve.supervisor import exits


class _Arbiter(exits.ExitHandling):
    """The state slot recovery reads: one model, two frontends, their eventfds."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.rings = [RequestRing(arena, 0)]
        self.model_efds = (wake.new_eventfd(),)
        self.frontend_efds = (wake.new_eventfd(), wake.new_eventfd())
        self.settings = NS(models=[NS(name="m")])
        self.counted: list[tuple[str, int]] = []
        self.stats = NS(
            requeued=lambda model, n: self.counted.append(("requeued", n)),
            poisoned=lambda model, n: self.counted.append(("poisoned", n)),
        )

    def close(self) -> None:
        self.rings[0].close()
        for fd in (*self.model_efds, *self.frontend_efds):
            wake.drain(fd)
            os.close(fd)


def _worker(index: int) -> NS:
    return NS(control_index=index, model_index=0, name=f"worker-{index}")


def test_requests_requeued_from_a_dead_worker_wake_the_models_workers(tmp_path: Path) -> None:
    arena = make_arena(tmp_path)
    arb = _Arbiter(arena)
    ring = RequestRing(arena, 0)
    for slot in range(2):
        produce(arena, ring, slot, np.zeros(4, np.uint8))
    assert len(ring.pop(4, worker=5, worker_pid=111)) == 2
    assert arb._recover_worker_slots(_worker(5))  # type: ignore[arg-type]
    assert arb.counted == [("requeued", 2)]
    assert wake.drain(arb.model_efds[0]) >= 1, "re-queued with every worker left asleep"
    assert [wake.drain(fd) for fd in arb.frontend_efds] == [0, 0]  # nothing to collect
    ring.close()
    arb.close()
    arena.close()


def test_a_poison_answer_wakes_the_frontend_that_waits_for_it(tmp_path: Path) -> None:
    arena = make_arena(tmp_path)
    arb = _Arbiter(arena)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 3, np.zeros(4, np.uint8))
    arena.slots["owner"][3] = 1  # frontend 1's request
    ring.pop(4, worker=5, worker_pid=111)
    ring.requeue_from_dead(5, b"first death")  # re-queued once
    assert [c.slot for c in ring.pop(4, worker=6, worker_pid=222)] == [3]
    assert arb._recover_worker_slots(_worker(6))  # type: ignore[arg-type]
    rec = arena.slots[3]
    assert rec["state"] == SlotState.DONE and rec["status"] == Status.POISON
    assert arb.counted == [("poisoned", 1)]
    assert wake.drain(arb.frontend_efds[1]) >= 1, "a poison answer nobody is woken for"
    assert wake.drain(arb.frontend_efds[0]) == 0
    ring.close()
    arb.close()
    arena.close()
