"""supervisor/systemd.py against real sockets: a datagram listener stands in for systemd's
notify socket, and ``systemd-socket-activate`` (Debian package ``systemd``) passes real
listening sockets to a child for ``listen_fds``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from ringserve.supervisor import systemd

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory whose paths fit in sun_path (pytest's tmp_path may not)."""
    d = tempfile.mkdtemp(prefix="rs-sd-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in NOTIFY_VARS + LISTEN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def listener(short_dir: str, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = os.path.join(short_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    clean_env.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_ready_status_stopping_watchdog_send_exact_datagrams(listener: socket.socket) -> None:
    assert systemd.ready() is True
    assert recv(listener) == b"READY=1"
    assert systemd.status("2 frontends, 3 workers ready") is True
    assert recv(listener) == b"STATUS=2 frontends, 3 workers ready"
    assert systemd.watchdog() is True
    assert recv(listener) == b"WATCHDOG=1"
    assert systemd.stopping() is True
    assert recv(listener) == b"STOPPING=1"


def test_notify_joins_lines_into_one_datagram(listener: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=up", "MAINPID=42") is True
    assert recv(listener) == b"READY=1\nSTATUS=up\nMAINPID=42"


def test_status_keeps_to_one_line(listener: socket.socket) -> None:
    systemd.status("draining\n3 requests left")
    assert recv(listener) == b"STATUS=draining 3 requests left"


def test_reloading_sends_monotonic_usec(listener: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(listener).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"ringserve-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert recv(sock) == b"READY=1"


def test_without_notify_socket_does_nothing(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog() is False
    assert systemd.reloading() is False
    clean_env.setenv("NOTIFY_SOCKET", "")
    assert systemd.stopping() is False


def test_unreachable_socket_returns_false_and_logs(
    short_dir: str, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", os.path.join(short_dir, "nobody-listens"))
    with caplog.at_level("WARNING", logger="ringserve.supervisor"):
        assert systemd.ready() is False
    assert "sd_notify" in caplog.text


def test_non_path_notify_socket_is_refused(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level("WARNING", logger="ringserve.supervisor"):
        assert systemd.ready() is False
    assert "vsock" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("30000000", "x", None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval_s() == expected


def test_listen_fds_ignores_another_pid_and_unsets(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_FDNAMES", "http:admin")
    assert systemd.listen_fds() == {}
    assert not any(name in os.environ for name in LISTEN_VARS)


def test_listen_fds_without_variables(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.listen_fds() == {}


def test_listen_fds_keeps_env_when_asked(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(unset_env=False) == {}
    assert os.environ["LISTEN_FDS"] == "1"


@pytest.mark.parametrize(
    ("fds", "names", "match"),
    [("two", None, "malformed"), ("2", "http", "1 names for LISTEN_FDS=2")],
)
def test_listen_fds_rejects_malformed_variables(
    clean_env: pytest.MonkeyPatch, fds: str, names: str | None, match: str
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", fds)
    if names is not None:
        clean_env.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(ValueError, match=match):
        systemd.listen_fds()


# The child reports what listen_fds() gave it: for each fd, whether it is a listening
# socket, its address, and its close-on-exec state; and whether the variables are gone.
CHILD = r"""
import json, os, socket, sys
from ringserve.supervisor.systemd import listen_fds
{prelude}
fds = listen_fds()
out = {{"env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")), "fds": {{}}}}
for name, numbers in fds.items():
    for fd in numbers:
        s = socket.socket(fileno=fd)
        out["fds"].setdefault(name, []).append({{
            "fd": fd,
            "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1,
            "addr": s.getsockname(),
            "inheritable": os.get_inheritable(fd),
        }})
        s.detach()
print(json.dumps(out))
"""


def test_listen_fds_under_systemd_socket_activate(short_dir: str) -> None:
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: apt-get install systemd"
    http, admin = os.path.join(short_dir, "http.sock"), os.path.join(short_dir, "admin.sock")
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
    proc = subprocess.Popen(
        [
            tool,
            "-l",
            http,
            "-l",
            admin,
            "--fdname=http:admin",
            sys.executable,
            "-c",
            CHILD.format(prelude=""),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # systemd-socket-activate starts the program on the first connection.
        deadline, delay = time.monotonic() + 10, 0.01
        while not os.path.exists(admin):
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(http)
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["env_left"] == []
    assert report["fds"] == {
        "http": [{"fd": 3, "listening": True, "addr": http, "inheritable": False}],
        "admin": [{"fd": 4, "listening": True, "addr": admin, "inheritable": False}],
    }


def test_listen_fds_without_names_defaults_to_unknown() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        # The child moves the passed socket to fd 3 and names itself in LISTEN_PID, as
        # systemd would between fork and exec.
        fd = sock.fileno()
        prelude = (
            f"fd = {fd}\nif fd != 3: os.dup2(fd, 3); os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
            "os.environ.pop('LISTEN_FDNAMES', None)"
        )
        env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD.format(prelude=prelude)],
            pass_fds=(sock.fileno(),),
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["env_left"] == []
    assert report["fds"] == {
        "unknown": [{"fd": 3, "listening": True, "addr": ["127.0.0.1", port], "inheritable": False}]
    }
