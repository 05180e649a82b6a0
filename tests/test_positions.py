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
