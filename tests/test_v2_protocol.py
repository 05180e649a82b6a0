"""KServe v2 REST against a real ``ringserve serve`` (identity, digits and models with a
BYTES input and a BYTES output), raw httpx.

One server for the module. Every bad request is followed by a good one that must still
succeed: a refused request costs nothing and leaves the server healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import EXAMPLES, Server, kill_group, launch, wait_until
from support.freeze import frozen_mid_batch_outside_the_lock
from test_e2e_core import HANDLER_ENV, PNGS

from ringserve.ipc.arena import Arena
from ringserve.ipc.ring import RequestRing

pytestmark = pytest.mark.e2e

MAX_BODY = 256 * 1024


@contextlib.contextmanager
def serve(tmp: Path, *args: str) -> Iterator[Server]:
    """``ringserve serve`` (2 frontends) for a whole module (conftest's fixture is per
    test); the same bounded start and process-group teardown."""
    server = launch(tmp, *args, env=HANDLER_ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        try:
            server.stop()
        finally:
            kill_group(server)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("v2proto")
    with serve(
        tmp,
        "--model",
        "id=identity",
        "--model",
        "digits=digits",
        "--model",
        "text=python:support.fake_handlers:ByteLengths",
        "--model",
        "desc=python:support.fake_handlers:Describe",
        "--model",
        "mix=python:support.fake_handlers:MixesRows",
        "--set",
        f"server.max_body_bytes={MAX_BODY}",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def good_json(client: httpx.Client) -> None:
    """A valid request that must succeed after any refused one."""
    r = client.post(
        "/v2/models/id/infer",
        json={
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1, 2, 3]


def binary_body(
    arr: np.ndarray,
    *,
    size: int | None = None,
    extra: dict | None = None,
    outputs: list | None = None,
    tail: bytes | None = None,
) -> tuple[bytes, dict]:
    doc: dict = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": arr.nbytes if size is None else size},
            }
        ],
        **(extra or {}),
    }
    if outputs is not None:
        doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    data = arr.tobytes() if tail is None else tail
    return head + data, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


# -- metadata ---------------------------------------------------------------------------


def test_server_metadata_and_health(client: httpx.Client) -> None:
    import ringserve

    r = client.get("/v2")
    assert r.status_code == 200
    meta = r.json()
    assert meta["name"] == "ringserve"
    assert meta["version"] == ringserve.__version__
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(meta["extensions"])
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert "x-request-id" in r.headers


def test_model_metadata(client: httpx.Client) -> None:
    for path in ("/v2/models/digits", "/v2/models/digits/versions/1"):
        r = client.get(path)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "name": "digits",
            "versions": ["1"],
            "platform": "pytorch_libtorch",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 8, 8]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}],
        }
    ident = client.get("/v2/models/id").json()
    assert ident["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}]


def test_model_ready_and_unknowns(client: httpx.Client) -> None:
    assert client.get("/v2/models/id/ready").status_code == 200
    assert client.get("/v2/models/id/versions/1/ready").status_code == 200
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/config",
        "/v2/models/id/versions/2",
        "/v2/models/id/versions/2/ready",
    ):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "error" in r.json()
    r = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404
    assert "nope" in r.json()["error"]
    r = client.post("/v2/models/id/versions/7/infer", json={"inputs": []})
    assert r.status_code == 404
    r = client.get("/v2/models/id/infer")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 says which methods would do
    assert "error" in r.json()
    good_json(client)


def test_model_config(client: httpx.Client) -> None:
    for path in ("/v2/models/digits/config", "/v2/models/digits/versions/1/config"):
        cfg = client.get(path).json()
        assert cfg["name"] == "digits"
        assert cfg["max_batch_size"] == 32
        assert cfg["input"][0]["name"] == "INPUT0"
        assert cfg["input"][0]["data_type"] == "TYPE_FP32"
        assert cfg["input"][0]["dims"] == [8, 8]  # no batch dimension
        assert cfg["output"][0]["dims"] == [10]
        dyn = cfg["dynamic_batching"]
        assert dyn["max_queue_delay_microseconds"] == 2000
        assert isinstance(dyn["preferred_batch_size"], list)
        assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


def test_stats(client: httpx.Client) -> None:
    t0_ms = time.time() * 1000
    good_json(client)
    one = client.get("/v2/models/id/stats").json()["model_stats"]
    assert [m["name"] for m in one] == ["id"]
    before = one[0]["inference_stats"]["success"]["count"]
    good_json(client)
    good_json(client)
    after = client.get("/v2/models/id/versions/1/stats").json()["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] >= before + 2
    assert after["inference_stats"]["success"]["ns"] > 0
    assert after["inference_count"] >= after["inference_stats"]["success"]["count"]
    assert after["execution_count"] >= 1
    # Milliseconds since the epoch; the first request's batch was recorded (after its
    # answer went out) before the third request was sent.
    assert t0_ms - 1 <= after["last_inference"] <= time.time() * 1000 + 1
    # An error answer counts in ``fail``, with the time it took (as Triton reports it).
    bad = client.post("/v2/models/id/infer", json={"inputs": [{"name": "x"}]})
    assert bad.status_code == 400
    failed = client.get("/v2/models/id/stats").json()["model_stats"][0]["inference_stats"]
    assert failed["fail"]["count"] == after["inference_stats"]["fail"]["count"] + 1
    assert failed["fail"]["ns"] > after["inference_stats"]["fail"]["ns"]
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert sorted(m["name"] for m in every) == ["desc", "digits", "id", "mix", "text"]


def test_stats_memory_usage_is_what_the_supervisor_sampled(
    server: Server, client: httpx.Client
) -> None:
    """``memory_usage`` (Triton's field; [] here before) is the model's workers' USS from
    the supervisor's last sample, the figure ``ctl status`` shows, on CPU device 0."""

    def usage() -> list[dict]:
        return client.get("/v2/models/id/stats").json()["model_stats"][0]["memory_usage"]

    def sampled_alike() -> tuple[list[dict], int] | None:
        before = usage()
        procs = server.children()
        uss = sum(p["uss_bytes"] for p in procs if p["role"] == "worker" and p["model"] == "id")
        return (before, uss) if uss and usage() == before else None  # no sample in between

    got, uss = wait_until(sampled_alike, 30, "a memory sample of id's worker")
    assert got == [{"type": "CPU", "id": 0, "byte_size": uss}]
    assert client.get("/v2/models/id/stats").json()["model_stats"][0]["response_stats"] == {}


def test_stats_compute_times_follow_triton(client: httpx.Client) -> None:
    """Compute stages count requests in ``inference_stats`` (each charged its batch's
    time) and executions per batch size in ``batch_stats``: one request of 3 rows is one
    execution of batch size 3 and one computed request, with the same times in both."""

    def stats() -> dict:
        return client.get("/v2/models/id/stats").json()["model_stats"][0]

    def by_size(s: dict) -> dict[int, dict]:
        return {b["batch_size"]: b for b in s["batch_stats"]}

    good_json(client)
    before = wait_until(lambda: (s := stats())["execution_count"] >= 1 and s, 10, "stats")
    data = list(range(9))
    r = client.post(
        "/v2/models/id/infer",
        json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 3], "data": data}]},
    )
    assert r.status_code == 200, r.text
    after = wait_until(
        lambda: (s := stats())["execution_count"] > before["execution_count"] and s,
        10,
        "the 3-row batch in the stats",
    )
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["inference_count"] == before["inference_count"] + 3
    three, three_before = by_size(after)[3], by_size(before).get(3)
    runs_before = three_before["compute_infer"]["count"] if three_before else 0
    assert three["compute_infer"]["count"] == runs_before + 1
    for stage in ("compute_input", "compute_infer", "compute_output"):
        req_now, req_then = after["inference_stats"][stage], before["inference_stats"][stage]
        assert req_now["count"] == req_then["count"] + 1, stage
        assert req_now["ns"] > req_then["ns"], stage
        batch_ns = three[stage]["ns"] - (three_before[stage]["ns"] if three_before else 0)
        assert abs((req_now["ns"] - req_then["ns"]) - batch_ns) <= 1000, stage
    # Every execution is in batch_stats, with its rows.
    sizes = by_size(after)
    assert sum(b["compute_infer"]["count"] for b in sizes.values()) == after["execution_count"]
    assert (
        sum(n * b["compute_infer"]["count"] for n, b in sizes.items()) == after["inference_count"]
    )


