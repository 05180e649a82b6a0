"""The supervisor end to end: recycling with nothing lost, hangs, crash loops, signals,
the admin socket and systemd notify — real processes, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import Server, alive, kill_group, launch, shm_segments, wait_until
from support.freeze import frozen_mid_batch_outside_the_lock
from test_e2e_core import DIGIT3, HANDLER_ENV, _fire, digit_requests

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState
from ringserve.ipc.ring import RequestRing
from ringserve.supervisor.admin_protocol import AdminClient, AdminError

pytestmark = pytest.mark.e2e


def check_all_ok(responses: list, cases: list) -> None:
    for resp, (_, label) in zip(responses, cases, strict=True):
        assert isinstance(resp, httpx.Response), resp
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"]["label"] == label


def load_while(server: Server, n: int, action, concurrency: int = 16, delay: float = 0.3):
    """Run ``action()`` (sync, may block) while ``n`` requests are in flight."""
    cases = digit_requests(n)

    async def scenario() -> list:
        task = asyncio.ensure_future(_fire(server.url, [c for c, _ in cases], concurrency))
        await asyncio.sleep(delay)
        await asyncio.to_thread(action)
        return await task

    return asyncio.run(scenario()), cases


def worker_pids(server: Server) -> set[int]:
    return {p["pid"] for p in server.children() if p["role"] == "worker"}


def test_admin_recycle_under_load_loses_nothing_and_keeps_capacity(start_server) -> None:
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    before = worker_pids(server)
    min_ready = [2]

    def recycle_and_watch() -> None:
        server.ctl("recycle", "worker-0")

        def done() -> bool:
            st = server.ctl("status")
            min_ready[0] = min(min_ready[0], st["models"][0]["ready"])
            # The old worker is listed (stopping) until it has finished and exited.
            pids = {p["pid"] for p in st["processes"] if p["role"] == "worker"}
            return not st["server"]["recycles_in_progress"] and len(pids & before) == 1

        wait_until(done, 60, "the recycle to finish")

    responses, cases = load_while(server, 400, recycle_and_watch)
    check_all_ok(responses, cases)
    assert min_ready[0] >= 2, "the replacement is ready before the old worker stops"
    assert len(worker_pids(server) & before) == 1
    st = server.ctl("status")
    assert st["server"]["totals"].get("recycles:admin") == 1
    assert (
        next(p for p in st["processes"] if p["id"] == "worker-0")["last_recycle_reason"] == "admin"
    )
    assert server.stop() == 0


def test_v2_statistics_do_not_go_backwards_across_a_recycle(start_server) -> None:
    """perf_analyzer and dashboards take deltas of Triton's counters: a recycled worker
    must not take the model's batches, rows or last inference time back to zero."""
    server: Server = start_server()
    with server.client() as c:
        for _ in range(5):
            assert c.post("/predict", json=DIGIT3).status_code == 200

        def stats() -> dict:
            return c.get("/v2/models/digits/stats").json()["model_stats"][0]

        before = wait_until(lambda: (s := stats())["execution_count"] >= 5 and s, 10, "stats")
        for _ in range(2):  # twice: the second replacement reuses the first's control slot
            old = worker_pids(server)
            server.ctl("recycle", "worker-0")
            wait_until(
                lambda old=old: (
                    worker_pids(server).isdisjoint(old)
                    and not server.ctl("status")["server"]["recycles_in_progress"]
                ),
                60,
                "the recycle to finish",
            )
        after = stats()
        for key in ("execution_count", "inference_count", "last_inference"):
            assert after[key] >= before[key] > 0, (key, before, after)
        assert c.post("/predict", json=DIGIT3).status_code == 200
        later = wait_until(
            lambda: (s := stats())["execution_count"] > after["execution_count"] and s,
            10,
            "the new worker's batch in the stats",
        )
        assert later["inference_count"] > after["inference_count"]
    assert server.stop() == 0


def test_sighup_rolling_restart_under_load(start_server) -> None:
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)

    def hup_and_wait() -> None:
        server.rolling_restart(180)

    responses, _ = load_while(server, 600, hup_and_wait, delay=0.2)
    # Frontends restart one at a time on the shared listening socket; a request that
    # raced a closing keep-alive connection is a transport error, never a wrong answer.
    ok = [r for r in responses if isinstance(r, httpx.Response)]
    assert all(r.status_code == 200 for r in ok), [r.text for r in ok if r.status_code != 200][:3]
    server.wait_ready()
    assert server.stop() == 0


def test_sighup_replaces_one_worker_at_a_time(start_server) -> None:
    """A rolling restart replaces workers one by one, each replacement ready before its
    old worker stops: watched through the admin socket, never two replacements at once
    and never fewer ready workers than configured."""
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    admin = AdminClient(server.admin_socket)
    seen: list[tuple[int, int]] = []  # (replacements in progress, ready workers)
    handovers: set[tuple[int, int]] = set()  # (old pid, the pid its row names)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            st = admin.call("status")
            seen.append((len(st["server"]["recycles_in_progress"]), st["models"][0]["ready"]))
            for p in st["processes"]:
                if "replaced_by" in p:
                    ids = [q["pid"] for q in st["processes"] if q["id"] == p["id"]]
                    assert sorted(ids) == sorted([p["pid"], p["replaced_by"]]), st["processes"]
                    handovers.add((p["pid"], p["replaced_by"]))
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        server.rolling_restart(180)
    finally:
        stop.set()
        watcher.join(10)
    assert any(n for n, _ in seen), "the watch never saw a replacement"
    assert max(n for n, _ in seen) == 1, seen
    assert min(ready for _, ready in seen) >= 2, seen
    # The old process of each replacement named its successor, which now serves.
    assert handovers and {new for _, new in handovers} <= set(server.pids("worker")), handovers
    assert server.stop() == 0


SLOW = "slow=python:support.fake_handlers:Slow"


def sigterm_while_in_the_model(
    server: Server, c: httpx.Client, pool: ThreadPoolExecutor, ms: float
) -> Future[httpx.Response]:
    """Send a request that sleeps ``ms`` in the Slow model, wait until a worker runs it,
    then SIGTERM the server; returns the request's future."""
    pending = pool.submit(c.post, "/v1/models/slow/predict", json={"data": [ms, 1.0]})
    arena = server.ctl("status")["server"]["arena"]
    wait_until(lambda: running(arena), 20, "the request to reach a worker")
    server.proc.send_signal(signal.SIGTERM)
    return pending


def test_sigterm_flips_readiness_and_refuses_new_work_while_finishing_old(start_server) -> None:
    """SIGTERM: readiness goes 503 and a new request is refused (503, Retry-After) while
    an accepted request is still running; that one still gets its answer; exit 0."""
    server: Server = start_server("--model", SLOW, "--drain-timeout", "60", env=HANDLER_ENV)
    with server.client() as c, ThreadPoolExecutor(1) as pool:
        pending = sigterm_while_in_the_model(server, c, pool, 4000.0)
        with server.client() as probe:

            def readiness() -> httpx.Response | None:
                r = probe.get("/readiness")
                return r if r.status_code == 503 or pending.done() else None

            r = wait_until(readiness, 30, "readiness to flip")
            assert not pending.done(), "readiness flipped only after the drain"
            assert r.status_code == 503 and "draining" in r.json()["reasons"], r.text
            refused = probe.post("/v1/models/slow/predict", json={"data": [1.0, 1.0]})
            assert not pending.done()
            assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        answered = pending.result(60)
    assert answered.status_code == 200 and answered.json()["result"] == [4000.0, 1.0]
    assert server.proc.wait(60) == 0


