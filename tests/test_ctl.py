"""``ringserve ctl`` against a real AdminServer with a stand-in dispatch."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from ringserve.supervisor import ctl, paths
from ringserve.supervisor.admin import AdminCommandError, AdminServer

GiB, MiB = 2**30, 2**20

STATUS: dict[str, Any] = {
    "server": {"instance": "p8000", "pid": 4242, "phase": "running", "uptime_s": 3725},
    "processes": [
        {
            "role": "frontend",
            "id": "frontend-0",
            "pid": 101,
            "model": None,
            "state": "running",
            "uptime_s": 3720.4,
            "requests": 123456,
            "rss_bytes": 95 * MiB,
            "uss_bytes": 41 * MiB,
            "pss_bytes": 60 * MiB,
            "restarts": 0,
        },
        {
            "role": "worker",
            "id": "worker-0",
            "pid": 202,
            "model": "digits",
            "state": "running",
            "uptime_s": 59,
            "requests": 7,
            "batches": 3,
            "batch_target": 8,
            "device": "cuda:1",
            "rss_bytes": int(1.5 * GiB),
            "uss_bytes": 350 * MiB,
            "pss_bytes": 512 * MiB,
            "gpu_allocated_bytes": 3 * GiB,
            "gpu_reserved_bytes": 4 * GiB,
            "restarts": 2,
            "last_exit_reason": "killed by SIGKILL",
            "last_recycle_reason": "uss_limit",
        },
        {"id": "worker-1", "state": "starting"},  # most keys missing
    ],
    "models": [
        {"name": "digits", "workers": 2, "ready": True},
        {"name": "bad", "workers": 1, "ready": 0, "last_error": "RuntimeError: corrupt"},
    ],
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        self.calls.append((cmd, args))
        if cmd == "status":
            return STATUS
        if cmd == "config":
            return {"server": {"port": 8000}}
        if cmd == "drain" and args.get("id") == "worker-9":
            raise KeyError("no process worker-9")
        if cmd == "scale":
            return {"message": f"{args['model']}: {args['workers']} workers"}
        if cmd in ("drain", "restart", "recycle", "pause", "resume"):
            return None
        raise AdminCommandError(f"unknown command {cmd!r}")


@pytest.fixture
def sock_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private directory, used as XDG_RUNTIME_DIR with RINGSERVE_* cleared."""
    d = tempfile.mkdtemp(prefix="rs-ctl-", dir="/tmp")
    for name in list(os.environ):
        if name.startswith("RINGSERVE_") or name == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_RUNTIME_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dispatch() -> Recorder:
    return Recorder()


