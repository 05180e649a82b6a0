"""The admin socket: a real AdminServer on a real Unix socket, raw and AdminClient clients."""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_until

from ringserve.ipc.errors import ConfigError
from ringserve.supervisor.admin import AdminCommandError, AdminServer, AdminSocketInUse
from ringserve.supervisor.admin_protocol import (
    MAX_LINE,
    AdminClient,
    AdminConnectionError,
    AdminError,
    AdminRemoteError,
    ProtocolError,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)


def fake_dispatch(cmd: str, args: dict[str, Any]) -> Any:
    if cmd == "status":
        return {"server": {"instance": "test"}, "processes": []}
    if cmd == "echo":
        return args
    if cmd == "keyerror":
        raise KeyError("no process worker-9")
    if cmd == "valueerror":
        raise ValueError("workers must be 0 or more")
    if cmd == "refuse":
        raise AdminCommandError("worker-0 is already draining")
    if cmd == "boom":
        raise RuntimeError("boom")
    if cmd == "notjson":
        return {1, 2}
    if cmd == "big":
        return "x" * int(args["n"])
    raise KeyError(f"unknown command {cmd!r}")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="rs-adm-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "admin.sock")


ServerFactory = Callable[..., AdminServer]


@pytest.fixture
def make_server(sock_path: str) -> Iterator[ServerFactory]:
    servers: list[AdminServer] = []

    def make(**kwargs: Any) -> AdminServer:
        server = AdminServer(
            kwargs.pop("path", sock_path), kwargs.pop("dispatch", fake_dispatch), **kwargs
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: ServerFactory) -> AdminServer:
    return make_server()


