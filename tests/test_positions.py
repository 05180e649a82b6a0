"""A configured position outlives its processes: drained or scaled down it is not
restarted, not even by a back-off that was due; wanted again, it starts fresh."""

from __future__ import annotations

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
