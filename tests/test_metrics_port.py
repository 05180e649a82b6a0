"""``server.metrics_port``: ``GET /metrics`` for the whole server on a port of its own
as well as on the main port, and nothing else there (an operator can open that port to
Prometheus without opening inference) — real servers on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import SERVE, Server, free_port, kill_group, launch, shm_segments
from test_e2e_core import DIGIT3

pytestmark = pytest.mark.e2e


def ringserve_series(text: str) -> set[str]:
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in text.splitlines()
        if line.startswith("ringserve_")
    }


def scrape(port: int) -> httpx.Response:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return r


def check_metrics_port_serves_only_metrics(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for method, path, kw in [
            ("POST", "/predict", {"json": DIGIT3}),
            ("POST", "/v1/models/digits/predict", {"json": DIGIT3}),
            ("POST", "/v2/models/digits/infer", {"json": {"inputs": []}}),
            ("GET", "/v2", {}),
            ("GET", "/v2/models/digits", {}),
            ("GET", "/v1/models", {}),
            ("GET", "/health", {}),
            ("GET", "/readiness", {}),
            ("GET", "/metrics/", {}),
        ]:
            r = c.request(method, path, **kw)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert "metrics port" in r.json()["error"], r.text
            assert r.headers["x-request-id"]
        r = c.post("/metrics", content=b"x")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.text


def test_metrics_on_both_ports_and_only_metrics_on_the_metrics_port(start_server) -> None:
    mport = free_port()
    server: Server = start_server("--set", f"server.metrics_port={mport}")
    with server.client() as c:
        for _ in range(3):
            r = c.post("/predict", json=DIGIT3)
            assert r.status_code == 200 and r.json()["result"]["label"] == "3", r.text
    main, side = scrape(server.port), scrape(mport)
    assert "ringserve_requests_total" in ringserve_series(main.text)
    assert ringserve_series(side.text) == ringserve_series(main.text)
    # The same whole-server view: requests answered on the main port count here too.
    assert 'ringserve_requests_total{code="200",model="digits"} 3.0' in side.text, side.text
    assert main.headers["content-type"] == side.headers["content-type"]
    check_metrics_port_serves_only_metrics(mport)
    with server.client() as c:  # inference still works on the main port
        r = c.post("/v1/models/digits/predict", json=DIGIT3)
        assert r.status_code == 200 and r.json()["result"]["label"] == "3", r.text
    metrics_listen = server.ctl("status")["server"]["metrics_listen"]
    assert metrics_listen["address"] == f"127.0.0.1:{mport}"
    assert metrics_listen["source"] == "bound"
    assert f"metrics only (GET /metrics) on http://127.0.0.1:{mport}" in server.log()
    assert server.stop() == 0
    assert shm_segments(server.instance) == []
    with pytest.raises(httpx.ConnectError):  # the supervisor closed it on exit
        httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5)


@pytest.mark.parametrize("key", ["server.metrics_port", "server.grpc_port"])
def test_a_taken_extra_port_fails_the_start(tmp_path: Path, key: str) -> None:
    """The supervisor binds (metrics) or holds (gRPC, cli.grpc_port_reservation) every
    port it serves besides the main one before anything starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mport = taken.getsockname()[1]
        server = launch(tmp_path, "--set", f"{key}={mport}")
        try:
            rc = server.proc.wait(60)
        finally:
            kill_group(server)
    # As a taken main port: exit 1 (ServeExit.ERROR), the key named, nothing left behind.
    assert rc == 1, server.log()
    assert f"{key}: cannot listen on 127.0.0.1:{mport}" in server.log()
    assert shm_segments(server.instance) == []
    assert not os.path.exists(server.admin_socket)


@pytest.mark.parametrize("value", ["-1", "70000", "MAIN"])
def test_bad_metrics_port_is_invalid_configuration(value: str) -> None:
    port = free_port()
    value = str(port) if value == "MAIN" else value
    r = subprocess.run(
        [*SERVE, "--port", str(port), "--set", f"server.metrics_port={value}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "invalid configuration: server.metrics_port" in r.stderr


def test_metrics_port_under_socket_activation_is_bound_by_the_supervisor(
    tmp_path: Path,
) -> None:
    """systemd passes the main socket only: the supervisor binds the metrics port itself."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing: CI must install it (apt-get install systemd)"
    port, mport = free_port(), free_port()
    instance = f"t{port}"
    admin = str(tmp_path / "admin.sock")
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cmd = [tool, "-l", f"127.0.0.1:{port}", "--fdname=http", *SERVE, "--instance", instance]
    cmd += ["--admin-socket", admin, "--set", f"server.metrics_port={mport}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(proc, port, instance, admin, log_path, env)
    try:
        server.wait_ready()  # the first connection makes systemd-socket-activate exec us
        status = server.ctl("status")["server"]
        assert status["listen"][0]["source"] == "systemd:http"
        assert status["metrics_listen"]["address"] == f"127.0.0.1:{mport}"
        assert "ringserve_workers_ready" in ringserve_series(scrape(mport).text)
        check_metrics_port_serves_only_metrics(mport)
        assert server.stop() == 0
    finally:
        kill_group(server)
    assert shm_segments(instance) == []
