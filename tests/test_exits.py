"""What the supervisor does when a worker exits (``supervisor/exits.py``), on the
arbiter's own methods with stand-in state: the restart back-off of a worker that
keeps dying before it is ready, and none for one that was serving."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from ringserve.ipc.errors import ExitCode
from ringserve.supervisor import exits
from ringserve.supervisor.children import Phase
from ringserve.supervisor.positions import FrontendSlot, WorkerSlot

NOW = 1000.0


class _Arbiter(exits.ExitHandling):
    """The state ``_worker_exited`` reads, for one model with one worker position."""

    def __init__(self, backoff_s: float, backoff_max_s: float) -> None:
        worker = NS(restart_backoff_s=backoff_s, restart_backoff_max_s=backoff_max_s)
        self.settings = NS(worker=worker, models=[NS(name="m")])
        self.replacements: list = []
        self.ws = WorkerSlot(ident=0, model_index=0)
        self.phase = "running"
        self.ever_ready = True
        self.restarted: list[str] = []
        self.stats = NS(restarted=lambda role, reason, model=None: self.restarted.append(reason))

    def _worker_slot(self, child: object) -> WorkerSlot:
        return self.ws

    def _notify_status(self) -> None:
        pass

    def exit(self, phase: Phase, rc: int = ExitCode.MODEL_LOAD) -> float:
        """A process in this position exits in ``phase``; returns its restart's delay."""
        child = NS(phase=phase, model_index=0, name="worker-0")
        self.ws.child = child  # type: ignore[assignment]
        self._worker_exited(child, ExitCode.describe(rc), "", rc)  # type: ignore[arg-type]
        assert self.ws.child is None and self.ws.restart_at is not None
        return self.ws.restart_at - NOW


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exits, "time", NS(monotonic=lambda: NOW))


def test_failed_starts_back_off_exponentially_up_to_the_maximum() -> None:
    arb = _Arbiter(backoff_s=0.5, backoff_max_s=3.0)
    delays = [arb.exit(Phase.STARTING) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert arb.ws.failures == 6 and arb.ws.restarts == 6 and len(arb.restarted) == 6


def test_a_worker_that_was_serving_restarts_at_once_and_its_back_off_is_kept() -> None:
    """A crash after readiness is no failed start: no back-off of its own, and it does
    not reset the count of the failed starts before it either (that is readiness's)."""
    arb = _Arbiter(backoff_s=0.5, backoff_max_s=30.0)
    assert arb.exit(Phase.STARTING) == 0.5
    arb.ws.failures = 0  # it became ready (promote_if_ready resets the count)
    assert arb.exit(Phase.READY, rc=-9) == 0.0
    assert [arb.exit(Phase.STARTING) for _ in range(3)] == [0.5, 1.0, 2.0]


def test_a_frontend_that_keeps_failing_to_start_backs_off_too() -> None:
    arb = _Arbiter(backoff_s=0.5, backoff_max_s=3.0)
    fs = FrontendSlot(ident=0)
    arb.frontends = [fs]

    def exit_frontend(phase: Phase) -> float:
        child = NS(phase=phase, ident=0, name="frontend-0")
        fs.child = child  # type: ignore[assignment]
        arb._frontend_exited(child, "exit 1")  # type: ignore[arg-type]
        assert fs.child is None and fs.restart_at is not None
        return fs.restart_at - NOW

    assert [exit_frontend(Phase.STARTING) for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert exit_frontend(Phase.READY) == 0.0  # was serving: no failed start
    assert fs.restarts == 5 and fs.failures == 4
