"""NVIDIA's ``tritonclient.http`` against a real ringserve, with only URL and model name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aio
from conftest import EXAMPLES, Server
from test_e2e_core import PNGS
from test_v2_protocol import serve
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("v2triton")
    fake = "python:support.fake_handlers"
    models = ["id=identity", "digits=digits", f"text={fake}:ByteLengths", f"desc={fake}:Describe"]
    models += [f"multi={fake}:SeveralOutputs", f"masked={fake}:MaskedSum"]
    with serve(tmp, *(a for m in models for a in ("--model", m))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=16)
    yield c
    c.close()


def infer_input(x: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    i = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def test_server_and_model_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("id")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "ringserve"
    assert "binary_tensor_data" in meta["extensions"]
    md = client.get_model_metadata("digits")
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("id", "1")["name"] == "id"
    cfg = client.get_model_config("digits")
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0]["dims"] == [8, 8]
    assert cfg["input"][0]["data_type"] == "TYPE_FP32"
    stats = client.get_inference_statistics("id")
    assert stats["model_stats"][0]["name"] == "id"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert "nope" in e.value.message()


def test_repository_index_and_no_model_control(
    client: httpclient.InferenceServerClient,
) -> None:
    index = client.get_model_repository_index()
    assert sorted(m["name"] for m in index) == ["desc", "digits", "id", "masked", "multi", "text"]
    assert all(m["state"] == "READY" for m in index)
    with pytest.raises(InferenceServerException, match="model control is not enabled"):
        client.unload_model("id")
    assert client.is_model_ready("id")


def test_trace_and_logging_settings_say_they_are_not_supported(
    client: httpclient.InferenceServerClient,
) -> None:
    """Triton's trace and logging extensions answered a bare 404 "Not Found", which reads
    as a wrong URL or an unknown model, not as a server without the extension."""
    calls = {
        "trace extension": (
            client.get_trace_settings,
            lambda: client.get_trace_settings(model_name="id"),
            lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        ),
        "logging extension": (
            client.get_log_settings,
            lambda: client.update_log_settings({"log_verbose_level": 1}),
        ),
    }
    for words, ways in calls.items():
        for call in ways:
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "400" and words in e.value.message(), e.value


def test_json_infer(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
    r = client.infer("id", [infer_input(x, binary=False)], outputs=[out])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    assert "data" in r.get_output("OUTPUT0")
    # ``timeout`` (µs) rides in the request's parameters: a deadline, not an error.
    r = client.infer("id", [infer_input(x)], timeout=10_000_000)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_binary_combinations(
    client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
    r = client.infer("id", [infer_input(x, binary_in)], outputs=[out])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    params = r.get_output("OUTPUT0").get("parameters") or {}
    assert ("binary_data_size" in params) is binary_out


def test_no_outputs_named_means_binary(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), np.float32)
    r = client.infer("id", [infer_input(x)])  # the client asks binary_data_output
    assert r.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 16
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)


def test_compressed_request_and_versioned_url(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    for algo in ("gzip", "deflate"):
        r = client.infer(
            "id", [infer_input(x)], model_version="1", request_compression_algorithm=algo
        )
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)


def test_batch_of_8_equals_8_single_rows(client: httpclient.InferenceServerClient) -> None:
    x = np.random.default_rng(3).random((8, 5), dtype=np.float32)
    batch = client.infer("id", [infer_input(x)]).as_numpy("OUTPUT0")
    singles = [
        client.infer("id", [infer_input(x[i : i + 1])]).as_numpy("OUTPUT0") for i in range(8)
    ]
    assert batch.shape == (8, 5)
    np.testing.assert_array_equal(batch, np.concatenate(singles))


def test_digits_sample_and_batch(client: httpclient.InferenceServerClient) -> None:
    sample = np.asarray(json.loads((EXAMPLES / "digit_3.json").read_text())["data"], np.float32)
    one = sample.reshape(1, 8, 8)
    probs = client.infer("digits", [infer_input(one)]).as_numpy("OUTPUT0")
    assert probs.shape == (1, 10)
    assert int(probs.argmax()) == 3
    rng = np.random.default_rng(5)
    batch = np.concatenate([one, rng.uniform(0, 16, (7, 8, 8)).astype(np.float32)])
    out = client.infer("digits", [infer_input(batch)]).as_numpy("OUTPUT0")
    singles = np.concatenate(
        [
            client.infer("digits", [infer_input(batch[i : i + 1])]).as_numpy("OUTPUT0")
            for i in range(8)
        ]
    )
    assert int(out[0].argmax()) == 3
    np.testing.assert_allclose(out, singles, rtol=1e-4, atol=1e-5)


def test_64_concurrent_async_infers_each_get_their_own_answer(
    client: httpclient.InferenceServerClient,
) -> None:
    inputs = [np.full((1, 4), i, np.float32) + np.arange(4, dtype=np.float32) for i in range(64)]
    pending = [
        client.async_infer("id", [infer_input(x)], request_id=f"req-{i}")
        for i, x in enumerate(inputs)
    ]
    for i, p in enumerate(pending):
        r = p.get_result(timeout=60)
        assert r.get_response()["id"] == f"req-{i}"
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), inputs[i])


def test_request_id_echo(client: httpclient.InferenceServerClient) -> None:
    r = client.infer("id", [infer_input(np.ones((1, 2), np.float32))], request_id="abc-123")
    assert r.get_response()["id"] == "abc-123"
    assert r.get_response()["model_name"] == "id"
    assert r.get_response()["model_version"] == "1"


def test_errors_surface_as_exceptions(client: httpclient.InferenceServerClient) -> None:
    bad = httpclient.InferInput("INPUT0", [1, 2], "FP64")
    bad.set_data_from_numpy(np.ones((1, 2), np.float64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("id", [bad])
    assert e.value.status() == "400"
    assert "FP64" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer(
            "id",
            [infer_input(np.ones((1, 2), np.float32))],
            outputs=[httpclient.InferRequestedOutput("NOPE")],
        )
    assert "NOPE" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [infer_input(np.ones((1, 8, 9), np.float32))])
    assert e.value.status() == "400"
    # and the server is fine
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(client.infer("id", [infer_input(x)]).as_numpy("OUTPUT0"), x)


def test_aio_client(server: Server) -> None:
    async def main() -> None:
        async with aio.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
            assert await c.is_server_ready()
            xs = [np.full((1, 3), i, np.float32) for i in range(16)]
            results = await asyncio.gather(
                *(c.infer("id", [infer_input(x)], request_id=str(i)) for i, x in enumerate(xs))
            )
            for i, r in enumerate(results):
                assert r.get_response()["id"] == str(i)
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), xs[i])

    asyncio.run(main())


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input(client: httpclient.InferenceServerClient, binary: bool) -> None:
    """A BYTES input as Triton users send text: an object array of bytes or str."""
    x = np.array([[b"a", b"\x00bc"], ["h\u00e9llo", b""]], dtype=object)
    i = httpclient.InferInput("INPUT0", [2, 2], "BYTES")
    i.set_data_from_numpy(x, binary_data=binary)
    r = client.infer("text", [i])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), [[1, 3], [6, 0]])
    md = client.get_model_metadata("text")
    assert md["inputs"][0]["datatype"] == "BYTES"


def test_images_as_bytes(client: httpclient.InferenceServerClient) -> None:
    """Encoded images the way Triton users send them to a model that preprocesses
    server-side: a BYTES tensor of file contents, one image per row."""
    pngs = [PNGS["7"], PNGS["3"]]
    i = httpclient.InferInput("INPUT0", [2, 1], "BYTES")
    i.set_data_from_numpy(np.array(pngs, dtype=object).reshape(2, 1))
    r = client.infer("digits", [i])
    assert r.as_numpy("OUTPUT0").argmax(axis=1).tolist() == [7, 3]


@pytest.mark.parametrize("binary", [True, False])
def test_classification(client: httpclient.InferenceServerClient, binary: bool) -> None:
    """``class_count``: the top classes as "value:index:label", as Triton answers."""
    pngs = [PNGS["3"], PNGS["7"]]
    i = httpclient.InferInput("INPUT0", [2], "BYTES")
    i.set_data_from_numpy(np.array(pngs, dtype=object))
    full = client.infer("digits", [i]).as_numpy("OUTPUT0")
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)
    got = client.infer("digits", [i], outputs=[out]).as_numpy("OUTPUT0")
    assert got.shape == (2, 3)
    for row, probs in zip(got, full, strict=True):
        # binary answers come back as bytes, JSON ones as str
        fields = [(b.decode() if isinstance(b, bytes) else b).split(":") for b in row]
        indices = [int(f[1]) for f in fields]
        assert indices == np.argsort(-probs, kind="stable")[:3].tolist()
        assert [f[2] for f in fields] == [str(k) for k in indices]  # digits' labels
        # printed as Triton prints them: std::to_string, 6 decimals
        assert [f[0] for f in fields] == [f"{float(p):f}" for p in probs[indices]]
    assert "classification" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_output(client: httpclient.InferenceServerClient, binary: bool) -> None:
    """A BYTES output comes back as Triton's client makes it: an object array, of bytes
    from binary data and of str from JSON (as against Triton itself)."""
    x = np.array([[1, 2.5], [3, 4]], dtype=np.float32)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    r = client.infer("desc", [infer_input(x, binary=binary)], outputs=[out])
    got = r.as_numpy("OUTPUT0")
    assert got.dtype == object and got.shape == (2, 1)
    want = [b"1,2.5", b"3,4"] if binary else ["1,2.5", "3,4"]
    assert got.ravel().tolist() == want


@pytest.mark.parametrize("binary", [True, False])
def test_several_outputs(client: httpclient.InferenceServerClient, binary: bool) -> None:
    """A model with three outputs, as Triton users call one: ``as_numpy`` by name for
    each, all of them when none is named, only those named otherwise."""
    x = np.array([[1.0, 2.0], [-4.0, 1.0]], np.float32)
    everything = client.infer("multi", [infer_input(x)])
    assert everything.as_numpy("DOUBLED").tolist() == (2 * x).tolist()
    assert everything.as_numpy("TOTAL").tolist() == [[3], [-3]]
    assert everything.as_numpy("SIGN").tolist() == [[b"pos"], [b"neg"]]
    wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("SIGN", "TOTAL")]
    some = client.infer("multi", [infer_input(x, binary)], outputs=wanted)
    assert some.as_numpy("DOUBLED") is None
    assert some.as_numpy("TOTAL").dtype == np.int64
    assert some.as_numpy("TOTAL").tolist() == [[3], [-3]]
    signs = [[b"pos"], [b"neg"]] if binary else [["pos"], ["neg"]]  # as test_bytes_output
    assert some.as_numpy("SIGN").tolist() == signs
    md = client.get_model_metadata("multi")
    assert [(o["name"], o["datatype"]) for o in md["outputs"]] == [
        ("DOUBLED", "FP32"),
        ("TOTAL", "INT64"),
        ("SIGN", "BYTES"),
    ]


@pytest.mark.parametrize("binary", [True, False])
def test_several_inputs(client: httpclient.InferenceServerClient, binary: bool) -> None:
    """Token ids and a mask, as Triton users send a text model's two inputs."""
    ids = np.array([[5, 6, 7], [1, 2, 3]], np.int64)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.int64)
    inputs = []
    for name, x in (("MASK", mask), ("IDS", ids)):
        i = httpclient.InferInput(name, list(x.shape), "INT64")
        i.set_data_from_numpy(x, binary_data=binary)
        inputs.append(i)
    r = client.infer("masked", inputs)
    assert r.as_numpy("SUM").tolist() == [[11], [6]]
    assert r.as_numpy("KEPT").tolist() == [[2], [3]]
    md = client.get_model_metadata("masked")
    assert [i["name"] for i in md["inputs"]] == ["IDS", "MASK"]