def test_a_worker_killed_during_a_drain_is_replaced_and_its_request_answered(
    start_server,
) -> None:
    """A drain waits for what was accepted. A worker that died in it was not replaced
    (nothing was restarted once the server began to stop), so the request it held was
    re-queued for nobody: it waited out the drain timeout and failed with a 503."""
    server: Server = start_server("--model", SLOW, "--drain-timeout", "60", env=HANDLER_ENV)
    arena = server.ctl("status")["server"]["arena"]
    with server.client(timeout=60) as c, ThreadPoolExecutor(1) as pool:
        [worker] = server.pids("worker")
        pending = sigterm_while_in_the_model(server, c, pool, 3000.0)
        wait_until(lambda: draining(arena), 20, "the drain to begin")
        os.kill(worker, signal.SIGKILL)
        answered = pending.result(60)
    assert answered.status_code == 200, answered.text
    assert answered.json()["result"] == [3000.0, 1.0]
    assert re.search(r"re-queued 1 requests of worker-0", server.log())
    assert server.proc.wait(60) == 0


def test_request_unanswered_at_the_drain_timeout_gets_a_json_503(start_server) -> None:
    """A request still in the model when server.drain_timeout_s runs out: uvicorn cancels
    it; the client gets a JSON 503 saying so (it was a text 500 and a logged traceback),
    and the server still exits 0. The frontends' own graceful wait after the drain is
    short: the drain timeout is spent once, not twice (4 s then 4 s more before)."""
    drain_s = 4.0
    server: Server = start_server(
        "--model", SLOW, "--drain-timeout", f"{drain_s:g}", env=HANDLER_ENV
    )
    with server.client() as c, ThreadPoolExecutor(1) as pool:
        pending = sigterm_while_in_the_model(server, c, pool, 9000.0)
        t0 = time.monotonic()
        r = pending.result(60)
        answered_after_s = time.monotonic() - t0
    assert r.status_code == 503 and "server.drain_timeout_s ran out" in r.json()["error"], r.text
    assert drain_s <= answered_after_s < 2 * drain_s - 1, answered_after_s
    assert server.proc.wait(60) == 0
    assert "Exception in ASGI application" not in server.log()


def test_sigterm_while_the_supervisor_sets_up_leaves_nothing_behind(tmp_path: Path) -> None:
    """The supervisor made its shared memory (256 MiB of /dev/shm) and its metrics
    directory before it took SIGTERM as a request to stop: one that came meanwhile (a
    systemd stop right after the start) killed it outright, and both stayed behind until
    the next start swept them. The supervisor here stops itself right after making
    them; SIGTERM is sent then."""
    server = launch(tmp_path, env={"RINGSERVE_TEST_PAUSE_AT": "supervisor.set_up"}, frontends=1)
    try:
        wait_until(lambda: psutil.Process(server.proc.pid).status() == "stopped", 60, "the set-up")
        assert shm_segments(server.instance)  # made, and held
        server.proc.send_signal(signal.SIGTERM)
        server.proc.send_signal(signal.SIGCONT)
        rc = server.proc.wait(60)
    finally:
        kill_group(server)
    assert rc == 0, server.log()[-3000:]
    assert shm_segments(server.instance) == []
    metrics = Path(tempfile.gettempdir()).glob(f"ringserve-metrics-{server.instance}-*")
    assert list(metrics) == []


def test_second_server_on_the_same_instance_leaves_nothing_behind(
    start_server, tmp_path: Path
) -> None:
    """It fails at the admin socket (a live server answers there), after creating its own
    shared memory: that must go too (it stayed, 256 MiB, until the next start)."""
    server: Server = start_server(frontends=1)
    before = shm_segments(server.instance)
    second = launch(tmp_path, "--instance", server.instance, "--admin-socket", server.admin_socket)
    try:
        rc = second.proc.wait(60)
    finally:
        kill_group(second)
    assert rc == 1 and "already running" in second.log(), second.log()
    assert shm_segments(server.instance) == before  # the first server's alone
    with server.client() as c:
        assert c.get("/readiness").status_code == 200
    assert server.stop() == 0


def test_an_admin_socket_it_cannot_create_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    """An admin socket in a directory the server may not write (/proc: not even root
    may) stopped the start with a Python traceback (FileNotFoundError, PermissionError
    from ``bind``), naming no setting; now one line names server.admin_socket and the
    path, exit 1 as for a port that is taken, and nothing is left behind."""
    server = launch(tmp_path, "--admin-socket", "/proc/ringserve-test-admin.sock")
    try:
        rc = server.proc.wait(60)
    finally:
        kill_group(server)
    log = server.log()
    assert rc == 1, log
    assert "server.admin_socket: cannot create the admin socket /proc/" in log, log
    assert "Traceback" not in log, log
    assert shm_segments(server.instance) == []


