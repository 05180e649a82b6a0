"""Our shipped nginx site (systemd/nginx-ringserve.conf) in front of real ringserve
processes, under load, while ringserve restarts, loses processes and drains.

nginx runs unprivileged-style from a temporary prefix (``nginx -p DIR -c DIR/nginx.conf``
with its pid file, logs and temp paths in DIR) and is stopped with SIGQUIT. The site file
is used as shipped; only what must change for a test is rewritten: the listen address,
the log paths and the upstream servers' addresses. CI installs nginx (Debian
``nginx-light``); a missing nginx is a failure, not a skip.

Every scenario sends open-loop load (``support.load``) through nginx for the whole
disruption and asserts that clients see no non-2xx answer and no transport error: a
draining frontend's fast 503 and a dead frontend's reset connection are retried by
nginx (``proxy_next_upstream ... http_503 non_idempotent``). Run with ``pytest -s`` to
see the counts per scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from conftest import REPO, Server, free_port, socket_links, wait_until
from support.grpc_load import calls_across
from support.load import LoadResult, load_during, post_counted
from tritonclient.utils import InferenceServerException

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState

pytestmark = pytest.mark.e2e

SITE = REPO / "systemd" / "nginx-ringserve.conf"
SHIPPED_SERVER = "server 127.0.0.1:8000 max_fails=0;"
SHIPPED_GRPC_SERVER = "server 127.0.0.1:8011 max_fails=0;"
SHIPPED_GRPC_LISTEN = "listen 8001 http2;"
# Idle upstream connections nginx caches per worker (the site's "keepalive N;").
UPSTREAM_KEEPALIVE = int(re.search(r"^\s*keepalive (\d+);", SITE.read_text(), re.M).group(1))

# nginx.conf around the site file (which lives in the http{} context).
MAIN_CONF = """\
{user}daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    access_log {d}/access.log;
{site}
}}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    assert path, "nginx is missing: CI must install it (apt-get install nginx-light)"
    return path


def multi_host_params(site: str) -> str:
    """The server parameters the site documents for ringserve on several hosts."""
    m = re.search(r"#\s*server 10\.0\.0\.\d+:\d+ ([^;]+);", site)
    assert m, "the site no longer documents the several-hosts form of the upstream"
    return m.group(1)


def site_for(
    ports: list[int], listen_port: int, log_dir: Path, grpc: tuple[int, int] = (0, 0)
) -> str:
    """The shipped site, rewritten to listen on ``listen_port`` and proxy to ``ports``,
    and for gRPC (``grpc``: nginx's port, ringserve's) to listen on the first and proxy
    to the second (ports nobody uses when not given).

    One ringserve instance: the shipped upstream (one address listed keepalive + 2 times,
    so nginx may retry past every dead cached connection), with our port. Several: the
    documented several-hosts form.
    """
    site = SITE.read_text()
    assert site.count(SHIPPED_SERVER) == UPSTREAM_KEEPALIVE + 2, "see the site's upstream comment"
    assert site.count("listen 80;") == 1
    if len(ports) == 1:
        site = site.replace(SHIPPED_SERVER, f"server 127.0.0.1:{ports[0]} max_fails=0;")
    else:
        params = multi_host_params(site)
        lines = "\n    ".join(f"server 127.0.0.1:{p} {params};" for p in ports)
        first = site.index(SHIPPED_SERVER)
        last = site.rindex(SHIPPED_SERVER) + len(SHIPPED_SERVER)
        site = site[:first] + lines + site[last:]
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    site = site.replace("/var/log/nginx/", f"{log_dir}/")
    grpc_listen, grpc_port = (p or free_port() for p in grpc)
    assert site.count(SHIPPED_GRPC_LISTEN) == 1
    site = site.replace(SHIPPED_GRPC_LISTEN, f"listen 127.0.0.1:{grpc_listen} http2;")
    site = site.replace(SHIPPED_GRPC_SERVER, f"server 127.0.0.1:{grpc_port} max_fails=0;")
    code = re.sub(r"#.*", "", site)
    assert "8000" not in code and "8001" not in code and "8011" not in code
    return site