# -- good inference ---------------------------------------------------------------------


def test_json_infer_flat_and_nested_and_id_echo(client: httpx.Client) -> None:
    x = [[1.5, 2, 3], [4, 5, 6]]
    for data in (x, [v for row in x for v in row]):
        r = client.post(
            "/v2/models/id/versions/1/infer",
            json={
                "id": "req-42",
                "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 3], "data": data}],
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["x-request-id"] == "req-42"
        assert r.json() == {
            "model_name": "id",
            "model_version": "1",
            "id": "req-42",
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "data": [1.5, 2, 3, 4, 5, 6],
                }
            ],
        }


def test_any_id_is_echoed(client: httpx.Client) -> None:
    """Triton takes any string id: one a header cannot carry goes there percent-encoded
    (it was a 500 once, with the answer already computed)."""
    r = client.post(
        "/v2/models/id/infer",
        json={
            "id": "日本",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "日本" and r.headers["x-request-id"] == "%E6%97%A5%E6%9C%AC"


def test_one_request_id_limit_on_every_route(client: httpx.Client) -> None:
    """256 characters, from the header, v1's ``request_id`` or v2's ``id`` (v1 and the
    header stopped at 128, v2 at 256, and a v2 id over 128 was not echoed)."""
    longest, over = "t" * 256, "t" * 257
    v2 = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
    r = client.post("/v2/models/id/infer", json={**v2, "id": longest})
    assert r.status_code == 200 and r.headers["x-request-id"] == longest, r.text
    r = client.post("/v1/models/id/predict", json={"data": [[1.0]], "request_id": longest})
    assert r.status_code == 200 and r.headers["x-request-id"] == longest, r.text
    assert r.json()["request_id"] == longest
    r = client.get("/v2/health/ready", headers={"X-Request-ID": longest})
    assert r.headers["x-request-id"] == longest
    r = client.post("/v2/models/id/infer", json={**v2, "id": over})
    assert r.status_code == 400 and "at most 256" in r.json()["error"], r.text
    r = client.post("/v1/models/id/predict", json={"data": [[1.0]], "request_id": over})
    assert r.status_code == 422 and "at most 256" in r.json()["error"], r.text
    r = client.get("/v2/health/ready", headers={"X-Request-ID": over})
    assert r.headers["x-request-id"] not in (over, ""), "a new id instead"
    good_json(client)


def test_digits_json_sample_is_a_3(client: httpx.Client) -> None:
    data = json.loads((EXAMPLES / "digit_3.json").read_text())["data"]
    arr = np.asarray(data, np.float32).reshape(1, 8, 8)  # one row: the batch dim is explicit
    r = client.post(
        "/v2/models/digits/infer",
        json={
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": list(arr.shape),
                    "data": arr.ravel().tolist(),
                }
            ]
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [1, 10]
    assert int(np.argmax(out["data"])) == 3


@pytest.mark.parametrize("binary_out", [False, True])
def test_binary_input(client: httpx.Client, binary_out: bool) -> None:
    x = np.random.default_rng(1).random((4, 5), dtype=np.float32)
    outputs = [{"name": "OUTPUT0", "parameters": {"binary_data": binary_out}}]
    content, headers = binary_body(x, outputs=outputs)
    r = client.post("/v2/models/id/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    if binary_out:
        assert r.headers["content-type"] == "application/octet-stream"
        n = int(r.headers["inference-header-content-length"])
        head = json.loads(r.content[:n])
        entry = head["outputs"][0]
        assert entry["parameters"]["binary_data_size"] == x.nbytes
        assert "data" not in entry
        got = np.frombuffer(r.content[n:], np.float32).reshape(entry["shape"])
    else:
        assert "inference-header-content-length" not in r.headers
        entry = r.json()["outputs"][0]
        got = np.asarray(entry["data"], np.float32).reshape(entry["shape"])
    np.testing.assert_array_equal(got, x)


def test_binary_output_for_json_input_via_request_parameter(client: httpx.Client) -> None:
    r = client.post(
        "/v2/models/id/infer",
        json={
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [7, 8]}],
            "parameters": {"binary_data_output": True},
        },
    )
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    assert np.frombuffer(r.content[n:], np.float32).tolist() == [7, 8]


def test_gzip_request_body(client: httpx.Client) -> None:
    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    r = client.post(
        "/v2/models/id/infer",
        content=gzip.compress(json.dumps(doc).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1, 2]


# -- every refusal, then a good request -------------------------------------------------


def _t(**kw: object) -> dict:
    return {"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3], **kw}


JSON_ERRORS = [
    ("malformed", b'{"inputs": [', 400, "malformed JSON"),
    ("not-object", [1, 2, 3], 400, "JSON object"),
    ("no-inputs", {"id": "x"}, 400, '"inputs"'),
    ("inputs-not-list", {"inputs": {"name": "INPUT0"}}, 400, "must be a list"),
    ("zero-inputs", {"inputs": []}, 400, "exactly 1 input"),
    ("two-inputs", {"inputs": [_t(), _t()]}, 400, "exactly 1 input"),
    ("unknown-input", {"inputs": [_t(name="IMAGE")]}, 400, "unknown input 'IMAGE'"),
    ("bad-datatype", {"inputs": [_t(datatype="FLOAT")]}, 400, "invalid datatype 'FLOAT'"),
    ("datatype-mismatch", {"inputs": [_t(datatype="INT64")]}, 400, "INT64 does not match"),
    ("bytes-to-fp32", {"inputs": [_t(datatype="BYTES", data=["a", "b", "c"])]}, 400,
     "BYTES does not match"),
    ("count-vs-shape", {"inputs": [_t(shape=[2, 3])]}, 400, "3 elements; shape [2, 3] needs 6"),
    ("wrong-rank", {"inputs": [_t(shape=[3])]}, 400, "rank"),
    ("batch-over-max", {"inputs": [_t(shape=[33, 1], data=[0] * 33)]}, 400,
     "exceeds max_batch_size 32"),
    ("unknown-output", {"inputs": [_t()], "outputs": [{"name": "PROBS"}]}, 400,
     "unknown output 'PROBS'"),
    ("nan", {"inputs": [_t(data=[1, "NaN", 3])]}, 400, "numbers"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "doc", "status", "words"), JSON_ERRORS, ids=[c[0] for c in JSON_ERRORS]
)
def test_json_refusals(
    client: httpx.Client, case: str, doc: object, status: int, words: str
) -> None:
    content = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    r = client.post(
        "/v2/models/id/infer", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert r.headers["x-request-id"]
    good_json(client)


LONE_SURROGATE = b'"\\ud800"'  # a JSON string escape no UTF-8 encoder takes back


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/text/infer", b'{"inputs":[{"name":"INPUT0","datatype":"BYTES",'
         b'"shape":[1,1],"data":[' + LONE_SURROGATE + b"]}]}"),
        ("/v2/models/id/infer", b'{"id":' + LONE_SURROGATE + b',"inputs":[{"name":"INPUT0",'
         b'"datatype":"FP32","shape":[1,1],"data":[1]}]}'),
        ("/v1/models/id/predict", b'{"data":[[1]],"request_id":' + LONE_SURROGATE + b"}"),
        # The same as raw bytes (not UTF-8: a surrogate has no UTF-8 form).
        ("/v2/models/id/infer", b'{"id":"\xed\xa0\x80","inputs":[{"name":"INPUT0",'
         b'"datatype":"FP32","shape":[1,1],"data":[1]}]}'),
    ],
    ids=["bytes-data", "v2-id", "v1-request-id", "v2-id-raw-bytes"],
)  # fmt: skip
def test_a_lone_surrogate_in_a_json_string_is_400(
    client: httpx.Client, path: str, body: bytes
) -> None:
    """orjson refuses it, the standard parser (its fallback, for NaN literals) takes it as
    a str nothing can encode: that failed later as a 500 (a v2 id: after inference)."""
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert re.search("lone UTF-16 surrogate|not UTF-8", r.json()["error"])
    good_json(client)


NOT_INFER = [
    "/health", "/readiness", "/v1/models", "/metrics", "/v2", "/v2/health/live",
    "/v2/health/ready", "/v2/models/id", "/v2/models/id/ready", "/v2/models/id/config",
    "/v2/models/stats", "/v2/models/nope", "/nope",
]  # fmt: skip


@pytest.mark.parametrize("path", NOT_INFER)
def test_any_request_id_header_is_echoed_on_every_route(client: httpx.Client, path: str) -> None:
    """Starlette's responses encode headers as latin-1: a client's '€' in X-Request-ID made
    each of these routes, the health checks among them, a text 500. It comes back
    percent-encoded, as on the inference routes."""
    for sent, echoed in (("€uro".encode(), "%E2%82%ACuro"), (b"\xff\xfe", "%EF%BF%BD%EF%BF%BD")):
        r = client.get(path, headers={"X-Request-ID": sent})
        assert r.status_code in (200, 404), (r.status_code, r.text)
        assert r.headers["x-request-id"] == echoed
        if r.status_code == 404:
            assert r.headers["content-type"] == "application/json" and r.json()["error"]


def test_digits_fixed_dims(client: httpx.Client) -> None:
    for shape, words in (([1, 8, 9], "does not match the model's [-1, 8, 8]"), ([1, 64], "rank")):
        r = client.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "FP32",
                        "shape": shape,
                        "data": [0.0] * int(np.prod(shape)),
                    }
                ]
            },
        )
        assert r.status_code == 400
        assert words in r.json()["error"]
        good_json(client)


