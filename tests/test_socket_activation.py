"""Socket activation end to end: ``ringserve serve`` on a listening socket it inherited.

``systemd-socket-activate`` (Debian package ``systemd``) binds the socket, passes it as
fd 3 with ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES=http`` and *execs* ringserve on
the first connection, as systemd does for ``ringserve.socket``. CI installs it; a
missing tool is a failure here, not a skip.

What ``systemd-socket-activate`` cannot show: it execs the service, so it does not keep
the socket once the service exits, and a restart of the service would re-bind (with a
window where connections are refused). Under real systemd the ``.socket`` unit keeps the
socket across ``systemctl restart``. ``test_full_restart_on_a_held_socket`` therefore
plays systemd's part itself: the test holds the socket and hands it, as fd 3 with the
same variables, to one supervisor after another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import SERVE, Server, free_port, shm_segments, socket_links
from support.load import DIGIT3, LoadResult, load_during

pytestmark = pytest.mark.e2e

LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")

# What systemd does between fork and exec for a socket-activated service: the socket
# becomes fd 3 and the variables name this very process.
SYSTEMD_EXEC = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http")
os.execv(sys.argv[2], sys.argv[2:])
"""


def socket_activate() -> str:
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: CI must install it (apt-get install systemd)"
    return tool


def serve_cmd(instance: str, admin_socket: str, *args: str) -> list[str]:
    return [*SERVE, "--instance", instance, "--admin-socket", admin_socket, *args]


def socket_inode(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``launch(cmd_prefix, port, instance, *serve_args, pass_fds=())`` → a started Server."""
    started: list[Server] = []

    def start(
        prefix: list[str], port: int, instance: str, *args: str, pass_fds: tuple[int, ...] = ()
    ) -> Server:
        admin = str(tmp_path / f"admin-{instance}.sock")
        log_path = tmp_path / f"server-{instance}-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
        env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*prefix, *serve_cmd(instance, admin, *args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        server = Server(proc, port, instance, admin, log_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


def check_passed_socket(server: Server) -> None:
    """The supervisor and every frontend serve the one socket systemd passed as fd 3."""
    listen = server.ctl("status")["server"]["listen"]
    assert listen == [{"address": f"127.0.0.1:{server.port}", "fd": 3, "source": "systemd:http"}]
    passed = socket_inode(server.proc.pid, 3)
    for pid in server.pids("frontend"):
        assert passed in socket_links(pid), f"frontend {pid} does not hold the passed socket"
    assert "systemd:http socket" in server.log()


def print_counts(what: str, result: LoadResult) -> None:
    print(f"\n[socket activation] {what}: {result.summary()}")


def test_serves_on_the_socket_systemd_passed(launch) -> None:
    port = free_port()
    server: Server = launch(
        [socket_activate(), "-l", f"127.0.0.1:{port}", "--fdname=http"], port, f"t{port}"
    )
    # systemd-socket-activate execs ringserve on the first connection (this poll).
    server.wait_ready()
    assert "Execing" in server.log()
    assert "ringserve.supervisor.cli" in psutil.Process(server.proc.pid).cmdline()
    check_passed_socket(server)
    with server.client() as c:
        for _ in range(5):
            r = c.post("/predict", json=DIGIT3)
            assert r.status_code == 200 and r.json()["result"]["label"] == "3", r.text
    assert server.stop() == 0
    assert shm_segments(server.instance) == []


def test_sighup_rolling_restart_under_load_on_the_passed_socket(launch) -> None:
    """Frontends restart one at a time on the inherited socket: nothing refused or failed."""
    port = free_port()
    server: Server = launch(
        [socket_activate(), "-l", f"127.0.0.1:{port}", "--fdname=http"],
        port,
        f"t{port}",
    )
    server.wait_ready()
    result = load_during(server.url, server.rolling_restart)
    print_counts("SIGHUP rolling restart", result)
    assert not result.exhausted, "the load ended before the rolling restart did"
    assert result.connect_errors == 0, result.summary()
    assert result.non_2xx == 0, result.summary()
    assert result.wrong == 0, result.summary()
    # A keep-alive connection that a stopping frontend closes just as the client reuses
    # it is a transport error (not a refused connection); nginx retries those, see
    # test_deploy_nginx.py. Here it must stay rare.
    assert result.transport_errors <= result.total // 50, result.summary()
    check_passed_socket(server)
    server.wait_ready()
    assert server.stop() == 0


def test_full_restart_on_a_held_socket(launch) -> None:
    """``systemctl restart`` with ringserve.socket: the socket outlives the supervisor.

    The test holds the listening socket (systemd's part) and hands it to a second
    supervisor after the first one drained and exited. Connections made meanwhile wait
    in the backlog: none is refused. The new supervisor starts its frontends only once
    its models are ready (on a systemd socket), so nothing answers "model not ready":
    clients wait instead. The only non-200s are the draining supervisor's fast 503s
    (with Retry-After) in the moment before it exits. A zero-error upgrade on one host
    is SIGHUP (previous test), or, with several hosts, draining this one behind nginx
    first (docs/deployment.md).
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(4096)
    port = holder.getsockname()[1]
    prefix = [sys.executable, "-c", SYSTEMD_EXEC, str(holder.fileno())]
    instance = f"t{port}"
    servers: list[Server] = []
    try:
        servers.append(launch(prefix, port, instance, pass_fds=(holder.fileno(),)))
        servers[0].wait_ready()
        check_passed_socket(servers[0])

        def restart() -> None:
            old = servers[0]
            old.proc.send_signal(signal.SIGTERM)
            assert old.proc.wait(60) == 0, old.log()
            new = launch(prefix, port, instance, pass_fds=(holder.fileno(),))
            servers.append(new)
            new.wait_ready()

        result = load_during(f"http://127.0.0.1:{port}", restart)
    finally:
        holder.close()
    print_counts("full restart, socket held", result)
    assert not result.exhausted, "the load ended before the restart did"
    assert result.connect_errors == 0, result.summary()
    assert set(result.statuses) <= {200, 503}, result.summary()
    assert result.no_retry_after == 0, result.summary()
    assert not any("not ready" in reason for reason in result.reasons), result.summary()
    assert result.wrong == 0, result.summary()
    assert result.statuses[200] > 0
    new = servers[1]
    check_passed_socket(new)
    with httpx.Client(base_url=new.url, timeout=10) as c:
        assert c.post("/predict", json=DIGIT3).status_code == 200
    assert new.stop() == 0
    assert shm_segments(instance) == []