@dataclass
class Nginx:
    proc: subprocess.Popen
    prefix: Path
    port: int
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pid(self) -> int:
        return int((self.prefix / "nginx.pid").read_text())

    def error_log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.prefix.glob("*error.log"))
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid(), signal.SIGQUIT)
            self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[list[int]], Nginx]]:
    started: list[Nginx] = []

    def start(ports: list[int], grpc_upstream: int = 0) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        prefix.mkdir()
        port, grpc_port = free_port(), free_port()
        # As root, nginx's workers would switch to "nobody", who cannot enter tmp_path.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        site = site_for(ports, port, prefix, (grpc_port, grpc_upstream))
        conf.write_text(MAIN_CONF.format(user=user, d=prefix, site=site))
        argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        ngx = Nginx(proc, prefix, port, grpc_port)
        started.append(ngx)

        def listening() -> bool:
            assert proc.poll() is None, ngx.error_log()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 20, "nginx to listen")
        return ngx

    yield start
    for ngx in started:
        if ngx.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                os.kill(ngx.pid(), signal.SIGQUIT)
            try:
                ngx.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(ngx.proc.pid, signal.SIGKILL)
                ngx.proc.wait(10)


ACCESS = re.compile(r'"POST [^"]*" (\d+) .* upstream=(.*) ustatus=(.*) urt=')


def retried(ngx: Nginx) -> Counter[str]:
    """Requests nginx sent to more than one upstream, by the statuses it got in turn."""
    out: Counter[str] = Counter()
    for line in (ngx.prefix / "ringserve.access.log").read_text().splitlines():
        m = ACCESS.search(line)
        if m and "," in m.group(3):
            out[f"{m.group(3)} -> {m.group(1)}"] += 1
    return out


def check_clean(scenario: str, result: LoadResult, ngx: Nginx) -> Counter[str]:
    """No non-2xx, no transport error, nothing wrong; returns nginx's retries."""
    retries = retried(ngx)
    print(
        f"\n[nginx] {scenario}: non-2xx={result.non_2xx} transport_errors="
        f"{result.transport_errors} of {result.total} requests; retried by nginx: "
        f"{sum(retries.values())} {dict(retries)}\n  {result.summary()}"
    )
    assert not result.exhausted, "the load ended before the disruption did"
    assert result.non_2xx == 0, result.summary() + "\n" + ngx.error_log()[-3000:]
    assert result.transport_errors == 0, result.summary() + "\n" + ngx.error_log()[-3000:]
    assert result.wrong == 0, result.summary()
    assert result.ok >= 300, result.summary()
    return retries


