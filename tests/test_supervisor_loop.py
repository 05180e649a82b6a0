"""The supervisor's loop, run whole on a real arena with stand-in children: processes
that report ready in their control record, as a frontend or a worker does once it
serves, and then do nothing until SIGTERM ends them. Each scenario runs in its own
interpreter (a supervisor sets process-wide state: its signal handlers and the wake-up
fd)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# A supervisor for one identity model, its children stand-ins; SCENARIOS adds how it
# is driven and what it prints.
SUPERVISOR = """
import logging, os, signal, subprocess, sys, time
from ringserve.supervisor import arbiter
from ringserve.supervisor.children import Child, Phase
from ringserve.supervisor.cli import _serve_parser, settings_from_args

logging.basicConfig(level=logging.INFO)
sock, instance, *more = sys.argv[1:]
args = ["--model", "id=identity", "--instance", instance, "--admin-socket", sock, *more]
arb = arbiter.Arbiter(settings_from_args(_serve_parser().parse_args(args)), [])
STAND_IN = '''
import sys, time
from ringserve.ipc.arena import Arena
from ringserve.ipc.control import ControlBlock
from ringserve.ipc.layout import ProcState
path, index, supervisor_efd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ControlBlock(Arena.attach(path), index, supervisor_efd).set_state(ProcState.READY)
time.sleep(60)
'''

# A lighter worker stand-in for scenarios that start scores of them (no numpy: 20 ms
# a start, not 160): its record marked ready through its byte offsets, and a SIGTERM
# taken as a worker finishing its batch does, in STOP_S.
LIGHT_STAND_IN = '''
import mmap, os, signal, struct, sys, time
path, state, ready, beat, efd, stop_s = sys.argv[1:]
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(float(stop_s)), os._exit(0)))
with open(path, "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
now = time.monotonic_ns()
struct.pack_into("<q", m, int(ready), now)
struct.pack_into("<q", m, int(beat), now)
struct.pack_into("<I", m, int(state), 2)  # ProcState.READY
os.write(int(efd), (1).to_bytes(8, "little"))
time.sleep(60)
'''

fail_once = set()  # roles whose next stand-in exits 1 before it is ready
hang_once = set()  # roles whose next stand-in never reports ready
light_workers_stop_s = None  # a number: workers are LIGHT_STAND_INs stopping in that time

def light_args(spec):
    from ringserve.ipc.layout import CONTROL, CONTROL_BYTES
    base = arb.arena.geometry.offsets()["control"] + spec.control_index * CONTROL_BYTES
    fields = ("state", "ready_ns", "heartbeat_ns")
    return [str(base + CONTROL.fields[f][1]) for f in fields]

def stand_in(spec):
    args = [spec.arena_path, str(spec.control_index), str(spec.supervisor_efd)]
    code = STAND_IN
    if spec.role == "worker" and light_workers_stop_s is not None:
        code = LIGHT_STAND_IN
        args = [spec.arena_path, *light_args(spec), str(spec.supervisor_efd)]
        args.append(str(light_workers_stop_s))
    if spec.role in fail_once:
        fail_once.discard(spec.role)
        code = "raise SystemExit(1)"
    if spec.role in hang_once:
        hang_once.discard(spec.role)
        code = "import time; time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        pass_fds=(spec.supervisor_efd,),
        start_new_session=True,
    )
    return Child(spec, proc, os.pidfd_open(proc.pid))

arbiter.spawn = stand_in
"""

SCENARIOS = {
    # It stops once its children are up, as for systemd; prints run()'s exit code and
    # the timeout of every wait the loop began after it had nothing left to stop.
    "stop": """
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
""",
    # No tick is due for an hour: only a wake-up moves the loop. Once every child is
    # promoted it stops; prints run()'s exit code and the children's phases then.
    "ready": """
tick = arb._tick
phases = []

def hour_long_tick():
    tick()
    if arb.phase == "running" and not phases:
        if all(c.phase is Phase.READY for c in arb.all_children()):
            phases.extend(c.phase.value for c in arb.all_children())
            os.kill(os.getpid(), signal.SIGTERM)
    return 3600.0

arb._tick = hour_long_tick
print(arb.run(), phases)
""",
    # The worker's first start fails, and its restart waits out a back-off. Stops once
    # the restarted worker is ready; prints run()'s exit code and each tick whose wait
    # ran past the restart's time: (the wait, the seconds left to the restart).
    "backoff": """
fail_once.add("worker")
tick = arb._tick
past_the_restart = []

