"""Compressed v2 infer responses when the client asks, as Triton answers tritonclient's
``response_compression_algorithm``: the whole body, binary tensors included, with the
JSON header's length as before compression; small bodies, clients that do not ask and
a server told not to are answered as they are."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import Server
from test_v2_protocol import binary_body, serve

from ringserve.frontend.response_compression import MIN_BYTES, compress, negotiate


@pytest.mark.parametrize(
    ("accept", "size", "coding"),
    [
        ("gzip, deflate, br", MIN_BYTES, "gzip"),
        ("deflate", MIN_BYTES, "deflate"),
        ("gzip;q=0.5, deflate", MIN_BYTES, "deflate"),  # the higher weight
        ("deflate;q=0.5, gzip;q=0.5", MIN_BYTES, "gzip"),  # a tie: ours first
        ("gzip;q=0, *", MIN_BYTES, "deflate"),  # gzip refused; * is the rest
        ("*;q=0.1", MIN_BYTES, "gzip"),
        ("GZIP ; Q=1", MIN_BYTES, "gzip"),  # case-insensitive
        ("gzip;q=x", MIN_BYTES, None),  # an unreadable weight is no consent
        ("br, identity", MIN_BYTES, None),
        ("", MIN_BYTES, None),
        (None, MIN_BYTES, None),
        ("gzip", MIN_BYTES - 1, None),  # too small to gain anything
    ],
)
def test_negotiate(accept: str | None, size: int, coding: str | None) -> None:
    assert negotiate(accept, size) == coding


def test_compress_is_what_each_coding_means_in_http() -> None:
    body = b"abc" * 1000
    assert gzip.decompress(compress(body, "gzip")) == body
    assert zlib.decompress(compress(body, "deflate")) == body  # zlib-wrapped, as HTTP says


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with serve(tmp_path_factory.mktemp("compress"), "--model", "id=identity") as s:
        yield s


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_tritonclient_asks_and_reads_compressed_binary_outputs(server: Server, coding: str) -> None:
    x = np.arange(2000, dtype=np.float32).reshape(2, 1000)
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        i = httpclient.InferInput("INPUT0", [2, 1000], "FP32")
        i.set_data_from_numpy(x)
        r = c.infer("id", [i], response_compression_algorithm=coding)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    finally:
        c.close()


def test_only_a_large_body_is_compressed_and_only_when_asked(server: Server) -> None:
    x = np.arange(1000, dtype=np.float32).reshape(1, 1000)
    body, headers = binary_body(x, extra={"parameters": {"binary_data_output": True}})
    with server.client() as c:
        url = "/v2/models/id/infer"
        r = c.post(url, content=body, headers={**headers, "Accept-Encoding": "gzip"})
        assert r.headers["Content-Encoding"] == "gzip", r.headers
        raw = r.content  # as httpx inflated it
        assert r.num_bytes_downloaded < len(raw)  # what came over the wire was smaller
        n = int(r.headers["Inference-Header-Content-Length"])  # of the inflated body
        assert json.loads(raw[:n])["outputs"][0]["parameters"]["binary_data_size"] == 4000
        assert np.frombuffer(raw[n:], np.float32).tolist() == x.ravel().tolist()
        plain = c.post(url, content=body, headers={**headers, "Accept-Encoding": "identity"})
        assert "Content-Encoding" not in plain.headers and plain.content == raw
        small, small_headers = binary_body(np.ones((1, 4), np.float32))
        r = c.post(url, content=small, headers={**small_headers, "Accept-Encoding": "gzip"})
        assert r.status_code == 200 and "Content-Encoding" not in r.headers


def test_a_server_told_not_to_never_compresses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ("--model", "id=identity", "--set", "server.compress_responses=false")
    with serve(tmp_path, *args) as s, s.client() as c:
        x = np.zeros((1, 1000), np.float32)
        body, headers = binary_body(x)
        r = c.post(
            "/v2/models/id/infer", content=body, headers={**headers, "Accept-Encoding": "gzip"}
        )
        assert r.status_code == 200 and "Content-Encoding" not in r.headers