def test_failed_reload_stops_the_rolling_restart_and_says_so(start_server, tmp_path: Path) -> None:
    """SIGHUP after one model's code broke: its first replacement fails to load, the old
    worker keeps serving, the rolling restart skips that model's other worker (it would
    fail the same way) but still restarts the other model's workers and the frontend,
    and ctl status shows the failure instead of a done reload."""
    module = tmp_path / "reloadable.py"
    module.write_text("from ringserve.gpu_worker.handlers.identity import IdentityHandler\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{HANDLER_ENV['PYTHONPATH']}"}
    server: Server = start_server(
        "--model",
        "m=python:reloadable:IdentityHandler",
        "--model",
        "other=identity",
        "--workers",
        "2",
        env=env,
        frontends=1,
    )
    server.wait_workers_ready(2, model=0)
    server.wait_workers_ready(2, model=1)

    def workers(model: str) -> dict[str, dict]:
        return {
            p["id"]: p
            for p in server.children()
            if p["role"] == "worker" and p.get("model") == model
        }

    pids = {i: p["pid"] for i, p in workers("m").items()}
    others = {i: p["pid"] for i, p in workers("other").items()}
    frontend = next(p["pid"] for p in server.children() if p["role"] == "frontend")
    assert len(pids) == len(others) == 2, server.children()
    module.write_text("raise ImportError('broken on purpose')\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "rolling restart stopped for model m" in server.log(), 90, "the stop")
    wait_until(lambda: "rolling restart over" in server.log(), 90, "the rest of the reload")

    def rest_restarted() -> bool:
        now = [p["pid"] for p in server.children() if p["role"] != "worker" or p["model"] != "m"]
        return len(now) == 3 and not set(now) & {frontend, *others.values()}

    wait_until(rest_restarted, 30, "the other model's workers and the frontend restarted")
    procs = workers("m")
    assert {i: p["pid"] for i, p in procs.items()} == pids  # both old workers still serve
    reasons = [str(p.get("last_recycle_reason")) for p in procs.values()]
    # One failed and the other was never tried.
    # (An import error is a configuration error, named with the worker's own message.)
    failed = "reload failed: model_config: ImportError: broken on purpose"
    assert sum(r == failed for r in reasons) == 1, reasons
    with server.client() as c:
        r = c.post("/v1/models/m/predict", json={"data": [1.0, 2.0]})
        assert r.status_code == 200 and r.json()["result"] == [1.0, 2.0]
    # A failed deploy shows in metrics (the crash-loop alert counts restarts by role).
    metrics = httpx.get(f"{server.url}/metrics").text
    restarts = (
        r'ringserve_process_restarts_total\{model="m",reason="model_config",role="worker"\} 1\.0'
    )
    assert re.search(restarts, metrics), [x for x in metrics.splitlines() if "restarts" in x]
    assert server.stop() == 0


def test_reload_recycles_are_counted(start_server) -> None:
    """Each worker a SIGHUP replaces is a recycle with reason reload in the metrics, as
    ctl recycle is one with reason admin (the recycle-storm alert leaves both out)."""
    server: Server = start_server("--workers", "2", frontends=1)
    server.wait_workers_ready(2)
    server.proc.send_signal(signal.SIGHUP)

    def reloads() -> str:
        metrics = httpx.get(f"{server.url}/metrics").text
        found = re.findall(
            r'ringserve_worker_recycles_total\{model="digits",reason="reload"\} (\S+)', metrics
        )
        return found[0] if found else ""

    wait_until(lambda: reloads() == "2.0", 90, "both workers recycled by the reload")
    assert server.ctl("status")["server"]["totals"].get("recycles:reload") == 2
    assert server.stop() == 0


def test_reload_says_an_edited_config_file_is_not_applied(start_server, tmp_path: Path) -> None:
    """SIGHUP (systemctl reload) keeps the configuration the server started with. An
    operator who edited the file and reloaded was told nothing: a new max_batch_size
    silently not applied, a typo silently waiting to fail the next start. The reload
    says which settings it did not apply, and that the file no longer loads (naming the
    key), as ``ctl restart all`` does in its reply; the server keeps serving."""
    config = tmp_path / "ringserve.toml"
    good = '[models.id]\nhandler = "identity"\n[models.id.batching]\nmax_batch_size = 8\n'
    config.write_text(good)
    server: Server = start_server("--config", str(config), frontends=1)
    server.rolling_restart()
    assert "configuration" not in server.log()  # unchanged: nothing to say
    config.write_text(good.replace("= 8", "= 4"))
    server.rolling_restart()
    wait_until(
        lambda: "models.id.batching.max_batch_size: 8 -> 4" in server.log(), 30, "the change"
    )
    assert "a reload does not apply it" in server.log()
    assert server.ctl("config")["models"][0]["batching"]["max_batch_size"] == 8
    config.write_text(good + "max_batchsize = 4\n")
    reply = server.ctl("restart", "all")
    assert "models.id.batching.max_batchsize: unknown key" in reply["config_not_applied"][0]
    assert "the next start would stop (exit 2)" in reply["config_not_applied"][0]
    wait_until(lambda: not server.ctl("status")["server"]["rolling_restart_pending"], 60, "it")
    with server.client() as c:
        assert c.post("/predict", json={"data": [1.0, 2.0]}).json()["result"] == [1.0, 2.0]
    assert server.stop() == 0


def _look(arena_path: str, read: Callable[[Arena], object]) -> bool:
    """One look at the server's arena, attached for it alone."""
    arena = Arena.attach(arena_path)
    try:
        return bool(read(arena))
    finally:
        arena.close()


def running(arena_path: str) -> bool:
    """Whether a worker runs a request now."""
    return _look(arena_path, lambda a: (a.slots["state"] == SlotState.RUNNING).any())


def draining(arena_path: str) -> bool:
    """Whether the supervisor has begun to drain (its header's flag)."""
    return _look(arena_path, lambda a: a.header["draining"])


def test_hung_worker_is_killed_and_replaced(start_server) -> None:
    server: Server = start_server("--workers", "2", "--set", "worker.heartbeat_timeout_s=3")
    server.wait_workers_ready(2)
    victim = sorted(worker_pids(server))[0]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    responses, cases = load_while(
        server,
        200,
        lambda: wait_until(
            lambda: victim not in worker_pids(server), 30, "the hung worker to be replaced"
        ),
    )
    detected = time.monotonic() - t0
    check_all_ok(responses, cases)
    assert "heartbeat stopped" in server.log()
    print(f"hung worker replaced {detected:.1f} s after SIGSTOP (timeout 3 s)")
    server.wait_ready()
    assert server.stop() == 0


def test_leaking_worker_recycled_by_trend_without_storm(start_server) -> None:
    server: Server = start_server(
        "--model",
        "leak=python:support.fake_handlers:Leaky",
        "--max-batch-size",
        "1",
        "--set",
        "memory.sample_interval_s=0.5",
        "--set",
        "memory.warmup_s=1",
        "--set",
        "memory.trend_window_s=6",
        "--set",
        "memory.trend_min_mb_per_min=30",
        "--set",
        "memory.min_recycle_interval_s=600",
        env=HANDLER_ENV,
    )
    before = worker_pids(server)
    body = {"json": {"data": [1.0, 2.0]}}
    counts = {"sent": 0, "ok": 0}
    stop = threading.Event()

    def pump() -> None:
        # Steady load, so the leak is a steady trend (a pause would read as flat memory).
        while not stop.is_set():
            rs = asyncio.run(_fire(server.url, [("/v1/models/leak/predict", body)] * 20, 4))
            counts["sent"] += len(rs)
            counts["ok"] += sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in rs)

    def recycled() -> int:
        return server.ctl("status")["server"]["totals"].get("recycles:uss_trend", 0)

    t0 = time.monotonic()
    thread = threading.Thread(target=pump)
    thread.start()
    try:
        wait_until(recycled, 120, "a uss_trend recycle")
        wait_until(lambda: not worker_pids(server) & before, 60, "the old worker to go")
    finally:
        stop.set()
        thread.join(60)
    took = time.monotonic() - t0
    sent, ok = counts["sent"], counts["ok"]
    assert ok == sent, "no request failed during the recycle"
    assert recycled() == 1
    print(f"leak (~{sent} MiB) recycled after {took:.1f} s and {sent} requests")
    # The storm guard: keep leaking; within the minimum interval nothing else recycles.
    rs = asyncio.run(_fire(server.url, [("/v1/models/leak/predict", body)] * 200, 8))
    assert all(r.status_code == 200 for r in rs)
    assert server.ctl("status")["server"]["totals"].get("recycles:uss_trend") == 1
    assert server.stop() == 0


def test_uss_limit_recycles(start_server) -> None:
    server: Server = start_server(
        "--model",
        "leak=python:support.fake_handlers:Leaky",
        "--set",
        "memory.sample_interval_s=0.5",
        "--set",
        "memory.uss_limit_mb=400",
        "--set",
        "memory.uss_limit_samples=2",
        env=HANDLER_ENV,
    )
    before = worker_pids(server)
    for _ in range(30):
        rs = asyncio.run(
            _fire(server.url, [("/v1/models/leak/predict", {"json": {"data": [1.0]}})] * 40, 8)
        )
        assert all(r.status_code == 200 for r in rs)
        if worker_pids(server) != before:
            break
    wait_until(
        lambda: server.ctl("status")["server"]["totals"].get("recycles:uss_limit"),
        30,
        "a uss_limit recycle",
    )
    log = server.log()
    recycled = re.search(r"recycling: uss_limit \(uss [\d.]+ MiB, limit 400 MiB\)", log)
    trimmed = re.search(r"memory \(uss_limit, uss [\d.]+ MiB\): asking it to trim", log)
    assert recycled and trimmed and trimmed.start() < recycled.start()  # a trim came first
    assert server.stop() == 0


