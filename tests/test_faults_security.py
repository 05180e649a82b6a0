"""Security boundaries: no TCP but the HTTP port, an admin socket other users cannot use,
weights that cannot run code, no unpickling or eval of request data, and a worker that
bounds-checks every shared-memory header a frontend wrote."""

from __future__ import annotations

import ast
import concurrent.futures
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from conftest import REPO, Server, wait_until
from test_e2e_core import HANDLER_ENV

from ringserve.gpu_worker.handlers import create_handler
from ringserve.ipc.arena import Arena
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.layout import DTYPE_CODE, SlotState

NOBODY = 65534


def tree(server: Server) -> list[psutil.Process]:
    sup = psutil.Process(server.proc.pid)
    return [sup, *sup.children(recursive=True)]


# -- network exposure ---------------------------------------------------------------------


@pytest.mark.e2e
def test_no_tcp_listener_but_the_http_port(start_server) -> None:
    server: Server = start_server("--workers", "2")
    procs = tree(server)
    assert {p.cmdline()[2] for p in procs[1:]} >= {"ringserve.frontend", "ringserve.gpu_worker"}
    listening: dict[tuple, set[int]] = {}
    for p in procs:
        for c in p.net_connections(kind="inet"):  # TCP and UDP, v4 and v6
            if c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM:
                listening.setdefault((c.laddr.ip, c.laddr.port, c.type), set()).add(p.pid)
    assert list(listening) == [("127.0.0.1", server.port, socket.SOCK_STREAM)], listening
    unix = {c.laddr for p in procs for c in p.net_connections(kind="unix") if c.laddr}
    assert server.admin_socket in unix  # the admin interface is there, as a Unix socket only
    assert server.stop() == 0


# -- the admin socket and other users -----------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp dirs are 0700), so only the
    socket's mode stands between another user and the admin socket."""
    path = Path(tempfile.mkdtemp(prefix="ringserve-sec-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect_as(uid: int | None, path: str) -> subprocess.CompletedProcess:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r})\n"
        "except OSError as e:\n"
        "    print(type(e).__name__); sys.exit(1)\n"
        's.sendall(b\'{"cmd": "status"}\\n\')\n'
        "print('connected', s.recv(20))\n"
    )
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.run(
        ["/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        **ids,  # type: ignore[arg-type]
    )


@pytest.mark.e2e
def test_admin_socket_refuses_another_user(start_server, open_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    sock = str(open_dir / "admin.sock")
    server: Server = start_server("--admin-socket", sock)
    server.admin_socket = sock
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    mine = connect_as(None, sock)
    assert mine.returncode == 0 and "connected" in mine.stdout, mine.stderr
    other = connect_as(NOBODY, sock)
    assert other.returncode == 1 and other.stdout.strip() == "PermissionError", (
        other.stdout,
        other.stderr,
    )
    assert server.ctl("status")["server"]["phase"] == "running"
    assert server.stop() == 0


# -- weights cannot run code --------------------------------------------------------------


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}, path)
    return path


def test_the_evil_checkpoint_is_live(tmp_path: Path) -> None:
    """Control: without weights_only the payload runs (so the refusals below mean it)."""
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(ckpt)!r}, weights_only=False)"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert marker.exists()


@pytest.mark.parametrize(
    ("handler", "options"),
    [("torchvision:resnet18", {"num_classes": 10, "image_size": 32}), ("digits", {})],
)
def test_weights_load_with_weights_only(tmp_path: Path, handler: str, options: dict) -> None:
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    h = create_handler(ModelSettings(name="m", handler=handler, weights=str(ckpt), options=options))
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|unsupported global"):
        h.load(torch.device("cpu"))
    assert not marker.exists(), "the checkpoint ran code"


