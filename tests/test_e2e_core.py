"""End to end: ``ringserve serve`` as a subprocess on a free port, real signals, httpx."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import EXAMPLES, REPO, Server, alive, shm_segments, wait_until

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState
from ringserve.ipc.ring import RequestRing

pytestmark = pytest.mark.e2e

TESTS = str(REPO / "tests")
HANDLER_ENV = {"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
DIGIT3 = json.loads((EXAMPLES / "digit_3.json").read_text())
IMAGE_PNG = {"Content-Type": "image/png"}
PNGS = {label: (EXAMPLES / f"digit_{label}.png").read_bytes() for label in ("0", "3", "7")}


async def _fire(
    url: str,
    requests: list[tuple[str, dict]],
    concurrency: int = 64,
    timeout: float = 60.0,
    answered: asyncio.Event | None = None,
) -> list[httpx.Response | Exception]:
    """Send every request once (bounded concurrency); return responses or exceptions.
    ``answered`` is set at the first response."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(path: str, kw: dict) -> httpx.Response | Exception:
            async with sem:
                try:
                    response = await client.post(path, **kw)
                except httpx.HTTPError as e:
                    return e
                if answered is not None:
                    answered.set()
                return response

        return await asyncio.gather(*(one(p, kw) for p, kw in requests))


def slots_free(server: Server, slots: int) -> bool:
    """Every request slot is free again (the gauge every frontend renders)."""
    text = httpx.get(f"{server.url}/metrics").text
    return f'ringserve_ring_slots{{state="free"}} {slots}.0' in text


def overload(server: Server, n: int, ms: float) -> list:
    """``n`` concurrent requests to the ``slow`` model, each holding a slot ``ms``: every
    answer is a 200 or a fast 503 that says when to retry."""
    responses = fire(
        server.url, [("/v1/models/slow/predict", {"json": {"data": [ms]}})] * n, concurrency=n
    )
    for r in responses:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.headers.get("retry-after"), r.headers
    return responses


def fire(url: str, requests: list[tuple[str, dict]], **kw: object) -> list:
    return asyncio.run(_fire(url, requests, **kw))  # type: ignore[arg-type]


def digit_requests(n: int) -> list[tuple[tuple[str, dict], str]]:
    out = []
    for i in range(n):
        if i % 2:
            out.append((("/predict", {"json": DIGIT3}), "3"))
        else:
            label = "037"[i % 3]
            out.append(
                (
                    (
                        "/v1/models/digits/predict",
                        {"content": PNGS[label], "headers": {"Content-Type": "image/png"}},
                    ),
                    label,
                )
            )
    return out


