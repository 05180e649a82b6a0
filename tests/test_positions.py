"""A configured position outlives its processes: drained or scaled down it is not
restarted, not even by a back-off that was due; wanted again, it starts fresh."""

from __future__ import annotations

from types import SimpleNamespace

from ringserve.supervisor.arbiter import Arbiter
from ringserve.supervisor.positions import WorkerSlot


def test_a_retired_position_keeps_no_restart_it_was_waiting_for() -> None:
    ws = WorkerSlot(ident=3, model_index=0, failures=2, restart_at=12.5)
    ws.retire()
    assert ws.retired and ws.restart_at is None


def test_a_revived_position_starts_now_without_its_last_processs_recycle() -> None:
    ws = WorkerSlot(ident=3, model_index=0, last_recycle_reason="uss_limit")
    ws.retire()
    ws.revive(42.0)
    assert not ws.retired and ws.restart_at == 42.0
    assert ws.last_recycle_reason == ""


def test_the_start_up_timeout_phrase_of_a_worker_reads_as_two_facts() -> None:
    """The start-up timeout's line named a worker "still loading after 6 s failed to
    start 3 time(s)": the process loading now and its failed predecessors are two facts."""
    ws = WorkerSlot(ident=1, model_index=0, failures=3, last_exit_reason="model_load")
    ws.last_error = "ValueError: no file"
    assert Arbiter._worker_state(ws, 100.0) == (
        "worker-1 failed to start 3 time(s) (last: model_load: ValueError: no file)"
    )
    ws.child = SimpleNamespace(returncode=None, started=94.0)  # type: ignore[assignment]
    assert Arbiter._worker_state(ws, 100.0) == (
        "worker-1 still loading after 6 s; failed to start 3 time(s) "
        "(last: model_load: ValueError: no file)"
    )
    fresh = WorkerSlot(ident=0, model_index=0)
    assert Arbiter._worker_state(fresh, 100.0) == "worker-0 not started"
    fresh.child = SimpleNamespace(returncode=None, started=90.0)  # type: ignore[assignment]
    assert Arbiter._worker_state(fresh, 100.0) == "worker-0 still loading after 10 s"


def test_a_models_positions_take_its_devices_in_turn_and_keep_them() -> None:
    """``device = "cuda:0,cuda:1"``: the model's first position runs on GPU 0, its second
    on GPU 1, its third on GPU 0 again, counted among the model's own positions, and a
    position keeps its device through restarts, recycles and scaling (a scale-down
    retires the last positions; a scale-up revives them before it adds any)."""
    from ringserve.ipc.child import ChildSpec
    from ringserve.ipc.config import ModelSettings, Settings
    from ringserve.supervisor.positions import rank_in_model

    spread = ModelSettings(name="r50", handler="identity", device="cuda:0,cuda:1", workers=3)
    other = ModelSettings(name="id", handler="identity")
    # Positions as the arbiter makes them at start, then one more by ``ctl scale``.
    workers = [WorkerSlot(0, 0), WorkerSlot(1, 0), WorkerSlot(2, 1), WorkerSlot(3, 0)]
    workers.append(WorkerSlot(4, 0))
    assert [rank_in_model(workers, w) for w in workers] == [0, 1, 0, 2, 3]
    workers[3].retire()  # scaled down, then up again: the same position, the same rank
    workers[3].revive(1.0)
    assert rank_in_model(workers, workers[3]) == 2
    # What the arbiter hands each worker it starts (a restart or a replacement alike).
    spawned: list[ChildSpec] = []
    arb = SimpleNamespace(
        settings=Settings(models=(spread, other)),
        workers=workers,
        _new_spec=lambda role, ident, model: ChildSpec(role, ident, 0, "", "", 0, model),
        _spawn=spawned.append,
    )
    for w in workers:
        Arbiter._spawn_worker(arb, w)  # type: ignore[arg-type]
    assert [s.device for s in spawned] == ["cuda:0", "cuda:1", "cpu", "cuda:0", "cuda:1"]