def checked_tick():
    # Seconds left counted from before the tick: the tick counts its wait from its own
    # end, at or after this. Counted from after it, a preemption between its return and
    # the look read as a late wait (a loaded host: 3 to 40 ms each, every tick).
    now = time.monotonic()
    timeout = tick()
    due = [w.restart_at - now for w in arb.workers if w.child is None and w.restart_at]
    if due and timeout > max(0.01, min(due)) + 0.001:
        past_the_restart.append((round(timeout, 3), round(min(due), 3)))
    children = arb.all_children()
    if arb.phase == "running" and arb.workers[0].restarts and len(children) == 3:
        if all(c.phase is Phase.READY for c in children):
            os.kill(os.getpid(), signal.SIGTERM)
    return timeout

arb._tick = checked_tick
print(arb.run(), past_the_restart)
""",
    # Under a systemd watchdog (WATCHDOG_USEC: a ping every 0.3 s). Stops after ten
    # ticks; prints run()'s exit code and each tick whose wait ran past the next ping:
    # (the wait, the seconds left to the ping).
    "watchdog": """
tick = arb._tick
past_the_ping = []
ticks = []

def checked_tick():
    now = time.monotonic()  # before the tick, as in "backoff"
    timeout = tick()
    due = arb._next_watchdog - now
    if arb.phase == "running" and timeout > max(0.01, due) + 0.001:
        past_the_ping.append((round(timeout, 3), round(due, 3)))
    ticks.append(timeout)
    if len(ticks) == 10:
        os.kill(os.getpid(), signal.SIGTERM)
    return timeout

arb._tick = checked_tick
print(arb.run(), past_the_ping)
""",
    # The loop stalls 1.5 s once every child is ready, while a client asks it to drain
    # and is given 0.5 s for the answer. Stops at the tick after the stall; prints
    # run()'s exit code, the client's answer and the phase at that tick.
    "stalled": """
import threading
from ringserve.supervisor.admin_protocol import AdminClient, AdminError
arbiter.ADMIN_ANSWER_S = 0.5
tick = arb._tick
seen = []

def ask_to_drain():
    try:
        seen.append(AdminClient(sock, 5.0).call("drain"))
    except AdminError as e:
        seen.append(str(e))

def stalling_tick():
    timeout = tick()
    if arb.phase == "running" and not seen and all(c.phase is Phase.READY for c in arb.all_children()):
        asking = threading.Thread(target=ask_to_drain)
        asking.start()
        time.sleep(1.5)  # the stall: the request waits in the queue
        asking.join()
        return 0.01  # the loop then wakes for the request, and ticks again
    if len(seen) == 1:
        seen.append(arb.phase)
        os.kill(os.getpid(), signal.SIGTERM)
    return timeout

arb._tick = stalling_tick
print(arb.run(), seen)
""",
    # Scales the model to 64 workers, back to 1 and at once to 64 again: the 63 scaled
    # away take a second and a half to finish (their control records held meanwhile).
    # Stops once 64 workers serve and the others are gone; prints run()'s exit code
    # and the scale commands' answers.
    "records": """
from ringserve.supervisor.commands import scale
light_workers_stop_s = 1.5
tick = arb._tick
answers = []

def serving():
    return sum(1 for w in arb.workers if w.child and w.child.phase is Phase.READY)

def driven_tick():
    timeout = tick()
    if arb.phase != "running":
        return timeout
    children = arb.all_children()
    if not answers and all(c.phase is Phase.READY for c in children):
        answers.append(scale(arb, {"model": "id", "workers": 64}))
    elif len(answers) == 1 and serving() == 64:
        answers.append(scale(arb, {"model": "id", "workers": 1}))
        answers.append(scale(arb, {"model": "id", "workers": 64}))
    elif len(answers) == 3 and serving() == 64 and len(children) == 2 + 64:
        answers.append(sum(w.restarts for w in arb.workers))
        os.kill(os.getpid(), signal.SIGTERM)
    return timeout

arb._tick = driven_tick
print(arb.run(), answers)
""",
    # Its worker takes 30 s to finish after SIGTERM (a batch that does not end). Stops
    # once every child is ready; prints run()'s exit code and, for each child, its role,
    # why the supervisor killed it and its exit status.
    "unstoppable": """
light_workers_stop_s = 30
fast = os.environ.get("SECOND_SIGTERM") == "1"  # and a second SIGTERM: a fast stop
tick = arb._tick
stop_child = arb.stop_child
children = []
frontends_alive_at_worker_stop = []

def watched_stop(child, reason):
    if child.role == "worker" and child.phase is not Phase.STOPPING:
        alive = [c for c in arb.all_children() if c.role == "frontend" and c.returncode is None]
        frontends_alive_at_worker_stop.append(len(alive))
    return stop_child(child, reason)

