"""How the benchmark counts: answers and errors from wrk and perf_analyzer, the server's
CPU over a point, the order of the systems in each repetition, and what it waits on.
CPU-only and short; no figure of speed is asserted."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psutil
import pytest


@pytest.fixture
def bench_run(bench_importable: None) -> ModuleType:
    from bench import run

    return run


def completed(cmd: list[str], stdout: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr="")


def test_socket_errors_are_not_taken_off_the_answers_wrk_counted(
    bench_run: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """wrk counts answers (non-2xx among them, ``errors_status``); a read or connect
    error is no answer and not in that count. Taking every error off the count read a
    server that dropped 50 connections while answering 100 times at 50 a second."""
    result = {
        "requests": 100, "duration_us": 1_000_000, "bytes": 1, "errors_connect": 10,
        "errors_read": 40, "errors_write": 0, "errors_status": 5, "errors_timeout": 0,
        "p50_us": 1500.0, "p90_us": 2000.0, "p99_us": 4000.0, "max_us": 5000.0,
        "mean_us": 1600.0, "window_bad": -1, "window_times": [],
    }  # fmt: skip
    out = f"Running 1s test\nBENCH_JSON {json.dumps(result)}\n"
    monkeypatch.setattr(bench_run.subprocess, "run", lambda cmd, **kw: completed(cmd, out))
    r = bench_run.run_wrk("wrk", "http://127.0.0.1:1/", 8, 1.0, tmp_path / "b", "t")
    assert (r["errors"], r["ok"]) == (55, 95)
    assert r["throughput"] == pytest.approx(95.0)
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == pytest.approx((1.5, 2.0, 4.0))  # µs -> ms


PA_STDOUT = (  # as perf_analyzer 2.x prints it ("Client: " with its trailing space)
    "*** Measurement Settings ***\n  Measurement window: 666 msec\n\n"
    "Request concurrency: 8\n  Client: \n    Request count: 5268\n"
    "    Throughput: 2163.89 infer/sec\n    p50 latency: 3557 usec\n"
    "  Server: \n    Inference count: 5275\n    Successful request count: 5275\n"
)
PA_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "8,2163.89,44,6927,1104,144,30,99,0,3557,5378,6230,8412\n"
)


def test_perf_analyzer_points_count_the_requests_it_made(
    bench_run: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server's CPU is read around the whole perf_analyzer run, whose three windows
    of 666 ms took 2.43 s: the rate times 2.0 s counted 4,327 requests where the server
    answered 5,275, and read the CPU per request a fifth high. The count is the one
    perf_analyzer reports."""

    def pa(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        Path(cmd[cmd.index("-f") + 1]).write_text(PA_CSV)
        return completed(cmd, PA_STDOUT)

    monkeypatch.setattr(bench_run.subprocess, "run", pa)
    r = bench_run.run_pa(1, "identity", 8, 2.0, tmp_path)
    assert (r["requests"], r["ok"], r["throughput"]) == (5268, 5268, 2163.89)
    assert r["seconds"] == pytest.approx(5268 / 2163.89)
    assert (r["p50_ms"], r["p99_ms"]) == pytest.approx((3.557, 8.412))  # µs -> ms


# A server whose tree changes during a point: child A (it has used 0.3 s of CPU by the
# time the server is ready) exits, and child B starts and uses 0.3 s. The point's CPU is
# B's 0.3 s (and the server's own few ms), not minus A's past.
FAKE_SERVER = r"""
import subprocess, sys
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
a = subprocess.Popen([sys.executable, "-c", BURN + "import sys; print(1, flush=True); sys.stdin.readline()"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
a.stdout.readline()
print("ready", flush=True)
sys.stdin.readline()
a.stdin.close(); a.wait()
b = subprocess.Popen([sys.executable, "-c", BURN + "import sys; print(1, flush=True); sys.stdin.readline()"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
b.stdout.readline()
print("burnt", flush=True)
sys.stdin.readline()
b.stdin.close(); b.wait()
"""


def test_a_points_cpu_counts_the_processes_the_server_started_during_it(
    bench_run: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-c", FAKE_SERVER]
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    with server:
        assert server.stdout.readline() == "ready\n"

        @contextlib.contextmanager
        def running(*a: object) -> Iterator[int]:
            yield server.pid

        def wrk(*a: object, **kw: object) -> dict:
            server.stdin.write("go\n")
            server.stdin.flush()
            assert server.stdout.readline() == "burnt\n"
            return {"requests": 100, "errors": 0, "ok": 100, "throughput": 100.0,
                    "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "seconds": 1.0}  # fmt: skip

        monkeypatch.setattr(bench_run, "running", running)
        monkeypatch.setattr(bench_run, "run_wrk", wrk)
        monkeypatch.setattr(bench_run, "log", lambda msg: None)
        system = bench_run.System(
            "fake", "fake", "b", lambda *a: bench_run.Launch(["x"], "/p", "identity", "t")
        )
        args = argparse.Namespace(
            duration=1.0, concurrency=[8], warmup=0.0, settle=0.0, idle_window=0.0,
            ready_timeout=10.0, threads=1, device="cpu", compile=False,
        )  # fmt: skip
        inputs = {"identity": tmp_path / "body.json"}
        (row,) = bench_run.bench_system(
            system, "identity", 0, args, inputs, "wrk", tmp_path, tmp_path
        )
        server.stdin.close()
        server.wait(30)
    # B's 0.3 s over 100 answers: 3 ms each, and a little for the server's own work
    # (its reads and Popen); before, B went uncounted and A's past was taken off: < 0.
    assert 2.9 <= row["cpu_ms_per_req"] < 4.5, row["cpu_ms_per_req"]
    assert row["processes"] == 2  # the tree after the point: the server and B


def systems_like_the_full_run(bench_run: ModuleType) -> list:
    """Every system of a full CPU run (LitServe and MLServer built, perf_analyzer there)."""
    args = bench_run.parse_args([])
    py = Path(sys.executable)
    found = bench_run.systems(args, py, "", py, "")
    if not any(s.key == "ringserve-v2" for s in found):
        found.append(
            bench_run.System("ringserve-v2", "v2", "e", lambda *a: None, models=("identity",))
        )
    return found


@pytest.mark.parametrize("model", ["identity", "resnet50"])
def test_each_repetition_runs_the_systems_in_another_order(
    bench_run: ModuleType, model: str
) -> None:
    """Rotated from one repetition to the next, with inline-N, the raw model (None) and
    ringserve's configurations kept together, in that order. Rotating every system and
    then moving those together undid the rotation: repetitions 1 and 2 ran the full set
    in the same order."""
    active = systems_like_the_full_run(bench_run)
    served = {s.key for s in active if model in s.models}
    orders = [bench_run.repetition_order(active, model, rep, 2) for rep in range(3)]
    keys = [[s.key if s else "raw" for s in order] for order in orders]
    assert len({tuple(k) for k in keys}) == 3, keys
    assert len({k[0] for k in keys}) == 3, keys  # a different system first each time
    judged = ["ringserve", "ringserve-shared"] if model == "resnet50" else ["ringserve"]
    for k in keys:
        assert sorted(k) == sorted([*served, "raw"]), k
        at = k.index("inline-2")
        assert k[at : at + 2 + len(judged)] == ["inline-2", "raw", *judged], k


def test_without_ringserve_the_raw_model_still_runs_once(bench_run: ModuleType) -> None:
    # ``--systems a``: the raw model alone (the rotation divided by no systems: it crashed).
    assert bench_run.repetition_order([], "identity", 1, 2) == [None]
    active = [s for s in systems_like_the_full_run(bench_run) if s.role == "b"]
    for rep in range(3):
        order = bench_run.repetition_order(active, "identity", rep, 2)
        assert [s.key if s else "raw" for s in order].count("raw") == 1
        assert len(order) == 3


def test_a_raw_probe_that_never_gets_ready_is_not_left_running(
    bench_run: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    monkeypatch.setattr(bench_run, "_raw_model", lambda *a: ([sys.executable, "-c", code], None))
    with pytest.raises(RuntimeError, match="no answer"):
        bench_run.RawProbe("resnet50", argparse.Namespace(), ready_s=1.0)
    pid = int(pid_file.read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "the probe is still running"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", ["poll", "asyncio"])
def test_the_ipc_round_trip_gives_up_on_a_worker_that_is_gone(
    bench_importable: None, wait: str
) -> None:
    """No worker answers: the round trip raises instead of waiting forever."""
    import numpy as np

    from bench import ipc_roundtrip as ipc
    from ringserve.ipc import wake
    from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name

    geometry = ArenaGeometry(n_slots=8, slot_bytes=4096, n_models=1, n_procs=4, n_frontends=1)
    with tempfile.TemporaryDirectory(prefix="ringserve-bench-test-", dir="/dev/shm") as tmp:
        arena = Arena.create(os.path.join(tmp, segment_name("benchtest")), geometry)
        work_fd, done_fd = wake.new_eventfd(), wake.new_eventfd()
        fe = ipc.Frontend(arena, work_fd, done_fd)
        run = ipc._run_poll if wait == "poll" else ipc._run_asyncio
        try:
            with pytest.raises(RuntimeError, match="no answer within"):
                run(fe, np.zeros(16, np.float32), 3, 1, timeout_s=0.3)
        finally:
            fe.ring.close()
            arena.close()
            for fd in (work_fd, done_fd):
                os.close(fd)


def test_a_soak_whose_server_never_gets_ready_stops_it(
    bench_importable: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``Soak.start`` gives up after 180 s without readiness; the server it started (in
    a session of its own) was left running."""
    from bench import soak

    def start(self: soak.Soak) -> None:
        cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        raise SystemExit("server not ready in 180 s")

    monkeypatch.setattr(soak.Soak, "start", start)
    s = soak.Soak(argparse.Namespace(port=1, out=str(tmp_path)))
    with pytest.raises(SystemExit, match="not ready"):
        s.run()
    assert s.proc is not None and s.proc.poll() is not None, "the server is still running"


def test_each_ringserve_start_profiles_afresh_but_shares_compiled_kernels(
    bench_run: ModuleType, tmp_path: Path
) -> None:
    """Each repetition's server measures its own batch profile: with one cache for the
    run, the first repetition's (noisy) choice decided all three, and the benchmark's
    "3 repetitions" were one sample of the profile. Compiled kernels are not a
    measurement and stay shared."""
    args = argparse.Namespace(frontends=2, device="cpu", threads=2, compile=False)
    launch = bench_run.launch_ringserve("wrk")
    first, second = (launch("resnet50", port, args, tmp_path).env for port in (40001, 40002))
    assert first["XDG_CACHE_HOME"] != second["XDG_CACHE_HOME"]
    for kernels in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert first[kernels] == second[kernels]


def test_the_batch_size_the_profile_chose_is_read_from_the_servers_log(
    bench_run: ModuleType,
) -> None:
    """Read from the line the worker writes (its own format string), so a change of its
    wording fails here, not silently in the benchmark's notes."""
    from ringserve.gpu_worker.profile import PROFILE_LOG

    rates = {1: 16.2, 2: 19.0, 4: 21.5, 8: 22.5, 16: 22.9, 32: 21.3}
    line = "2026-12-07 08:06:07,643 worker-0 INFO " + PROFILE_LOG % ("r50", rates, 16)
    assert bench_run.profile_choice(f"started\n{line}\nready\n") == 16
    assert bench_run.profile_choice("started\nready\n") is None