@pytest.fixture
def server(sock_dir: str, dispatch: Recorder) -> Iterator[AdminServer]:
    with AdminServer(os.path.join(sock_dir, "admin.sock"), dispatch) as s:
        yield s


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_status_table(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--socket", server.path, "status")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "instance=p8000  pid=4242  phase=running  uptime=1h02m"
    table = lines[2:6]
    header = table[0]
    assert header.split() == [h for h, _ in ctl.PROCESS_COLUMNS]
    worker = next(line for line in table if line.startswith("worker-0"))
    assert worker.split() == [
        "worker-0", "worker", "202", "digits", "cuda:1", "running", "59s", "7", "3", "8",
        "1.5G", "350M", "512M", "3.0G", "4.0G", "2", "killed", "by", "SIGKILL", "uss_limit",
    ]  # fmt: skip
    assert worker[header.index("LAST_RESTART") :].startswith("killed by SIGKILL")
    frontend = next(line for line in table if line.startswith("frontend-0"))
    assert frontend.split()[6:11] == ["1h02m", "123456", "-", "-", "95M"]
    assert next(line for line in table if line.startswith("worker-1")).split()[1:6] == [
        "-",
        "-",
        "-",
        "-",
        "starting",
    ]
    # fixed width: right-aligned numbers end under their header, text starts under it
    for col in ("RSS", "REQS", "GPU_RSVD"):
        end = header.index(col) + len(col)
        assert all(line[end - 1] != " " for line in table if "worker-0" in line)
    assert all(line.index(" ", 9) <= header.index("ROLE") for line in table[1:])
    assert worker[header.index("MODEL") :].startswith("digits")
    assert all(line == line.rstrip() for line in lines)
    assert "NAME" in lines[7] and "digits" in lines[8] and "yes" in lines[8]
    # A load error is a sentence under the table, not a column widening every row.
    assert "LAST_ERROR" not in lines[7] and lines[9].split()[0] == "bad"
    assert lines[10] == "bad: last load error: RuntimeError: corrupt"


def test_status_table_tells_a_recycled_worker_from_its_replacement() -> None:
    """A recycle shows one id twice, the old process serving and its replacement
    starting: two "worker-1" rows, one plainly "ready", read as a duplicate."""
    out = io.StringIO()
    ctl.write_status(
        {
            "processes": [
                {"id": "worker-1", "pid": 202, "state": "ready", "replaced_by": 303},
                {"id": "worker-1", "pid": 303, "state": "starting"},
            ]
        },
        out,
    )
    rows = [line for line in out.getvalue().splitlines() if line.startswith("worker-1")]
    assert "ready (replacement: 303)" in rows[0] and " starting " in rows[1]


def test_status_json(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--socket", server.path, "--json", "status")
    assert rc == 0
    assert json.loads(out) == STATUS


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--socket", "{path}", "--json"],  # options after the command, as typed
        ["--json", "status", "--socket", "{path}", "--timeout", "3"],
        ["--timeout", "3", "--socket", "{path}", "status", "--json"],
    ],
)
def test_options_go_before_or_after_the_command(
    server: AdminServer, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = run(capsys, *(a.format(path=server.path) for a in argv))
    assert (rc, err) == (0, "") and json.loads(out) == STATUS


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket", "{path}", "status", "--instance", "other"],
        ["--port", "8001", "status", "--socket", "{path}"],
        ["--instance", "a", "--port", "1", "status"],  # argparse's own check
    ],
)
def test_two_ways_of_naming_the_server_are_refused(
    server: AdminServer, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = run(capsys, *(a.format(path=server.path) for a in argv))
    assert rc == 2 and out == ""
    assert "--" in err and ("each name the server" in err or "not allowed with" in err)


@pytest.mark.parametrize(
    ("argv", "cmd", "args", "line"),
    [
        (["drain", "worker-0"], "drain", {"id": "worker-0"}, "drain worker-0: ok"),
        (["drain"], "drain", {"id": "server"}, "drain server: ok"),
        (["restart", "all"], "restart", {"id": "all"}, "restart all: ok"),
        (["restart", "frontend-1"], "restart", {"id": "frontend-1"}, "restart frontend-1: ok"),
        (["recycle", "worker-1"], "recycle", {"id": "worker-1"}, "recycle worker-1: ok"),
        (["scale", "digits", "3"], "scale", {"model": "digits", "workers": 3},
         "scale digits 3: digits: 3 workers"),
        (["pause"], "pause", {}, "pause: ok"),
        (["resume"], "resume", {}, "resume: ok"),
    ],
)  # fmt: skip
def test_action_commands(
    server: AdminServer,
    dispatch: Recorder,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    cmd: str,
    args: dict[str, Any],
    line: str,
) -> None:
    rc, out, err = run(capsys, "--socket", server.path, *argv)
    assert (rc, out, err) == (0, line + "\n", "")
    assert dispatch.calls == [(cmd, args)]


def test_config_prints_json(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--socket", server.path, "config")
    assert rc == 0 and json.loads(out) == {"server": {"port": 8000}}


def test_error_reply_exits_1(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--socket", server.path, "drain", "worker-9")
    assert (rc, out) == (1, "")
    assert err == "ringserve ctl: drain worker-9: no process worker-9\n"


def test_unreachable_socket_exits_2(sock_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sock_dir, "nobody.sock")
    rc, out, err = run(capsys, "--socket", path, "status")
    assert (rc, out) == (2, "")
    assert f"cannot reach ringserve admin socket at {path}: is `ringserve serve` running?" in err


def test_unreachable_default_socket_names_the_servers_that_run(
    sock_dir: str,
    dispatch: Recorder,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve --port 18431`` then a bare ``ctl status`` (instance p8000), or a server
    socket-activated on another port: the message says how to reach the ones that run."""
    # Only this test's directory: not the host's /run/ringserve or /tmp/ringserve-<uid>.
    monkeypatch.setattr(paths, "SYSTEMD_RUNTIME_DIR", sock_dir)
    monkeypatch.setattr(paths, "private_tmp_dir", lambda: sock_dir)
    with (
        AdminServer(paths.default_admin_socket("p9001"), dispatch),
        AdminServer(paths.default_admin_socket("blue"), dispatch),
    ):
        open(os.path.join(sock_dir, "ringserve-p7.sock"), "w").close()  # not a socket
        rc, out, err = run(capsys, "status")
        assert (rc, out) == (2, "")
        assert "cannot reach ringserve admin socket at" in err
        assert err.rstrip().endswith(
            "; other servers here: `ringserve ctl --instance blue ...`, "
            "`ringserve ctl --port 9001 ...`"
        ), err
        # A path given with --socket is the operator's own: no guessing.
        rc, _, err = run(capsys, "--socket", os.path.join(sock_dir, "x.sock"), "status")
        assert rc == 2 and "other servers" not in err, err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["scale", "digits", "-1"], ["scale", "digits"], ["--timeout", "0", "status"],
     ["--port", "1", "--instance", "x", "status"], ["scale", "digits", "0"],
     ["scale", "digits", "abc"], ["--timeout", "inf", "status"], ["--timeout", "1e300", "status"],
     ["--timeout", "nan", "status"]],
)  # fmt: skip
def test_usage_errors_exit_2(
    sock_dir: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert "usage: ringserve ctl" in err
    if argv[:1] == ["scale"] and len(argv) == 3:  # the server's range, said before asking
        assert "from 1 to 64" in err or "not a number of workers" in err
    if argv == ["scale", "digits", "0"]:  # Triton's unload, or TorchServe's min_worker=0
        assert "`ringserve ctl drain worker-N` retires a model's last one" in err, err


def test_status_into_a_closed_pipe_is_quiet(server: AdminServer) -> None:
    """``ringserve ctl status | head -1``: the reader leaves early; no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringserve.supervisor.ctl", "--socket", server.path, "status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has written anything
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "scale" in out and "Exit status" in out


@pytest.mark.parametrize(
    ("argv", "instance"),
    [([], "p8000"), (["--port", "9001"], "p9001"), (["--instance", "blue"], "blue")],
)
def test_default_socket_follows_instance(
    sock_dir: str,
    dispatch: Recorder,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    instance: str,
) -> None:
    path = paths.default_admin_socket(instance)
    assert path == os.path.join(sock_dir, f"ringserve-{instance}.sock")
    with AdminServer(path, dispatch):
        rc, out, _ = run(capsys, *argv, "pause")
    assert (rc, out) == (0, "pause: ok\n")


def test_socket_from_config_file_and_environment(
    sock_dir: str,
    dispatch: Recorder,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = os.path.join(sock_dir, "ringserve.toml")
    with open(config, "w") as f:
        f.write("[server]\nport = 9100\n")
    with AdminServer(paths.default_admin_socket("p9100"), dispatch):
        assert run(capsys, "--config", config, "pause")[0] == 0
    explicit = os.path.join(sock_dir, "explicit.sock")
    monkeypatch.setenv("RINGSERVE_SERVER_ADMIN_SOCKET", explicit)
    with AdminServer(explicit, dispatch):
        assert run(capsys, "pause")[0] == 0
    monkeypatch.setenv("RINGSERVE_SERVER_PORT", "not-a-port")
    rc, _, err = run(capsys, "pause")
    assert rc == 2 and "server.port" in err


def test_runs_as_a_module(server: AdminServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ringserve.supervisor.ctl", "--socket", server.path, "resume"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, "resume: ok\n"), proc.stderr


# -- paths ---------------------------------------------------------------------------


def test_default_admin_socket_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/ringserve:/run/other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.default_admin_socket("p8000") == "/run/ringserve/ringserve-p8000.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert paths.default_admin_socket("p8000") == "/run/user/1000/ringserve-p8000.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.default_admin_socket("blue") == f"/tmp/ringserve-{os.getuid()}/ringserve-blue.sock"
    assert paths.admin_socket_candidates("blue") == [
        f"/tmp/ringserve-{os.getuid()}/ringserve-blue.sock",
        "/run/ringserve/ringserve-blue.sock",
    ]
    with pytest.raises(ValueError, match="instance name"):
        paths.default_admin_socket("../etc")


def test_find_admin_socket_tries_the_systemd_location(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "SYSTEMD_RUNTIME_DIR", sock_dir + "/systemd")
    os.mkdir(sock_dir + "/systemd")
    assert paths.find_admin_socket("p8000") == os.path.join(sock_dir, "ringserve-p8000.sock")
    with open(sock_dir + "/systemd/ringserve-p8000.sock", "w"):
        pass
    assert paths.find_admin_socket("p8000") == sock_dir + "/systemd/ringserve-p8000.sock"


def test_format_helpers() -> None:
    assert [ctl.format_bytes(v) for v in (None, 0, 1023, 1536, 350 * MiB, 12 * GiB, "x")] == [
        "-", "0B", "1023B", "1.5K", "350M", "12G", "-"
    ]  # fmt: skip
    assert [ctl.format_duration(v) for v in (None, 0, 59.9, 61, 3725, 90000, -1)] == [
        "-", "0s", "59s", "1m01s", "1h02m", "1d01h", "-"
    ]  # fmt: skip


@pytest.mark.parametrize("instance", ["é", "a²", "..", "", "a" * 129])
def test_paths_take_only_the_instance_names_serve_takes(instance: str) -> None:
    """``isalnum()`` took any alphabet: a name ``serve`` refuses made a socket path."""
    with pytest.raises(ValueError, match="instance name"):
        paths.socket_name(instance)


def test_a_request_too_large_to_send_exits_2_and_reaches_no_server(
    server: AdminServer, dispatch: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 is "the command line is wrong" as well as "unreachable": a request over the
    admin socket's line limit is refused by the client before it is sent (a plain
    ``AdminError``, neither a remote error, exit 1, nor a connection error)."""
    huge = "worker-" + "9" * (64 * 1024)
    rc, out, err = run(capsys, "--socket", server.path, "drain", huge)
    assert (rc, out) == (2, "")
    assert "request too large" in err
    assert dispatch.calls == []