def test_nginx_proxies_with_request_ids(start_server, start_nginx) -> None:
    server: Server = start_server()
    ngx = start_nginx([server.port])
    with httpx.Client(base_url=ngx.url, timeout=10) as c:
        r = c.get("/readiness")
        assert r.status_code == 200, r.text
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # nginx's $request_id
        r = c.post("/predict", json={"data": [[0.0] * 8] * 8}, headers={"X-Request-ID": "mine"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "mine", r.text
        assert r.json()["request_id"] == "mine"
    assert ngx.stop() == 0
    assert "rid=mine" in (ngx.prefix / "ringserve.access.log").read_text()
    assert server.stop() == 0


def test_nginx_answers_json_when_ringserve_is_unreachable(start_nginx) -> None:
    """With every try refused (a stop or restart without ringserve.socket, or the server
    down), nginx answered its own HTML 502: no JSON, no Retry-After, unlike every answer
    of ringserve's (operator probe). The site answers a JSON 503 with Retry-After."""
    ngx = start_nginx([free_port()])  # nothing listens there
    r = httpx.post(f"{ngx.url}/predict", json={"data": [1.0]}, headers={"X-Request-ID": "x-1"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2", (r.status_code, r.text)
    assert "not reachable" in r.json()["error"] and r.headers["X-Request-ID"] == "x-1"
    assert ngx.stop() == 0


def test_nginx_refuses_a_body_over_its_limit_as_ringserve_would(start_nginx) -> None:
    """nginx refuses a body over client_max_body_size itself (8 MiB, ringserve's own
    limit): it answered its HTML 413 page, without X-Request-ID, where every answer of
    ringserve's is JSON and names the request."""
    ngx = start_nginx([free_port()])  # refused before any upstream is tried
    body = b"0" * (8 * 2**20 + 1)
    headers = {"X-Request-ID": "big-1", "Content-Type": "application/json"}
    r = httpx.post(f"{ngx.url}/predict", content=body, headers=headers, timeout=30)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "over the limit of 8 MiB" in r.json()["error"] and r.headers["X-Request-ID"] == "big-1"
    assert ngx.stop() == 0


def test_sighup_rolling_restart_behind_nginx(start_server, start_nginx) -> None:
    server: Server = start_server()
    ngx = start_nginx([server.port])
    check_clean(
        "(a) SIGHUP rolling restart",
        load_during(ngx.url, server.rolling_restart, rate=50, min_requests=400),
        ngx,
    )
    assert ngx.stop() == 0
    assert server.stop() == 0


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def stop_while_running_a_batch(server: Server, victim: int, timeout_s: float = 20.0) -> None:
    """SIGSTOP ``victim`` at a moment it holds RUNNING slots.

    A digits batch takes a millisecond or two, so this stops the worker, looks at the
    slots it claimed, and lets it run again until it is caught holding some.
    """
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            os.kill(victim, signal.SIGSTOP)
            wait_until(lambda: process_state(victim) == "T", 5, "the worker to stop")
            running = arena.slots["state"] == SlotState.RUNNING
            if (running & (arena.slots["worker_pid"] == victim)).any():
                return
            os.kill(victim, signal.SIGCONT)
            assert time.monotonic() < deadline, "never caught the worker inside a batch"
            time.sleep(0.002 + random.random() * 0.01)  # a random phase, not a sync wait
    finally:
        arena.close()


def test_sigkill_worker_behind_nginx(start_server, start_nginx) -> None:
    """A worker dies in the middle of a batch: its requests are re-queued, none fails."""
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    ngx = start_nginx([server.port])
    victim = server.pids("worker")[0]

    def kill_and_wait() -> None:
        stop_while_running_a_batch(server, victim)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                victim not in server.pids("worker")
                and server.ctl("status")["models"][0]["ready"] == 2
            ),
            60,
            "a ready replacement worker",
        )

    result = load_during(
        ngx.url, kill_and_wait, rate=200, warmup=100, min_requests=400, max_requests=4000
    )
    check_clean("(b) SIGKILL of one worker", result, ngx)
    totals = server.ctl("status")["server"]["totals"]
    print(f"  supervisor: re-queued {totals.get('requeued', 0)} requests of the dead worker")
    assert totals.get("requeued", 0) >= 1, totals
    assert not totals.get("poisoned")
    assert ngx.stop() == 0
    assert server.stop() == 0


def test_sigterm_one_of_two_instances_behind_nginx(start_server, start_nginx) -> None:
    first: Server = start_server(ready=False)
    second: Server = start_server(ready=False)
    first.wait_ready()
    second.wait_ready()
    ngx = start_nginx([first.port, second.port])

    def drain_first() -> None:
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(60) == 0, first.log()

    result = load_during(ngx.url, drain_first, rate=200, warmup=100, min_requests=400)
    retries = check_clean("(c) SIGTERM one of two instances", result, ngx)
    assert retries, "nginx never had to retry: the drain did not meet the load"
    assert ngx.stop() == 0
    assert second.stop() == 0


def connections_from_nginx(server: Server, ngx: Nginx) -> dict[int, int]:
    """Established connections from nginx, by frontend pid (matched against nginx's own
    sockets: no other connection counts)."""
    master = psutil.Process(ngx.pid())
    nginx_ends = {
        tuple(c.laddr)
        for proc in (master, *master.children())
        for c in proc.net_connections(kind="tcp")
    }
    return {
        pid: sum(
            c.status == psutil.CONN_ESTABLISHED and c.raddr in nginx_ends
            for c in psutil.Process(pid).net_connections(kind="tcp")
        )
        for pid in server.pids("frontend")
    }


def busiest_frontend(server: Server, ngx: Nginx, at_least: int = 1) -> int:
    """The frontend holding the most connections from nginx (the kernel need not spread
    them), once one holds ``at_least``: a stopped frontend accepts no new connection, so
    nginx reaches it only through those it already holds."""

    def busiest() -> int | None:
        counts = connections_from_nginx(server, ngx)
        pid = max(counts, key=counts.__getitem__)
        return pid if counts[pid] >= at_least else None

    return wait_until(busiest, 30, f"a frontend holding {at_least} connections from nginx")


def unread_bytes(pid: int) -> int:
    """Bytes waiting unread on ``pid``'s TCP connections (from /proc/net/tcp)."""
    inodes = {link[8:-1] for link in socket_links(pid)}
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # ESTABLISHED only: a listening socket's "receive queue" is its backlog
                if fields[3] == "01" and fields[9] in inodes:
                    total += int(fields[4].split(":")[1], 16)
    return total


def within(predicate: Callable[[], object], timeout_s: float) -> bool:
    """Whether ``predicate`` turns true within ``timeout_s`` (``wait_until`` that reports)."""
    try:
        wait_until(predicate, timeout_s, "")
    except AssertionError:
        return False
    return True


def wide_rounds(url: str, stop: threading.Event) -> LoadResult:
    """Rounds of more concurrent requests than nginx keeps idle upstream connections.

    nginx reuses its most recently used idle upstream connection first, so a light load
    can go on for longer than the supervisor's heartbeat timeout without touching the
    connections a stopped frontend holds (the likely story of one CI failure, where the
    supervisor killed the victim first). A round wider than the cache takes every cached
    connection, the stopped frontend's among them; each round waits for all its answers,
    so the last one ends only after nginx has retried what the victim held. Runs until
    ``stop``.
    """
    width = UPSTREAM_KEEPALIVE + 8
    result = LoadResult()

    async def rounds() -> None:
        limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            while not stop.is_set():
                await asyncio.gather(*(post_counted(client, result) for _ in range(width)))

    asyncio.run(rounds())
    return result


def test_sigkill_frontends_holding_cached_connections(start_server, start_nginx) -> None:
    """Under rounds wider than nginx's cache of idle upstream connections, SIGKILL the
    frontend holding the most of them: three times, and on until a kill has met a
    connection nginx had to retry (at most ten).

    nginx then hands requests the victim's cached connections, several dead ones in a
    row before it sees them close. Each uses up an upstream entry, and the site has one
    more entry than a request can meet dead connections (the upstream comment). With
    four entries, 1 request in 12 kills got a 502. A kill that falls between two rounds
    meets no request at all (nginx reads each close before it reuses the connection):
    in one local run three such kills in a row left nothing tested.
    """
    server: Server = start_server()
    ngx = start_nginx([server.port])
    stop = threading.Event()
    kills = 0
    with ThreadPoolExecutor(1) as pool:
        wide = pool.submit(wide_rounds, ngx.url, stop)
        try:
            while kills < 3 or (not retried(ngx) and kills < 10):
                # Several connections, so the kill can leave a chain of dead cached ones.
                victim = busiest_frontend(server, ngx, at_least=4)
                os.kill(victim, signal.SIGKILL)
                kills += 1
                server.wait_replaced(victim)
                server.wait_ready()
        finally:
            stop.set()
        result = wide.result(120)
    retries = retried(ngx)
    longest = max((k.count("502") for k in retries), default=0)
    print(
        f"\n[nginx] {kills} kills under wide rounds: {result.summary()}; "
        f"retried: {dict(retries)}; "
        f"longest run of dead connections: {longest}"
    )
    assert result.total >= 300 and result.ok == result.total, (
        result.summary() + "\n" + ngx.error_log()[-3000:]
    )
    assert retries, "nginx never had to retry: the kills met no connection"


def test_sigkill_frontend_behind_nginx(start_server, start_nginx) -> None:
    """A frontend dies with requests sent to it and unanswered: nginx retries them.

    To be sure the kill meets requests, the victim is stopped (SIGSTOP) first and
    killed once nginx has sent it a request it will now never read (``wide_rounds``
    makes nginx use the victim's idle connections). The heartbeat timeout is raised so the
    supervisor does not kill the stopped victim first.
    """
    server: Server = start_server("--set", "worker.heartbeat_timeout_s=120")
    ngx = start_nginx([server.port])

    def kill_and_wait() -> LoadResult:
        # Each of the victim's nginx connections may be in the middle of a request when
        # it stops: a busy connection gets nothing new and a stopped frontend accepts
        # none, so nothing reaches it. Then it goes on, finishes them, and is stopped
        # again. The wide rounds stop before it goes on: running, they would hand it many
        # more connections, and the kill would leave them all dead in nginx's cache.
        for _ in range(3):
            victim = busiest_frontend(server, ngx)
            stop = threading.Event()
            sent = False
            os.kill(victim, signal.SIGSTOP)
            with ThreadPoolExecutor(1) as pool:
                wide = pool.submit(wide_rounds, ngx.url, stop)
                try:
                    sent = within(lambda v=victim: unread_bytes(v) > 0, 10)
                finally:
                    stop.set()
                    os.kill(victim, signal.SIGKILL if sent else signal.SIGCONT)
                wide_result = wide.result(120)
            if sent:
                break
            assert wide_result.ok == wide_result.total, wide_result.summary()
        else:
            raise AssertionError("in 3 tries nginx sent no request to a stopped frontend")
        server.wait_replaced(victim)
        server.wait_ready()
        return wide_result

    result = load_during(
        ngx.url, kill_and_wait, rate=200, warmup=100, min_requests=400, max_requests=4000
    )
    retries = check_clean("(d) SIGKILL of one frontend", result, ngx)
    wide: LoadResult = result.action_result
    print(f"  wide rounds (while the victim was stopped): {wide.summary()}")
    assert wide.ok == wide.total and wide.wrong == 0, wide.summary()
    assert retries, "nginx never had to retry: the kill did not meet the load"
    assert ngx.stop() == 0
    assert server.stop() == 0


# -- gRPC through the site's second server block ----------------------------------------


def _grpc_client(ngx: Nginx) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{ngx.grpc_port}")


def test_grpc_through_nginx_unary_and_streamed(start_server, start_nginx) -> None:
    grpc_port = free_port()
    server: Server = start_server("--model", "id=identity", "--grpc-port", str(grpc_port))
    ngx = start_nginx([server.port], grpc_upstream=grpc_port)
    c = _grpc_client(ngx)
    try:
        assert c.is_server_ready()
        x = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], np.float32))
        assert c.infer("id", [x]).as_numpy("OUTPUT0").tolist() == [[1.0, 2.0, 3.0]]
        answers: list = []
        c.start_stream(callback=lambda result, error: answers.append((result, error)))
        for n in range(5):
            c.async_stream_infer("id", [x], request_id=f"s{n}")
        c.stop_stream()  # (waits for the answers)
    finally:
        c.close()
    assert sorted(r.get_response().id for r, e in answers if e is None) == [
        f"s{n}" for n in range(5)
    ]
    assert ngx.stop() == 0
    assert server.stop() == 0