def test_default_model_200_concurrent_right_labels(start_server) -> None:
    server: Server = start_server()
    cases = digit_requests(200)
    responses = fire(server.url, [c for c, _ in cases])
    for resp, (_, label) in zip(responses, cases, strict=True):
        assert isinstance(resp, httpx.Response), resp
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["result"]["label"] == label
        assert resp.headers["x-request-id"] == body["request_id"]
        assert body["batch_size"] >= 1 and body["latency_ms"] > 0
    with server.client() as c:
        # A compressed body, as v2 takes it too (tritonclient's request compression).
        body = gzip.compress(json.dumps(DIGIT3).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        r = c.post("/predict", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["result"]["label"] == "3", r.text
        r = c.post("/predict", json={**DIGIT3, "request_id": "abc"})
        assert r.json()["request_id"] == "abc" and r.headers["x-request-id"] == "abc"
        r = c.get("/health", headers={"X-Request-ID": "mine"})
        assert r.headers["x-request-id"] == "mine"
        # A UTF-8 header id comes back as its own bytes percent-encoded (was 'Ã¼' encoded)
        r = c.post("/predict", json=DIGIT3, headers={"X-Request-ID": "ünï".encode()})
        assert r.json()["request_id"] == "ünï"
        assert r.headers["x-request-id"] == "%C3%BCn%C3%AF"
        # An id from the body that a header cannot carry as it is: percent-encoded there.
        r = c.post("/predict", json={**DIGIT3, "request_id": "日本-1"})
        assert r.status_code == 200 and r.json()["request_id"] == "日本-1"
        assert r.headers["x-request-id"] == "%E6%97%A5%E6%9C%AC-1"
        # ...and one that would split the response head or forge a log line: answered
        # as sent, but not named in the head nor in the logs (as v2 does with its id).
        forged = "a\r\n2026-12-06 20:00:00,000 frontend-0 INFO forged\r\nX-Evil: 1"
        r = c.post("/predict", json={**DIGIT3, "request_id": forged})
        assert r.status_code == 200 and r.json()["request_id"] == forged
        assert re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"])
        assert "x-evil" not in r.headers
        r = c.post("/predict", json={**DIGIT3, "request_id": ""})
        assert r.json()["request_id"] == "" and r.headers["x-request-id"]
        models = c.get("/v1/models").json()["models"]
        assert models[0]["name"] == "digits" and models[0]["state"] == "ready"
    assert server.stop() == 0


def test_a_batchs_images_preprocessed_side_by_side_each_get_their_own_answer(
    start_server,
) -> None:
    """With two threads a worker preprocesses a batch's images on its preprocess threads
    (gpu_worker/preprocess_pool.py), if the class that defines ``preprocess`` says it
    may: each answer is still its own image's, an image that cannot be decoded fails
    alone, and a subclass overriding a thread-safe ``preprocess`` runs on the worker's
    own thread until it says so too."""
    server: Server = start_server(
        "--model",
        "pooled=python:support.fake_handlers:PreprocessThread",
        "--model",
        "own=python:support.fake_handlers:OverridesPreprocess",
        "--model",
        "digits=digits",
        "--threads",
        "2",
        "--max-queue-delay-ms",
        "20",
        env=HANDLER_ENV,
    )
    log = server.log()
    assert "model pooled: a batch's images are preprocessed on 2 threads" in log
    assert "model own: a batch's images" not in log
    for model, expect_pooled in (("pooled", True), ("own", False)):
        bodies = [PNGS["3"] + bytes(i) for i in range(48)]  # a length per request
        path = f"/v1/models/{model}/predict"
        requests = [(path, {"content": b, "headers": IMAGE_PNG}) for b in bodies]
        responses = fire(server.url, requests, concurrency=16)
        pooled = 0
        for resp, body in zip(responses, bodies, strict=True):
            assert resp.status_code == 200, resp.text
            on_pool, length = resp.json()["result"]
            assert length == len(body)
            pooled += int(on_pool)
        assert (pooled > 0) == expect_pooled, (model, pooled)
    # Real decoding on the pool: every answer its own image's; a broken one fails alone.
    path = "/v1/models/digits/predict"
    labels = "037" * 16
    requests = [(path, {"content": PNGS[label], "headers": IMAGE_PNG}) for label in labels]
    requests.insert(20, (path, {"content": PNGS["3"][:60], "headers": IMAGE_PNG}))  # cut short
    responses = fire(server.url, requests, concurrency=16)
    bad = responses.pop(20)
    assert bad.status_code == 400 and "could not decode image" in bad.json()["error"], bad.text
    for resp, label in zip(responses, labels, strict=True):
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"]["label"] == label
    assert server.stop() == 0


def test_bad_input_gets_4xx_and_server_stays_healthy(start_server) -> None:
    server: Server = start_server("--set", "server.max_body_bytes=65536")
    cases = [
        (
            "malformed json",
            "/predict",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("not an object", "/predict", {"json": [1, 2]}, 422),
        (
            "content coding it cannot undo",  # was ignored: the body read as it was
            "/predict",
            {
                "content": json.dumps(DIGIT3).encode(),
                "headers": {"Content-Type": "application/json", "Content-Encoding": "br"},
            },
            415,
        ),
        (
            "gzip bomb",
            "/predict",
            {
                "content": gzip.compress(b" " * 10**6),
                "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            },
            413,
        ),
        ("no data", "/predict", {"json": {"x": 1}}, 422),
        ("wrong dtype", "/predict", {"json": {"data": [["a"] * 8] * 8}}, 422),
        ("wrong shape", "/predict", {"json": {"data": [1.0, 2.0, 3.0]}}, 422),
        ("ragged", "/predict", {"json": {"data": [[1.0], [1.0, 2.0]]}}, 422),
        ("booleans", "/predict", {"json": {"data": [[True] * 8] * 8}}, 422),
        (
            "nan",
            "/predict",
            {
                "content": b'{"data": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}',
                "headers": {"Content-Type": "application/json"},
            },
            422,
        ),
        (
            "oversized",
            "/predict",
            {
                "content": b"[" + b"1," * 40000 + b"1]",
                "headers": {"Content-Type": "application/json"},
            },
            413,
        ),
        (
            "not an image",
            "/v1/models/digits/predict",
            {"content": b"hello world", "headers": {"Content-Type": "image/png"}},
            400,
        ),
        (
            "corrupt png",
            "/v1/models/digits/predict",
            {"content": PNGS["3"][:40] + b"\0" * 40, "headers": {"Content-Type": "image/png"}},
            400,
        ),
        (
            "image bomb",
            "/v1/models/digits/predict",
            {
                "content": PNGS["3"][:16] + (100000).to_bytes(4, "big") * 2 + PNGS["3"][24:],
                "headers": {"Content-Type": "image/png"},
            },
            413,
        ),
        (
            "wrong content type",
            "/predict",
            {"content": b"x", "headers": {"Content-Type": "text/html"}},
            415,
        ),
        ("unknown model", "/v1/models/nope/predict", {"json": DIGIT3}, 404),
        ("path-like model", "/v1/models/..%2F..%2Fetc/predict", {"json": DIGIT3}, 404),
        ("trailing slash", "/v1/models/digits/predict/", {"json": DIGIT3}, 404),  # was a 307
        (
            "bad timeout header",
            "/predict",
            {"json": DIGIT3, "headers": {"X-Request-Timeout-Ms": "soon"}},
            400,
        ),
    ]
    with server.client() as c:
        for what, path, kw, status in cases:
            r = c.post(path, **kw)
            assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
            assert "error" in r.json(), what
            assert r.headers.get("x-request-id"), what
            ok = c.post("/predict", json=DIGIT3)
            assert ok.status_code == 200 and ok.json()["result"]["label"] == "3", what
        assert c.get("/readiness").status_code == 200
        # Made-up model names get no metric series (a client could make millions).
        metrics = c.get("/metrics").text
        assert 'model="nope"' not in metrics and "etc" not in metrics
        assert 'ringserve_requests_total{code="422",model="digits"}' in metrics
        # Media types are case-insensitive.
        r = c.post(
            "/predict",
            content=json.dumps(DIGIT3).encode(),
            headers={"Content-Type": "Application/JSON; charset=UTF-8"},
        )
        assert r.status_code == 200, r.text
    assert server.stop() == 0


def test_handler_faults_are_named_and_the_server_keeps_serving(start_server) -> None:
    """The batch profile feeds zeros of the declared shape; a handler that refuses them
    crash-looped and never became ready. Now the profile is skipped, with a warning.
    An output that contradicts the handler's declaration (which v2 metadata advertises)
    answered 200, or a tuple from ``infer`` a riddle about ``.device``: now each is a
    500 that names the mismatch, logged once, and the next request is served."""
    server: Server = start_server(
        "--model", "z=python:support.fake_handlers:Misbehaves", env=HANDLER_ENV, frontends=1
    )
    with server.client() as c:
        r = c.post("/v1/models/z/predict", json={"data": [1.0, 2.0]})
        assert r.status_code == 200 and r.json()["result"] == [1.0, 2.0], r.text
        # BadInput raised in infer (not only in preprocess) is the client's 400.
        r = c.post("/v1/models/z/predict", json={"data": [-1.0, 2.0]})
        assert r.status_code == 400 and "negatives" in r.json()["error"], r.text
        broken = {
            1001: "output OUTPUT0 is float64; the model declares float32",
            1002: "output OUTPUT0 has per-row shape [2, 1]; the model declares [-1]",
            1003: "infer returned tuple; it must return one torch.Tensor",
            1004: "handler returned 0 rows for a batch of 1",
            1005: "preprocess returned list; it must return a torch.Tensor",
            1006: "preprocess returned 0 rows for a request of 1",
            1007: "model z answered NaN or Inf, which JSON cannot carry",  # not null, a 200
        }
        worker = server.pids("worker")
        for first, why in [*broken.items(), (1001, broken[1001])]:
            r = c.post("/v1/models/z/predict", json={"data": [first, 2.0]})
            assert r.status_code == 500 and why in r.json()["error"], r.text
            ok = c.post("/v1/models/z/predict", json={"data": [3.0, 4.0]})
            assert ok.status_code == 200 and ok.json()["result"] == [3.0, 4.0], ok.text
        assert server.pids("worker") == worker  # a handler's bug fails requests, not workers
    log = server.log()
    assert "batch profile skipped (ValueError: all zeros" in log
    assert log.count("output OUTPUT0 is float64; the model declares float32") == 1
    assert server.stop() == 0


def test_one_request_breaking_the_output_contract_fails_alone_in_its_batch(
    start_server,
) -> None:
    """An output that breaks the declaration may follow one request's data (a dtype
    promotion, a row filter): its batch is re-run member by member, as for a raise, so
    only that request fails. Its batchmates used to get its 500."""
    server: Server = start_server(
        "--model", "z=python:support.fake_handlers:Misbehaves", env=HANDLER_ENV, frontends=1
    )
    arena = Arena.attach(server.ctl("status")["server"]["arena"])
    ring = RequestRing(arena, 0)

    def predict(first: float) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/models/z/predict", json={"data": [first, 2.0]})

    try:
        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(predict, 1008)  # the worker is busy with it for 2 s
            wait_until(lambda: np.any(arena.slots["state"] == SlotState.RUNNING), 10, "busy")
            answers = {first: pool.submit(predict, first) for first in (5.0, 1001, 6.0)}
            wait_until(lambda: ring.depth() == 3, 10, "three requests queued behind it")
            replies = {first: a.result(30) for first, a in answers.items()}
        assert blocker.result(30).status_code == 200
    finally:
        ring.close()
        arena.close()
    bad = replies.pop(1001)
    assert bad.status_code == 500 and "is float64" in bad.json()["error"], bad.text
    for first, r in replies.items():
        assert r.status_code == 200 and r.json()["result"] == [first, 2.0], r.text
    assert server.stop() == 0


def test_a_model_whose_answers_depend_on_their_batchmates_is_named_at_start(
    start_server,
) -> None:
    """A BatchNorm left in training mode answers each request by its batch's statistics:
    answers change with load and one request's input shows in another's answer, with no
    error anywhere. The worker says so at start; models that batch correctly (the
    built-in digits network, identity) do not."""
    server: Server = start_server(
        *("--model", "bn=python:support.fake_handlers:TrainModeBatchNorm"),
        *("--model", "digits=digits", "--model", "id=identity"),
        env=HANDLER_ENV,
        frontends=1,
    )
    warnings = re.findall(r"model (\S+) answers a request differently depending on", server.log())
    assert warnings == ["bn"], server.log()
    assert "a BatchNorm or Dropout in training mode?" in server.log()
    assert "by the profile, near worker.heartbeat_timeout_s" not in server.log()  # fast models
    assert server.stop() == 0


def test_frontends_never_load_torch_nor_the_digits_worker_torchvision(start_server) -> None:
    """Also after serving every kind of request (a lazy import on one path would load
    it only then): each kind eight times on fresh connections, which the kernel spreads
    over both frontends. A frontend stays small; the default model's worker decodes
    its images with PIL, and ``import torchvision`` (which imports ``torch._dynamo``)
    would add 1.2 s to each of its starts and restarts."""
    server: Server = start_server()
    pixels = DIGIT3["data"]
    v2 = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 8, 8], "data": pixels}]}
    kinds = [
        ("POST", "/predict", {"json": DIGIT3}),
        ("POST", "/v1/models/digits/predict", {"content": PNGS["3"], "headers": IMAGE_PNG}),
        ("POST", "/v2/models/digits/infer", {"json": v2}),
        ("GET", "/v2/models/digits/stats", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, kw in kinds * 8:
        with server.client() as c:
            assert c.request(method, path, **kw).status_code == 200, path
    for pid in server.pids("frontend"):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "torch/lib" not in maps
        assert "cygrpc" not in maps  # gRPC loads only with server.grpc_port set
        uss = psutil.Process(pid).memory_full_info().uss
        assert uss < 100 * 2**20, f"frontend USS {uss / 2**20:.0f} MiB"
        # DESIGN's "RSS well under 100 MB", less the arena's pages (RssShmem): those
        # count in every mapper's RSS and grow with the payloads, not with the frontend.
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        own_kb = sum(int(status[k].split()[0]) for k in ("RssAnon", "RssFile"))
        assert own_kb < 100 * 1024, f"frontend RSS less shared memory {own_kb / 1024:.0f} MiB"
    worker_maps = Path(f"/proc/{server.pids('worker')[0]}/maps").read_text()
    assert "libtorch" in worker_maps  # the check above can see torch when it is there
    assert "torchvision" not in worker_maps  # its extension and libraries
    server.stop()


# Wake-ups a second of idle allowed to each process, all its threads together: its timers
# wake it about once a second (worker.heartbeat_interval_s, the supervisor's tick); a poll
# loop shows as hundreds.
IDLE_WAKEUPS_PER_S = 5
IDLE_WAKEUPS_SLACK = 10


def wakeups(pid: int) -> int:
    """Context switches of every thread of ``pid`` so far: each time one went to sleep
    and was woken again (or was preempted)."""
    total = 0
    for path in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            fields = dict(line.split(":", 1) for line in path.read_text().splitlines())
        except OSError:  # a thread that ended while we looked
            continue
        total += int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
    return total


def test_idle_server_does_not_spin(start_server) -> None:
    """No busy loop and no polling storm while idle: a spinning process shows as a large
    share of a core, a wait turned into a poll loop with a short sleep (little CPU: 2 %
    of a core for a 5 ms poll) as hundreds of wake-ups a second, which the kernel counts.
    The 2 % target for the whole idle server is a speed figure, measured by the benchmark
    (``bench.run``'s idle window, docs/benchmarks.md), not asserted here: on this VM the
    cost of each timer wake-up moves from hour to hour, and the same code measured 0.5 %
    in one soak and 3.6 % in this test's 5 s window on another afternoon."""
    server: Server = start_server()
    pids = {"supervisor": server.proc.pid}
    pids.update({f"frontend {p}": p for p in server.pids("frontend")})
    pids.update({f"worker {p}": p for p in server.pids("worker")})
    procs = [psutil.Process(p) for p in pids.values()]
    time.sleep(1.0)  # let start-up work (profiles, imports) settle
    before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    woke_before = {name: wakeups(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(5.0)  # a measurement window, not a synchronisation wait
    used = sum(p.cpu_times().user + p.cpu_times().system for p in procs) - before
    woke = {name: wakeups(pid) - woke_before[name] for name, pid in pids.items()}
    window = time.monotonic() - t0
    share = used / window
    print(f"idle CPU of {len(procs)} processes: {share * 100:.2f}% of one core")
    print(f"idle wake-ups: {woke}")
    assert share < 0.15, f"{share * 100:.1f}% of a core while idle: something spins"
    allowed = IDLE_WAKEUPS_PER_S * window + IDLE_WAKEUPS_SLACK  # scales with the window
    polling = {name: n for name, n in woke.items() if n > allowed}
    assert not polling, f"woken more than {allowed:.0f} times while idle (polling): {polling}"
    server.stop()


def test_sigkill_worker_under_load_every_request_answered(start_server) -> None:
    """A worker SIGKILLed at an arbitrary instant under load: every request answered
    right (one death poisons nothing). A digits batch lasts well under a millisecond, so
    the kill rarely lands mid-batch; the re-queue of a batch in flight is
    ``test_faults_chaos``'s (under load, and for a lone request)."""
    server: Server = start_server("--workers", "2")
    server.wait_workers_ready(2)
    cases = digit_requests(300)
    victim = server.pids("worker")[0]

    async def scenario() -> list:
        load = _fire(server.url, [c for c, _ in cases], concurrency=32)
        task = asyncio.ensure_future(load)
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        return await task

    responses = asyncio.run(scenario())
    for resp, (_, label) in zip(responses, cases, strict=True):
        assert isinstance(resp, httpx.Response), resp
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"]["label"] == label
    wait_until(
        lambda: victim not in server.pids("worker") and len(server.pids("worker")) == 2,
        60,
        "a replacement worker",
    )
    server.wait_ready()
    # The journal says the supervisor did not send it (and, where the host counts OOM
    # kills, that the kernel's OOM killer did not either: test_oom.py).
    said = r"exited: killed by SIGKILL \(not sent by the supervisor.*; it held \d+ MiB RSS at its last sample\)"
    assert re.search(said, server.log()), server.log()
    assert server.stop() == 0


def test_sigterm_under_load_drains_and_exits_clean(start_server) -> None:
    server: Server = start_server()
    cases = digit_requests(300)

    async def scenario() -> list:
        # SIGTERM once the server answers (a fixed delay met a loaded CI host before any
        # request had been answered), with most of the 300 still to come.
        first = asyncio.Event()
        requests = [c for c, _ in cases]
        task = asyncio.ensure_future(_fire(server.url, requests, concurrency=32, answered=first))
        await asyncio.wait_for(first.wait(), 60)
        server.proc.send_signal(signal.SIGTERM)
        return await task

    responses = asyncio.run(scenario())
    answered = refused = 0
    for resp, (_, label) in zip(responses, cases, strict=True):
        if isinstance(resp, httpx.TransportError):
            # Connection refused or closed before the request was read (the listening
            # socket or an idle keep-alive connection closed at shutdown): never accepted,
            # and no half-answer: the client knows to retry (nginx does, see its tests).
            refused += 1
            continue
        assert isinstance(resp, httpx.Response), resp
        if resp.status_code == 503:
            assert resp.headers.get("retry-after"), resp.text
            refused += 1
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["result"]["label"] == label
            answered += 1
    assert answered > 0
    assert server.proc.wait(60) == 0
    # Every process exits 0, the children too: the supervisor's own code says nothing of
    # theirs, its log does (one line per exit; "ok" is exit 0).
    exits = re.findall(r"\b((frontend|worker)-\d+) \(pid \d+\) exited: (.*)", server.log())
    assert {role for _, role, _ in exits} == {"frontend", "worker"}, server.log()[-3000:]
    assert [why for *_, why in exits] == ["ok"] * len(exits), exits
    assert shm_segments(server.instance) == []
    assert not os.path.exists(server.admin_socket)


def test_poison_request_fails_alone(start_server) -> None:
    server: Server = start_server(
        "--model", "p=python:support.fake_handlers:Poison", "--workers", "2", env=HANDLER_ENV
    )
    good = [("/v1/models/p/predict", {"json": {"data": [float(i + 100), 1.0]}}) for i in range(40)]
    raises = ("/v1/models/p/predict", {"json": {"data": [13.0, 1.0], "request_id": "unlucky-1"}})
    kills = ("/v1/models/p/predict", {"json": {"data": [666.0, 1.0], "request_id": "crash-1"}})
    responses = fire(server.url, [*good[:20], raises, kills, *good[20:]], concurrency=16)
    errors = [(i, repr(r)) for i, r in enumerate(responses) if not isinstance(r, httpx.Response)]
    assert not errors, f"{errors}\n{server.log()[-6000:]}"  # once in CI: say what, and why
    statuses = [r.status_code for r in responses]
    assert statuses[20] == 500 and "unlucky" in responses[20].json()["error"]
    # The log line names the request, to be found by its id.
    assert "model p raised on request unlucky-1: 13 is unlucky" in server.log()
    assert statuses[21] == 500 and "poison" in responses[21].json()["error"]
    # The supervisor's lines about the crashes name the request too (batchmates with it).
    assert re.search(r"re-queued \d+ requests of worker-\d: [^\n]*crash-1", server.log())
    assert re.search(r"failed 1 poison requests of worker-\d: crash-1\n", server.log())
    for _i, r in enumerate(responses[:20] + responses[22:]):
        assert r.status_code == 200, r.text
    status = server.ctl("status")
    assert status["server"]["totals"].get("poisoned") == 1
    totals = status["server"]["totals"]
    assert sum(v for k, v in totals.items() if k.startswith("restarts:worker:")) == 2
    server.wait_ready()
    with server.client() as c:
        assert c.post("/v1/models/p/predict", json={"data": [1.0, 2.0]}).json()["result"] == [
            1.0,
            2.0,
        ]
    assert server.stop() == 0


def test_a_batch_that_ran_out_of_memory_is_retried_one_by_one_without_its_memory(
    start_server,
) -> None:
    """A batch that raises is run again one request at a time; those runs come after the
    except block, whose traceback held the failed batch's tensors (on a GPU after an
    out-of-memory error, the memory they need)."""
    server: Server = start_server(
        "--model",
        "m=python:support.fake_handlers:OutOfMemoryOnBatches",
        "--max-queue-delay-ms",
        "20",
        env=HANDLER_ENV,
    )
    calls = [("/v1/models/m/predict", {"json": {"data": [float(i), 1.0]}}) for i in range(24)]
    responses = fire(server.url, calls, concurrency=8)
    for i, r in enumerate(responses):
        assert isinstance(r, httpx.Response) and r.status_code == 200, (r, server.log()[-3000:])
        assert r.json()["result"] == [float(i), 1.0]
    assert "ran out of device memory in the profile" not in server.log()
    assert "ran out of memory" in server.log()  # batches of requests did form, and failed
    assert server.stop() == 0


def test_a_device_fault_replaces_the_worker_and_fails_only_its_request(start_server) -> None:
    """After a device-side assert every CUDA call of the process fails. The worker exits
    (device_fault) instead of answering 500 to everything while it still beats; its
    batchmates are re-queued and answered, the request that broke it fails as poison."""
    server: Server = start_server(
        "--model",
        "p=python:support.fake_handlers:Poison",
        "--workers",
        "2",
        "--max-queue-delay-ms",
        "20",
        env=HANDLER_ENV,
    )
    good = [("/v1/models/p/predict", {"json": {"data": [float(i + 100), 1.0]}}) for i in range(30)]
    breaks = ("/v1/models/p/predict", {"json": {"data": [669.0, 1.0], "request_id": "assert-1"}})
    responses = fire(server.url, [*good[:15], breaks, *good[15:]], concurrency=8)
    errors = [(i, repr(r)) for i, r in enumerate(responses) if not isinstance(r, httpx.Response)]
    assert not errors, f"{errors}\n{server.log()[-6000:]}"
    assert responses[15].status_code == 500 and "poison" in responses[15].json()["error"]
    for r in responses[:15] + responses[16:]:
        assert r.status_code == 200, (r.text, server.log()[-4000:])
    log = server.log()
    assert "the device failed while running requests" in log and "assert-1" in log
    assert re.search(r"worker-\d \(pid \d+\) exited: device_fault \(AcceleratorError: CUDA", log)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(
        r'ringserve_process_restarts_total\{model="p",reason="device_fault",role="worker"\} 2\.0',
        metrics,
    ), [x for x in metrics.splitlines() if "restarts_total{" in x]
    server.wait_ready()
    with server.client() as c:  # the replacements serve
        r = c.post("/v1/models/p/predict", json={"data": [1.0, 2.0]})
        assert r.status_code == 200 and r.json()["result"] == [1.0, 2.0], r.text
    assert server.stop() == 0


def test_workers_share_their_threads_across_processes(start_server) -> None:
    """--share-threads between real worker processes: a lone request runs on every
    thread; two at once (one per worker) split them; alone again, all come back."""
    server: Server = start_server(
        "--model",
        "t=python:support.fake_handlers:ThreadCount",
        "--workers",
        "2",
        "--threads",
        "2",
        "--share-threads",
        "--max-batch-size",
        "1",
        env=HANDLER_ENV,
    )
    url = "/v1/models/t/predict"

    def threads_used(responses: list) -> list[float]:
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return sorted(r.json()["result"][0] for r in responses)

    with server.client() as c:
        assert threads_used([c.post(url, json={"data": [0.0]})]) == [2.0]
    both = threads_used(fire(server.url, [(url, {"json": {"data": [1500.0]}})] * 2))
    assert both[0] == 1.0, both  # the second to start saw the first running
    with server.client() as c:
        assert threads_used([c.post(url, json={"data": [0.0]})]) == [2.0]
    assert server.stop() == 0


def test_deadline_full_queue_and_disconnect(start_server) -> None:
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:Slow",
        "--set",
        "arena.slots=4",
        "--max-batch-size",
        "1",
        env=HANDLER_ENV,
        frontends=1,
    )
    with server.client() as c:
        r = c.post(
            "/v1/models/slow/predict",
            json={"data": [800.0]},
            headers={"X-Request-Timeout-Ms": "200"},
        )
        assert r.status_code == 504, r.text
        # v2's own deadline (Triton's ``timeout`` parameter, in µs), and the shorter of
        # it and the header when both are set.
        v2 = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [800.0]}]}
        for params, headers in (
            ({"timeout": 200_000}, {}),
            ({"timeout": 200_000}, {"X-Request-Timeout-Ms": "60000"}),
            ({"timeout": 60_000_000}, {"X-Request-Timeout-Ms": "200"}),
        ):
            t0 = time.monotonic()
            r = c.post("/v2/models/slow/infer", json={**v2, "parameters": params}, headers=headers)
            assert r.status_code == 504, (params, headers, r.text)
            assert "deadline" in r.json()["error"]
            assert time.monotonic() - t0 < 5  # not the 60 s one

    all_free = functools.partial(slots_free, server, 4)
    # The abandoned request's slot is freed once the worker is done with it.
    wait_until(all_free, 20, "the timed-out request's slot to be freed")
    # Full queue: 4 slots, each request holds one for 300 ms: the rest get a fast 503.
    t0 = time.monotonic()
    codes = sorted(r.status_code for r in overload(server, 12, 300.0))
    assert codes.count(200) >= 4 and codes.count(503) >= 1, codes
    assert time.monotonic() - t0 < 30
    # Disconnect: the client gives up; its slot is cancelled and freed, not leaked.
    with server.client(timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/models/slow/predict", json={"data": [1500.0]})

    wait_until(all_free, 20, "every slot back to free")
    with server.client() as c:
        assert c.post("/v1/models/slow/predict", json={"data": [1.0]}).status_code == 200
    assert server.stop() == 0


def _computed(server: Server) -> float:
    """Requests of the ``slow`` model that went through its model, from /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(r'^ringserve_computed_requests_total\{model="slow"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_requests_nobody_waits_for_any_more_are_not_run_in_their_batch(start_server) -> None:
    """A worker holds a batch's requests a while before it runs them: while the batch
    fills, and while its earlier groups (other shapes) run. A request whose client left
    meanwhile, or whose deadline passed, is answered without a model run. (The cancel flag
    was read when the request was claimed, and deadlines checked only before the first
    group: both ran anyway.) Timings: ``Slow`` sleeps its first value in ms a batch; the
    busy device makes the worker wait up to a batch's time for company."""
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:Slow",
        "--set",
        "models.slow.batching.max_queue_delay_ms=8000",
        "--set",
        "models.slow.batching.preferred_batch_size=8",
        "--max-batch-size",
        "8",
        env=HANDLER_ENV,
        frontends=1,
    )
    url = f"{server.url}/v1/models/slow/predict"

    def post(data: list[float], at: float, timeout: float = 60.0, ms: int = 0) -> object:
        time.sleep(at)
        headers = {"X-Request-Timeout-Ms": str(ms)} if ms else {}
        try:
            return httpx.post(url, json={"data": data}, headers=headers, timeout=timeout)
        except httpx.ReadTimeout as e:
            return e

    def scenario(*requests: tuple) -> list:
        with ThreadPoolExecutor(len(requests)) as pool:
            return [f.result() for f in [pool.submit(post, *r) for r in requests]]

    # 1. The client leaves while its batch fills. The first request keeps the worker 2 s;
    # the next two come meanwhile and are claimed together at 2 s, then wait for company
    # up to 4 s (a batch's time); the third's client gives up at 3 s.
    first, kept, left = scenario(([2000.0], 0.0), ([0.0], 0.3), ([0.0], 0.5, 2.5))
    assert first.status_code == 200 and kept.status_code == 200, (first.text, kept.text)
    assert isinstance(left, httpx.ReadTimeout), left
    assert httpx.post(url, json={"data": [0.0]}).status_code == 200  # its batch recorded
    assert _computed(server) == 3.0  # not the one whose client left

    # 2. A deadline passes while an earlier group runs. The first request keeps the worker
    # 0.6 s; the next two (two shapes, two groups) are claimed together at 0.6 s and run
    # by 1.2 s at the latest, the first group 2.5 s; the second's deadline passes at 2.3 s.
    first, slow_group, late = scenario(
        ([600.0], 0.0), ([2500.0, 0.0], 0.15), ([0.0, 0.0, 0.0], 0.3, 60.0, 2000)
    )
    assert first.status_code == 200 and slow_group.status_code == 200, slow_group.text
    assert late.status_code == 504, late.text
    assert httpx.post(url, json={"data": [0.0]}).status_code == 200
    assert _computed(server) == 6.0  # three more, not the late one
    assert server.stop() == 0


