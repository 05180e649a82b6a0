"""What the supervisor publishes for a model (LOADING, SERVING, RECOVERING, FAILING),
driven on a real arena in a supervisor of our own making: orders of events that a live
server meets only by chance, made certain. Each scenario runs in its own interpreter (a
supervisor sets process-wide state: its metric files, signal handlers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A set-up supervisor (arena, admin socket) with one identity worker position; a
# sleeping process stands in for its worker, its control record says READY (what a
# worker writes once loaded, and what frontends send work to), then it is SIGKILLed.
# argv: admin socket, instance, then "tick" (a tick runs before the exit is handled)
# or "exit" (the pidfd wakes the supervisor first). Prints the model's availability
# before the kill and after the exit and the tick after it, and the position's failed
# starts.
SCENARIO = """
import os, selectors, subprocess, sys
from ringserve.ipc.layout import ModelAvailability, ProcState
from ringserve.supervisor.arbiter import Arbiter
from ringserve.supervisor.children import Child
from ringserve.supervisor.cli import _serve_parser, settings_from_args

sock, instance, order = sys.argv[1:]
args = ["--model", "id=identity", "--workers", "1", "--instance", instance]
arb = Arbiter(settings_from_args(_serve_parser().parse_args([*args, "--admin-socket", sock])), [])
arb.setup()
try:
    ws = arb.workers[0]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = Child(arb._new_spec("worker", ws.ident, ws.model_index), proc, os.pidfd_open(proc.pid))
    ws.child = child
    arb.selector.register(child.pidfd, selectors.EVENT_READ, child)
    arb.arena.control[child.control_index]["state"] = ProcState.READY
    availability = lambda: ModelAvailability(int(arb.arena.models[0]["availability"])).name
    if order == "tick":
        arb._check_children(0.0)
        arb._check_ready()
    before = availability()
    proc.kill()
    proc.wait(10)
    arb._on_exit(child)
    arb._check_ready()
    print(before, availability(), ws.failures)
finally:
    arb.teardown()
"""


def _after_a_ready_worker_died(tmp_path: Path, order: str) -> tuple[str, str, int]:
    args = [str(tmp_path / "admin.sock"), f"av{os.getpid()}{order}", order]
    out = subprocess.run(
        [sys.executable, "-c", SCENARIO, *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, failures = out.stdout.split()
    return before, after, int(failures)


def test_a_first_worker_dying_before_a_tick_saw_it_ready_leaves_its_model_recovering(
    tmp_path: Path,
) -> None:
    """Frontends take requests once a worker's record says READY; the supervisor's tick
    notices up to a second later. A worker that died in that second (its first batch
    crashed it) left the model LOADING, which frontends refuse with 503 "not ready"
    until a replacement loads, where a model whose worker dies later queues
    (RECOVERING). CI met it: two workers, the second still loading, the first killed
    by a request sent as soon as the server was ready."""
    assert _after_a_ready_worker_died(tmp_path, "exit") == ("LOADING", "RECOVERING", 0)


def test_a_worker_dying_after_a_tick_saw_it_ready_leaves_its_model_recovering(
    tmp_path: Path,
) -> None:
    """The order a live server meets nearly always: the tick publishes SERVING first."""
    assert _after_a_ready_worker_died(tmp_path, "tick") == ("SERVING", "RECOVERING", 0)