def binary_output(r: httpx.Response) -> np.ndarray:
    """The one FP32 output of a binary answer."""
    n = int(r.headers["inference-header-content-length"])
    shape = json.loads(r.content[:n])["outputs"][0]["shape"]
    return np.frombuffer(r.content[n:], np.float32).reshape(shape)


def test_binary_nan_is_taken_and_runs_alone(server: Server) -> None:
    """As Triton does (perf_analyzer's random inputs hold NaN and Inf), binary NaN is
    served, in a batch of its own: MixesRows subtracts the batch mean, so a NaN batched
    with others would turn their answers into NaN too. Three requests queue behind a
    slow one and are claimed together; the two finite ones share a batch, the NaN one
    does not. (The worker is frozen in the slow batch until all three have queued, not
    given 0.1 s to claim it and 0.3 s for the three to queue: a loaded host may not.)"""
    status = server.ctl("status")
    [pid] = [p["pid"] for p in status["processes"] if p["model"] == "mix"]
    mix = [m["name"] for m in status["models"]].index("mix")
    arena = Arena.attach(status["server"]["arena"])
    ring = RequestRing(arena, mix)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:

            def send(row: list[float]) -> Awaitable[httpx.Response]:
                out = [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
                content, headers = binary_body(np.array([row], np.float32), outputs=out)
                return c.post("/v2/models/mix/infer", content=content, headers=headers)

            slow = asyncio.ensure_future(send([200.0, 0.0]))
            await asyncio.to_thread(
                wait_until,
                lambda: frozen_mid_batch_outside_the_lock(arena, ring, pid),
                20,
                "the slow batch, frozen",
            )
            try:
                rest = asyncio.gather(send([1.0, 2.0]), send([np.nan, 5.0]), send([3.0, 4.0]))
                await asyncio.to_thread(
                    wait_until, lambda: ring.depth() == 3, 20, "the three queued"
                )
            finally:
                os.kill(pid, signal.SIGCONT)
            return [await slow, *await rest]

    try:
        slow, first, nan, last = asyncio.run(run())
    finally:
        ring.close()
        arena.close()
    for r in (slow, first, nan, last):
        assert r.status_code == 200, r.text
    got = [binary_output(r) for r in (first, nan, last)]
    assert got[0].tolist() == [[-1.0, -1.0]] and got[2].tolist() == [[1.0, 1.0]], got
    assert np.isnan(got[1][0, 0]) and got[1][0, 1] == 0.0, got
    # JSON keeps the house rule: test_faults_hostile.py::test_nan_and_inf_refused_while...


BINARY_ERRORS = [
    ("truncated", dict(tail=bytes(20)), None, "truncated"),
    ("size-vs-shape", dict(size=12, tail=bytes(12)), None,
     "binary_data_size 12 does not match shape [2, 4] x 4 bytes = 32"),
    ("unclaimed-tail", dict(tail=bytes(40)), None, "8 bytes after the JSON header"),
    ("header-not-number", {}, "twelve", "non-negative decimal integer"),
    ("header-plus-sign", {}, "+10", "non-negative decimal integer"),
    ("header-too-long", {}, "100000", "larger than the body"),
    ("header-negative", {}, "-5", "non-negative decimal integer"),
    ("header-cuts-json", {}, "10", "malformed JSON"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "kw", "header", "words"), BINARY_ERRORS, ids=[c[0] for c in BINARY_ERRORS]
)
def test_binary_refusals(
    client: httpx.Client, case: str, kw: dict, header: str | None, words: str
) -> None:
    x = np.ones((2, 4), np.float32)
    content, headers = binary_body(x, **kw)
    if header is not None:
        headers["Inference-Header-Content-Length"] = header
    r = client.post("/v2/models/id/infer", content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    good_json(client)


def _binary_answer(r: httpx.Response) -> tuple[dict, bytes]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n])["outputs"][0], r.content[n:]