class Raw:
    """A raw client: bytes in, reply lines out."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; buffered {self.buf!r}"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def ask(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.line()

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: AdminServer) -> Iterator[Callable[[], Raw]]:
    clients: list[Raw] = []

    def connect() -> Raw:
        clients.append(Raw(server.path))
        return clients[-1]

    yield connect
    for c in clients:
        c.close()


# -- framing -----------------------------------------------------------------------


def test_status_reply(raw: Callable[[], Raw]) -> None:
    c = raw()
    c.send(b'{"cmd": "status"}\n')
    assert c.sock.recv(4096) == (
        b'{"ok":true,"result":{"server":{"instance":"test"},"processes":[]}}\n'
    )


def test_args_reach_dispatch(raw: Callable[[], Raw]) -> None:
    c = raw()
    assert c.ask(b'{"cmd": "echo", "args": {"id": "worker-0"}}\n') == {
        "ok": True,
        "result": {"id": "worker-0"},
    }
    assert c.ask(b'{"cmd": "echo"}\n') == {"ok": True, "result": {}}
    assert c.ask(b'{"cmd": "echo", "args": null}\n') == {"ok": True, "result": {}}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "not valid JSON"),
        (b'{"cmd": "status"\n', "not valid JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'"status"\n', "must be a JSON object"),
        (b"{}\n", 'non-empty string "cmd"'),
        (b'{"cmd": 7}\n', 'non-empty string "cmd"'),
        (b'{"cmd": ""}\n', 'non-empty string "cmd"'),
        (b'{"cmd": "echo", "args": [1]}\n', '"args" must be a JSON object'),
        (b'{"cmd": "echo", "args": {"x": NaN}}\n', "NaN is not valid JSON"),
        (b'{"cmd": "\xff"}\n', "not valid UTF-8"),
    ],
)
def test_bad_request_gets_error_and_connection_stays(
    raw: Callable[[], Raw], line: bytes, message: str
) -> None:
    c = raw()
    reply = c.ask(line)
    assert reply["ok"] is False
    assert message in reply["error"]
    assert c.ask(b'{"cmd": "echo", "args": {"again": 1}}\n')["result"] == {"again": 1}


def test_empty_lines_are_ignored_and_pipelined_requests_answered_in_order(
    raw: Callable[[], Raw],
) -> None:
    c = raw()
    c.send(
        b'\n\r\n{"cmd": "echo", "args": {"n": 1}}\n{"cmd": "keyerror"}\r\n'
        b'{"cmd": "echo", "args": {"n": 3}}\n'
    )
    assert c.line() == {"ok": True, "result": {"n": 1}}
    assert c.line() == {"ok": False, "error": "no process worker-9"}
    assert c.line() == {"ok": True, "result": {"n": 3}}


def test_request_split_across_writes(raw: Callable[[], Raw]) -> None:
    c = raw()
    c.send(b'{"cmd": "ec')
    c.send(b'ho", "args": {"a": 1}}')
    assert c.ask(b"\n") == {"ok": True, "result": {"a": 1}}


def test_line_of_exactly_max_line_bytes_is_accepted(raw: Callable[[], Raw]) -> None:
    head, tail = b'{"cmd": "echo", "args": {"pad": "', b'"}}'
    line = head + b"x" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    reply = raw().ask(line + b"\n")
    assert reply["ok"] is True and len(reply["result"]["pad"]) > 60000


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_over_long_line_gets_error_then_close(raw: Callable[[], Raw], newline: bytes) -> None:
    c = raw()
    reply = c.ask(b"x" * (MAX_LINE + 1) + newline)
    assert reply == {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
    assert c.closed_by_server()


def test_last_request_without_newline_is_answered_on_half_close(raw: Callable[[], Raw]) -> None:
    c = raw()
    c.send(b'{"cmd": "echo", "args": {"last": true}}')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line() == {"ok": True, "result": {"last": True}}
    assert c.closed_by_server()


# -- dispatch errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "error"),
    [
        ("keyerror", "no process worker-9"),
        ("valueerror", "workers must be 0 or more"),
        ("refuse", "worker-0 is already draining"),
        ("nosuch", "unknown command 'nosuch'"),
    ],
)
def test_expected_dispatch_errors_become_error_replies(
    raw: Callable[[], Raw], cmd: str, error: str
) -> None:
    assert raw().ask(encode_request(cmd)) == {"ok": False, "error": error}


def test_unexpected_exception_is_internal_error_logged_and_server_keeps_serving(
    raw: Callable[[], Raw], caplog: pytest.LogCaptureFixture
) -> None:
    c = raw()
    with caplog.at_level("ERROR", logger="ringserve.supervisor"):
        assert c.ask(encode_request("boom")) == {
            "ok": False,
            "error": "internal error: RuntimeError: boom",
        }
        wait_until(lambda: "admin command 'boom' failed" in caplog.text, 5, "the failure logged")
    assert c.ask(encode_request("echo", {"ok": 1}))["result"] == {"ok": 1}
    assert raw().ask(encode_request("status"))["ok"] is True


def test_result_that_is_not_json_is_internal_error(raw: Callable[[], Raw]) -> None:
    reply = raw().ask(encode_request("notjson"))
    assert reply["ok"] is False
    assert reply["error"].startswith("internal error: the result of 'notjson' is not JSON")


# -- socket file ---------------------------------------------------------------------


def test_socket_mode_is_0600(server: AdminServer) -> None:
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_group_socket_is_0660_and_owned_by_the_group(make_server: ServerFactory) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    server = make_server(group=group)
    st = os.lstat(server.path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()


def test_unknown_group_is_a_config_error(sock_path: str) -> None:
    with pytest.raises(ConfigError, match="admin_socket_group: no such group"):
        AdminServer(sock_path, fake_dispatch, group="no-such-group-ringserve").start()
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced(sock_path: str, make_server: ServerFactory) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(sock_path)  # a server that died without unlinking
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    server = make_server()
    assert AdminClient(server.path).call("echo", x=1) == {"x": 1}


def test_path_that_is_not_a_socket_is_left_alone(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        AdminServer(sock_path, fake_dispatch).start()
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_live_server_is_not_replaced(server: AdminServer) -> None:
    with pytest.raises(AdminSocketInUse, match="already running"):
        AdminServer(server.path, fake_dispatch).start()
    assert AdminClient(server.path).call("echo", still=True) == {"still": True}


def test_missing_directory_is_created_private(sock_dir: str, make_server: ServerFactory) -> None:
    path = os.path.join(sock_dir, "run", "admin.sock")
    make_server(path=path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_too_long_path_is_a_config_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "x" * 120 + ".sock")
    with pytest.raises(ConfigError, match="Unix sockets allow 107"):
        AdminServer(path, fake_dispatch).start()


def test_close_removes_the_socket_and_is_idempotent(sock_path: str) -> None:
    server = AdminServer(sock_path, fake_dispatch)
    server.start()
    assert os.path.exists(sock_path)
    server.close()
    assert not os.path.exists(sock_path)
    server.close()
    with pytest.raises(AdminConnectionError, match="is `ringserve serve` running"):
        AdminClient(sock_path).call("status")


def test_close_leaves_a_socket_that_replaced_ours(sock_path: str) -> None:
    server = AdminServer(sock_path, fake_dispatch)
    server.start()
    os.unlink(sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(sock_path)
        server.close()
        assert os.path.exists(sock_path)


def test_context_manager(sock_path: str) -> None:
    with AdminServer(sock_path, fake_dispatch) as server:
        assert AdminClient(server.path).call("status")["server"] == {"instance": "test"}
    assert not os.path.exists(sock_path)


# -- many clients, bad clients ---------------------------------------------------------


def test_silent_client_does_not_block_others(raw: Callable[[], Raw]) -> None:
    silent = raw()
    half = raw()
    half.send(b'{"cmd": "ech')  # a partial line, then nothing
    start = time.monotonic()
    assert raw().ask(encode_request("status"))["ok"] is True
    assert time.monotonic() - start < 2
    assert silent.sock.fileno() >= 0


def test_client_that_never_reads_does_not_block_others(raw: Callable[[], Raw]) -> None:
    hog = raw()
    for _ in range(4):  # 4 replies of 4 MiB: far more than the socket buffers hold
        hog.send(encode_request("big", {"n": 4 * 2**20}))
    assert raw().ask(encode_request("echo", {"n": 1}))["result"] == {"n": 1}


def test_idle_client_is_dropped(make_server: ServerFactory) -> None:
    server = make_server(idle_timeout_s=0.2)
    c = Raw(server.path)
    try:
        start = time.monotonic()
        assert c.closed_by_server()
        assert time.monotonic() - start < 3
    finally:
        c.close()


def test_too_many_clients_are_refused_politely(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(max_clients=2)
    held = [Raw(server.path), Raw(server.path)]
    try:
        assert held[0].ask(encode_request("echo"))["ok"] is True  # both accepted by now
        assert held[1].ask(encode_request("echo"))["ok"] is True
        with caplog.at_level(logging.WARNING, logger="ringserve.supervisor"):
            for _ in range(3):  # a client looping on connect: one warning, not three
                extra = Raw(server.path)
                try:
                    assert extra.line() == {
                        "ok": False,
                        "error": "too many admin connections (2)",
                    }
                finally:
                    extra.close()
        refusals = [r for r in caplog.records if "refusing" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        held.pop().close()
        wait_until(lambda: _answers(server.path), 5, "an answer")
    finally:
        for c in held:
            c.close()


def _answers(path: str) -> bool:
    c = Raw(path)
    try:
        return c.ask(encode_request("echo"))["ok"] is True
    finally:
        c.close()


def test_concurrent_clients(server: AdminServer) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            client = AdminClient(server.path, timeout_s=10)
            for i in range(15):
                assert client.call("echo", n=n, i=i) == {"n": n, "i": i}
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


# -- client ----------------------------------------------------------------------------


def test_client_error_reply_raises_remote_error(server: AdminServer) -> None:
    with pytest.raises(AdminRemoteError, match=r"^no process worker-9$"):
        AdminClient(server.path).call("keyerror")


def test_client_arg_named_cmd(server: AdminServer) -> None:
    assert AdminClient(server.path).call("echo", cmd="x") == {"cmd": "x"}


def test_client_missing_socket(sock_path: str) -> None:
    with pytest.raises(AdminConnectionError) as e:
        AdminClient(sock_path).call("status")
    assert str(e.value).startswith(
        f"cannot reach ringserve admin socket at {sock_path}: is `ringserve serve` running?"
    )


def test_client_times_out_on_a_server_that_never_answers(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(sock_path)
        mute.listen()  # accepts into the backlog, never replies
        start = time.monotonic()
        with pytest.raises(AdminConnectionError, match=r"no reply to 'status'.*within 0.3 s"):
            AdminClient(sock_path, timeout_s=0.3).call("status")
        assert time.monotonic() - start < 3


def test_client_reports_a_connection_closed_without_reply(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rude:
        rude.bind(sock_path)
        rude.listen()

        def hang_up() -> None:
            conn, _ = rude.accept()
            conn.recv(1024)
            conn.close()

        t = threading.Thread(target=hang_up)
        t.start()
        with pytest.raises(AdminConnectionError, match="closed the connection without"):
            AdminClient(sock_path).call("status")
        t.join(5)


def test_client_refuses_an_oversized_request(server: AdminServer) -> None:
    with pytest.raises(AdminError, match="request too large"):
        AdminClient(server.path).call("echo", pad="x" * MAX_LINE)


# -- encode/decode -------------------------------------------------------------------


def test_codec_round_trip() -> None:
    line = encode_request("scale", {"model": "digits", "workers": 2})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == ("scale", {"model": "digits", "workers": 2})
    assert decode_reply(encode_result({"a": [1, "é\n"]}).rstrip(b"\n")) == {"a": [1, "é\n"]}
    with pytest.raises(AdminRemoteError, match=r"^nope$"):
        decode_reply(encode_error("nope"))
    with pytest.raises(AdminConnectionError, match="malformed reply"):
        decode_reply(b'{"result": 1}')
    with pytest.raises(ProtocolError):
        decode_request(b"{")
    # JSON the parser takes but Python will not hold: an error reply, not a dropped
    # connection and a logged traceback.
    for valid_json in (
        b"[" * 5_000 + b"]" * 5_000,
        b'{"cmd": "x", "args": {"n": ' + b"9" * 5000 + b"}}",
    ):
        with pytest.raises(ProtocolError, match="does not take"):
            decode_request(valid_json)
    with pytest.raises(ValueError):
        encode_result(float("nan"))


def test_a_client_refused_before_it_sent_reads_why(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server writes its refusal and closes at once; a client whose request goes
    out after that got EPIPE and reported "Broken pipe" instead of the reason."""
    server = make_server(max_clients=1)
    held = Raw(server.path)
    try:
        assert held.ask(encode_request("echo"))["ok"] is True
        real = socket.socket.sendall

        def late(self: socket.socket, data: bytes, *args: Any) -> None:
            time.sleep(0.3)  # the refusal and the close come first
            real(self, data, *args)

        monkeypatch.setattr(socket.socket, "sendall", late)
        with pytest.raises(AdminRemoteError, match=r"too many admin connections \(1\)"):
            AdminClient(server.path).call("echo")
    finally:
        held.close()