def test_queue_depth_limit_refuses_fast_and_frees_the_slot(start_server) -> None:
    """Slots to spare, but the model's queue is capped at 2: requests beyond it get a fast
    503 with Retry-After (the push is refused after the slot was written), and every slot
    comes back."""
    server: Server = start_server(
        "--model",
        "slow=python:support.fake_handlers:Slow",
        "--set",
        "arena.slots=32",
        "--set",
        "arena.max_queue_depth=2",
        "--max-batch-size",
        "1",
        env=HANDLER_ENV,
        frontends=1,
    )
    t0 = time.monotonic()
    responses = overload(server, 10, 400.0)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(503) >= 5, codes
    for r in responses:
        if r.status_code == 503:
            assert "depth limit" in r.json()["error"], r.text
    assert time.monotonic() - t0 < 20

    all_free = functools.partial(slots_free, server, 32)
    wait_until(all_free, 20, "every slot back to free")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'ringserve_rejected_requests_total\{model="slow"\} [1-9]', metrics)
    with server.client() as c:
        assert c.post("/v1/models/slow/predict", json={"data": [1.0]}).status_code == 200
    assert server.stop() == 0


def test_sigkill_supervisor_children_exit_and_restart_sweeps(
    start_server, private_shm_dir: str
) -> None:
    shm = private_shm_dir
    server: Server = start_server("--set", f"arena.shm_dir={shm}")
    kids = server.pids("frontend") + server.pids("worker")
    assert shm_segments(server.instance, shm)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: not any(map(alive, kids)), 10, "children to exit with their supervisor")
    stale = shm_segments(server.instance, shm)
    assert stale, "a SIGKILLed supervisor leaves its segment behind"
    again = start_server("--instance", server.instance, "--set", f"arena.shm_dir={shm}")
    assert not any(s in shm_segments(server.instance, shm) for s in stale)
    assert "removed stale shared memory" in again.log()
    assert again.stop() == 0