def test_a_uss_limit_below_the_fresh_footprint_is_named(start_server) -> None:
    """A limit under what the model needs right after loading recycles every worker and
    every replacement, forever: the log says so once per worker, with both numbers."""
    server: Server = start_server(
        *("--set", "memory.sample_interval_s=0.5"),
        *("--set", "memory.uss_limit_mb=1"),
        *("--set", "memory.uss_limit_samples=1000"),  # no recycle in this test
    )
    message = re.compile(
        r"worker-0 is over memory.uss_limit_mb \(1 MiB\) as soon as it is ready \(uss "
        r"[\d.]+ MiB\): it and every replacement will be recycled in a loop"
    )
    wait_until(lambda: message.search(server.log()), 20, "the warning")
    time.sleep(1.5)  # three more samples: still once
    assert len(message.findall(server.log())) == 1
    assert server.stop() == 0


def test_model_that_never_loads_backs_off_and_is_not_ready(start_server) -> None:
    server: Server = start_server(
        "--model",
        "bad=python:support.fake_handlers:FailsToLoad",
        "--set",
        "worker.restart_backoff_s=0.2",
        env=HANDLER_ENV,
        ready=False,
    )
    wait_until(
        lambda: "failed to start 3 time(s) in a row (model_load)" in server.log(),
        60,
        "three load failures with back-off",
    )
    # The worker's own error, not only "not ready": in every view an operator or a
    # client looks at (it was only in the journal, next to the traceback).
    error = "RuntimeError: weights file is corrupt"
    with server.client() as c:
        r = c.get("/readiness")
        assert r.status_code == 503 and f"model bad has no ready worker: {error}" in r.text
        r = c.post("/v1/models/bad/predict", json={"data": [1.0]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"] == (
            f"model 'bad' is not ready: its workers fail to load it ({error})"
        )
        [model] = c.get("/v1/models").json()["models"]
        assert (model["state"], model["last_error"]) == ("failing", error)
        r = c.get("/v2/models/bad")
        assert r.status_code == 503 and error in r.json()["error"]
        [entry] = c.post("/v2/repository/index").json()  # Triton's view of the same
        assert (entry["name"], entry["state"]) == ("bad", "UNAVAILABLE")
        assert "failing to start" in entry["reason"] and error in entry["reason"]
    [model] = server.ctl("status")["models"]
    assert (model["ready"], model["state"], model["last_error"]) == (0, "failing", error)
    assert f"exited: model_load ({error})" in server.log()
    assert server.stop() == 0


@pytest.mark.parametrize("in_a_drain", [False, True])
def test_requests_queued_for_a_model_that_turns_failing_are_answered_and_free_their_slots(
    start_server, tmp_path: Path, in_a_drain: bool
) -> None:
    """A model whose workers keep failing to start refuses new requests (503). Those it
    had queued when its last worker died stayed queued: each client waited out its
    deadline (504), and the slots stayed taken until a worker came back, which for a
    model failing for good was never (every model of those frontends then got 503s).
    In a drain too: there they held the drain until its timeout."""
    server: Server = start_server(
        "--drain-timeout",
        "60",
        "--model",
        "once=python:support.fake_handlers:LoadsOnlyOnce",
        "--set",
        f"models.once.options.marker={tmp_path / 'loaded'}",
        "--set",
        "worker.restart_backoff_s=0.1",
        env=HANDLER_ENV,
        frontends=1,
    )
    arena = server.ctl("status")["server"]["arena"]
    queued = lambda a: (a.slots["state"] == SlotState.QUEUED).sum() == 4  # noqa: E731
    headers = {"X-Request-Timeout-Ms": "40000"}
    with ThreadPoolExecutor(5) as pool, server.client(timeout=60) as c:
        post = lambda ms: c.post("/v1/models/once/predict", json={"data": [ms]}, headers=headers)  # noqa: E731
        t0 = time.monotonic()
        first = pool.submit(post, 3000.0)
        wait_until(lambda: running(arena), 20, "the first request to reach the worker")
        rest = [pool.submit(post, 1.0) for _ in range(4)]
        wait_until(lambda: _look(arena, queued), 20, "four requests to queue")
        [worker] = server.pids("worker")
        if in_a_drain:
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: draining(arena), 20, "the drain to begin")
        os.kill(worker, signal.SIGKILL)
        responses = [f.result() for f in (first, *rest)]
        waited = time.monotonic() - t0
    error = (
        "model 'once' is not ready: its workers fail to load it (RuntimeError: the device is gone)"
    )
    for r in responses:
        assert (r.status_code, r.json()["error"]) == (503, error)
        assert r.headers["retry-after"]
    assert waited < 30, f"answered at the deadline ({waited:.1f} s), not when the model failed"
    if in_a_drain:  # nothing left in flight: the drain ends, and the server with it
        assert server.proc.wait(30) == 0
        return
    assert server.ctl("status")["models"][0]["state"] == "failing"
    assert _look(arena, lambda a: (a.slots["state"] == SlotState.FREE).all())
    assert server.stop() == 0


def test_a_worker_drained_or_scaled_away_during_its_back_off_stays_down(start_server) -> None:
    """``ctl drain`` and ``ctl scale`` take a position whose worker failed to start and
    waits out its back-off out of service. ``drain`` refused it ("not running"), and
    after ``scale`` the back-off's end started it again anyway, a worker the model was
    scaled down from, loading (here: failing) beside the wanted one."""
    server: Server = start_server(
        "--model",
        "bad=python:support.fake_handlers:FailsToLoad",
        *("--workers", "3"),
        *("--set", "worker.restart_backoff_s=4"),
        env=HANDLER_ENV,
        frontends=1,
        ready=False,
    )
    for line in ("worker-1 failed to start 1 time(s)", "worker-2 failed to start 1 time(s)"):
        wait_until(lambda line=line: line in server.log(), 60, line)
    assert server.ctl("drain", "worker-1") == {"draining": "worker-1"}
    assert server.ctl("scale", "bad", "1")["workers"] == 1  # worker-2 goes
    wait_until(
        lambda: "worker-0 failed to start 2 time(s)" in server.log(),
        60,
        "worker-0 to fail again after its back-off (the others' ended with it)",
    )
    assert server.log().count("started worker-1 ") == 1, server.log()[-3000:]
    assert server.log().count("started worker-2 ") == 1, server.log()[-3000:]
    with pytest.raises(AdminError, match="worker-1 is not running"):  # drained already
        AdminClient(server.admin_socket).call("drain", id="worker-1")
    assert server.stop() == 0


def test_start_up_diagnostics_load_error_cleared_and_slot_size(
    start_server, tmp_path: Path
) -> None:
    """Once a worker loads the model, its earlier load error is history: /v1/models and
    ``ctl status`` stop showing it (the journal keeps it). And a slot too small for a
    request of max_batch_size rows is said at start, with the size that would do,
    instead of on the first 413."""
    server: Server = start_server(
        "--model",
        "flaky=python:support.fake_handlers:FailsFirstLoad",
        *("--set", f"models.flaky.options.marker={tmp_path / 'loaded-once'}"),
        *("--set", "models.flaky.batching.max_batch_size=32"),
        *("--set", "arena.slot_bytes=4096"),
        *("--set", "worker.restart_backoff_s=0.2"),
        env=HANDLER_ENV,
        frontends=1,
    )
    log = server.log()
    assert "exited: model_load (RuntimeError: device busy, try again)" in log
    assert (
        "model flaky: a request slot (arena.slot_bytes=4096) holds 16 row(s) of INPUT0 "
        "(float32 [64], 256 bytes a row): requests over 16 row(s) are refused "
        "(max_batch_size=32). arena.slot_bytes=8192 would hold 32; the arena then takes "
        "2 MiB of /dev/shm (256 slots)"
    ) in log
    # The supervisor counts a worker ready when its report wakes it, after the frontends.
    wait_until(lambda: server.ctl("status")["models"][0]["state"] == "ready", 10, "ready")
    [model] = server.ctl("status")["models"]
    assert "last_error" not in model, model
    with server.client() as c:
        [model] = c.get("/v1/models").json()["models"]
        assert model["state"] == "ready" and "last_error" not in model, model
        ok = c.post("/v1/models/flaky/predict", json={"data": [[1.0] * 64] * 16})
        assert ok.status_code == 200, ok.text
        r = c.post("/v1/models/flaky/predict", json={"data": [[1.0] * 64] * 17})
        assert r.status_code == 413 and "(arena.slot_bytes)" in r.json()["error"], r.text
    assert server.stop() == 0