arb.stop_child = watched_stop

def driven_tick():
    timeout = tick()
    if arb.phase == "running" and not children:
        if all(c.phase is Phase.READY for c in arb.all_children()):
            children.extend(arb.all_children())
            os.kill(os.getpid(), signal.SIGTERM)
    elif fast and arb.phase == "stopping" and not arb.workers_stopping:
        fast_sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return timeout

fast_sent = []
arb._tick = driven_tick
code = arb.run()
kills = sorted((c.role, c.kill_reason, c.returncode) for c in children)
print(code, [kills, frontends_alive_at_worker_stop])
""",
    # Once every child is ready, queues a request nobody runs (the stand-in worker takes
    # nothing) and stops; prints run()'s exit code and [the request's state and status
    # at the last tick, whether its frontend was woken for it].
    "queued": """
from ringserve.ipc import wake
from ringserve.ipc.layout import DTYPE_CODE
from ringserve.ipc.ring import RequestRing
tick = arb._tick
seen = []

def driven_tick():
    timeout = tick()
    if arb.phase == "running" and not seen:
        if all(c.phase is Phase.READY for c in arb.all_children()):
            slot = int(arb.arena.frontend_slots(1)[0])
            arb.arena.headers.write_request(
                slot, owner=1, owner_pid=os.getpid(), model=0, kind=0,
                dtype_code=DTYPE_CODE["float32"], shape=(1,), nbytes=4, rows=1,
                deadline_ns=0, enqueued_ns=time.monotonic_ns(), request_id=b"late",
            )
            RequestRing(arb.arena, 0).push(slot)
            wake.drain(arb.frontend_efds[1])
            seen.extend([slot, None, None, False])
            os.kill(os.getpid(), signal.SIGTERM)
    elif seen:
        rec = arb.arena.slots[seen[0]]
        woken = seen[3] or wake.drain(arb.frontend_efds[1]) > 0
        seen[1:] = [int(rec["state"]), int(rec["status"]), woken]
    return timeout

arb._tick = driven_tick
code = arb.run()
print(code, seen[1:])
""",
    # Once every child is ready, recycles the worker (its replacement never ready when
    # STAND_IN_HANGS=worker). Stops once the recycle ended; prints run()'s
    # exit code and [the replacement's phase when the old worker was asked to stop, or
    # None; whether the old one still serves; its position's last recycle reason].
    "recycle": """
hang = os.environ.get("STAND_IN_HANGS") == "worker"
tick = arb._tick
stop_child = arb.stop_child
seen = {}

def watched_stop(child, reason):
    if child is seen.get("old"):  # (the position already names its replacement)
        seen["new_when_old_stopped"] = arb.workers[0].child.phase.value
    return stop_child(child, reason)

arb.stop_child = watched_stop

def driven_tick():
    timeout = tick()
    if arb.phase != "running":
        return timeout
    ws = arb.workers[0]
    if "old" not in seen and all(c.phase is Phase.READY for c in arb.all_children()):
        seen["old"] = ws.child
        if hang:
            hang_once.add("worker")
        assert arb.replace_worker(ws, "test")
        if hang:
            assert not arb.replace_worker(ws, "test")  # one replacement at a time
    elif "old" in seen and not arb.replacements and "done" not in seen:
        seen["done"] = [
            seen.get("new_when_old_stopped"),
            ws.child is seen["old"] and ws.child.phase is Phase.READY,
            ws.last_recycle_reason,
        ]
        os.kill(os.getpid(), signal.SIGTERM)
    return min(timeout, 0.05)

arb._tick = driven_tick
print(arb.run(), seen["done"])
""",
    # Once every child is ready, runs admin commands as the admin socket does
    # (``run_command``) and stops; prints run()'s exit code and each command's answer,
    # or the text of the error the client would be told.
    "commands": """
from ringserve.supervisor.commands import run_command
tick = arb._tick
answers = []

def ask(cmd, **args):
    try:
        answers.append(run_command(arb, cmd, args))
    except Exception as e:  # what the admin server turns into an error reply
        answers.append(f"{type(e).__name__}: {e}")