def test_sigkill_frontend_is_replaced_and_slots_reclaimed(start_server) -> None:
    server: Server = start_server(
        "--model", "slow=python:support.fake_handlers:Slow", env=HANDLER_ENV
    )
    victim = server.pids("frontend")[0]
    responses: list = []

    async def scenario() -> None:
        task = asyncio.create_task(
            _fire(
                server.url,
                [("/v1/models/slow/predict", {"json": {"data": [200.0]}})] * 16,
                concurrency=16,
            )
        )
        await asyncio.sleep(0.1)
        os.kill(victim, signal.SIGKILL)
        responses.extend(await task)

    asyncio.run(scenario())
    # Requests on the dead frontend's connections fail at the TCP level (nginx retries
    # them; see the nginx tests); all others succeed.
    assert all(isinstance(r, httpx.HTTPError) or r.status_code == 200 for r in responses)
    server.wait_replaced(victim)

    def all_free() -> bool:
        return 'ringserve_ring_slots{state="free"} 256.0' in httpx.get(f"{server.url}/metrics").text

    wait_until(all_free, 30, "the dead frontend's slots to be reclaimed")
    assert server.stop() == 0


def test_json_logs_tagged_by_process_with_access_lines(start_server) -> None:
    server: Server = start_server("--log-format", "json", "--set", "server.access_log=true")
    v2 = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}]
    }
    with server.client() as c:
        c.post("/predict", json=DIGIT3, headers={"X-Request-ID": "trace-me"})
        c.post("/v2/models/digits/infer", json=v2, headers={"X-Request-ID": "trace-v2"})
        c.post("/v2/models/digits/infer", json={}, headers={"X-Request-ID": "trace-400"})
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    procs = {r["proc"] for r in records}
    assert {"supervisor", "frontend-0", "worker-0"} <= procs | {"frontend-1"}, procs
    access = {r["request_id"]: r for r in records if "latency_ms" in r and "request_id" in r}
    one = access["trace-me"]
    assert (one["status"], one["model"], one["method"], one["path"]) == (
        200,
        "digits",
        "POST",
        "/predict",
    )
    assert one["latency_ms"] > 0 and "batch_id" in one
    # The v2 route is logged as well, answers and errors alike.
    assert access["trace-v2"]["path"] == "/v2/models/digits/infer"
    assert access["trace-v2"]["status"] == 200 and "batch_id" in access["trace-v2"]
    assert access["trace-400"]["status"] == 400
    noise = [line for line in server.log().splitlines() if line and not line.startswith("{")]
    assert noise == [], noise[:5]


