"""How the supervisor asks a child to stop (``Replacing.stop_child``): a worker is told
through its control record (it finishes its batch and exits as recycled) and by SIGTERM,
and every child gets a deadline after which the supervisor's check SIGKILLs it: for a
recycled worker, not only at shutdown, that deadline is the only one."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from test_ipc import make_arena

from ringserve.ipc.child import ChildSpec
from ringserve.ipc.layout import Command
from ringserve.supervisor import replacing
from ringserve.supervisor.children import Child, Phase

NOW = 500.0


class _Arbiter(replacing.Replacing):
    def __init__(self, arena: object, children: list[Child]) -> None:
        self.arena = arena
        self.settings = NS(worker=NS(stop_timeout_s=7.0))
        self.children = children
        self.leaving: list[Child] = []

    def all_children(self) -> list[Child]:
        return self.children


@pytest.mark.parametrize("role", ["worker", "frontend"])
def test_a_child_asked_to_stop_is_told_signalled_and_given_a_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    monkeypatch.setattr(replacing, "time", NS(monotonic=lambda: NOW))
    arena = make_arena(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        spec = ChildSpec(role, 0, 2, arena_path="", settings_json="", parent_pid=0)
        child = Child(spec=spec, popen=proc, pidfd=-1)
        child.phase = Phase.READY
        arb = _Arbiter(arena, [child])
        arb.stop_child(child, "recycle")
        assert (child.phase, child.stop_reason) == (Phase.STOPPING, "recycle")
        assert child.stop_deadline == NOW + 7.0, "nothing would kill it if it never stops"
        rec = arena.control[2]
        told = (int(rec["command"]), int(rec["command_seq"]))
        assert told == ((Command.STOP, 1) if role == "worker" else (0, 0))
        assert proc.wait(10) == -signal.SIGTERM
        arb.stop_child(child, "again")  # asked once: nothing changes
        assert child.stop_reason == "recycle" and int(rec["command_seq"]) == told[1]
    finally:
        proc.kill()
        proc.wait()
        arena.close()