def driven_tick():
    timeout = tick()
    if arb.phase == "running" and not answers:
        if all(c.phase is Phase.READY for c in arb.all_children()):
            for n in (0, 65, True, "2"):
                ask("scale", model="id", workers=n)
            ask("scale", model="nope", workers=1)
            ask("unload", model="nope")
            ask("load", model="nope")
            ask("frobnicate")
            ask("recycle", id="worker-9")
            ask("recycle", id="frontend-0")
            ask("recycle", id="worker-0")
            ask("recycle", id="worker-0")  # already being replaced
            ask("scale", model="id", workers=2)
            answers.append(run_command(arb, "config", {})["models"][0]["workers"])
            ask("pause")
            answers.append(int(arb.arena.header["paused"]))
            ask("resume")
            answers.append(int(arb.arena.header["paused"]))
            os.kill(os.getpid(), signal.SIGTERM)
    elif arb.phase != "running" and len(answers) == 18:
        ask("drain", id="worker-0")  # a stopping server takes no more actions
        answers[-1] = answers[-1].replace(arb.phase, "PHASE")
    return timeout

arb._tick = driven_tick
print(arb.run(), answers)
""",
}


def _run(
    tmp_path: Path, scenario: str, *more: str, env: dict[str, str] | None = None
) -> tuple[str, object]:
    """Run the scenario (``more``: arguments of ``ringserve serve``); returns run()'s
    exit code and what the scenario printed."""
    args = [str(tmp_path / "admin.sock"), f"loop{os.getpid()}{scenario}", *more]
    out = subprocess.run(
        [sys.executable, "-c", SUPERVISOR + SCENARIOS[scenario], *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    code, printed = out.stdout.split(maxsplit=1)
    assert code == "0", out.stderr[-3000:]
    assert "SIGTERM: draining" in out.stderr, out.stderr[-3000:]
    return code, ast.literal_eval(printed)


def test_the_supervisor_returns_once_its_last_child_has_exited(tmp_path: Path) -> None:
    """The tick that reaps the last child ends the loop. The loop used to wait once more
    before it looked, and every stop, each systemd restart among them, took a full
    tick (1 s) longer than its children did."""
    _, waits_when_stopped = _run(tmp_path, "stop")
    assert waits_when_stopped == []


def test_a_child_reporting_ready_wakes_the_supervisor(tmp_path: Path) -> None:
    """A child rings the supervisor's eventfd as it reports ready, and the supervisor
    promotes it then: systemd's READY=1, a recycle's hand-over and each step of a
    rolling restart wait on that promotion, which came at the next tick, up to 1 s
    late. With no tick due for an hour, the old supervisor waited out this test's
    timeout."""
    _, phases = _run(tmp_path, "ready")
    assert phases == ["ready"] * 3  # two frontends and a worker


def test_a_restart_after_a_back_off_is_not_late(tmp_path: Path) -> None:
    """The loop's wait ends when a back-off does: a restart the log announced "in 0.5 s"
    came at the first tick after that, up to a second late."""
    _, past_the_restart = _run(tmp_path, "backoff", "--set", "worker.restart_backoff_s=0.5")
    assert past_the_restart == []


def test_workers_scaled_back_up_while_others_still_stop_wait_for_their_records(
    tmp_path: Path,
) -> None:
    """Each worker process holds a control record, fixed in number at start. Scaled to
    64, back to 1 and at once to 64 again, the supervisor started the new workers while
    the 63 scaled away still finished their batches holding theirs: it took a record
    from an empty list and died (IndexError), and every child with it. Now a start
    waits for a record to be freed by an exit."""
    _, answers = _run(tmp_path, "records")
    others = [f"worker-{i}" for i in range(1, 64)]
    assert answers == [
        {"model": "id", "workers": 64, "starting": others},
        {"model": "id", "workers": 1, "stopping": others},
        # New positions: the 63 scaled away are still stopping, so none is reused yet.
        {"model": "id", "workers": 64, "starting": [f"worker-{i}" for i in range(64, 127)]},
        0,  # no worker died on the way
    ]


def test_a_watchdog_ping_is_not_late(tmp_path: Path) -> None:
    """The loop's wait ends when a systemd watchdog ping is due: it ignored the ping's
    time, so a ping came at the first tick after it, up to a second late, and a
    WatchdogSec= of 2 s or less had systemd kill a healthy server."""
    env = {"WATCHDOG_USEC": "600000", "WATCHDOG_PID": ""}
    _, past_the_ping = _run(tmp_path, "watchdog", env=env)
    assert past_the_ping == []


def test_a_command_whose_client_was_told_it_timed_out_is_not_run_later(tmp_path: Path) -> None:
    """The admin thread waits a while for the loop to run a command, then tells the
    client it did not answer; the command stayed queued and the loop ran it once free:
    a drain the operator was told had failed began later on its own."""
    _, seen = _run(tmp_path, "stalled")
    told, phase = seen
    assert "did not take the command within 0.5 s; it will not run it" in told
    assert phase == "running"  # not draining


def test_admin_commands_refuse_what_the_command_table_does_not_allow(tmp_path: Path) -> None:
    """The admin socket's commands (docs/deployment.md), run as the socket runs them:
    ``scale`` takes 1 to 64 workers of a known model (ctl checks the range too, but the
    socket is the contract: 0 would leave a model serving nothing, which is ``drain``'s
    to do), an unknown command or worker is an error (ctl exits 1 on it), a worker
    being replaced is not replaced again (a wrong id is answered with the workers there
    are, and a frontend's with the command that replaces it), ``config`` shows the
    scaled count,
    pause/resume flip intake, and a stopping server refuses actions."""
    _, answers = _run(tmp_path, "commands")
    must = '"workers" must be an integer from 1 to 64'
    assert answers == [
        f"AdminCommandError: {must}",
        f"AdminCommandError: {must}",
        f"AdminCommandError: {must}",
        f"AdminCommandError: {must}",
        "AdminCommandError: unknown model 'nope'",
        "AdminCommandError: unknown model 'nope'",
        "AdminCommandError: unknown model 'nope'",
        "AdminCommandError: unknown command 'frobnicate' (status, drain, restart, recycle, "
        "scale, unload, load, pause, resume, config)",
        "AdminCommandError: no worker 'worker-9' (workers: worker-0)",
        "AdminCommandError: no worker 'frontend-0' (workers: worker-0); a frontend is "
        "replaced with `ringserve ctl restart frontend-0`",
        {"recycling": "worker-0"},
        "AdminCommandError: worker-0 is not running or already being replaced",
        {"model": "id", "workers": 2, "starting": ["worker-1"]},
        2,
        {"paused": True},
        1,
        {"paused": False, "draining": False},
        0,
        "AdminCommandError: server is PHASE: drain refused",
    ], answers


def test_a_second_sigterm_kills_what_does_not_stop_without_the_stop_timeout(
    tmp_path: Path,
) -> None:
    """A fast stop gives its children seconds, not worker.stop_timeout_s (here longer
    than the scenario may run)."""
    args = ("--set", "worker.stop_timeout_s=600", "--set", "worker.heartbeat_timeout_s=600")
    _, (children, _) = _run(tmp_path, "unstoppable", *args, env={"SECOND_SIGTERM": "1"})
    assert ("worker", "stop_timeout", -9) in children


def test_a_stop_asks_the_workers_to_stop_only_once_the_frontends_are_gone(
    tmp_path: Path,
) -> None:
    """Frontends first: what they accepted may still need a worker to answer it."""
    _, (_, frontends_alive) = _run(tmp_path, "unstoppable", "--set", "worker.stop_timeout_s=1")
    assert frontends_alive == [0]


def test_a_request_still_queued_when_the_workers_stop_is_answered_503(tmp_path: Path) -> None:
    """Past the drain timeout, what is still queued has no worker to run it: it is
    answered (SHUTDOWN, a 503) and its frontend woken, not left to its deadline."""
    from ringserve.ipc.layout import SlotState, Status

    _, (state, status, woken) = _run(tmp_path, "queued", "--drain-timeout", "0.2")
    assert (state, status, woken) == (SlotState.DONE, Status.SHUTDOWN, True)


def test_a_worker_that_does_not_stop_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    """A stop waits worker.stop_timeout_s for a worker to finish, then SIGKILLs it: a
    batch that does not end cannot hold the supervisor's exit (and systemd's stop) up."""
    _, (children, _) = _run(tmp_path, "unstoppable", "--set", "worker.stop_timeout_s=1")
    assert children == [
        ("frontend", "", -15),
        ("frontend", "", -15),
        ("worker", "stop_timeout", -9),
    ]


def test_a_recycled_worker_stops_only_once_its_replacement_is_ready(tmp_path: Path) -> None:
    """No capacity dip: the old worker serves until its replacement reports ready."""
    _, (new_phase, old_serves, reason) = _run(tmp_path, "recycle")
    assert (new_phase, old_serves, reason) == ("ready", False, "test")


def test_a_replacement_not_ready_in_time_is_killed_and_the_old_worker_kept(
    tmp_path: Path,
) -> None:
    """A replacement still not ready after worker.start_timeout_s is killed; the worker
    it was to replace keeps serving, and its status says the recycle failed."""
    args = ("--set", "worker.start_timeout_s=1")
    env = {"STAND_IN_HANGS": "worker"}
    _, (new_phase, old_serves, reason) = _run(tmp_path, "recycle", *args, env=env)
    assert new_phase is None and old_serves
    assert reason.startswith("test failed: start_timeout"), reason