def test_a_body_request_id_that_would_forge_a_log_line_is_answered_not_logged(
    start_server,
) -> None:
    """/predict's body may name the request (``request_id``). One holding a line break
    went into the text access log as it was, and a client could write lines of its own
    into the server's log. It is answered as sent, and the server names the request by
    an id of its own, as it does a v2 body's id or an X-Request-ID it cannot use."""
    server: Server = start_server("--set", "server.access_log=true", frontends=1)
    forged = "x\n2026-12-06 20:00:00,000 frontend-0 INFO forged"
    with server.client() as c:
        r = c.post("/predict", json={**DIGIT3, "request_id": forged})
    assert r.status_code == 200 and r.json()["request_id"] == forged
    assert server.stop() == 0
    lines = server.log().splitlines()
    assert not [line for line in lines if "forged" in line], lines[-5:]
    rid = r.headers["x-request-id"]
    # The text line names the batch the request ran in, as the JSON one does.
    assert re.search(
        rf"^\S+ \S+ frontend-0 INFO {rid} POST /predict digits 200 [\d.]+ ms batch \d+$",
        server.log(),
        re.M,
    ), lines[-5:]


def test_a_bug_in_the_request_path_is_a_counted_500_with_the_request_id(start_server) -> None:
    """An unexpected exception in a frontend's answer path (planted by a sitecustomize
    on the frontends' PYTHONPATH) is a JSON 500 that echoes X-Request-ID, counted in
    ``ringserve_requests_total`` and logged with its traceback; the slot comes back and
    the other routes keep serving."""
    bug = str(REPO / "tests" / "support" / "frontend_bug")
    server: Server = start_server(
        "--model",
        "id=identity",
        env={"PYTHONPATH": bug + os.pathsep + os.environ.get("PYTHONPATH", "")},
        frontends=1,
    )
    with server.client() as c:
        r = c.post("/v1/models/id/predict", json={"data": [1.0]}, headers={"X-Request-ID": "bug-1"})
        assert r.status_code == 500, r.text
        assert r.json() == {"error": "internal server error"}
        assert r.headers["x-request-id"] == "bug-1"
        v2 = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [2]}]}
        assert c.post("/v2/models/id/infer", json=v2).status_code == 200
        # A JSON route's bug: the same 500, with the id (it came without one), logged.
        r = c.post("/v2/repository/index", headers={"X-Request-ID": "bug-2"})
        assert (r.status_code, r.json()) == (500, {"error": "internal server error"})
        assert r.headers["x-request-id"] == "bug-2"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'ringserve_requests_total\{code="500",model="id"\} 1\.0', metrics), [
        line for line in metrics.splitlines() if "requests_total" in line
    ]
    assert "RuntimeError: injected frontend bug" in server.log()
    assert "unhandled error on POST /v2/repository/index (request bug-2)" in server.log()
    wait_until(functools.partial(slots_free, server, 256), 10, "every slot back to free")
    assert server.stop() == 0