def test_a_childs_memory_is_sampled_as_it_turns_ready(start_server) -> None:
    """ctl status and the memory metrics showed, until the next sample, what a child
    used as it was spawned: a ready digits worker at 184 KB where it held 531 MB."""
    server: Server = start_server("--set", "memory.sample_interval_s=3600")
    wait_until(lambda: {p["state"] for p in server.children()} == {"ready"}, 10, "all ready")
    for p in server.children():
        now = psutil.Process(p["pid"]).memory_info().rss
        assert p["rss_bytes"] > now / 2 and p["uss_bytes"] > 0 and p["pss_bytes"] > 0, p
    assert server.stop() == 0


def test_admin_socket_commands_and_mode(start_server) -> None:
    server: Server = start_server()
    assert stat.S_IMODE(os.stat(server.admin_socket).st_mode) == 0o600
    st = server.ctl("status")
    assert {p["role"] for p in st["processes"]} == {"frontend", "worker"}
    for p in st["processes"]:
        assert p["pid"] > 0 and p["state"] == "ready" and p["uss_bytes"] >= 0
    assert server.ctl("config")["server"]["port"] == server.port
    with server.client() as c:
        assert "\nringserve_intake_open 1.0\n" in c.get("/metrics").text
        server.ctl("pause")
        r = c.post("/predict", json=DIGIT3)
        assert r.status_code == 503 and "paused" in r.text
        assert "\nringserve_intake_open 0.0\n" in c.get("/metrics").text  # planned 503s
        server.ctl("resume")
        assert c.post("/predict", json=DIGIT3).status_code == 200

        def frontend_requests() -> int:
            procs = server.ctl("status")["processes"]
            return sum(p["requests"] for p in procs if p["role"] == "frontend")

        # Frontends report what they queued (ctl status REQS), at their next heartbeat.
        wait_until(frontend_requests, 10, "the frontends' request counts")
        server.ctl("drain")
        not_ready = c.get("/readiness")
        assert not_ready.status_code == 503 and not_ready.headers["Retry-After"] == "2"
        assert c.post("/predict", json=DIGIT3).status_code == 503
        server.ctl("resume")
        assert c.get("/readiness").status_code == 200
    up = server.ctl("scale", "digits", "2")
    assert up == {"model": "digits", "workers": 2, "starting": ["worker-1"]}
    server.wait_workers_ready(2)
    down = server.ctl("scale", "digits", "1")
    assert down == {"model": "digits", "workers": 1, "stopping": ["worker-1"]}
    wait_until(lambda: len(worker_pids(server)) == 1, 60, "scale down to 1")
    assert server.ctl("scale", "digits", "1") == {"model": "digits", "workers": 1}  # no change
    # Bad commands get an error reply; the supervisor keeps serving.
    bad = server.ctl("scale", "nope", "2", check=False)
    assert bad == {} or "error" in str(bad)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.admin_socket)
        s.sendall(b"{not json}\n")
        assert json.loads(s.recv(4096))["ok"] is False
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(server.admin_socket)  # connects and says nothing
        assert server.ctl("status")["server"]["phase"] == "running"
    assert server.stop() == 0


def _notify_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def _drain_messages(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def test_systemd_notify_protocol(start_server, tmp_path: Path) -> None:
    notify = _notify_listener(tmp_path / "notify.sock")
    server: Server = start_server(
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    )
    messages: list[str] = []

    def seen(fragment: str) -> bool:
        messages.extend(_drain_messages(notify))
        return any(fragment in m for m in messages)

    wait_until(lambda: seen("READY=1"), 10, "READY")
    assert seen("STATUS=")
    wait_until(lambda: seen("WATCHDOG=1"), 10, "a watchdog ping")
    messages.clear()
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: seen("RELOADING=1"), 10, "RELOADING")
    assert any("MONOTONIC_USEC=" in m for m in messages)
    wait_until(lambda: seen("READY=1"), 90, "READY after the reload")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: seen("STOPPING=1"), 10, "STOPPING")
    assert server.proc.wait(60) == 0
    seen("")  # everything it sent
    assert sum("STOPPING=1" in m for m in messages) == 1  # once: the drain said it
    notify.close()


def test_idle_worker_stops_on_sigterm_not_at_its_heartbeat(start_server) -> None:
    """An idle worker blocks on its model's eventfd for up to a heartbeat interval
    (30 s here). Shutdown must end that wait with the SIGTERM itself: before the worker
    watched its signal wake-up pipe, every stop, drain or recycle of an idle worker
    waited out the interval."""
    server: Server = start_server(
        "--model",
        "id=identity",
        "--set",
        "worker.heartbeat_interval_s=30",
        "--set",
        "worker.heartbeat_timeout_s=90",
    )
    time.sleep(1)  # the worker is in its idle wait
    t0 = time.monotonic()
    assert server.stop(timeout_s=60) == 0
    took = time.monotonic() - t0
    assert took < 15, f"shutdown took {took:.1f} s: the idle worker waited for its interval"
    assert re.search(r"worker-0 \(pid \d+\) exited: ok", server.log()), server.log()[-2000:]


def test_a_stopping_worker_runs_the_models_exit_handlers_with_its_heap_frozen(
    start_server, tmp_path: Path
) -> None:
    """A worker freezes its heap before the interpreter's teardown, which otherwise
    spent 0.4-0.6 s of every stop and recycle collecting torch's objects, and still runs
    what the model registered to run at exit."""
    record = tmp_path / "exit-record"
    server: Server = start_server(
        "--model",
        "x=python:support.fake_handlers:RecordsItsExit",
        *("--set", f"models.x.options.record={record}"),
        env=HANDLER_ENV,
        frontends=1,
    )
    assert server.stop(timeout_s=60) == 0
    assert re.search(r"worker-0 \(pid \d+\) exited: ok", server.log()), server.log()[-2000:]
    assert int(record.read_text()) > 0, "the worker's heap was not frozen when it exited"