@pytest.mark.e2e
def test_server_with_an_evil_checkpoint_refuses_to_load_it(start_server, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    server: Server = start_server(
        "--model",
        "d=digits",
        "--weights",
        str(ckpt),
        "--set",
        "worker.restart_backoff_s=0.2",
        ready=False,
    )
    wait_until(lambda: "failed to load" in server.log(), 60, "the worker's load failure")
    assert "weights_only" in server.log() or "Unsupported global" in server.log()
    assert not marker.exists(), "the checkpoint ran code in a worker"
    with server.client() as c:
        assert c.get("/readiness").status_code == 503
    assert server.stop() == 0


# -- nothing from a request is unpickled or evaluated ------------------------------------

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
UNSAFE_MODULES |= {"joblib", "copyreg", "importlib", "code", "codeop", "yaml"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint", "input"}
REQUEST_FACING = ["frontend", "ipc", "supervisor/admin.py", "supervisor/admin_protocol.py"]


def unsafe_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in UNSAFE_BUILTINS:
                found.append(f"{where} {fn.id}()")
            if (
                isinstance(fn, ast.Attribute)
                and fn.attr in ("load", "loads")
                and (isinstance(fn.value, ast.Name) and fn.value.id in ("np", "numpy", "torch"))
            ):
                found.append(f"{where} {fn.value.id}.{fn.attr}()")
            for kw in node.keywords:
                if kw.arg == "allow_pickle":
                    found.append(f"{where} allow_pickle=")
    return found


def test_nothing_from_a_request_is_unpickled_or_evaluated(tmp_path: Path) -> None:
    files = []
    for part in REQUEST_FACING:
        p = REPO / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert len(files) > 10
    found = [hit for f in files for hit in unsafe_uses(f)]
    assert found == [], found
    # The checker itself sees what it is meant to see.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle\nfrom marshal import loads\neval('1')\nnp.load(x, allow_pickle=True)\n"
    )
    assert len(unsafe_uses(probe)) == 5, unsafe_uses(probe)


# -- shared-memory headers are bounds-checked by the worker --------------------------------

CORRUPTIONS = {
    "in_nbytes larger than the slot": ("in_nbytes", lambda slot_bytes: slot_bytes * 4),
    "in_ndim 99": ("in_ndim", lambda _: 99),
    "in_dtype out of range": ("in_dtype", lambda _: 200),
    "payload kind 7": ("kind", lambda _: 7),
    "shape not matching the bytes": ("in_shape", lambda _: [10**12] + [0] * 7),
    # float32 1.0 read as a BYTES length prefix: 0x3f800000 bytes, past the slot's end
    "in_dtype BYTES over floats": ("in_dtype", lambda _: DTYPE_CODE["bytes"]),
}


@pytest.mark.e2e
def test_corrupt_queued_header_fails_that_request_alone(start_server) -> None:
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:Slow",
        "--max-batch-size",
        "1",
        env=HANDLER_ENV,
        frontends=1,
    )
    worker = server.pids("worker")[0]
    arena = Arena.attach(server.ctl("status")["server"]["arena"])

    def in_state(state: SlotState) -> list[int]:
        return [int(i) for i in np.flatnonzero(arena.slots["state"] == state)]

    def post(data: list[float]) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/models/slow/predict", json={"data": data}, timeout=30)

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for what, (field, value) in CORRUPTIONS.items():
                busy = pool.submit(post, [700.0, 1.0])  # holds the only worker 700 ms
                wait_until(lambda: in_state(SlotState.RUNNING), 10, "the busy request running")
                victim = pool.submit(post, [1.0, 2.0, 3.0])
                queued = wait_until(lambda: in_state(SlotState.QUEUED), 10, "a queued request")
                assert in_state(SlotState.RUNNING), "corrupt it while it is still queued"
                arena.slots[field][queued[0]] = value(arena.geometry.slot_bytes)
                r = victim.result(timeout=30)
                assert r.status_code == 400, f"{what}: {r.status_code} {r.text}"
                assert "corrupt request header" in r.json()["error"], (what, r.text)
                ok = busy.result(timeout=30)
                assert ok.status_code == 200 and ok.json()["result"] == [700.0, 1.0], what
                after = post([5.0, 6.0])
                assert after.status_code == 200 and after.json()["result"] == [5.0, 6.0], what
                assert server.pids("worker") == [worker], f"{what}: the worker died"
    finally:
        arena.close()
    assert not server.ctl("status")["server"]["totals"].get("restarts:worker:crash")
    assert server.stop() == 0
