"""The supervisor's loop, run whole on a real arena with stand-in children: processes
that do nothing until SIGTERM ends them. The scenario runs in its own interpreter (a
supervisor sets process-wide state: its signal handlers and the wake-up fd)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# A supervisor for one identity model whose children are stand-ins. It sends itself a
# SIGTERM once they run, then drains and stops as it would for systemd. Prints run()'s
# exit code and the timeouts of every wait the loop began after it had nothing left to
# stop.
SCENARIO = """
import logging, os, signal, subprocess, sys
from ringserve.supervisor import arbiter
from ringserve.supervisor.children import Child
from ringserve.supervisor.cli import _serve_parser, settings_from_args

logging.basicConfig(level=logging.INFO)
sock, instance = sys.argv[1:]
args = ["--model", "id=identity", "--instance", instance, "--admin-socket", sock]
arb = arbiter.Arbiter(settings_from_args(_serve_parser().parse_args(args)), [])

def stand_in(spec):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(sleeper, start_new_session=True)
    return Child(spec, proc, os.pidfd_open(proc.pid))

arbiter.spawn = stand_in
spawn_missing = arb._spawn_missing

def spawn_then_stop():
    spawn_missing()
    os.kill(os.getpid(), signal.SIGTERM)

arb._spawn_missing = spawn_then_stop
select = arb.selector.select
waits_when_stopped = []

def watched_select(timeout=None):
    if arb.phase == "stopped":
        waits_when_stopped.append(timeout)
    return select(timeout)

arb.selector.select = watched_select
print(arb.run(), waits_when_stopped)
"""


def test_the_supervisor_returns_once_its_last_child_has_exited(tmp_path: Path) -> None:
    """The tick that reaps the last child ends the loop. The loop used to wait once more
    before it looked, and every stop, each systemd restart among them, took a full
    tick (1 s) longer than its children did."""
    args = [str(tmp_path / "admin.sock"), f"loop{os.getpid()}"]
    out = subprocess.run(
        [sys.executable, "-c", SCENARIO, *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    code, waits = out.stdout.split(maxsplit=1)
    assert code == "0", out.stderr[-3000:]
    assert ast.literal_eval(waits) == [], out.stderr[-3000:]
    assert "SIGTERM: draining" in out.stderr, out.stderr[-3000:]