def test_an_admin_request_while_the_wake_pipe_is_full_is_given_up_not_run_later(
    monkeypatch,
) -> None:
    """A loop stuck long enough for its wake-up pipe to fill (signals and earlier
    requests): the write that wakes it raised BlockingIOError after the request was
    queued, so the client heard of an internal error while its command could still run
    once the loop came back. A full pipe already wakes the loop: the request waits for
    its answer like any other, and is given up (never run) when the loop does not take
    it in time."""
    import queue

    from ringserve.supervisor import arbiter as arbiter_module
    from ringserve.supervisor.admin import AdminCommandError

    monkeypatch.setattr(arbiter_module, "ADMIN_ANSWER_S", 0.05)
    arb = arbiter_module.Arbiter.__new__(arbiter_module.Arbiter)
    arb._closing = False
    arb.admin_queue = queue.Queue()
    read_end, arb._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(arb._wake_w, b"\0" * 4096)
        with pytest.raises(AdminCommandError, match="did not take the command"):
            arb._admin_dispatch("drain", {"id": "worker-0"})
        given_up = arb.admin_queue.get_nowait()
        assert not given_up.claim()  # the loop, back, does not run it
    finally:
        os.close(read_end)
        os.close(arb._wake_w)


def test_an_action_is_logged_with_its_arguments_or_none(
    raw: Callable[[], Raw], caplog: pytest.LogCaptureFixture
) -> None:
    """Operator actions are on the record at INFO: "admin echo from ..." for one without
    arguments (it read "admin echo  from", two spaces), else with them."""
    with caplog.at_level("INFO", logger="ringserve.supervisor"):
        raw().ask(encode_request("echo"))
        raw().ask(encode_request("echo", {"ok": 1}))
        wait_until(lambda: caplog.text.count("admin echo") == 2, 5, "both commands logged")
    assert re.search(r"admin echo from \S", caplog.text), caplog.text
    assert "admin echo {'ok': 1} from " in caplog.text, caplog.text
    assert "admin echo  from" not in caplog.text