def test_idle_keep_alive_connections_close_after_the_configured_time(start_server) -> None:
    """server.keep_alive_s sets how long a frontend keeps an idle connection (a load
    balancer in front must give up its own idle connections first)."""
    import socket

    server: Server = start_server("--set", "server.keep_alive_s=1", frontends=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(4096) == b""  # the server closed it
        assert 0.5 < time.monotonic() - t0 < 4  # after about 1 s, not uvicorn's 5 s
    assert server.stop() == 0


def test_requests_that_crash_a_fresh_worker_do_not_mark_the_model_failing(start_server) -> None:
    """A worker that reported ready and then dies on a request has not failed to start,
    even before the supervisor's tick has promoted it: a poison request kills the
    restarted worker at once, and counting that as a failed start backed the position
    off and, from three, marked a loadable model failing (readiness 503 for all)."""
    server: Server = start_server(
        "--model", "p=python:support.fake_handlers:Poison", env=HANDLER_ENV, frontends=1
    )
    with server.client(timeout=60) as c:
        for _ in range(3):
            server.wait_ready()
            r = c.post("/v1/models/p/predict", json={"data": [666.0, 1.0]})
            assert r.status_code == 500 and "poison" in r.json()["error"], r.text
        server.wait_ready()
        # Created at zero, so increase() sees the first one (as every restart reason).
        zero = 'ringserve_process_restarts_total{model="p",reason="unasked_exit",role="worker"} 0.0'
        assert zero in c.get("/metrics").text
        for first in (667.0, 668.0):
            r = c.post("/v1/models/p/predict", json={"data": [first, 1.0]})
            assert r.status_code == 500 and "poison" in r.json()["error"], r.text
            server.wait_ready()
        assert c.post("/v1/models/p/predict", json={"data": [1.0, 2.0]}).status_code == 200
    # A worker ending itself with exit 0 while serving is no "ok" at INFO.
    assert re.search(r"supervisor ERROR worker-0 \(pid \d+\) exited: unasked_exit", server.log())
    # Exit 3 is BOOT only while starting: from a serving worker, the handler's own code.
    assert re.search(r"supervisor ERROR worker-0 \(pid \d+\) exited: exit 3\n", server.log())
    assert "exited: boot" not in server.log()
    assert "failed to start" not in server.log()
    assert server.ctl("status")["models"][0]["state"] == "ready"  # as /v1/models says
    assert server.stop() == 0


def test_a_request_retried_after_a_crash_sees_its_original_input(
    start_server, tmp_path: Path
) -> None:
    """A model that changes its input in place (in preprocess or in infer) must not
    change the request's slot: when the worker then dies, the request is re-queued and
    the next worker runs it again, which answered 200 with the input scaled twice."""
    server: Server = start_server(
        "--model",
        "pre=python:support.fake_handlers:ScalesInPreprocess",
        "--model",
        "inf=python:support.fake_handlers:ScalesInInfer",
        "--set",
        f"models.pre.options.marker={tmp_path / 'pre'}",
        "--set",
        f"models.inf.options.marker={tmp_path / 'inf'}",
        env=HANDLER_ENV,
        frontends=1,
    )
    with server.client(timeout=60) as c:
        for model, sent in (("pre", [7.0, 2.0, 3.0, 4.0]), ("inf", [7.0, 2.0, 3.0, 4.0])):
            r = c.post(f"/v1/models/{model}/predict", json={"data": [sent]})
            assert r.status_code == 200, r.text
            assert r.json()["result"] == [[70.0, 20.0, 30.0, 40.0]], model
            assert (tmp_path / model).exists()  # it did crash once on the way
    assert server.stop() == 0


def _stopped_workers(server: Server) -> list[int]:
    return [p for p in server.pids("worker") if psutil.Process(p).status() == "stopped"]


def _kill_the_worker_writing_an_answer(server: Server, path: str, data: object) -> tuple:
    """Send one request; SIGKILL the worker once it has written the answer but not yet
    marked it DONE (every worker here stops itself there). Returns the response and the
    replacement workers that reached the same point (they are let go on)."""
    with ThreadPoolExecutor(1) as pool, server.client(timeout=60) as c:
        sent = pool.submit(c.post, path, json={"data": data})
        [victim] = wait_until(lambda: _stopped_workers(server), 30, "the worker to pause")
        os.kill(victim, signal.SIGKILL)
        reran = []
        while True:
            try:
                return sent.result(timeout=0.1), reran
            except TimeoutError:  # a replacement that ran it again paused: let it answer
                for pid in _stopped_workers(server):
                    reran.append(pid)
                    os.kill(pid, signal.SIGCONT)


def test_a_worker_killed_writing_an_answer_beside_the_input_has_it_run_again(
    start_server,
) -> None:
    """An answer that fits beside its request's input in the slot is written there. A
    worker SIGKILLed between that copy and ``state = DONE`` (by the heartbeat check, the
    OOM killer, a chaos test) leaves the input whole: the replacement runs the request
    again and the client gets its right answer, not a 500. (A digit: 3136 bytes in, 40
    out, in a 1 MiB slot.)"""
    server: Server = start_server(env={"RINGSERVE_TEST_PAUSE_AT": "answer.written"}, frontends=1)
    r, reran = _kill_the_worker_writing_an_answer(server, "/predict", DIGIT3["data"])
    assert r.status_code == 200, r.text
    assert r.json()["result"]["label"] == "3" and len(reran) == 1
    assert not re.search(r"whose answers it was writing when it died", server.log())
    server.wait_ready()
    assert server.stop() == 0


def test_a_worker_killed_writing_an_answer_over_the_input_fails_it_rather_than_rerun_it(
    start_server,
) -> None:
    """An answer too large to fit beside its input goes over it. A worker SIGKILLed
    between that copy and ``state = DONE`` left the request RUNNING, the supervisor
    re-queued it, and the next worker ran the answer's bytes as the input: a 200 for an
    input nobody sent. The request now fails, 500, saying why, and the replacement does
    not run it. (Identity in 4 KiB slots: 3200 bytes in and 3200 out do not fit.)"""
    server: Server = start_server(
        *("--model", "id=identity", "--set", "arena.slot_bytes=4096"),
        env={"RINGSERVE_TEST_PAUSE_AT": "answer.written"},
        frontends=1,
    )
    r, reran = _kill_the_worker_writing_an_answer(server, "/v1/models/id/predict", [[1.5] * 800])
    assert not reran, f"the request ran again: {r.status_code} {r.text}"
    assert r.status_code == 500, r.text
    assert "the worker died while writing this request's answer" in r.json()["error"]
    assert re.search(
        r"failed 1 requests of worker-0 whose answers it was writing when it died: ", server.log()
    )
    server.wait_ready()
    assert server.stop() == 0


def _v2_bytes_request(element: bytes) -> tuple[bytes, dict[str, str]]:
    """A v2 request of one BYTES element, in the binary extension (any bytes go)."""
    head = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 1],
                        "parameters": {"binary_data_size": 4 + len(element)}}]}  # fmt: skip
    header = json.dumps(head).encode()
    body = header + len(element).to_bytes(4, "little") + element
    return body, {"Inference-Header-Content-Length": str(len(header))}


