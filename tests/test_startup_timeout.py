"""``server.startup_timeout_s``: a server whose models never all become ready gives up,
cleans up and exits non-zero (so systemd's ``Restart=`` or Kubernetes takes over),
instead of retrying a model that cannot load forever; once ready, the limit is gone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torchvision
from conftest import Server, alive, shm_segments, wait_until
from test_e2e_core import HANDLER_ENV

from ringserve.supervisor.exits import ServeExit

pytestmark = pytest.mark.e2e


def test_model_that_cannot_load_stops_the_server_after_the_startup_timeout(
    start_server,
) -> None:
    server: Server = start_server(
        "--model",
        "bad=python:support.fake_handlers:FailsToLoad",
        "--model",
        "good=identity",
        "--set",
        "server.startup_timeout_s=8",
        "--set",
        "worker.restart_backoff_s=0.2",
        env=HANDLER_ENV,
        ready=False,
    )
    rc = server.proc.wait(120)
    log = server.log()
    assert rc == ServeExit.STARTUP_TIMEOUT == 3, log[-3000:]
    lines = log.splitlines()
    [at] = [i for i, x in enumerate(lines) if "start-up timeout" in x]
    line = lines[at]
    assert "server.startup_timeout_s=8 s" in line, line
    assert re.search(r"model bad \(python:support\.fake_handlers:FailsToLoad\)", line), line
    assert "worker-0 " in line, line
    # What the worker last failed with, when it had failed by then (on a slow machine the
    # first load may still run at the deadline: the line says so instead).
    if any(re.search(r"worker-0 \(pid \d+\) exited: model_load", x) for x in lines[:at]):
        last = r"\(last: model_load: RuntimeError: weights file is corrupt\)"
        assert re.search(r"failed to start \d+ time\(s\) " + last, line), line
    else:
        assert "worker-0 still loading" in line, line
    assert "model good" not in line, line  # identity loads: only the failing one is named
    # The load's traceback once, then one line per retry (not a traceback each time).
    if "failed to load again" in log:
        assert log.count("Traceback (most recent call last)") == 1, log[-3000:]
    # The normal shutdown path: children stopped, shared memory and admin socket gone.
    assert "frontend-0" in log and not re.search(r"frontend-\d \(pid \d+\) exited: killed", log)
    assert shm_segments(server.instance) == []
    assert not os.path.exists(server.admin_socket)


def test_a_stop_reaching_a_worker_on_its_way_out_leaves_its_failure_as_it_was(
    start_server,
) -> None:
    """The start-up timeout stops the server while the worker that failed to load is
    still exiting (its atexit clean-up takes 10 s). The SIGTERM used to raise the
    loading worker's StopRequested inside that clean-up: a second traceback in the
    journal ("Exception ignored in atexit callback"), seen in CI with torch's own
    callback. Now the exit goes on: one traceback, and the exit says model_load."""
    server: Server = start_server(
        *("--model", "bad=python:support.fake_handlers:FailsToLoadAndExitsSlowly"),
        *("--set", "models.bad.options.exit_s=10", "--set", "server.startup_timeout_s=8"),
        env=HANDLER_ENV,
        ready=False,
        frontends=1,
    )
    assert server.proc.wait(120) == ServeExit.STARTUP_TIMEOUT, server.log()[-3000:]
    log = server.log()
    lines = log.splitlines()
    failed = next(i for i, x in enumerate(lines) if "model bad (python:" in x and "failed" in x)
    timeout = next(i for i, x in enumerate(lines) if "start-up timeout" in x)
    assert failed < timeout, "the load must fail before the timeout for this test to say anything"
    # (It exits after the timeout, so in the stop's words: exit 4 is MODEL_LOAD, not OK.)
    exited = r"worker-0 \(pid \d+\) exited: exit 4 \(RuntimeError: weights file is corrupt\)"
    assert re.search(exited, log), log[-3000:]
    assert "Exception ignored" not in log and "StopRequested" not in log, log[-3000:]
    assert log.count("Traceback (most recent call last)") == 1, log[-3000:]


def test_a_failed_starts_exit_leaves_the_signal_dispositions_alone() -> None:
    """A first version ignored SIGTERM (SIG_IGN) there: run in-process, as the tests
    run the worker's start-up probe, it left every process started later deaf to
    SIGTERM (CI: test_stop_child's child never stopped). A flag does the job."""
    import signal

    from ringserve.gpu_worker import stop

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        stop.exit_failed_start(4)
    assert exited.value.code == 4 and stop.leaving()
    assert signal.getsignal(signal.SIGTERM) == before
    stop._leaving = False  # (this process goes on: the flag is the worker's alone)


def test_startup_timeout_does_not_apply_after_the_first_readiness(start_server) -> None:
    # Three times and more this machine's start-up (4-6 s in CI), so the server gets ready
    # first; the test waits it out, so no longer than that.
    limit_s = 15.0
    server: Server = start_server("--set", f"server.startup_timeout_s={limit_s:g}")
    # Ready in the supervisor's own view first (it promotes a worker when the worker's
    # report wakes it, a moment after the frontends see it).
    wait_until(lambda: server.ctl("status")["models"][0]["ready"] == 1, 30, "the supervisor's view")
    server.ctl("drain", "worker-0")  # the only worker: the model is not ready any more
    wait_until(
        lambda: server.ctl("status")["models"][0]["ready"] == 0, 60, "the drained worker gone"
    )
    wait_until(
        lambda: server.ctl("status")["server"]["uptime_s"] > limit_s + 2,
        limit_s + 60,
        "the start-up deadline to pass",
    )
    assert server.proc.poll() is None, server.log()[-3000:]
    assert "start-up timeout" not in server.log()
    assert server.stop() == 0
    assert shm_segments(server.instance) == []


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        ("python:support.fake_handlers:Nope", "AttributeError: module 'support.fake_handlers'"),
        ("python:support.no_such_module:Cls", "ModuleNotFoundError: No module named"),
        (
            "torchvision:resnet05",
            f"ValueError: torchvision {torchvision.__version__} has no classification model "
            "'resnet05'; did you mean resnet50",
        ),
        (
            "python:support.fake_handlers:ScoresWithoutClasses",
            "DeclarationError: ScoresWithoutClasses is a classification model, so its output "
            "is one score per class per row",
        ),
        (
            "python:support.fake_handlers:LabelsTooFew",
            "DeclarationError: LabelsTooFew declares 4 classes but 3 labels",
        ),
        (  # found by the start-up probe, after the load
            "python:support.fake_handlers:DeclaresFloat64",
            "OutputContractError: on a row of zeros: output OUTPUT0 is float32; "
            "the model declares float64",
        ),
    ],
)
def test_a_model_that_cannot_be_served_as_configured_stops_the_start_at_once(
    start_server, handler: str, error: str
) -> None:
    """A handler that does not import (or invalid options, or declared tensors) cannot
    fix itself: the start stops with exit 2 at the first failure, naming the error,
    instead of retrying with back-off until server.startup_timeout_s (180 s by default)
    and then suggesting a longer timeout. The other model had loaded meanwhile."""
    server: Server = start_server(
        *("--model", f"bad={handler}"),
        *("--model", "good=identity"),
        env=HANDLER_ENV,
        ready=False,
    )
    rc = server.proc.wait(60)
    log = server.log()
    assert rc == ServeExit.CONFIG == 2, log[-3000:]
    [line] = [x for x in log.splitlines() if "cannot be served as configured" in x]
    assert f"model bad ({handler}) cannot be served as configured: {error}" in line, line
    assert "failed to load again" not in log and "start-up timeout" not in log
    assert shm_segments(server.instance) == []