def test_raw_binary_request(client: httpx.Client) -> None:
    """Triton's raw binary request (header length 0): the body is one row of the one
    input, its variable dimension from the size; the answer is binary. An image model
    also takes one encoded image this way."""
    raw_headers = {"Inference-Header-Content-Length": "0"}
    x = np.arange(5, dtype=np.float32)
    r = client.post("/v2/models/id/infer", content=x.tobytes(), headers=raw_headers)
    entry, data = _binary_answer(r)
    assert entry["shape"] == [1, 5] and entry["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(np.frombuffer(data, np.float32), x)
    r = client.post("/v2/models/digits/infer", content=PNGS["7"], headers=raw_headers)
    entry, data = _binary_answer(r)
    assert entry["shape"] == [1, 10] and int(np.frombuffer(data, np.float32).argmax()) == 7
    for model, body, words in [
        ("id", bytes(6), "not a whole number of 4-byte steps"),
        ("digits", bytes(12), "does not match shape [8, 8]"),
        # An image model: the body is not its other form either, and the error says so.
        ("digits", bytes(12), "nor is it a JPEG, PNG, GIF or WebP image"),
        ("text", b"hello", "BYTES input of shape [1]"),
        ("id", b"", "the body is empty"),
        # An image exactly the tensor's 256 bytes: either reading could be meant. Read as
        # the tensor it was 64 floats of PNG and answered "2" with a 200.
        ("digits", PNGS["7"].ljust(8 * 8 * 4, b"\0"), "ambiguous"),
    ]:
        r = client.post(f"/v2/models/{model}/infer", content=body, headers=raw_headers)
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]
        good_json(client)


