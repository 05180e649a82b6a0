"""Chaos under load: processes die by SIGKILL, clients vanish, /dev/shm is too small.

Each test drives open-loop load (``support.load.drive``) and asserts its pass criterion:
nothing lost (every request answered once, with its own answer, or refused with a
documented fast 503), every slot back to free, and no resource left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import SERVE, Server, alive, free_port, shm_segments, wait_until
from support.freeze import frozen_mid_batch, frozen_mid_batch_outside_the_lock
from support.load import DIGIT3, Planned, drive, echo_request
from test_e2e_core import HANDLER_ENV

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState
from ringserve.ipc.ring import RequestRing

pytestmark = pytest.mark.e2e

SLOW = "slow=python:support.fake_handlers:Slow"
SLOW_PATH = "/v1/models/slow/predict"
SLOTS = 256  # arena.slots default


def slot_states(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^ringserve_ring_slots\{state="(\w+)"\} (\S+)$', text, re.M)
    }


def all_slots_free(server: Server, total: int = SLOTS) -> bool:
    return slot_states(server).get("free") == total


def wait_workers(server: Server, n: int, gone: int | None = None) -> None:
    def ready() -> bool:
        st = server.ctl("status")
        pids = [p["pid"] for p in st["processes"] if p["role"] == "worker"]
        return st["models"][0]["ready"] == n and len(pids) == n and gone not in pids

    wait_until(ready, 60, f"{n} ready workers" + (f" without {gone}" if gone else ""))


def test_worker_sigkilled_mid_batch_three_times_loses_nothing(start_server) -> None:
    server: Server = start_server(
        "--model", SLOW, "--workers", "2", "--max-batch-size", "8", env=HANDLER_ENV
    )
    wait_workers(server, 2)
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    kills: list[dict] = []

    def kill_three_times() -> None:
        for _ in range(3):
            victim = server.pids("worker")[0]
            # Mid-batch: the victim holds a RUNNING slot (each batch sleeps 40 ms), and
            # still does when the kill lands: frozen first, so the batch cannot end
            # between the look and the kill (on a slow host it once did).
            wait_until(
                lambda v=victim: frozen_mid_batch(arena, v), 20, f"worker {victim} mid-batch"
            )
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            wait_workers(server, 2, gone=victim)
            kills.append({"pid": victim, "replaced_s": round(time.monotonic() - t0, 2)})

    try:
        result = drive(
            server.url,
            lambda i: echo_request(SLOW_PATH, i, first=40.0),
            kill_three_times,
            rate=40,
            max_requests=4000,
            max_duration_s=100,
        )
    finally:
        arena.close()
    print(f"kills {kills}; {result.summary()}")
    result.assert_nothing_lost(min_ok=100)
    assert len(kills) == 3
    totals = server.ctl("status")["server"]["totals"]
    assert sum(v for k, v in totals.items() if k.startswith("restarts:worker:")) == 3, totals
    assert totals.get("requeued", 0) >= 3, f"each kill caught a batch in flight: {totals}"
    assert not totals.get("poisoned"), totals
    wait_until(lambda: all_slots_free(server), 20, "every slot back to free")
    assert server.stop() == 0


def _frontend_footprint(server: Server) -> dict[int, tuple[int, int]]:
    """pid -> (open sockets, USS bytes) of each frontend."""
    sockets = server.open_sockets()
    return {pid: (n, psutil.Process(pid).memory_full_info().uss) for pid, n in sockets.items()}


def test_fifty_clients_disconnecting_mid_request_leak_nothing(start_server) -> None:
    server: Server = start_server("--model", SLOW, "--max-batch-size", "8", env=HANDLER_ENV)
    # Warm both frontends (lazy imports, first allocations) before the baseline.
    warm = drive(
        server.url, lambda i: echo_request(SLOW_PATH, i, first=1.0), rate=50, max_requests=60
    )
    warm.assert_nothing_lost(min_ok=60)
    wait_until(lambda: all_slots_free(server), 10, "warm-up slots free")
    before = _frontend_footprint(server)

    async def impatient_clients(n: int) -> list[BaseException | httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3, limits=limits) as c:
            return await asyncio.gather(
                *(c.post(SLOW_PATH, json={"data": [1000.0, float(i)]}) for i in range(n)),
                return_exceptions=True,
            )

    outcomes = asyncio.run(impatient_clients(50))
    assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes[:3]
    # The worker finishes the batch it is running (1 s), skips the cancelled rest.
    wait_until(lambda: all_slots_free(server), 30, "every abandoned slot back to free")

    def sockets_back() -> bool:
        now = server.open_sockets()
        return all(now[pid] <= before[pid][0] for pid in before)

    wait_until(sockets_back, 20, "the frontends' sockets back to baseline")
    after = _frontend_footprint(server)
    for pid, (sockets, uss) in after.items():
        grew = (uss - before[pid][1]) / 2**20
        print(f"frontend {pid}: sockets {before[pid][0]} -> {sockets}, USS grew {grew:.2f} MiB")
        assert grew < 8, f"frontend {pid} USS grew {grew:.1f} MiB after 50 disconnects"
    with server.client() as c:
        r = c.post(SLOW_PATH, json={"data": [1.0, 2.0]})
        assert r.status_code == 200 and r.json()["result"] == [1.0, 2.0]
    assert server.stop() == 0


def _tree(server: Server) -> list[psutil.Process]:
    sup = psutil.Process(server.proc.pid)
    return [sup, *sup.children(recursive=True)]


def test_sigkill_whole_tree_then_restart_is_clean_and_prompt(
    start_server, private_shm_dir: str
) -> None:
    shm = private_shm_dir
    t0 = time.monotonic()
    server: Server = start_server("--set", f"arena.shm_dir={shm}")
    clean_s = time.monotonic() - t0
    with server.client() as c:
        assert c.post("/predict", json={"data": [[0.0] * 8] * 8}).status_code == 200
    procs = _tree(server)
    assert len(procs) >= 4, procs  # supervisor, 2 frontends, a worker
    segments = shm_segments(server.instance, shm)
    assert segments
    for p in procs:  # every child runs in its own session: kill each group at once
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
    assert server.proc.wait(10) == -signal.SIGKILL
    wait_until(lambda: not any(map(alive, procs)), 10, "every process of the tree to die")
    assert shm_segments(server.instance, shm) == segments, "a crash leaves its segment behind"
    assert os.path.exists(server.admin_socket), "and its admin socket"

    t1 = time.monotonic()
    again: Server = start_server(
        *("--instance", server.instance, "--admin-socket", server.admin_socket),
        *("--set", f"arena.shm_dir={shm}"),
    )
    restart_s = time.monotonic() - t1
    again.instance, again.admin_socket = server.instance, server.admin_socket
    print(f"clean start {clean_s:.1f} s, restart after SIGKILL of the tree {restart_s:.1f} s")
    assert restart_s <= 2 * clean_s + 5
    assert not set(segments) & set(shm_segments(server.instance, shm)), "stale segment removed"
    assert len(shm_segments(server.instance, shm)) == 1
    assert "removed stale shared memory" in again.log()
    assert again.ctl("status")["server"]["phase"] == "running"  # the same socket path
    result = drive(again.url, _digit_request, rate=40, max_requests=40)
    result.assert_nothing_lost(min_ok=40)
    assert again.stop() == 0
    assert shm_segments(server.instance, shm) == []


def _digit_request(i: int) -> Planned:
    rid = f"digit-{i}"

    def check(r: httpx.Response) -> str | None:
        body = r.json()
        if body["request_id"] != rid or body["result"]["label"] != "3":
            return f"{body['request_id']} {body['result']}"
        return None

    return Planned("/predict", {"json": {**DIGIT3, "request_id": rid}}, check)


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):  # type: ignore[no-untyped-def]
    path.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mount.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {mount.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=30)


def test_shm_too_small_fails_at_start_with_a_clear_error(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "shm", "2m") as shm:
        port = free_port()
        sock = tmp_path / "admin.sock"
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        env.pop("NOTIFY_SOCKET", None)
        t0 = time.monotonic()
        out = subprocess.run(
            [
                *SERVE,
                "--port",
                str(port),
                "--instance",
                f"t{port}",
                "--admin-socket",
                str(sock),
                "--set",
                f"arena.shm_dir={shm}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        took = time.monotonic() - t0
        print(f"rc {out.returncode} after {took:.1f} s: {out.stderr.strip()[-300:]}")
        assert out.returncode not in (-signal.SIGBUS, 128 + signal.SIGBUS), "died of SIGBUS"
        assert out.returncode == 1, out.stderr
        assert re.search(r"arena needs [\d.]+ MiB but \S+ has [\d.]+ MiB free", out.stderr)
        assert "Traceback" not in out.stderr
        assert os.listdir(shm) == [], "nothing left in the too-small directory"
        assert not sock.exists()
        with socket.socket() as s:  # the port was let go too
            s.bind(("127.0.0.1", port))


def test_missing_shm_dir_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    out = subprocess.run(
        [
            *SERVE,
            "--port",
            str(port),
            "--admin-socket",
            str(tmp_path / "admin.sock"),
            "--set",
            f"arena.shm_dir={tmp_path / 'missing'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "arena.shm_dir" in out.stderr and "No such file or directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_lone_request_whose_worker_dies_is_answered_by_its_retry(start_server) -> None:
    """Exactly one answer with no other traffic: under load, any later answer wakes the
    frontend, which would hide a retried request whose answer never signals it. Alone,
    such a request would sit until its deadline and get a 504 instead of its result."""
    server: Server = start_server("--model", SLOW, "--workers", "2", env=HANDLER_ENV, frontends=1)
    wait_workers(server, 2)
    arena = Arena.attach(server.ctl("status")["server"]["arena"])

    def running_worker() -> int:
        slots = arena.slots
        pids = slots["worker_pid"][slots["state"] == SlotState.RUNNING]
        return int(pids[0]) if len(pids) else 0

    try:
        with server.client(timeout=60) as c, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                c.post,
                SLOW_PATH,
                json={"data": [1500.0, 2.0]},  # each run sleeps 1.5 s
                headers={"X-Request-Timeout-Ms": "20000"},
            )
            victim = wait_until(running_worker, 20, "the request to run on a worker")
            os.kill(victim, signal.SIGKILL)
            r = pending.result(90)
    finally:
        arena.close()
    assert r.status_code == 200, r.text
    assert r.json()["result"] == [1500.0, 2.0]
    assert server.ctl("status")["server"]["totals"].get("requeued") == 1
    assert server.stop() == 0  # and a clean exit: no segment left in /dev/shm


# A worker caught by a freeze (SIGSTOP, a debugger, the cgroup freezer) inside pop holds
# its model's ring lock until the supervisor's heartbeat check kills it. Played here by a
# process outside the server, so the freeze lasts exactly as long as the test wants.
HOLD_RING_LOCK = """
import sys, time
from ringserve.ipc.arena import Arena
from ringserve.ipc.ring import RequestRing
ring = RequestRing(Arena.attach(sys.argv[1]), int(sys.argv[2]))  # kept: mapped until death
print("attached", flush=True)
sys.stdin.readline()  # the word to take it
ring.locked().lock()
print("held", flush=True)
time.sleep(600)
"""
FROZEN_LOCK_SETTINGS = (
    *("--model", "id=identity", "--model", "other=identity"),
    *("--set", "worker.heartbeat_interval_s=0.2", "--set", "worker.heartbeat_timeout_s=1"),
)


@contextlib.contextmanager
def frozen_ring_lock(
    server: Server, model: int, first: Callable[[], object] = lambda: None
) -> Iterator[subprocess.Popen]:
    """A process frozen (SIGSTOP) while it holds ``model``'s ring lock; killed after.
    ``first`` runs once the process is up, just before it takes the lock: the take is
    then a pipe's round trip away, not an interpreter's start (a second or more on a
    loaded host)."""
    arena = server.ctl("status")["server"]["arena"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RING_LOCK, arena, str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=server.env,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "attached"
        first()
        holder.stdin.write("lock\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        yield holder
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdin.close()
        holder.stdout.close()


def waits_on_a_futex(pid: int) -> bool:
    """The process's main thread sleeps in the kernel on a futex (a lock), not on its
    eventfd or a timer."""
    with open(f"/proc/{pid}/wchan") as f:
        return "futex" in f.read()


def test_a_frozen_ring_lock_holds_up_its_model_and_kills_nobody(start_server) -> None:
    """While a frozen process holds model id's ring lock, longer than several heartbeat
    timeouts: the frontend answers /health and the other model, the held-up request
    waits (not lost, not reset), and no process is killed as hung. The frontend used to
    block its event loop on the lock, so every endpoint stalled, and the supervisor then
    killed it and the waiting worker for silence. Once the lock is free, the request is
    answered."""
    server: Server = start_server(*FROZEN_LOCK_SETTINGS, frontends=1)
    before = {p["pid"] for p in server.children()}
    url = f"{server.url}/v1/models/id/predict"
    long_deadline = {"X-Request-Timeout-Ms": "60000"}
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    with (
        frozen_ring_lock(server, 0) as holder,
        ThreadPoolExecutor(1) as pool,
        server.client(timeout=10) as client,
    ):
        held_up = pool.submit(
            httpx.post, url, json={"data": [1.5, 2.5]}, headers=long_deadline, timeout=60
        )
        wait_until(
            lambda: np.any(arena.slots["state"] == SlotState.WRITING), 20, "the request's slot"
        )
        until = time.monotonic() + 3.0  # three heartbeat timeouts
        while time.monotonic() < until:
            assert client.get("/health").status_code == 200
            other = client.post("/v1/models/other/predict", json={"data": [7.0]})
            assert other.status_code == 200 and other.json()["result"] == [7.0], other.text
            time.sleep(0.2)
        assert not held_up.done()
        assert "ring lock of model id has been held for over 1 s" in server.log()
        assert {p["pid"] for p in server.children()} == before, server.log()
        holder.kill()
        answered = held_up.result(30)
    arena.close()
    assert answered.status_code == 200 and answered.json()["result"] == [1.5, 2.5]
    assert "heartbeat stopped" not in server.log()
    # The frontend logs this after it pushes the request, and its log reaches the
    # server's through a pipe: the answer can come first (CI, 2026-12-06 06:47).
    wait_until(
        lambda: re.search(r"ring lock of model id is free again after [\d.]+ s", server.log()),
        10,
        "the log line that the ring lock is free again",
    )
    wait_until(lambda: all_slots_free(server), 20, "every slot back to free")


def test_a_worker_dying_while_its_ring_lock_is_frozen_loses_nothing(start_server) -> None:
    """The supervisor re-queues a dead worker's requests under its ring's lock. With that
    lock frozen it used to wait on it, and so stopped ticking: no replacement, no
    heartbeat check (the one thing that ends a real freeze), no ``ctl``. Now it replaces
    the worker at once and re-queues its request once the lock is free: answered, once."""
    server: Server = start_server(
        *("--model", SLOW, "--set", "worker.heartbeat_interval_s=0.2"),
        *("--set", "worker.heartbeat_timeout_s=3"),
        env=HANDLER_ENV,
        frontends=1,
    )
    victim = server.pids("worker")[0]
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    ring = RequestRing(arena, 0)

    sent: list[Future[httpx.Response]] = []

    def send_and_freeze_its_batch(pool: ThreadPoolExecutor) -> None:
        sent.append(
            pool.submit(
                httpx.post,
                f"{server.url}{SLOW_PATH}",
                json={"data": [1000.0, 2.0], "request_id": "slow-1"},  # runs for 1 s
                headers={"X-Request-Timeout-Ms": "60000"},
                timeout=60,
            )
        )
        # Frozen while it runs the request, so it still holds it when the kill lands: a
        # batch that ended first (the lock holder once took longer to start than the
        # batch ran, on a loaded host) leaves nothing to re-queue.
        wait_until(
            lambda: frozen_mid_batch_outside_the_lock(arena, ring, victim),
            20,
            "the request's batch, frozen",
        )

    try:
        with ThreadPoolExecutor(1) as pool:
            first = functools.partial(send_and_freeze_its_batch, pool)
            with frozen_ring_lock(server, 0, first=first) as holder:
                [answer] = sent
                os.kill(victim, signal.SIGKILL)
                wait_workers(server, 1, gone=victim)
                assert "requests of worker-0 wait to be re-queued (1: slow-1)" in server.log()
                assert not answer.done()
                holder.kill()
            r = answer.result(60)
    finally:
        ring.close()
        arena.close()
    assert r.status_code == 200 and r.json()["result"] == [1000.0, 2.0], r.text
    assert server.ctl("status")["server"]["totals"].get("requeued") == 1
    wait_until(lambda: all_slots_free(server), 20, "every slot back to free")


def test_a_frozen_ring_lock_does_not_hold_up_a_stop(start_server) -> None:
    """SIGTERM while a frozen process holds model id's ring lock: its worker, waiting on
    the lock (each idle wake-up pops), gives the wait up and exits as asked, and the
    supervisor does not wait on the lock to answer the queue. The worker used to stay in
    the wait until worker.stop_timeout_s and be SIGKILLed."""
    server: Server = start_server(
        *FROZEN_LOCK_SETTINGS, "--set", "worker.stop_timeout_s=20", frontends=1
    )
    worker = next(p for p in server.children() if p["model"] == "id")
    with frozen_ring_lock(server, 0):
        # Its next idle wake-up (every 0.2 s) pops: then it waits on the lock (a futex).
        wait_until(lambda: waits_on_a_futex(worker["pid"]), 10, "the worker in the lock wait")
        assert server.stop(timeout_s=15) == 0
    log = server.log()
    assert f"{worker['id']} (pid {worker['pid']}) exited: ok" in log, log
    assert "stop_timeout" not in log