@pytest.mark.parametrize("device", ["cuda:99", "cuda", "cuda:0,cuda:99"])
def test_a_cuda_device_the_host_lacks_stops_the_start_at_once(start_server, device: str) -> None:
    """``cuda`` is ``cuda:0``, as torch reads it: it crash-looped on any host (torch's
    set_device wants an index), with a message about the index. A device this host does
    not have cannot appear by retrying: exit 2 at once, naming the key and what the host
    has (it was retried as cuda_init until server.startup_timeout_s). Of a list the
    model's workers take in turn, the message names the one the worker was given."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this host has cuda:0")
    server: Server = start_server(
        *("--model", "bad=identity", "--set", f"models.bad.device={device}"),
        *("--set", "models.bad.workers=2", "--model", "good=identity"),
        ready=False,
    )
    assert server.proc.wait(60) == ServeExit.CONFIG, server.log()[-3000:]
    log = server.log()
    mine = r" cuda:(0|99):" if "," in device else ""  # (on a GPU host, cuda:99's worker)
    assert re.search(
        rf"ConfigError: models\.bad\.device={device}:{mine} (this host has \d+ CUDA device|torch sees no "
        r"CUDA device here|torch could not initialise CUDA: .|this torch build \(.*\) has no CUDA)",
        log,
    ), log[-3000:]
    assert "specified index" not in log and "start-up timeout" not in log


def test_a_load_cut_short_by_the_worker_start_timeout_names_that_setting(
    start_server, tmp_path
) -> None:
    """A model that loads slower than worker.start_timeout_s is killed each try: the
    kill, the model's last error and the start-up timeout line name that setting (the
    line used to suggest only server.startup_timeout_s, which cannot help). What the
    worker ran (a compiler, for torch.compile) is killed with it, not left running."""
    pids = tmp_path / "child.pids"
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:LoadsSlowly",
        *("--set", "models.slow.options.load_s=30"),
        *("--set", f"models.slow.options.child_pids={pids}"),
        # Long enough for a worker to reach its load on a busy 2-core machine (2 s was
        # not: with two busy loads beside it no try got past importing torch).
        *("--set", "worker.start_timeout_s=5"),
        *("--set", "server.startup_timeout_s=11"),
        *("--set", "worker.restart_backoff_s=0.2"),
        env=HANDLER_ENV,
        ready=False,
    )
    assert server.proc.wait(60) == ServeExit.STARTUP_TIMEOUT
    log = server.log()
    assert "did not become ready within worker.start_timeout_s=5 s" in log, log[-3000:]
    [line] = [x for x in log.splitlines() if "start-up timeout" in x]
    assert "(last: start_timeout: did not become ready within worker.start_timeout_s=5 s)" in line
    assert "raise worker.start_timeout_s (each try was cut short)" in line, line
    assert_children_ended(pids)


def assert_children_ended(pids: Path) -> None:
    """Every process the ``LoadsSlowly`` workers started (their pids in ``pids``) has
    ended: killed with its worker, not left running as an orphan."""
    children = [int(p) for p in pids.read_text().split()]
    assert children  # each worker that reached its load started one
    wait_until(lambda: not any(map(alive, children)), 10, "the workers' children killed")


def test_a_torchscript_model_whose_answer_no_request_can_use_stops_the_start(
    start_server, tmp_path
) -> None:
    """The batch profile is the first to run the model; a TorchScript archive returning
    a tuple fails it with the handler's contract error. That was taken for "this model
    cannot take zeros" and the server came up ready, failing every request (500)."""
    import torch
    from test_handlers import _script

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    path = tmp_path / "pair.pt"
    _script(Pair(), path)
    server: Server = start_server(
        "--model", f"pair=torchscript:{path}", env=HANDLER_ENV, ready=False
    )
    assert server.proc.wait(60) == ServeExit.CONFIG, server.log()[-3000:]
    [line] = [x for x in server.log().splitlines() if "cannot be served as configured" in x]
    assert "OutputContractError: the TorchScript model returned tuple" in line, line


def test_a_worker_still_loading_stops_at_once_on_sigterm(start_server, tmp_path) -> None:
    """Stopping the service while a large model loads: the worker has nothing to finish,
    so it exits on SIGTERM instead of being killed at worker.stop_timeout_s. What it ran
    (a compiler, for torch.compile) ends with it: a worker that exits on its own left
    it running (only a kill reached the worker's process group)."""
    pids = tmp_path / "child.pids"
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:LoadsSlowly",
        *("--set", "models.slow.options.load_s=60"),
        *("--set", f"models.slow.options.child_pids={pids}"),
        *("--set", "worker.stop_timeout_s=5"),
        env=HANDLER_ENV,
        ready=False,
    )
    wait_until(lambda: pids.exists() and pids.read_text(), 60, "the worker to be in its load")
    assert server.stop() == 0
    log = server.log()
    assert re.search(r"worker-0 \(pid \d+\) exited: ok", log), log[-3000:]
    assert "did not stop in time" not in log
    assert_children_ended(pids)
