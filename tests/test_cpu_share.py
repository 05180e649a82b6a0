"""Sharing a model's CPU threads among its workers: each worker's share is read from the
real control records in shared memory, as its siblings announce their batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.gpu_worker.cpu_share import ThreadShare
from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name
from ringserve.ipc.layout import ProcState, Role


@pytest.fixture
def arena(tmp_path: Path):
    geometry = ArenaGeometry(n_slots=8, slot_bytes=4096, n_models=2, n_procs=8, n_frontends=1)
    a = Arena.create(str(tmp_path / segment_name("share")), geometry)
    yield a
    a.close()


def worker(arena: Arena, index: int, model: int = 0, state: ProcState = ProcState.READY) -> None:
    rec = arena.control[index]
    rec["role"], rec["model"], rec["state"], rec["pid"] = Role.WORKER, model, state, 100 + index


def share(arena: Arena, index: int, budget: int = 4, backlog: int = 0, **kw) -> ThreadShare:
    calls: list[int] = []
    s = ThreadShare(arena, index, 0, budget, kw.pop("enabled", True), lambda: backlog, calls.append)
    s.calls = calls  # type: ignore[attr-defined]
    return s


def test_alone_a_worker_uses_the_whole_budget_and_shares_it_when_joined(arena):
    for i in (1, 2):
        worker(arena, i)
    a, b = share(arena, 1), share(arena, 2)
    assert a.enter(4) == 4  # b idle: all four threads
    assert b.enter(4) == 2  # announced, then counted: a is running too
    a.leave()
    assert a.enter(4) == 2  # b still running
    assert a.calls == [2] and b.calls == [2]  # set only when the share changes
    b.leave()
    a.leave()
    assert arena.control[1]["inflight"] == 0 and arena.control[2]["inflight"] == 0
    assert a.enter(1) == 4 and a.calls == [2, 4]


def test_queued_work_counts_as_a_second_runner_only_when_a_sibling_can_take_it(arena):
    worker(arena, 1)
    alone = share(arena, 1, backlog=3)
    assert alone.enter(4) == 4  # no sibling: the queue waits for this worker anyway
    worker(arena, 2)
    assert share(arena, 1, backlog=3).enter(4) == 2  # an idle sibling is about to run it


def test_other_models_stopped_workers_and_frontends_do_not_count(arena):
    worker(arena, 1)
    worker(arena, 2, model=1)
    worker(arena, 3, state=ProcState.STOPPED)
    arena.control[0]["role"], arena.control[0]["inflight"] = Role.FRONTEND, 7
    for i in (2, 3):
        arena.control[i]["inflight"] = 4
    assert share(arena, 1).enter(4) == 4


def test_unshared_it_touches_nothing(arena):
    for i in (1, 2):
        worker(arena, i)
    arena.control[2]["inflight"] = 4
    s = share(arena, 1, enabled=False)
    assert s.enter(3) == 4 and s.calls == []
    assert arena.control[1]["inflight"] == 0  # nobody reads it: no write on the hot path
    one = share(arena, 1, budget=1)
    assert one.enter(1) == 1 and one.calls == []  # a budget of one has nothing to share


def test_the_profile_takes_the_share_each_worker_gets_under_load(arena):
    """The warm-up profile counts every worker of the model as running, even alone."""
    worker(arena, 1)
    s = share(arena, 1)
    assert s.enter(1, runners=2) == 2 and s.calls == [2]
    s.leave()
    assert share(arena, 1, enabled=False).enter(1, runners=2) == 4  # unshared: its own


def test_idle_ready_siblings_split_the_queue_instead_of_one_taking_it_all(arena):
    """8 queued, 2 ready workers idle: take 4 and leave 4 to the sibling; a sibling that
    is busy, still starting, or sharing nothing leaves the whole target to this one."""
    for i in (1, 2):
        worker(arena, i)
    a = share(arena, 1)
    assert a.batch_limit(8, 8) == 4
    assert a.batch_limit(8, 5) == 3 and a.batch_limit(8, 1) == 8
    assert a.batch_limit(2, 8) == 2  # never past the target
    arena.control[2]["inflight"] = 4  # the sibling is running a batch
    assert a.batch_limit(8, 8) == 8
    arena.control[2]["inflight"] = 0
    arena.control[2]["state"] = ProcState.STARTING  # still profiling: cannot take any
    assert a.batch_limit(8, 8) == 8
    arena.control[2]["state"] = ProcState.READY
    assert share(arena, 1, enabled=False).batch_limit(8, 8) == 8