@pytest.mark.parametrize("how", ["second SIGTERM", "SIGQUIT"])
def test_fast_shutdown(start_server, how: str) -> None:
    server: Server = start_server(
        "--model",
        SLOW,
        "--drain-timeout",
        "60",
        "--max-batch-size",
        "1",
        env=HANDLER_ENV,
    )

    async def scenario() -> list:
        task = asyncio.ensure_future(
            _fire(server.url, [("/v1/models/slow/predict", {"json": {"data": [4000.0]}})] * 4, 4)
        )
        await asyncio.sleep(0.5)
        if how == "SIGQUIT":
            server.proc.send_signal(signal.SIGQUIT)
        else:
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
        return await task

    t0 = time.monotonic()
    responses = asyncio.run(scenario())
    assert server.proc.wait(30) == 0
    took = time.monotonic() - t0
    # Queued requests were answered 503; the one in the model was cut short. No drain wait.
    assert took < 20, f"fast shutdown took {took:.1f} s (drain timeout is 60 s)"
    codes = [r.status_code if isinstance(r, httpx.Response) else "transport" for r in responses]
    assert 503 in codes, codes
    for r in responses:  # a 503 says when to ask again, as the README promises of all
        if isinstance(r, httpx.Response) and r.status_code == 503:
            assert r.headers.get("Retry-After"), (r.text, r.headers)
            assert "drain timeout)" not in r.text  # no drain ran out: it was a fast stop
    if how == "SIGQUIT":
        assert "SIGQUIT: fast shutdown" in server.log()  # it was silent


def test_scale_and_drain_move_the_worker_count_everywhere(start_server) -> None:
    """``ctl scale`` and draining a model's last worker change the count it should have
    in /metrics, /v1/models, ctl config and the v2 config (not only in ctl status: the shipped
    degraded/no-worker alerts compare against it). Requests still queued when the last
    worker is drained get a 503 that says so at once, not a 504 at their deadline."""
    server: Server = start_server(
        *("--model", SLOW, "--set", "worker.heartbeat_timeout_s=120"),  # it is frozen below
        env=HANDLER_ENV,
        frontends=1,
    )

    def counts() -> tuple[str, int, int]:
        metrics = httpx.get(f"{server.url}/metrics").text
        [configured] = re.findall(r'ringserve_workers_configured\{model="slow"\} (\S+)', metrics)
        [model] = httpx.get(f"{server.url}/v1/models").json()["models"]
        group = httpx.get(f"{server.url}/v2/models/slow/config").json()["instance_group"]
        [effective] = server.ctl("config")["models"]  # "the effective configuration"
        assert effective["workers"] == model["workers"], effective
        return configured, model["workers"], group[0]["count"]

    assert counts() == ("1.0", 1, 1)
    server.ctl("scale", "slow", "2")
    assert counts() == ("2.0", 2, 2)
    server.wait_workers_ready(2)
    server.ctl("scale", "slow", "1")
    assert counts() == ("1.0", 1, 1)
    wait_until(lambda: len(worker_pids(server)) == 1, 60, "scale down to 1")
    [(worker, pid)] = [(p["id"], p["pid"]) for p in server.children() if p["role"] == "worker"]
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    ring = RequestRing(arena, 0)
    with server.client(timeout=60) as c, ThreadPoolExecutor(4) as pool:
        busy = pool.submit(c.post, "/v1/models/slow/predict", json={"data": [1500.0, 1.0]})
        # Frozen in the first request's batch until the drain is in: a drain that came
        # after the batch (on a loaded host the ctl calls below once took longer than its
        # 1.5 s) found the queued requests claimed by the worker, which rightly ran them.
        wait_until(
            lambda: frozen_mid_batch_outside_the_lock(arena, ring, pid),
            20,
            "the first request's batch, frozen",
        )
        try:
            queued = [
                pool.submit(c.post, "/v1/models/slow/predict", json={"data": [1.0, float(i)]})
                for i in range(3)
            ]
            wait_until(lambda: server.ctl("status")["models"][0]["queue_depth"] == 3, 10, "queued")
            t0 = time.monotonic()
            server.ctl("drain", worker)  # answered once the worker has been told
        finally:
            os.kill(pid, signal.SIGCONT)
            ring.close()
            arena.close()
        assert busy.result(30).status_code == 200
        for f in queued:
            r = f.result(30)
            assert r.status_code == 503, r.text
            assert "has no workers: its last one was drained" in r.json()["error"]
        assert time.monotonic() - t0 < 15  # the deadline is 30 s
    assert counts() == ("0.0", 0, 0)
    [model] = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert model["state"] == "drained"
    assert server.ctl("status")["models"][0]["state"] == "drained"
    not_ready = httpx.get(f"{server.url}/readiness")  # it serves nothing now
    assert not_ready.status_code == 503 and "every model was drained" in not_ready.text
    not_ready = httpx.get(f"{server.url}/v2/health/ready")
    assert not_ready.status_code == 503 and "every model was drained" in not_ready.text
    server.ctl("scale", "slow", "1")
    server.wait_workers_ready(1)
    with server.client() as c:
        assert c.post("/v1/models/slow/predict", json={"data": [1.0, 2.0]}).status_code == 200
    assert server.stop() == 0


def test_the_journal_says_what_happened_after_a_reload_and_a_refused_command(
    start_server,
) -> None:
    """After a rolling restart the supervisor tells systemd READY=1 again (its reload
    ends on it), and the journal said 'ready: every model has a ready worker' again, as
    if readiness had dropped; an admin command that was refused read like one that ran.
    Now: 'rolling restart over', and 'admin ... refused: why'."""
    server: Server = start_server("--model", "id=identity", frontends=1)
    server.rolling_restart()
    wait_until(lambda: "rolling restart over" in server.log(), 30, "the end of the restart")
    assert server.log().count("ready: every model has a ready worker") == 1
    # Over once the last step, the frontend, is back: it was said (and READY=1 sent)
    # as soon as the old frontend was asked to stop.
    before_over = server.log().split("rolling restart over")[0]
    assert re.search(r"frontend-0 \(pid \d+\) exited", before_over), before_over[-2000:]
    new_frontend = server.children()
    assert [p["state"] for p in new_frontend if p["role"] == "frontend"] == ["ready"]
    server.ctl("drain", "worker-99", check=False)
    assert re.search(r"admin drain refused: .*worker-99", server.log()), server.log()[-2000:]
    assert server.stop() == 0


def test_ctl_status_says_stopping_for_the_models_of_a_stopping_server(start_server) -> None:
    """While the server stops, its workers exit and nothing restarts them: ctl status
    said 'recovering' (a worker being replaced) for every model, which a script alerting
    on it would take for trouble. It says 'stopping'."""
    server: Server = start_server(
        "--model", SLOW, "--set", "worker.stop_timeout_s=30", env=HANDLER_ENV, frontends=1
    )
    arena = server.ctl("status")["server"]["arena"]
    with ThreadPoolExecutor(1) as pool:
        # A batch of 4.5 s (under a fast stop's 5 s): the server is stopping until it ends.
        # Seen running at once, not through a ctl call of its own: CI once saw it late in
        # a 3 s batch, and the stop was over before a ctl status could see it.
        busy = pool.submit(
            httpx.post, f"{server.url}/v1/models/slow/predict", json={"data": [4500.0]}, timeout=30
        )
        wait_until(lambda: running(arena), 20, "running")
        server.proc.send_signal(signal.SIGTERM)
        # The second SIGTERM (stop now, not drain) only once the first was taken: two sent
        # back to back can reach the supervisor as one (a signal does not queue), and CI
        # once saw only a drain, whose stopping phase ended before a ctl call saw it.
        wait_until(lambda: draining(arena), 20, "the drain")
        server.proc.send_signal(signal.SIGTERM)
        status = wait_until(
            lambda: (
                (s := server.ctl("status", check=False)).get("server", {}).get("phase")
                == "stopping"
                and s
            ),
            20,
            "the stopping phase",
        )
        assert [m["state"] for m in status["models"]] == ["stopping"], status["models"]  # type: ignore[index]
        busy.result(30)
    assert server.proc.wait(60) == 0


