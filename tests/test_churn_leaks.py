"""What a long-running server must not accumulate as processes die and are replaced or
as clients misbehave: each test repeats an event a few times and checks that what it
leaves behind stays at the count of a couple of events, not one per event."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A supervisor of our own making (no set-up: no arena, signal handlers or metric files)
# with one identity model of two worker positions and two frontend positions, each held
# by a stand-in that only has a name: what ``ctl restart`` looks at. It sends
# ``restart`` N times for each and prints the restarts left pending.
RESTARTS = """
import sys
from types import SimpleNamespace
from ringserve.supervisor.arbiter import Arbiter
from ringserve.supervisor.cli import _serve_parser, settings_from_args
from ringserve.supervisor.commands import run_command
from ringserve.supervisor.positions import FrontendSlot, WorkerSlot

n = int(sys.argv[1])
args = ["--model", "id=identity", "--workers", "2", "--frontends", "2"]
arb = Arbiter(settings_from_args(_serve_parser().parse_args(args)), [])
arb.arena = SimpleNamespace()  # (asserted present; restart does not touch it)
arb.phase = "running"
arb.frontends = [FrontendSlot(i) for i in range(2)]
arb.workers = [WorkerSlot(i, 0) for i in range(2)]
for p in (*arb.frontends, *arb.workers):
    role = "frontend" if isinstance(p, FrontendSlot) else "worker"
    p.child = SimpleNamespace(name=f"{role}-{p.ident}")
for _ in range(n):
    for name in ("worker-0", "worker-1", "frontend-1"):
        run_command(arb, "restart", {"id": name})
print(len(arb.rolling))
"""


def _pending_after(n: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RESTARTS, str(n)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_repeated_restarts_of_one_process_do_not_pile_up() -> None:
    """``ctl restart worker-0`` appended to the rolling-restart list each time it was
    sent: a client retrying on its timeout, or a script looping on the command, queued
    one full replacement (a model load) per call, run one after another for minutes
    (26 pending after 30 calls on a live server). A restart already waiting its turn
    covers the next request for the same process."""
    after_2, after_20 = _pending_after(2), _pending_after(20)
    assert after_2 == 3
    assert after_20 <= after_2


# A set-up supervisor (arena, admin socket, metric files) with one identity worker
# position whose process is a sleeping stand-in: killed and replaced N times through
# the supervisor's own exit handling. Prints its open fds, its children still known to
# it, and its zombie children after 2 and after N deaths.
DEATHS = """
import os, selectors, subprocess, sys, time
from ringserve.ipc.layout import ProcState
from ringserve.supervisor.arbiter import Arbiter
from ringserve.supervisor.children import Child
from ringserve.supervisor.cli import _serve_parser, settings_from_args

sock, instance, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
args = ["--model", "id=identity", "--workers", "1", "--instance", instance]
arb = Arbiter(settings_from_args(_serve_parser().parse_args([*args, "--admin-socket", sock])), [])
arb.setup()

def zombies():
    out = subprocess.run(["ps", "-o", "stat=", "--ppid", str(os.getpid())],
                         capture_output=True, text=True).stdout.split()
    return sum(s.startswith("Z") for s in out)

try:
    ws = arb.workers[0]
    counts = []
    for i in range(n):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        child = Child(arb._new_spec("worker", ws.ident, ws.model_index), proc,
                      os.pidfd_open(proc.pid))
        ws.child = child
        arb.selector.register(child.pidfd, selectors.EVENT_READ, child)
        arb.arena.control[child.control_index]["state"] = ProcState.READY
        arb._check_children(time.monotonic())
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        for key, _ in arb.selector.select(5):
            if key.data is child:
                arb._on_exit(child)
        if i + 1 in (2, n):
            known = len(arb.all_children()) + len(arb.unrecovered) + len(arb.memory._full)
            counts.append((len(os.listdir("/proc/self/fd")), known, zombies(),
                           len(arb.free_controls)))
    print(*counts[0], *counts[1])
finally:
    arb.teardown()
"""


def test_worker_deaths_leave_no_fds_records_or_zombies_in_the_supervisor(
    tmp_path: Path,
) -> None:
    """Each death is handled as on a live server (its pidfd wakes the loop, the exit is
    reaped and its control record freed): after 20 deaths the supervisor holds no more
    fds, children, zombies or used control records than after 2."""
    args = [str(tmp_path / "admin.sock"), f"churn{os.getpid()}", "20"]
    out = subprocess.run(
        [sys.executable, "-c", DEATHS, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fds_2, known_2, zombies_2, free_2, fds_n, known_n, zombies_n, free_n = map(
        int, out.stdout.split()
    )
    assert fds_n <= fds_2 + 2
    assert known_n <= known_2
    assert zombies_n == zombies_2 == 0
    assert free_n >= free_2