def test_binary_bytes_input_to_fp32_model(client: httpx.Client) -> None:
    raw = b"\x01\x00\x00\x00a\x01\x00\x00\x00b"
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    r = client.post(
        "/v2/models/id/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400
    assert "BYTES does not match the model's FP32" in r.json()["error"]
    good_json(client)


def test_content_type_and_encoding_refusals(client: httpx.Client) -> None:
    doc = json.dumps({"inputs": [_t()]}).encode()
    r = client.post("/v2/models/id/infer", content=doc, headers={"Content-Type": "image/png"})
    assert r.status_code == 415
    good_json(client)
    r = client.post("/v2/models/id/infer", content=doc, headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    # RFC 7694 (and Triton): the refusal names the codings that would be taken
    assert r.headers["Accept-Encoding"] == "gzip, deflate"
    good_json(client)
    r = client.post("/v2/models/id/infer", content=b"junk", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    good_json(client)
    bomb = gzip.compress(bytes(MAX_BODY * 4))
    r = client.post("/v2/models/id/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    good_json(client)
    # no Content-Type at all is fine
    r = client.post("/v2/models/id/infer", content=doc, headers={"Content-Type": ""})
    assert r.status_code == 200, r.text


def test_body_over_the_limit_is_413(server: Server) -> None:
    x = np.zeros((1, MAX_BODY // 4 + 16), np.float32)
    content, headers = binary_body(x)
    with server.client() as c:  # its own connection: the server may close it after a 413
        r = c.post("/v2/models/id/infer", content=content, headers=headers)
        assert r.status_code == 413
        assert "limit" in r.json()["error"]
    with server.client() as c:
        good_json(c)
        assert c.get("/v2/health/ready").status_code == 200


def test_drain_and_pause_make_ready_and_infer_503(server: Server, client: httpx.Client) -> None:
    for command in ("drain", "pause"):
        server.ctl(*((command, "server") if command == "drain" else (command,)))
        try:
            r = client.get("/v2/health/ready")
            assert r.status_code == 503, command
            assert "error" in r.json()
            r = client.post("/v2/models/id/infer", json={"inputs": [_t()]})
            assert r.status_code == 503, command
            assert "retry-after" in r.headers
            # Model readiness says what inference does (it said ready: a client gating
            # on is_model_ready() went on to a 503).
            assert client.get("/v2/models/id/ready").status_code == 503, command
            index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
            assert index["id"]["state"] == "UNAVAILABLE", command
            assert client.get("/v2/health/live").status_code == 200
        finally:
            server.ctl("resume")
        assert client.get("/v2/health/ready").status_code == 200
        good_json(client)


def test_model_without_a_ready_worker_is_503(start_server: Callable[..., Server]) -> None:
    server = start_server("--model", "id=identity", frontends=1)
    with server.client() as c:
        assert c.get("/v2/models/id/ready").status_code == 200
        server.ctl("drain", "worker-0")  # retired: no replacement
        wait_until(lambda: c.get("/v2/models/id/ready").status_code == 503, 30, "model unready")
        r = c.get("/v2/models/id/ready")
        assert r.headers["retry-after"]
        assert "has no workers: its last one was drained" in r.json()["error"]
        r = c.post("/v2/models/id/infer", json={"inputs": [_t()]})
        assert r.status_code == 503
        assert r.headers["retry-after"]
        assert c.get("/v2/health/ready").status_code == 503
        # metadata is still known from what the worker published
        assert c.get("/v2/models/id").json()["inputs"][0]["name"] == "INPUT0"
        [entry] = c.post("/v2/repository/index").json()
        assert (entry["name"], entry["version"], entry["state"]) == ("id", "1", "UNAVAILABLE")
        assert "last worker drained" in entry["reason"]  # its only worker was retired
        assert c.post("/v2/repository/index", json={"ready": True}).json() == []


@pytest.mark.parametrize(
    ("loaded", "availability", "accepting", "expected"),
    [
        (False, "LOADING", False, "LOADING"),
        (False, "FAILING", False, "UNAVAILABLE"),
        (True, "SERVING", True, "READY"),
        (True, "RECOVERING", True, "READY"),  # queued while a worker is replaced, as /ready
        (True, "FAILING", False, "UNAVAILABLE"),
        (True, "LOADING", False, "UNAVAILABLE"),  # the supervisor's tick lags a death
    ],
)
def test_repository_state_follows_what_the_supervisor_publishes(
    loaded: bool, availability: str, accepting: bool, expected: str
) -> None:
    from types import SimpleNamespace

    from ringserve.frontend.catalog import Catalog
    from ringserve.frontend.v2 import _repository_state
    from ringserve.ipc.layout import ModelAvailability

    info = SimpleNamespace(index=0, spec={"inputs": []} if loaded else None)
    catalog = Catalog.__new__(Catalog)  # the real readiness rule over a stubbed arena
    catalog.accepting = lambda i: accepting  # type: ignore[method-assign]
    catalog.availability = lambda i: ModelAvailability[availability]  # type: ignore[method-assign]
    catalog.last_error = lambda i: "OSError: no such file"  # type: ignore[method-assign]
    catalog.workers = lambda i: 1  # type: ignore[method-assign]
    state = SimpleNamespace(catalog=catalog, arena=SimpleNamespace(draining=0, paused=0))
    got, reason = _repository_state(state, info)  # type: ignore[arg-type]
    assert got == expected
    assert bool(reason) == (expected != "READY")
    assert ("OSError: no such file" in reason) == (availability == "FAILING")


def test_repository_index(client: httpx.Client) -> None:
    models = ["desc", "digits", "id", "mix", "text"]
    for body in ({}, {"ready": False}, {"ready": True}, None):
        r = client.post("/v2/repository/index", json=body)
        assert r.status_code == 200, r.text
        assert sorted(m["name"] for m in r.json()) == models
        assert {(m["version"], m["state"], m["reason"]) for m in r.json()} == {("1", "READY", "")}
    for bad, words in (([1], "JSON object"), ({"ready": "yes"}, '"ready"')):
        r = client.post("/v2/repository/index", json=bad)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    assert client.post("/v2/repository/index", content=b"{").status_code == 400
    # Without --allow-model-control, no load or unload over HTTP.
    for action in ("load", "unload"):
        r = client.post(f"/v2/repository/models/id/{action}")
        assert r.status_code == 400 and "--allow-model-control" in r.json()["error"], r.text
        assert client.post(f"/v2/repository/models/nope/{action}").status_code == 404
    good_json(client)


# -- BYTES input ---------------------------------------------------------------------------


def _bytes_binary(shape: list[int], raw: bytes) -> tuple[bytes, dict]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _prefixed(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def test_bytes_input_json_and_binary(client: httpx.Client) -> None:
    md = client.get("/v2/models/text").json()
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1, -1]}]
    cfg = client.get("/v2/models/text/config").json()
    assert cfg["input"][0]["data_type"] == "TYPE_STRING"

    doc = {"inputs": [_t(datatype="BYTES", shape=[2, 2], data=["a", "bcd", "", "h\u00e9llo"])]}
    r = client.post("/v2/models/text/infer", json=doc)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (out["datatype"], out["shape"], out["data"]) == ("FP32", [2, 2], [1, 3, 0, 6])

    # Binary: the bytes reach the handler as sent (a NUL, an empty one, non-UTF-8).
    body, headers = _bytes_binary([1, 4], _prefixed(b"\x00", b"", b"\xff\xfe", b"xyz"))
    r = client.post("/v2/models/text/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1, 0, -1, 3]


def test_images_as_bytes_to_an_image_model(client: httpx.Client) -> None:
    """Encoded images as a BYTES tensor, one per row, to a model declared FP32 that takes
    images: each row answers as the same image does through ``/v1/.../predict``."""
    body, headers = _bytes_binary([3], _prefixed(PNGS["3"], PNGS["7"], PNGS["0"]))
    r = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [3, 10]
    rows = np.asarray(out["data"], np.float32).reshape(3, 10)
    assert rows.argmax(axis=1).tolist() == [3, 7, 0]
    one = client.post(
        "/v1/models/digits/predict", content=PNGS["7"], headers={"Content-Type": "image/png"}
    )
    assert one.status_code == 200, one.text
    assert one.json()["result"]["label"] == "7"
    assert one.json()["result"]["score"] == pytest.approx(float(rows[1].max()), rel=1e-5)
    body, headers = _bytes_binary([1, 1], _prefixed(PNGS["3"]))  # [rows, 1] as well
    r = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert int(np.argmax(r.json()["outputs"][0]["data"])) == 3


def test_classification_json(client: httpx.Client) -> None:
    """The classification extension over plain JSON: BYTES strings, highest first; a
    BYTES output has nothing to rank (400) and the server goes on."""
    cls = [{"name": "OUTPUT0", "parameters": {"classification": 2}}]
    doc = {"inputs": [_t(shape=[2, 3], data=[1, 9, 5, 7, 3, 8])], "outputs": cls}
    r = client.post("/v2/models/id/infer", json=doc)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 2])
    assert out["data"] == ["9.000000:1", "5.000000:2", "8.000000:2", "7.000000:0"]
    r = client.post("/v2/models/desc/infer", json={"inputs": [_t()], "outputs": cls})
    assert r.status_code == 400 and "has no classes to rank" in r.json()["error"]
    good_json(client)


IMAGE_ERRORS = [
    (
        "not-an-image",
        b"hello world",
        400,
        "row 1: the element is not a JPEG, PNG, GIF or WebP image",
    ),
    (
        "declared-bomb",
        PNGS["3"][:16] + (100000).to_bytes(4, "big") * 2 + PNGS["3"][24:],
        413,
        "row 1: png declares 100000x100000 pixels",
    ),
    ("corrupt", PNGS["3"][:40] + b"\0" * 40, 400, "row 1: could not decode image"),
]


@pytest.mark.parametrize(
    ("case", "bad", "status", "words"), IMAGE_ERRORS, ids=[c[0] for c in IMAGE_ERRORS]
)
def test_images_as_bytes_refusals(
    client: httpx.Client, case: str, bad: bytes, status: int, words: str
) -> None:
    """A bad image in row 1 fails the request, naming the row: the header checks in the
    frontend, the decode in the worker; the server answers the next request."""
    body, headers = _bytes_binary([2], _prefixed(PNGS["3"], bad))
    r = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    good_json(client)
    body, headers = _bytes_binary([1], _prefixed(PNGS["7"]))
    r = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200 and int(np.argmax(r.json()["outputs"][0]["data"])) == 7


BYTES_ERRORS = [
    ("truncated-length", [1, 2], _prefixed(b"ab") + b"\x01\x00", "truncated"),
    ("runs-past-end", [1, 1], b"\x09\x00\x00\x00abc", "runs past the end"),
    ("too-few", [1, 3], _prefixed(b"a", b"b"), "holds 2 elements; its shape needs 3"),
    ("too-many", [1, 1], _prefixed(b"a", b"b"), "more than the 1 elements"),
]


@pytest.mark.parametrize(
    ("case", "shape", "raw", "words"), BYTES_ERRORS, ids=[c[0] for c in BYTES_ERRORS]
)
def test_bytes_input_refusals(
    client: httpx.Client, case: str, shape: list[int], raw: bytes, words: str
) -> None:
    body, headers = _bytes_binary(shape, raw)
    r = client.post("/v2/models/text/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    good_json(client)


def test_bytes_input_json_refusals(client: httpx.Client) -> None:
    r = client.post(
        "/v2/models/text/infer", json={"inputs": [_t(datatype="BYTES", shape=[1, 1], data=[7])]}
    )
    assert r.status_code == 400 and "must hold strings" in r.json()["error"]
    r = client.post(
        "/v2/models/text/infer", json={"inputs": [_t(datatype="FP32", shape=[1, 1], data=[7])]}
    )
    assert r.status_code == 400 and "does not match the model's BYTES" in r.json()["error"]
    good_json(client)
    r = client.post(
        "/v2/models/text/infer",
        json={"inputs": [_t(datatype="BYTES", shape=[1, 1], data=["ok"])]},
    )
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2]


def test_bytes_input_on_the_simple_api(client: httpx.Client) -> None:
    """The same model through ``/v1/models/{name}/predict``: JSON strings, one row or a
    batch; numbers for a BYTES input are a 422, not a 500."""
    r = client.post("/v1/models/text/predict", json={"data": ["ab", "c", "h\u00e9"]})
    assert r.status_code == 200, r.text
    assert r.json()["result"] == [2, 1, 3]
    r = client.post("/v1/models/text/predict", json={"data": [["ab"], ["xyz"]]})
    assert r.status_code == 200 and r.json()["result"] == [[2], [3]], r.text
    for bad in ([1, 2], [["a", "b"], ["c"]], {"a": 1}):
        r = client.post("/v1/models/text/predict", json={"data": bad})
        assert r.status_code == 422 and "string" in r.json()["error"], (bad, r.text)
    good_json(client)


# -- BYTES output ---------------------------------------------------------------------------


def test_bytes_output_json_binary_and_simple_api(client: httpx.Client) -> None:
    md = client.get("/v2/models/desc").json()
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1, 1]}]
    doc = {"inputs": [_t(shape=[2, 2], data=[1, 2.5, 3, 4])]}
    r = client.post("/v2/models/desc/infer", json=doc)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (out["datatype"], out["shape"], out["data"]) == ("BYTES", [2, 1], ["1,2.5", "3,4"])

    # Binary output: Triton's length-prefixed form after the JSON header.
    r = client.post(
        "/v2/models/desc/infer", json={**doc, "parameters": {"binary_data_output": True}}
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    entry = json.loads(r.content[:n])["outputs"][0]
    assert entry["parameters"]["binary_data_size"] == len(r.content) - n
    assert r.content[n:] == b"\x05\x00\x00\x001,2.5\x03\x00\x00\x003,4"

    r = client.post("/v1/models/desc/predict", json={"data": [1, 2.5]})
    assert r.status_code == 200 and r.json()["result"] == ["1,2.5"], r.text
    r = client.post("/v1/models/desc/predict", json={"data": [[1], [2]]})
    assert r.status_code == 200 and r.json()["result"] == [["1"], ["2"]], r.text


def test_bytes_output_refusals(client: httpx.Client) -> None:
    """Not UTF-8: JSON cannot carry it (500 saying so), binary can; an element that is
    neither bytes nor str fails that request alone (500 naming its type)."""
    not_utf8 = {"inputs": [_t(shape=[1, 1], data=[-1])]}
    r = client.post("/v2/models/desc/infer", json=not_utf8)
    assert r.status_code == 500 and "not UTF-8" in r.json()["error"], r.text
    r = client.post("/v1/models/desc/predict", json={"data": [-1]})
    assert r.status_code == 500 and "not UTF-8" in r.json()["error"], r.text
    r = client.post(
        "/v2/models/desc/infer", json={**not_utf8, "parameters": {"binary_data_output": True}}
    )
    n = int(r.headers["inference-header-content-length"])
    assert r.status_code == 200 and r.content[n:] == b"\x01\x00\x00\x00\xff"
    r = client.post("/v2/models/desc/infer", json={"inputs": [_t(shape=[1, 1], data=[13])]})
    assert r.status_code == 500 and "must be bytes or str, not int" in r.json()["error"], r.text
    r = client.post("/v2/models/desc/infer", json={"inputs": [_t(shape=[1, 1], data=[7])]})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["7"]
    good_json(client)


def test_config_never_prefers_more_rows_than_max_batch_size(start_server) -> None:
    """max_batch_size in the config is the rows one request may carry: fewer than the
    batcher joins when a slot holds fewer (digits rows in 4 KiB slots: 16). Triton
    refuses a config whose preferred size exceeds it, and tools that read the config
    (perf_analyzer, model analyzer) take it as invalid: the preferred size is then left
    out, not advertised as 32 against 16."""
    server = start_server(
        *("--model", "digits=digits", "--set", "arena.slot_bytes=4096"),
        *("--set", "models.digits.batching.preferred_batch_size=32"),
        frontends=1,
    )
    config = httpx.get(f"{server.url}/v2/models/digits/config").json()
    assert config["max_batch_size"] == 16, config
    assert config["dynamic_batching"]["preferred_batch_size"] == [], config
    assert server.stop() == 0
