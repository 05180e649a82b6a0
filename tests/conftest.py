"""Shared fixtures: start a real ``ringserve serve`` on a free port and tear it down.

Everything is bounded: readiness is awaited with a deadline and backoff (never a fixed
sleep), and teardown kills the whole process group if a graceful stop overruns.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def bench_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/`` importable: it runs from the checkout and is not installed, and
    ``pytest`` (what CI runs), unlike ``python -m pytest``, does not put the checkout on
    the path."""
    monkeypatch.syspath_prepend(str(REPO))


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[object]:
    """A small arena of its own (4 slots of 4 KiB, 2 models, 1 frontend), unlinked after."""
    from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name

    a = Arena.create(
        os.path.join(tmp_path, segment_name("slotio")),
        ArenaGeometry(n_slots=4, slot_bytes=4096, n_models=2, n_procs=4, n_frontends=1),
    )
    yield a
    a.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grpc_port() -> int:
    """A free port for a module's server to serve gRPC on (``--grpc-port``)."""
    return free_port()


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll ``predicate`` with backoff until it returns truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    instance: str
    admin_socket: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30.0), **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def inflight(self) -> float:
        """Requests holding a slot, as /metrics reads them from the arena."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        (line,) = [x for x in text.splitlines() if x.startswith("ringserve_inflight_requests ")]
        return float(line.split()[-1])

    def ctl(self, *args: str, check: bool = True) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ringserve.supervisor.cli",
                "ctl",
                "--socket",
                self.admin_socket,
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ctl {args} failed: {out.stderr}{out.stdout}")
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def children(self) -> list[dict]:
        return self.ctl("status")["processes"]

    def pids(self, role: str) -> list[int]:
        return [p["pid"] for p in self.children() if p["role"] == role]

    def open_sockets(self, role: str = "frontend") -> dict[int, int]:
        """pid -> open socket fds, for leak checks. Not all fds: a frontend opens its
        metric files on its first counted request, and which frontend accepts a
        connection is the kernel's pick, so a warm-up may never reach one of them (CI saw
        a counter file and its mmap's dup open during a measured part)."""
        return {pid: len(socket_links(pid)) for pid in self.pids(role)}

    def wait_replaced(self, dead: int, role: str = "frontend", count: int = 2) -> None:
        """Until the supervisor has reaped ``dead`` and runs ``count`` of ``role`` again."""

        def replaced() -> bool:
            pids = self.pids(role)
            return dead not in pids and len(pids) == count

        wait_until(replaced, 30, f"a replacement {role}")

    def wait_workers_ready(self, count: int, timeout_s: float = 60.0, model: int = 0) -> None:
        """Until ``count`` workers of ``model`` are READY. Readiness needs only one: a
        sibling still warming up runs batches of its own (and takes its thread share)."""

        def ready() -> bool:
            return self.ctl("status")["models"][model]["ready"] == count

        wait_until(ready, timeout_s, f"{count} ready workers")

    def rolling_restart(self, timeout_s: float = 60.0) -> None:
        """SIGHUP, then wait until every child process has been replaced and the restart
        is over."""
        before = {p["pid"] for p in self.children()}
        self.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                not ({p["pid"] for p in self.children()} & before)
                and not self.ctl("status")["server"]["rolling_restart_pending"]
            ),
            timeout_s,
            "every process to be replaced",
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readiness", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s, "readiness")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"server did not stop within {timeout_s} s") from None
        return self.proc.returncode


def alive(proc: int | psutil.Process) -> bool:
    """Whether a process runs (exists and is no zombie); False once it has gone, also
    when it went, and was reaped, between two looks."""
    try:
        process = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def socket_links(pid: int) -> set[str]:
    """The ``socket:[inode]`` links of ``pid``'s open fds."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while we looked
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:"):
                out.add(link)
    return out


SERVE = [sys.executable, "-m", "ringserve.supervisor.cli", "serve"]


def launch(tmp: Path, *args: str, env: dict[str, str] | None = None, frontends: int = 2) -> Server:
    """``ringserve serve`` on a free port, in its own process group, its admin socket,
    log and profile cache under ``tmp``; not waited for."""
    port = free_port()
    instance = f"t{port}"
    sock = str(tmp / f"admin-{port}.sock")
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), **(env or {})}
    if "NOTIFY_SOCKET" not in (env or {}):
        full_env.pop("NOTIFY_SOCKET", None)  # never talk to a real systemd from tests
    cmd = [*SERVE, "--port", str(port), "--instance", instance, "--admin-socket", sock]
    cmd += ["--frontends", str(frontends), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    return Server(proc, port, instance, sock, log_path, full_env)


def kill_group(server: Server) -> None:
    """SIGKILL whatever is left of ``server``'s process group (teardown), and unlink its
    arena: a supervisor killed so cannot, and each failed test left 256 MiB in /dev/shm."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    for name in shm_segments(server.instance):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: ``start_server("--model", "id=identity", env={...})`` → a ready Server."""
    started: list[Server] = []

    def start(
        *args: str, env: dict[str, str] | None = None, ready: bool = True, frontends: int = 2
    ) -> Server:
        server = launch(tmp_path, *args, env=env, frontends=frontends)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        kill_group(server)


def shm_segments(instance: str, shm_dir: str = "/dev/shm") -> list[str]:
    return [n for n in os.listdir(shm_dir) if n.startswith(f"ringserve-{instance}-")]


@pytest.fixture
def private_shm_dir() -> Iterator[str]:
    """A directory of its own on /dev/shm's tmpfs, for ``arena.shm_dir``: what a crash
    leaves there is swept by that server's next start alone. In /dev/shm itself any
    ringserve starting on the host meanwhile (another test run) sweeps every instance's
    stale segment, and the test that looks for it finds none."""
    path = tempfile.mkdtemp(prefix="rs-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The batch profile on a virtual clock (``support/profile_clock.py``), its cache in
    ``tmp_path``. Imported here, not at the top: torch comes with it."""
    from support.profile_clock import use_virtual_clock

    return use_virtual_clock(monkeypatch, str(tmp_path))