def test_grpc_through_nginx_is_unavailable_when_ringserve_is_unreachable(start_nginx) -> None:
    """nginx's own 502 would reach a gRPC client as a protocol error; the site answers
    UNAVAILABLE, which clients retry."""
    ngx = start_nginx([free_port()], grpc_upstream=free_port())  # nothing listens there
    c = _grpc_client(ngx)
    try:
        with pytest.raises(InferenceServerException) as e:
            c.is_server_live()
    finally:
        c.close()
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert "not reachable" in e.value.message()
    assert ngx.stop() == 0


def test_grpc_sigkill_frontend_behind_nginx(start_server, start_nginx) -> None:
    """A frontend SIGKILLed under gRPC load through nginx. nginx cannot replay a gRPC
    call it has begun to send (it streams the body upstream), so each call in flight on
    the dead frontend ends UNAVAILABLE (the site's answer, not a protocol error); a
    client with the documented retry policy sends it again, and every call is answered
    right."""
    grpc_port = free_port()
    server: Server = start_server("--model", "id=identity", "--grpc-port", str(grpc_port))
    ngx = start_nginx([server.port], grpc_upstream=grpc_port)

    def kill_one() -> None:
        victim = server.pids("frontend")[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_replaced(victim)

    done, errors = calls_across(f"127.0.0.1:{ngx.grpc_port}", kill_one)
    print(f"\n[nginx gRPC] {done} calls, errors: {errors[:5]}")
    assert not errors, errors[:5]
    assert ngx.stop() == 0
    assert server.stop() == 0
