"""A model that declares several inputs (token ids and an attention mask), served for
real: each request's inputs reach ``infer`` together, batched with other requests of
the same row shape, on /predict and v2 (JSON, binary, in any order); requests whose
inputs are missing or disagree are refused with a 4xx naming why, and one whose inputs
the model cannot combine fails alone."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import Server
from test_e2e_core import HANDLER_ENV, fire
from test_several_outputs import serving

pytestmark = pytest.mark.e2e

MODEL = "python:support.fake_handlers:MaskedSum"


@pytest.fixture
def server(start_server) -> Server:
    return serving(start_server, f"text={MODEL}")


def post_binary(
    client: httpx.Client,
    path: str,
    inputs: list[tuple[str, str, list[int], bytes]],
    outputs: list[dict] | None = None,
) -> httpx.Response:
    """A v2 request whose ``inputs`` (name, datatype, shape, bytes) all travel as binary
    data after the JSON header, in the order given."""
    entries = [
        {"name": n, "datatype": d, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
        for n, d, shape, raw in inputs
    ]
    doc: dict = {"inputs": entries} if outputs is None else {"inputs": entries, "outputs": outputs}
    head = json.dumps(doc).encode()
    return client.post(
        path,
        content=b"".join([head, *(raw for *_, raw in inputs)]),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def masked(ids: list[list[int]], mask: list[list[int]]) -> dict[str, list]:
    sums = [sum(i * m for i, m in zip(r, k, strict=True)) for r, k in zip(ids, mask, strict=True)]
    return {"SUM": [[s] for s in sums], "KEPT": [[sum(k)] for k in mask]}


def test_predict_batches_each_requests_inputs_together(server: Server) -> None:
    """48 requests at once, of two sequence lengths: batches form of each length and
    every answer is its own ids and mask's."""
    cases = []
    for i in range(48):
        width = 3 if i % 2 else 5
        ids = [[i + j for j in range(width)], [7] * width]
        mask = [[1 if (i + j) % 3 else 0 for j in range(width)], [1] * width]
        cases.append((ids, mask))
    path = "/v1/models/text/predict"
    requests = [(path, {"json": {"data": {"MASK": m, "IDS": x}}}) for x, m in cases]
    responses = fire(server.url, requests, concurrency=16)
    batched = 0
    for r, (ids, mask) in zip(responses, cases, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["result"] == masked(ids, mask)
        batched += r.json()["batch_size"] > 2
    assert batched, "no batch held two requests: the inputs were never batched"
    with server.client() as c:
        one = c.post(path, json={"data": {"IDS": [1, 2, 3], "MASK": [1, 0, 1]}})
        assert one.status_code == 200 and one.json()["result"] == {"SUM": [4], "KEPT": [2]}
    assert "not writable" not in server.log()  # the worker's views of a set are writable
    assert server.stop() == 0


def test_v2_takes_the_inputs_in_any_order_json_or_binary(server: Server) -> None:
    ids, mask = [[5, 6, 7], [1, 1, 1]], [[1, 1, 0], [0, 0, 1]]
    want = masked(ids, mask)
    with server.client() as c:
        body = {
            "inputs": [
                {"name": "MASK", "datatype": "INT64", "shape": [2, 3], "data": mask},
                {"name": "IDS", "datatype": "INT64", "shape": [2, 3], "data": ids},
            ]
        }
        r = c.post("/v2/models/text/infer", json=body)
        assert r.status_code == 200, r.text
        got = {o["name"]: o["data"] for o in r.json()["outputs"]}
        assert got == {"SUM": [11, 1], "KEPT": [2, 1]}
        assert want == {"SUM": [[11], [1]], "KEPT": [[2], [1]]}

        # Binary, MASK's bytes first as its entry comes first.
        raw_mask, raw_ids = (np.array(a, np.int64).tobytes() for a in (mask, ids))
        inputs = [("MASK", "INT64", [2, 3], raw_mask), ("IDS", "INT64", [2, 3], raw_ids)]
        asked = [{"name": "SUM", "parameters": {"binary_data": True}}]
        r = post_binary(c, "/v2/models/text/infer", inputs, asked)
        assert r.status_code == 200, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        assert [o["name"] for o in json.loads(r.content[:n])["outputs"]] == ["SUM"]
        assert np.frombuffer(r.content[n:], np.int64).tolist() == [11, 1]

        meta = c.get("/v2/models/text").json()
        assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [
            ("IDS", [-1, -1]),
            ("MASK", [-1, -1]),
        ]
    assert server.stop() == 0


def test_inputs_missing_or_in_disagreement_are_refused_and_the_server_stays_healthy(
    server: Server,
) -> None:
    v2 = "/v2/models/text/infer"
    ids = {"name": "IDS", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}
    mask2 = {"name": "MASK", "datatype": "INT64", "shape": [2, 3], "data": [1] * 6}
    refusals = [
        (v2, {"inputs": [ids]}, 400, "missing 'MASK'"),
        (v2, {"inputs": [ids, mask2]}, 400, "'IDS' has 1 rows, 'MASK' has 2"),
        ("/v1/models/text/predict", {"data": {"IDS": [1, 2]}}, 422, "inputs IDS, MASK"),
        (
            "/v1/models/text/predict",
            {"data": {"IDS": [[1, 2]], "MASK": [[1, 1], [0, 1]]}},
            422,
            "disagree on their rows",
        ),
    ]
    with server.client() as c:
        for path, body, status, why in refusals:
            r = c.post(path, json=body)
            assert r.status_code == status and why in r.json()["error"], (body, r.text)
    # Same rows, but lengths the model cannot multiply: a model error, alone in its batch.
    path = "/v1/models/text/predict"
    bodies = [{"data": {"IDS": [i, 1, 1], "MASK": [1, 1, 1]}} for i in range(12)]
    bodies[6] = {"data": {"IDS": [1, 2, 3], "MASK": [1, 1]}}
    responses = fire(server.url, [(path, {"json": b}) for b in bodies], concurrency=12)
    for i, r in enumerate(responses):
        if i == 6:
            assert r.status_code == 500 and "model error" in r.json()["error"], r.text
        else:
            assert r.status_code == 200 and r.json()["result"] == {"SUM": [i + 2], "KEPT": [3]}
    [worker] = [p for p in server.children() if p["role"] == "worker"]
    assert worker["restarts"] == 0, worker
    assert server.stop() == 0


def test_a_bytes_input_beside_a_numeric_one(start_server) -> None:
    """TAG's text travels length-prefixed beside VALUES, on v2 (binary BYTES) and
    /predict (strings), and reaches ``preprocess`` as bytes."""
    server: Server = start_server(
        "--model", "tag=python:support.fake_handlers:ScaledByTag", env=HANDLER_ENV, frontends=1
    )
    tags = [b"ab", b"\xffxyz"]  # not UTF-8: only binary data carries it
    packed = b"".join(len(t).to_bytes(4, "little") + t for t in tags)
    values = np.array([[1, 2], [3, 4]], np.float32).tobytes()
    inputs = [("TAG", "BYTES", [2, 1], packed), ("VALUES", "FP32", [2, 2], values)]
    with server.client() as c:
        r = post_binary(c, "/v2/models/tag/infer", inputs)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [6.0, 28.0]
        r = c.post(
            "/v1/models/tag/predict", json={"data": {"VALUES": [[1, 1]], "TAG": [["héllo"]]}}
        )
        assert r.status_code == 200 and r.json()["result"] == [[12.0]], r.text  # 6 UTF-8 bytes
    assert server.stop() == 0


def test_a_torchscript_archive_of_two_inputs_and_two_outputs_from_a_config_file(
    start_server, tmp_path
) -> None:
    """A Triton user's pytorch_libtorch text model, as its config.pbtxt lists the
    tensors: served from TOML, called with tritonclient-style v2 JSON."""
    from test_handlers import TWO_IN_TWO_OUT, _IdsAndMask, _script

    archive = tmp_path / "text.pt"
    _script(_IdsAndMask().eval(), archive)
    lines = ["[models.text]", f'handler = "torchscript:{archive}"']
    for role in ("inputs", "outputs"):
        for t in TWO_IN_TWO_OUT[role]:
            lines += [f"[[models.text.options.{role}]]", f'name = "{t["name"]}"']
            lines += [f'dtype = "{t["dtype"]}"', f"shape = {t['shape']}"]
    config = tmp_path / "ringserve.toml"
    config.write_text("\n".join(lines) + "\n")
    server: Server = start_server("--config", str(config), frontends=1)
    body = {
        "inputs": [
            {"name": "INPUT__1", "datatype": "INT64", "shape": [1, 3], "data": [1, 0, 1]},
            {"name": "INPUT__0", "datatype": "INT64", "shape": [1, 3], "data": [4, 5, 6]},
        ]
    }
    with server.client() as c:
        r = c.post("/v2/models/text/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: (o["datatype"], o["data"]) for o in r.json()["outputs"]}
        assert outs == {"OUTPUT__0": ("INT64", [10]), "OUTPUT__1": ("FP32", [2.0])}
        config_doc = c.get("/v2/models/text/config").json()
        assert config_doc["platform"] == "pytorch_libtorch"
        assert [i["name"] for i in config_doc["input"]] == ["INPUT__0", "INPUT__1"]
    assert server.stop() == 0


def test_a_worker_killed_writing_a_set_of_outputs_beside_the_inputs_has_it_run_again(
    start_server,
) -> None:
    """Both sets (the request's inputs, the answer's outputs) fit in the slot side by
    side: a worker SIGKILLed between writing the answer and ``state = DONE`` leaves the
    inputs whole, and the replacement answers right."""
    from test_e2e_core import _kill_the_worker_writing_an_answer

    server: Server = start_server(
        *("--model", f"text={MODEL}"),
        env={**HANDLER_ENV, "RINGSERVE_TEST_PAUSE_AT": "answer.written"},
        frontends=1,
    )
    data = {"IDS": [4, 5, 6], "MASK": [1, 1, 0]}
    r, reran = _kill_the_worker_writing_an_answer(server, "/v1/models/text/predict", data)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"SUM": [9], "KEPT": [2]} and len(reran) == 1
    server.wait_ready()
    assert server.stop() == 0


def test_a_worker_killed_writing_a_set_of_outputs_over_the_input_fails_it(start_server) -> None:
    """Outputs too large together to go beside the input (3,200 bytes in, 3,200 doubled
    and the rest out, in 4 KiB slots) go over it: a worker SIGKILLed before DONE leaves
    no input to run again, so the request fails with a 500 that says so."""
    from test_e2e_core import _kill_the_worker_writing_an_answer

    server: Server = start_server(
        *("--model", "multi=python:support.fake_handlers:SeveralOutputs"),
        *("--set", "arena.slot_bytes=4096"),
        env={**HANDLER_ENV, "RINGSERVE_TEST_PAUSE_AT": "answer.written"},
        frontends=1,
    )
    path = "/v1/models/multi/predict"
    r, reran = _kill_the_worker_writing_an_answer(server, path, [[1.5] * 800])
    assert not reran, f"the request ran again: {r.status_code} {r.text}"
    assert r.status_code == 500, r.text
    assert "the worker died while writing this request's answer" in r.json()["error"]
    server.wait_ready()
    assert server.stop() == 0