def test_a_worker_started_by_scale_shows_no_recycle_it_never_had(start_server) -> None:
    """LAST_RECYCLE belongs to the position: a worker that ``ctl scale`` started again
    showed the recycle reason of the one before it, a process it never was."""
    server: Server = start_server("--model", "id=identity", "--workers", "2", frontends=1)
    server.wait_workers_ready(2)

    def row(ident: str) -> dict:
        return next(p for p in server.children() if p["id"] == ident and p["state"] == "ready")

    old = row("worker-1")["pid"]
    server.ctl("recycle", "worker-1")
    wait_until(lambda: row("worker-1")["pid"] != old, 60, "the recycle")
    assert row("worker-1")["last_recycle_reason"] == "admin"
    server.ctl("scale", "id", "1")
    wait_until(lambda: len(worker_pids(server)) == 1, 60, "scale down")
    server.ctl("scale", "id", "2")
    server.wait_workers_ready(2)
    assert row("worker-1")["last_recycle_reason"] == "", row("worker-1")
    assert server.stop() == 0


def test_draining_one_models_last_worker_leaves_the_server_ready(start_server) -> None:
    """``ctl drain`` of a model's last worker is deliberate (configured 0; the alerts
    stay quiet): the server still serves its other models, so /readiness stays 200. It
    went 503, which takes a Kubernetes pod or an nginx upstream out for every model."""
    server: Server = start_server("--model", "a=identity", "--model", "b=identity")
    [b_worker] = [p["id"] for p in server.children() if p["model"] == "b"]
    server.ctl("drain", b_worker)
    wait_until(lambda: len(worker_pids(server)) == 1, 60, "b's worker gone")
    ready = httpx.get(f"{server.url}/readiness")
    assert ready.status_code == 200, ready.text
    assert ready.json()["workers_ready"] == {"a": 1, "b": 0}
    # KServe v2's server readiness agrees (as Triton leaves out a model it unloaded).
    v2 = httpx.get(f"{server.url}/v2/health/ready")
    assert v2.status_code == 200, v2.text
    r = httpx.post(f"{server.url}/v1/models/b/predict", json={"data": [1.0]})
    assert r.status_code == 503 and "its last one was drained" in r.text
    # A reload ends (READY=1 for systemd) though b has no worker to wait for: it waited
    # for one for ever.
    server.rolling_restart()
    wait_until(lambda: "rolling restart over" in server.log(), 60, "the end of the reload")
    assert server.stop() == 0


def test_a_stopping_server_refuses_connections_once_its_frontends_are_gone(
    start_server,
) -> None:
    """SIGTERM with a worker still busy past the drain timeout: the frontends exit first,
    and from then on a connection is refused (nginx moves to another upstream at once)
    instead of being accepted into a backlog nobody reads and reset when the supervisor
    finally exits, seconds later."""
    server: Server = start_server("--model", SLOW, "--drain-timeout", "1", env=HANDLER_ENV)
    with server.client() as c, ThreadPoolExecutor(1) as pool:
        pending = sigterm_while_in_the_model(server, c, pool, 6000.0)
        gone = re.compile(r"frontend-\d \(pid \d+\) exited")
        wait_until(lambda: len(gone.findall(server.log())) == 2, 20, "the frontends gone")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 2, "connections refused")  # the supervisor's next tick
        assert server.proc.poll() is None, "the worker is still in its batch"
        assert pending.result(30).status_code == 503
    assert server.proc.wait(30) == 0


def test_a_stopping_frontend_still_serves_a_request_arriving_on_an_idle_connection(
    start_server,
) -> None:
    """A keep-alive connection idle when its frontend is restarted: a request the client
    sends just then is served (with Connection: close), not lost to a close that races
    it (uvicorn closed such connections at once: a read error at every rolling restart,
    for keep-alive clients and for connections accepted an instant before)."""
    server: Server = start_server(frontends=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # now idle, kept alive
        server.ctl("restart", "frontend-0")
        wait_until(lambda: "Shutting down" in server.log(), 10, "the frontend stopping")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200") and b"connection: close" in head, answer
    with server.client() as c:
        wait_until(lambda: c.get("/readiness").status_code == 200, 30, "the new frontend")
    assert server.stop() == 0


def worker_processes(server: Server) -> set[int]:
    """The supervisor's live worker children, as the kernel sees them (not as ctl says)."""
    import psutil

    pids = set()
    for p in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):  # exited, and reaped, as we looked
            if alive(p) and "ringserve.gpu_worker" in p.cmdline():
                pids.add(p.pid)
    return pids


def test_a_worker_dying_while_its_recycle_starts_leaves_one_tracked_worker(start_server) -> None:
    """The old worker dies (OOM kill, crash) before its replacement is ready: the
    replacement takes the position. A restart beside it would leave a third worker that
    no heartbeat, memory limit or metric watches."""
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    old = next(p["pid"] for p in server.children() if p["id"] == "worker-0")
    server.ctl("recycle", "worker-0")
    os.kill(old, signal.SIGKILL)
    wait_until(
        lambda: (
            not server.ctl("status")["server"]["recycles_in_progress"]
            and server.ctl("status")["models"][0]["ready"] == 2
        ),
        60,
        "the replacement to take over",
    )
    time.sleep(3)  # a stray restart would be spawned within a tick or two
    assert worker_processes(server) == worker_pids(server)
    assert len(worker_processes(server)) == 2
    assert "the replacement takes its place" in server.log()
    with server.client() as c:
        assert c.post("/predict", json=DIGIT3).status_code == 200
    assert server.stop() == 0


def test_a_drain_during_a_recycle_is_not_undone_by_the_replacement(start_server) -> None:
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    server.ctl("recycle", "worker-1")
    server.ctl("drain", "worker-1")
    wait_until(lambda: len(worker_processes(server)) == 1, 60, "worker-1 and its replacement gone")
    time.sleep(2)
    assert len(worker_processes(server)) == 1
    st = server.ctl("status")
    assert [p["id"] for p in st["processes"] if p["role"] == "worker"] == ["worker-0"]
    assert st["models"][0]["workers"] == 1
    with pytest.raises(AssertionError, match="not running or already being replaced"):
        server.ctl("recycle", "worker-1")
    assert server.stop() == 0


def test_a_worker_killed_as_hung_is_logged_with_the_request_it_ran(start_server) -> None:
    """The kill line names the request the worker was running, by the id its client
    knows (X-Request-ID): the one clue to what hangs a model. The model's last error,
    which /v1/models and 503s show to every client, does not carry it."""
    server: Server = start_server(
        *("--model", "slow=python:support.fake_handlers:Slow"),
        *("--set", "worker.heartbeat_timeout_s=3"),
        env=HANDLER_ENV,
        frontends=1,
    )
    body = {"data": [5000.0, 0.0], "request_id": "hangs-1"}  # 5 s a try
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post, f"{server.url}/v1/models/slow/predict", json=body, timeout=60
        )
        wait_until(
            lambda: re.search(
                r"worker-0 \(pid \d+\) heartbeat stopped .* running request hangs-1\)", server.log()
            ),
            20,
            "the kill line",
        )
        assert answer.result(60).status_code == 500  # killed on both tries: poison
    last_error = server.ctl("status")["models"][0].get("last_error", "")
    assert "heartbeat_timeout_s" in last_error and "hangs-1" not in last_error, last_error
    assert server.stop() == 0


