"""A model that declares several outputs, served for real: every output of every request
comes back, each its own request's rows even inside a batch, on /predict and the v2
protocol (JSON and binary, all outputs or those asked for); a handler that answers
other outputs than it declares fails its requests with a 500 naming them, and only
those."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import Server
from test_e2e_core import HANDLER_ENV, fire

pytestmark = pytest.mark.e2e

MODEL = "python:support.fake_handlers:SeveralOutputs"


def serving(start_server, model: str) -> Server:
    """A server of ``model`` (``name=handler``) that waits up to 20 ms to fill a batch,
    so a burst of requests shares batches."""
    return start_server(
        *("--model", model), *("--max-queue-delay-ms", "20"), env=HANDLER_ENV, frontends=1
    )


@pytest.fixture
def server(start_server) -> Server:
    return serving(start_server, f"multi={MODEL}")


def expected(rows: list[list[float]]) -> dict[str, list]:
    totals = [int(sum(r)) for r in rows]
    return {
        "DOUBLED": [[2 * v for v in r] for r in rows],
        "TOTAL": [[t] for t in totals],
        "SIGN": [["neg" if t < 0 else "pos" if t > 0 else "zero"] for t in totals],
    }


def test_predict_answers_every_output_by_name_each_request_its_own_rows(server: Server) -> None:
    """32 requests at once, so batches hold several: each answer is its own rows'."""
    inputs = [[[float(i), float(-2 * i)], [float(i), 1.0]] for i in range(32)]
    path = "/v1/models/multi/predict"
    responses = fire(server.url, [(path, {"json": {"data": x}}) for x in inputs], concurrency=16)
    batched = 0
    for r, x in zip(responses, inputs, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["result"] == expected(x)
        batched += r.json()["batch_size"] > 2
    assert batched, "no batch held two requests: the per-request slicing went untested"
    with server.client() as c:
        models = c.get("/v1/models").json()["models"]
        [multi] = [m for m in models if m["name"] == "multi"]
        assert [o["name"] for o in multi["outputs"]] == ["DOUBLED", "TOTAL", "SIGN"]
    assert server.stop() == 0


def test_v2_answers_all_outputs_or_those_asked_for(server: Server) -> None:
    x = [[1.0, 2.0], [-5.0, 1.0]]
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": x}]}
    with server.client() as c:
        r = c.post("/v2/models/multi/infer", json=body)
        assert r.status_code == 200, r.text
        outs = r.json()["outputs"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in outs] == [
            ("DOUBLED", "FP32", [2, 2]),
            ("TOTAL", "INT64", [2, 1]),
            ("SIGN", "BYTES", [2, 1]),
        ]
        want = expected(x)
        for o in outs:
            assert o["data"] == [v for row in want[o["name"]] for v in row], o

        # Two of three, in the order asked, one binary and one JSON.
        asked = dict(
            body,
            outputs=[
                {"name": "SIGN", "parameters": {"binary_data": True}},
                {"name": "TOTAL"},
            ],
        )
        r = c.post("/v2/models/multi/infer", json=asked)
        assert r.status_code == 200, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        head = json.loads(r.content[:n])
        assert [o["name"] for o in head["outputs"]] == ["SIGN", "TOTAL"]
        sign, total = head["outputs"]
        assert total["data"] == [3, -4]
        raw = r.content[n:]
        assert sign["parameters"]["binary_data_size"] == len(raw)
        assert raw == b"\x03\x00\x00\x00pos\x03\x00\x00\x00neg"

        # All binary: the outputs' bytes follow the header in the entries' order.
        r = c.post(
            "/v2/models/multi/infer", json=dict(body, parameters={"binary_data_output": True})
        )
        n = int(r.headers["Inference-Header-Content-Length"])
        sizes = [o["parameters"]["binary_data_size"] for o in json.loads(r.content[:n])["outputs"]]
        raw = r.content[n:]
        doubled = np.frombuffer(raw[: sizes[0]], np.float32).reshape(2, 2)
        totals = np.frombuffer(raw[sizes[0] : sizes[0] + sizes[1]], np.int64)
        assert doubled.tolist() == want["DOUBLED"] and totals.tolist() == [3, -4]

        r = c.post("/v2/models/multi/infer", json=dict(body, outputs=[{"name": "SCORES"}]))
        assert r.status_code == 400 and "'DOUBLED', 'TOTAL', 'SIGN'" in r.json()["error"], r.text

        meta = c.get("/v2/models/multi").json()
        assert [o["name"] for o in meta["outputs"]] == ["DOUBLED", "TOTAL", "SIGN"]
        config = c.get("/v2/models/multi/config").json()
        assert [o["name"] for o in config["output"]] == ["DOUBLED", "TOTAL", "SIGN"]
    assert server.stop() == 0


def test_other_outputs_than_declared_fail_only_their_own_requests(server: Server) -> None:
    """A row starting 99 makes the handler leave TOTAL out, 98 add an output it never
    declared: in a batch with good requests, those two fail with a 500 naming what is
    wrong; the others are answered, and the worker is never restarted."""
    inputs = [[[float(i), 1.0]] for i in range(24)]
    inputs[5] = [[99.0, 1.0]]
    inputs[17] = [[98.0, 1.0]]
    path = "/v1/models/multi/predict"
    responses = fire(server.url, [(path, {"json": {"data": x}}) for x in inputs], concurrency=12)
    for i, (r, x) in enumerate(zip(responses, inputs, strict=True)):
        if i == 5:
            assert r.status_code == 500, r.text
            assert "not the declared DOUBLED, TOTAL, SIGN: missing TOTAL" in r.json()["error"]
        elif i == 17:
            assert r.status_code == 500, r.text
            assert "undeclared EXTRA" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            assert r.json()["result"] == expected(x)
    [worker] = [p for p in server.children() if p["role"] == "worker"]
    assert worker["restarts"] == 0, worker
    assert "breaks the handler contract: postprocess returned outputs" in server.log()
    assert server.stop() == 0