def test_a_handlers_text_that_utf8_cannot_hold_fails_its_request_not_the_worker(
    start_server,
) -> None:
    """A handler that reads any bytes as text (``surrogateescape``) holds lone
    surrogates, which strict UTF-8 refuses: put in its error message, or answered as a
    BYTES output, the worker's encode raised, the worker died, its replacement died the
    same way, and the request failed as poison after two restarts."""
    server: Server = start_server(
        "--model", "echo=python:support.fake_handlers:EchoesText", env=HANDLER_ENV, frontends=1
    )
    with server.client(timeout=60) as c:
        url = "/v2/models/echo/infer"
        body, headers = _v2_bytes_request(b"refuse \xff")
        r = c.post(url, content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"] == "refused: refuse \\udcff", r.text
        body, headers = _v2_bytes_request(b"echo \xff")
        r = c.post(url, content=body, headers=headers)
        assert r.status_code == 500 and "a BYTES element is a str that is not UTF-8" in r.text
        body, headers = _v2_bytes_request(b"fine")
        r = c.post(url, content=body, headers=headers)
        assert r.status_code == 200, r.text
    [worker] = [p for p in server.children() if p["role"] == "worker"]
    assert worker["restarts"] == 0, worker
    assert server.stop() == 0


def test_every_504_counts_as_a_missed_deadline(start_server) -> None:
    """A request can miss its deadline in the frontend (its timer) or in the worker (it
    pops a request already past it, and answers 504 at once). Both are 504s; only the
    first was counted in ringserve_deadline_expired_total, which then showed a few
    percent of the 504s the dashboards' error panel had. The model sleeps its first
    value in ms per batch (up to 39), so a 2 ms deadline is missed on any host (with the
    identity model a fast, quiet host answered all 200 in time, and the test failed)."""
    server: Server = start_server(
        "--model", "id=python:support.fake_handlers:Slow", frontends=1, env=HANDLER_ENV
    )
    burst = [
        (
            "/v1/models/id/predict",
            {"json": {"data": [float(i)]}, "headers": {"X-Request-Timeout-Ms": "2"}},
        )
        for i in range(40)
    ]
    codes: list[int] = []
    for _ in range(5):
        codes += [r.status_code for r in fire(server.url, burst, concurrency=40)]
    assert set(codes) <= {200, 504} and 504 in codes, codes
    metrics = httpx.get(f"{server.url}/metrics").text
    counted = re.search(r'ringserve_deadline_expired_total\{model="id"\} (\S+)', metrics)
    assert counted is not None and float(counted.group(1)) == codes.count(504), (
        counted and counted.group(0),
        codes.count(504),
    )
    assert server.stop() == 0
    # With the access log off, a 504 still has a log line with its request id, once
    # per 10 s per model and frontend, not one per request.
    missed = [line for line in server.log().splitlines() if "missed its deadline" in line]
    assert 1 <= len(missed) <= 2, missed
    assert re.search(r"model id: request [0-9a-f]{32} missed its deadline of 0\.002 s", missed[0])


def test_a_handlers_prints_become_log_records_of_its_worker(start_server) -> None:
    """print() in model code went raw into the server's output: no time, no process,
    and lines that are not JSON in a JSON log (a log shipper's parse errors)."""
    server: Server = start_server(
        "--model",
        "chatty=python:support.fake_handlers:Chatty",
        "--log-format",
        "json",
        env=HANDLER_ENV,
        frontends=1,
    )
    with server.client() as c:
        assert c.post("/v1/models/chatty/predict", json={"data": [1.0]}).status_code == 200
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    printed = {(r["proc"], r["level"], r["msg"]) for r in records if r["logger"].endswith("output")}
    assert ("worker-0", "info", "loading the chatty model") in printed, printed
    assert ("worker-0", "info", "batch of 1 rows") in printed, printed
    assert ("worker-0", "warning", "careful: a warning") in printed, printed