def test_ctl_status_names_a_worker_silent_in_a_batch_before_it_is_killed(start_server) -> None:
    """A worker inside one long batch (or hung) showed as plain ``ready`` in ``ctl
    status`` until the heartbeat check killed it, while its model's requests queued
    behind it: the operator paged for latency could not see which worker, or what it
    ran. Now its row says ``ready (silent)`` and a line names the request and when the
    supervisor kills it (``silent`` and ``heartbeat_age_s`` in ``--json``); it is gone
    once the batch ends."""
    server: Server = start_server(
        *("--model", "slow=python:support.fake_handlers:Slow"), env=HANDLER_ENV, frontends=1
    )
    body = {"data": [6000.0, 0.0], "request_id": "long-1"}  # 6 s, under the 15 s timeout

    def silent() -> str | None:
        return next(p.get("silent") for p in server.children() if p["role"] == "worker")

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post, f"{server.url}/v1/models/slow/predict", json=body, timeout=60
        )
        text = wait_until(silent, 30, "the worker shown silent")
        assert "running request long-1 (a batch that long, or a hang)" in text, text
        assert "killed past worker.heartbeat_timeout_s=15 s" in text, text
        ctl = [sys.executable, "-m", "ringserve.supervisor.cli", "ctl"]
        table = subprocess.run(
            [*ctl, "--socket", server.admin_socket, "status"],
            capture_output=True,
            text=True,
            timeout=30,
            env=server.env,
        ).stdout
        assert re.search(r"worker-0 +worker +\d+ +slow +- +ready \(silent\)", table), table
        assert "worker-0: no heartbeat for " in table, table
        assert answer.result(60).status_code == 200
    wait_until(lambda: silent() is None, 30, "the worker beating again")
    assert all("heartbeat_age_s" in p for p in server.children())
    assert server.stop() == 0


def test_batches_near_the_heartbeat_timeout_are_named_at_start(start_server) -> None:
    """A worker beats between batches: one that outlasts worker.heartbeat_timeout_s is
    killed as hung (twice, and its requests fail as poison). When the profile shows a
    batch taking over half the timeout, the start says so, naming both settings."""
    server: Server = start_server(
        *("--model", "slow=python:support.fake_handlers:TakesHalfASecondAndMore"),
        *("--max-batch-size", "2", "--set", "worker.heartbeat_interval_s=0.2"),
        *("--set", "worker.heartbeat_timeout_s=1"),
        env=HANDLER_ENV,
        frontends=1,
    )
    assert re.search(
        r"model slow: a batch of \d takes about 0\.\d s by the profile, near "
        r"worker\.heartbeat_timeout_s=1 s.*Raise worker\.heartbeat_timeout_s or lower "
        r"batching\.max_batch_size",
        server.log(),
    ), server.log()
    assert server.stop() == 0


def test_isolating_a_failing_request_keeps_the_worker_alive(start_server) -> None:
    """A batch that raises is re-run member by member to find the culprit. Those runs
    together may outlast the heartbeat timeout: the worker beats between them, so it
    is not killed as hung (a cold restart, every batchmate re-queued) for one bad
    request."""
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:SlowUnlucky",
        "--set",
        "worker.heartbeat_timeout_s=3",
        "--set",
        "batching.preferred_batch_size=8",
        env=HANDLER_ENV,
        frontends=1,
    )
    arena = server.ctl("status")["server"]["arena"]
    url = "/v1/models/slow/predict"
    with server.client(timeout=60) as c, ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(c.post, url, json={"data": [1500.0, 0.0]})
        wait_until(lambda: running(arena), 20, "the blocker to reach the worker")
        rows = [[600.0, float(i)] for i in range(7)] + [[600.0, 13.0]]
        answers = [pool.submit(c.post, url, json={"data": row}) for row in rows]
        assert blocker.result(30).status_code == 200
        statuses = [f.result(60) for f in answers]
    assert [r.status_code for r in statuses] == [200] * 7 + [500], [r.text for r in statuses]
    assert "unlucky" in statuses[-1].json()["error"]
    assert max(r.json()["batch_size"] for r in statuses[:7]) == 1  # each re-run alone
    assert "heartbeat stopped" not in server.log()
    assert server.stop() == 0


def _listening(port: int) -> bool:
    """Whether any socket on the host listens on ``port`` (read from /proc/net, so the
    supervisor's and the frontends' sockets alike)."""
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.net_connections("tcp")
    )


def test_a_connection_during_the_frontends_stop_is_answered_or_refused_never_reset(
    start_server,
) -> None:
    """A frontend finishing its last request has stopped accepting. The socket must stop
    listening with it: were the supervisor's copy still open, the kernel would complete
    new connections into a backlog nobody reads and reset them when it closes."""
    server: Server = start_server(
        "--model", SLOW, "--drain-timeout", "0.5", env=HANDLER_ENV, frontends=1
    )
    outcomes: list[str] = []

    def attempt() -> bool:
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        except ConnectionRefusedError:
            outcomes.append("refused")
            return True
        with s:
            s.settimeout(5)
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head = s.recv(64)
            except OSError as e:
                head = repr(e).encode()
        outcomes.append("answered" if head.startswith(b"HTTP/1.1 ") else f"lost: {head!r}")
        return False

    with server.client() as c, ThreadPoolExecutor(1) as pool:
        pending = sigterm_while_in_the_model(server, c, pool, 4000.0)
        # uvicorn logs this, then stops accepting; the frontend still has 1 s to answer
        # its in-flight request. (Probing before that would also race the one instant a
        # connection can sit in the backlog as the frontend closes it.)
        wait_until(lambda: "Shutting down" in server.log(), 20, "the frontend's stop")
        # Then until nothing listens on the port (not a fixed 0.2 s: a loaded host's
        # frontend may take longer to close it); a copy the supervisor kept would listen on.
        wait_until(lambda: not _listening(server.port), 20, "the port to stop listening")
        for _ in range(5):
            attempt()
        assert pending.result(30).status_code == 503
    assert outcomes == ["refused"] * 5, outcomes
    assert server.proc.wait(30) == 0


def test_a_request_waiting_on_a_kept_alive_connection_survives_a_stalled_frontend(
    start_server,
) -> None:
    """A frontend stopped (SIGSTOP, a starved VM) past server.keep_alive_s: when it runs
    again, its keep-alive timer fires before the read, and closed connections whose
    client had sent a request in time. That request is served now."""
    server: Server = start_server("--set", "server.keep_alive_s=1", frontends=1)
    [frontend] = server.pids("frontend")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body, headers = json.dumps(DIGIT3), {"Content-Type": "application/json"}
    try:
        conn.request("POST", "/predict", body, headers)
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        os.kill(frontend, signal.SIGSTOP)
        try:
            conn.request("POST", "/predict", body, headers)  # in time: idle for < 1 s
            time.sleep(3)
        finally:
            os.kill(frontend, signal.SIGCONT)
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()[:200]
    finally:
        conn.close()
    assert server.stop() == 0


def test_scale_beyond_the_arenas_worker_records_is_refused(start_server) -> None:
    """Each worker process holds a control record of the arena, sized at start. Scaling
    two models to 64 each took more than there are, and the spawn with none left ended
    the supervisor (IndexError). ctl scale refuses it and says what to do."""
    server: Server = start_server("--model", "a=identity", "--model", "b=identity")
    with pytest.raises(AssertionError, match="would need 69 worker records; this server has 68"):
        server.ctl("scale", "a", "64")
    assert server.ctl("status")["models"][0]["workers"] == 1
    assert server.stop() == 0