_HOLD_CONNECTIONS = """
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
"""


def test_accepting_at_the_descriptor_limit_pauses_instead_of_spinning(
    server: AdminServer, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor out of file descriptors: accept() fails with EMFILE and the
    listener stays readable, so a loop that retried at once would spin a core. The admin
    thread says why and pauses its accepts, then serves again once descriptors are free.
    (The clients live in another process: their sockets must not count against ours.)"""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CONNECTIONS, sock_path, "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server._thread is not None and server._thread.ident is not None
    thread_cpu = time.pthread_getcpuclockid(server._thread.ident)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with caplog.at_level(logging.WARNING, "ringserve.supervisor"):
            # Room for three of the eight: the fourth accept() fails.
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "connected\n"
            wait_until(
                lambda: any("accept failed" in r.getMessage() for r in caplog.records),
                10,
                "the accept failure said",
            )
            cpu = time.clock_gettime(thread_cpu)
            time.sleep(1.5)  # a measurement window, over one pause and its retry
            used = time.clock_gettime(thread_cpu) - cpu
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        holder.communicate("bye\n", timeout=10)
    assert used < 0.3, f"the admin thread used {used:.2f} s of CPU in 1.5 s at its limit"
    [said] = {r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()}
    assert "Too many open files" in said and "pausing accepts for 1 s" in said
    # Past the pause, served again (the client waits in the backlog until then).
    assert AdminClient(sock_path, timeout_s=10).call("echo", n=1) == {"n": 1}
