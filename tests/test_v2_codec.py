"""Unit tests of the KServe v2 codec (no server): decoding requests, encoding responses,
BYTES framing, the binary split, compression bounds."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from ringserve.frontend.call import decompress_body
from ringserve.frontend.errors import HTTPError
from ringserve.frontend.v2_codec import (
    V2_TO_CONFIG,
    InferRequest,
    OutputWanted,
    ShmReader,
    TensorSpec,
    classify,
    decode_infer_body,
    decode_request,
    encode_response,
    header_length,
    model_shape,
    serialize_bytes,
    shm_off,
    split_body,
    v2_datatype,
)
from ringserve.ipc import bytes_tensor
from ringserve.ipc.tensor_set import PackedBytes

IN = TensorSpec("INPUT0", "float32", [-1])
OUT = TensorSpec("OUTPUT0", "float32", [-1])
IMG = TensorSpec("INPUT0", "float32", [8, 8])


def body(doc: object, *binary: bytes) -> tuple[bytes, str | None]:
    head = json.dumps(doc).encode()
    if not binary:
        return head, None
    return head + b"".join(binary), str(len(head))


def decode(
    doc: object,
    *binary: bytes,
    spec: TensorSpec = IN,
    mbs: int = 32,
    images: bool = False,
    outs: Sequence[TensorSpec] = (OUT,),
) -> InferRequest:
    raw, hlen = body(doc, *binary)
    header, tail = split_body(raw, header_length(hlen))
    return decode_request(header, tail, [spec], outs, mbs, images)


def err(doc: object, *binary: bytes, **kw: object) -> HTTPError:
    with pytest.raises(HTTPError) as e:
        decode(doc, *binary, **kw)  # type: ignore[arg-type]
    return e.value


def tensor(**kw: object) -> dict[str, object]:
    return {"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3], **kw}


# -- datatypes --------------------------------------------------------------------------


def test_datatype_names_cover_every_shared_memory_dtype() -> None:
    from ringserve.ipc.layout import DTYPES

    assert {v2_datatype(d) for d in DTYPES} == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BYTES",
    }  # fmt: skip
    assert V2_TO_CONFIG["FP32"] == "TYPE_FP32"
    assert V2_TO_CONFIG["BYTES"] == "TYPE_STRING"
    with pytest.raises(ValueError):
        v2_datatype("complex64")


def test_model_shape_puts_the_batch_dim_first() -> None:
    assert model_shape([8, 8], 32) == [-1, 8, 8]
    assert model_shape([-1], 4) == [-1, -1]
    assert model_shape([3], 0) == [3]


# -- JSON requests ----------------------------------------------------------------------


def test_json_flat_and_nested_data_give_the_same_array() -> None:
    flat = decode({"inputs": [tensor(shape=[2, 3], data=[1, 2, 3, 4, 5, 6])]})
    nested = decode({"inputs": [tensor(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6]])]})
    assert flat.payload.dtype == np.float32
    assert flat.payload.shape == (2, 3)
    np.testing.assert_array_equal(flat.payload, nested.payload)
    assert flat.rows == 2
    assert flat.outputs == (OutputWanted(0, "OUTPUT0", False),)


def test_id_and_binary_output_flags() -> None:
    r = decode({"id": "x-1", "inputs": [tensor()], "parameters": {"binary_data_output": True}})
    assert r.id == "x-1"
    assert r.outputs[0].binary
    r = decode(
        {
            "inputs": [tensor()],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
        }
    )
    assert not r.outputs[0].binary  # the per-output flag wins
    r = decode({"inputs": [tensor()], "outputs": [{"name": "OUTPUT0"}]})
    assert r.outputs == (OutputWanted(0, "OUTPUT0", False),)


@pytest.mark.parametrize("data", [[[1, 2], [3]], [1, [2, 3]], [[1], 2, [[3]]]])
def test_json_data_nested_unevenly_is_read_in_order_as_triton_does(data: list) -> None:
    req = decode({"inputs": [tensor(data=data)]})
    assert req.payload.tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ([1, 2], "JSON object"),
        ({}, '"inputs"'),
        ({"inputs": {"name": "INPUT0"}}, "must be a list"),
        ({"inputs": []}, "exactly 1 input"),
        ({"inputs": [tensor(), tensor()]}, "exactly 1 input"),
        ({"inputs": ["INPUT0"]}, "JSON object"),
        ({"inputs": [tensor(name="IN")]}, "unknown input 'IN'"),
        ({"inputs": [tensor(name=None)]}, '"name"'),
        ({"inputs": [tensor(datatype="FLOAT32")]}, "invalid datatype 'FLOAT32'"),
        ({"inputs": [tensor(datatype="FP64")]}, "FP64 does not match the model's FP32"),
        ({"inputs": [tensor(datatype="BF16")]}, "BF16 does not match the model's FP32"),
        ({"inputs": [tensor(datatype="BYTES", data=["a", "b", "c"])]}, "BYTES does not match"),
        ({"inputs": [tensor(shape=[1, 4])]}, "3 elements; shape [1, 4] needs 4"),
        ({"inputs": [tensor(shape="13")]}, "list of integers"),
        ({"inputs": [tensor(shape=[1, 0], data=[])]}, "below 1"),
        ({"inputs": [tensor(shape=[3])]}, "rank"),
        ({"inputs": [tensor(shape=[33, 1], data=[0] * 33)]}, "exceeds max_batch_size 32"),
        ({"inputs": [tensor(data=[[1, 2], [3, 4]])]}, "4 elements; shape [1, 3] needs 3"),
        ({"inputs": [tensor(data=[1, [2, {}]])]}, "numbers"),
        ({"inputs": [tensor(data=["a", "b", "c"])]}, "numbers"),
        ({"inputs": [tensor(data=[True, False, True])]}, "numbers"),
        ({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1]}]}, '"data"'),
        ({"inputs": [tensor(parameters=[1])]}, '"parameters"'),
        ({"inputs": [tensor()], "outputs": [{"name": "OUT"}]}, "unknown output 'OUT'"),
        ({"inputs": [tensor()], "outputs": "OUTPUT0"}, '"outputs" must be a list'),
        ({"inputs": [tensor()], "id": 7}, '"id"'),
        ({"inputs": [tensor()], "parameters": {"binary_data_output": "yes"}}, "true or false"),
        ({"inputs": [tensor()], "parameters": {"sequence_id": 3}}, "sequence_id"),
        *(
            ({"inputs": [tensor()], "parameters": {"timeout": bad}}, '"timeout" must be')
            for bad in (-1, "100", True, 1.5)
        ),
        *(
            ({"inputs": [tensor()], "parameters": {"priority": bad}}, '"priority" must be')
            for bad in (-1, "high", True, 1.5)
        ),
        ({"inputs": [tensor()], "parameters": {"triton_x": 1}}, "'triton_x': names starting"),
        ({"inputs": [tensor(shape=[])]}, "shape [] has no batch dimension"),
        ({"inputs": [tensor(shape=[1, 2**63])]}, "dimension over"),
        ({"inputs": [tensor(datatype=None)]}, 'needs a "datatype" (FP32)'),
        ({"inputs": [tensor(data=None)]}, '"data" must be a list'),
        ({"inputs": [tensor(data={"a": 1})]}, '"data" must be a list'),
        ({"inputs": [tensor(data=[1, True, 3])]}, "numbers, not booleans"),
        ({"inputs": [tensor(data=[[0.5, False, 2.5]])]}, "numbers, not booleans"),
        (
            {"inputs": [tensor()], "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]},
            "requested 2 times",
        ),
        *(
            (
                {
                    "inputs": [tensor()],
                    "outputs": [{"name": "OUTPUT0", "parameters": {"classification": bad}}],
                },
                '"classification" must be a non-negative integer',
            )
            for bad in (-1, "3", True, 1.5)
        ),
    ],
)
def test_bad_requests_are_400_naming_the_problem(doc: object, words: str) -> None:
    e = err(doc)
    assert e.status == 400
    assert words in e.message


def test_timeout_parameter_is_microseconds_and_zero_means_none() -> None:
    assert decode({"inputs": [tensor()], "parameters": {"timeout": 250_000}}).timeout_s == 0.25
    # Triton takes any uint64; past an hour it is an hour (server.request_timeout_s bounds
    # it anyway).
    assert decode({"inputs": [tensor()], "parameters": {"timeout": 2**64 - 1}}).timeout_s == 3600
    assert decode({"inputs": [tensor()], "parameters": {"timeout": 0}}).timeout_s is None
    assert decode({"inputs": [tensor()]}).timeout_s is None


def test_deadline_takes_the_shorter_of_header_and_body() -> None:
    from ringserve.frontend.app import TIMEOUT_HEADER, deadline_s
    from ringserve.ipc.config import load_settings

    s = load_settings(environ={})
    default = s.server.request_timeout_s
    assert deadline_s({}, s) == default
    assert deadline_s({}, s, 0.2) == 0.2  # the body's replaces the default, even longer ones
    assert deadline_s({}, s, default + 60) == default + 60
    assert deadline_s({TIMEOUT_HEADER: "60000"}, s, 0.2) == 0.2
    assert deadline_s({TIMEOUT_HEADER: "200"}, s, 60.0) == 0.2
    assert deadline_s({TIMEOUT_HEADER: "200"}, s) == 0.2


def test_fixed_dims_and_rank_against_the_model() -> None:
    ok = decode({"inputs": [tensor(shape=[2, 8, 8], data=[0.0] * 128)]}, spec=IMG)
    assert ok.payload.shape == (2, 8, 8)
    assert ok.rows == 2
    e = err({"inputs": [tensor(shape=[1, 8, 9], data=[0.0] * 72)]}, spec=IMG)
    assert "does not match the model's [-1, 8, 8]" in e.message
    e = err({"inputs": [tensor(shape=[1, 64], data=[0.0] * 64)]}, spec=IMG)
    assert "rank 3" in e.message


def test_malformed_json_is_400() -> None:
    header, tail = split_body(b'{"inputs": [', None)
    with pytest.raises(HTTPError) as e:
        decode_request(header, tail, [IN], (OUT,), 32)
    assert e.value.status == 400
    assert "malformed JSON" in e.value.message
    # Binary bytes after JSON with no header length: the error says what is missing.
    with pytest.raises(HTTPError, match="needs the Inference-Header-Content-Length") as e:
        decode_request(b'{"inputs": []}\x80\x00\x00\x3f', memoryview(b""), [IN], (OUT,), 32)
    assert e.value.status == 400


def test_nan_and_out_of_range_follow_the_house_rule() -> None:
    e = err({"inputs": [tensor(data=[1, float("nan"), 3])]})
    assert e.status == 422
    ints = TensorSpec("INPUT0", "int8", [-1])
    e = err({"inputs": [tensor(datatype="INT8", data=[1, 2, 300])]}, spec=ints)
    assert e.status == 422


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("UINT64", [2**63 + 1, 5]),  # numpy alone reads these as float64: 2**63
        ("UINT64", [2**64 - 1, 1]),  # ...and this as out of range
        ("UINT64", [2**53 + 1, 2**63]),
        ("INT64", [2**62 + 1, 2.0]),
        ("INT64", [-(2**63), 2**53 + 1]),
    ],
)
def test_json_integers_arrive_exactly(dtype: str, values: list[object]) -> None:
    spec = TensorSpec("INPUT0", dtype.lower(), [-1])
    r = decode({"inputs": [tensor(datatype=dtype, shape=[1, 2], data=values)]}, spec=spec)
    assert r.payload.dtype == np.dtype(dtype.lower())
    assert r.payload.tolist() == [[int(v) for v in values]]


def test_json_integers_out_of_range_or_fractional_are_refused() -> None:
    spec = TensorSpec("INPUT0", "uint64", [-1])
    for values in ([-1, 2**64 - 1], [2**64, 1], [2**60, 0.5]):
        e = err({"inputs": [tensor(datatype="UINT64", shape=[1, 2], data=values)]}, spec=spec)
        assert e.status in (400, 422), values


def test_an_integer_below_int64_is_refused_not_rounded_into_range() -> None:
    # orjson reads -2**63 - 1 as the float -2**63, which int64 holds: it was accepted as
    # a different number.
    spec = TensorSpec("INPUT0", "int64", [-1])
    for values in ([-(2**63) - 1, 1], [1, -(2**63) - 1000]):
        e = err({"inputs": [tensor(datatype="INT64", shape=[1, 2], data=values)]}, spec=spec)
        assert e.status == 422 and "out of range for int64" in str(e), values
    ok = decode({"inputs": [tensor(datatype="INT64", shape=[1, 2], data=[-(2**63), 1])]}, spec=spec)
    assert ok.payload.tolist() == [[-(2**63), 1]]


def test_a_boolean_among_numbers_is_refused_only_when_there_is_one() -> None:
    # A 0 or a 1 sends the check to the data; booleans elsewhere in the body do not count.
    doc = {
        "inputs": [tensor(data=[0, 1, 2])],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    }
    assert decode(doc).payload.tolist() == [[0, 1, 2]]
    assert "not booleans" in err({"inputs": [tensor(data=[False, 1, 2])]}).message
    ints = TensorSpec("INPUT0", "int8", [-1])
    e = err({"inputs": [tensor(datatype="INT8", data=[True, 2, 3])]}, spec=ints)
    assert "not booleans" in e.message


def test_empty_id_is_left_out_of_the_response() -> None:
    req = decode({"inputs": [tensor()], "id": ""})
    content, _ = encode_response("m", req, (np.zeros((1, 3), np.float32),), ("float32",), 32)
    assert "id" not in json.loads(content)


def test_bool_json_needs_booleans() -> None:
    spec = TensorSpec("INPUT0", "bool", [-1])
    r = decode({"inputs": [tensor(datatype="BOOL", data=[True, False, True])]}, spec=spec)
    assert r.payload.dtype == np.bool_
    assert r.payload.tolist() == [[True, False, True]]
    assert err({"inputs": [tensor(datatype="BOOL")]}, spec=spec).status == 400


# -- binary requests --------------------------------------------------------------------


def binary_tensor(arr: np.ndarray, datatype: str = "FP32", size: int | None = None) -> dict:
    return {
        "name": "INPUT0",
        "datatype": datatype,
        "shape": list(arr.shape),
        "parameters": {"binary_data_size": arr.nbytes if size is None else size},
    }


def test_binary_input_is_a_view_of_the_body_not_a_copy() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw, hlen = body({"inputs": [binary_tensor(x)]}, x.tobytes())
    header, tail = split_body(raw, header_length(hlen))
    r = decode_request(header, tail, [IN], (OUT,), 32)
    np.testing.assert_array_equal(r.payload, x)
    assert r.rows == 3
    assert np.shares_memory(r.payload, np.frombuffer(raw, np.uint8))


@pytest.mark.parametrize("dtype", ["int8", "uint16", "int32", "int64", "float16", "float64"])
def test_binary_input_every_numeric_dtype(dtype: str) -> None:
    x = np.arange(6).astype(dtype).reshape(2, 3)
    spec = TensorSpec("INPUT0", dtype, [3])
    r = decode({"inputs": [binary_tensor(x, v2_datatype(dtype))]}, x.tobytes(), spec=spec)
    assert r.payload.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(r.payload, x)


@pytest.mark.parametrize(
    ("size", "data", "words"),
    [
        (48, bytes(24), "truncated"),  # size claims more than the body holds
        (24, bytes(24), "binary_data_size 24 does not match shape [3, 4] x 4 bytes = 48"),
        (48, bytes(56), "8 bytes after the JSON header are not claimed"),
        (-1, bytes(48), "non-negative integer"),
    ],
)
def test_bad_binary_inputs(size: int, data: bytes, words: str) -> None:
    x = np.zeros((3, 4), np.float32)
    e = err({"inputs": [binary_tensor(x, size=size)]}, data)
    assert e.status == 400
    assert words in e.message


def test_binary_and_data_together_is_refused() -> None:
    x = np.zeros((1, 3), np.float32)
    e = err({"inputs": [{**binary_tensor(x), "data": [0, 0, 0]}]}, x.tobytes())
    assert "both" in e.message


def test_binary_data_is_taken_as_triton_takes_it() -> None:
    """perf_analyzer fills binary tensors with random bytes: BOOL bytes other than 0 and
    1 (true, as in Triton), float NaN and Inf (taken, and the request marked to run
    alone). JSON data keeps the house rule (``test_nan_and_out_of_range...``)."""
    spec = TensorSpec("INPUT0", "bool", [-1])
    body = {"inputs": [binary_tensor(np.zeros((1, 3), np.bool_), "BOOL")]}
    req = decode(body, b"\x00\x02\xff", spec=spec)
    assert req.payload.tolist() == [[False, True, True]] and not req.nonfinite
    for bad in (np.inf, -np.inf, np.nan):
        x = np.array([[1.0, bad]], np.float32)
        req = decode({"inputs": [binary_tensor(x)]}, x.tobytes())
        assert req.nonfinite and np.array_equal(req.payload, x, equal_nan=True)
    x = np.array([[1.0, 2.0]], np.float32)
    assert not decode({"inputs": [binary_tensor(x)]}, x.tobytes()).nonfinite


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("abc", "non-negative decimal integer"),
        ("-1", "non-negative decimal integer"),
        ("9999", "larger than the body"),
        # 0 is a raw binary request: decode_infer_body takes it apart; split_body, which
        # cuts a JSON header off, must not take the whole body for a binary tail
        ("0", "raw binary request"),
        # int() takes these; an HTTP length is digits only
        ("+10", "non-negative decimal integer"),
        ("1_0", "non-negative decimal integer"),
        ("\u0661\u0660", "non-negative decimal integer"),  # Arabic-Indic "10"
        ("", "non-negative decimal integer"),
        ("9" * 5000, "non-negative decimal integer"),
    ],
)
def test_header_length_checks(header: str, words: str) -> None:
    with pytest.raises(HTTPError) as e:
        split_body(b'{"inputs": []}', header_length(header))
    assert e.value.status == 400
    assert words in e.value.message


def test_split_body_without_header_is_all_json() -> None:
    header, tail = split_body(b"{}", None)
    assert bytes(header) == b"{}"
    assert len(tail) == 0


def test_binary_input_over_a_slot_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8 MiB of empty BYTES elements took 0.6 s of the event loop to validate, only to be
    refused as over a slot afterwards: the size alone refuses it now."""
    from ringserve.ipc import bytes_tensor

    def parsed(*args: object) -> None:
        raise AssertionError("the over-slot body was parsed")

    monkeypatch.setattr(bytes_tensor, "check", parsed)
    monkeypatch.setattr(bytes_tensor, "_spans", parsed)
    spec = TensorSpec("INPUT0", "bytes", [-1])
    n = 2 * 2**20
    head = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, n],
                     "parameters": {"binary_data_size": 4 * n}}]}
    ).encode()  # fmt: skip
    for body, length in ((head + bytes(4 * n), str(len(head))), (bytes(4 * n), "0")):
        with pytest.raises(HTTPError) as e:
            decode_infer_body(body, length, [spec], (OUT,), 0, slot_bytes=2**20)
        assert e.value.status == 413 and "a request slot holds 1048576" in e.value.message


# -- raw binary requests (Inference-Header-Content-Length: 0) ----------------------------


def raw(data: bytes, spec: TensorSpec = IN, mbs: int = 32, images: bool = False) -> InferRequest:
    return decode_infer_body(data, "0", [spec], (OUT,), mbs, images)


def raw_err(data: bytes, **kw: object) -> HTTPError:
    with pytest.raises(HTTPError) as e:
        raw(data, **kw)  # type: ignore[arg-type]
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("mbs", [0, 8])
def test_raw_binary_is_one_row_its_variable_dimension_from_the_size(mbs: int) -> None:
    x = np.arange(6, dtype=np.float32)
    req = raw(x.tobytes(), mbs=mbs)
    assert req.rows == 1 and req.id is None
    assert req.outputs == (OutputWanted(0, "OUTPUT0", True),)
    assert req.payload.shape == (1, 6) and np.array_equal(req.payload[0], x)
    spec = TensorSpec("INPUT0", "int16", [-1, 3])
    y = np.arange(12, dtype=np.int16).reshape(4, 3)
    assert np.array_equal(raw(y.tobytes(), spec=spec).payload, y[None])


def test_raw_binary_fixed_shape_must_match_the_size() -> None:
    x = np.ones((8, 8), np.float32)
    assert raw(x.tobytes(), spec=IMG).payload.shape == (1, 8, 8)
    assert "256" in raw_err(x.tobytes()[:-4], spec=IMG).message
    assert "whole number" in raw_err(b"\0" * 6).message  # 6 bytes of FP32
    assert "empty" in raw_err(b"").message


def test_raw_binary_refuses_two_variable_dimensions() -> None:
    e = raw_err(b"\0" * 16, spec=TensorSpec("INPUT0", "float32", [-1, -1]))
    assert "more than one variable dimension" in e.message
    e = raw_err(b"\0" * 16, spec=TensorSpec("INPUT0", "float32", [0, -1]))  # found by hypothesis
    assert "holds no bytes" in e.message  # was a ZeroDivisionError: a 500


def test_raw_binary_takes_nan_and_runs_it_alone() -> None:
    req = raw(np.array([1, np.nan], np.float32).tobytes())
    assert req.nonfinite
    assert not raw(np.ones(2, np.float32).tobytes()).nonfinite


def test_raw_binary_bytes_input_is_one_element_of_shape_one() -> None:
    spec = TensorSpec("INPUT0", "bytes", [1])
    req = raw(b"hello\xff", spec=spec)
    assert req.bytes_shape == (1, 1) and not req.images
    assert bytes_tensor.unpack(req.payload).tolist() == [b"hello\xff"]
    e = raw_err(b"hello", spec=TensorSpec("INPUT0", "bytes", [-1]))
    assert "shape [1]" in e.message


def test_raw_binary_image_for_an_image_model_only_when_it_is_not_the_tensor() -> None:
    """An image when the size does not fit the tensor; the tensor when it does and the
    body does not start as an image; a 400 when both readings fit."""
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    req = raw(png, spec=IMG, images=True)
    assert req.images and req.bytes_shape == (1,)
    assert bytes_tensor.unpack(req.payload).tolist() == [png]
    assert "256" in raw_err(png, spec=IMG).message  # the model does not take images
    assert not raw(bytes(256), spec=IMG, images=True).images  # the tensor's exact size
    assert "ambiguous" in raw_err((png * 6)[:256], spec=IMG, images=True).message
    # A shape no raw body can be (two variable dimensions, a 0 one): an image, whatever
    # its size (a 0 dimension was a ZeroDivisionError, a 500).
    for shape in ([3, -1, -1], [0, -1]):
        assert raw((png * 6)[:256], spec=TensorSpec("INPUT0", "float32", shape), images=True).images


# -- BYTES ------------------------------------------------------------------------------


BYTES_IN = TensorSpec("INPUT0", "bytes", [-1])


def _bytes_binary_tensor(shape: list[int], size: int) -> dict[str, object]:
    return {
        "name": "INPUT0",
        "datatype": "BYTES",
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def _elements(r: InferRequest) -> list:
    """A BYTES request's elements: its payload is the length-prefixed form."""
    assert r.bytes_shape is not None and r.payload.dtype == np.uint8
    return bytes_tensor.unpack(r.payload).reshape(r.bytes_shape).tolist()


def test_bytes_round_trip_with_length_prefixes() -> None:
    items = [b"", b"a", "héllo", b"\x00\xff"]
    raw = serialize_bytes(items)
    assert raw[:4] == struct.pack("<I", 0)
    assert raw[4:9] == struct.pack("<I", 1) + b"a"
    back = bytes_tensor.unpack(raw, 4)
    assert back.tolist() == [b"", b"a", "héllo".encode(), b"\x00\xff"]
    nested = np.array([[b"ab", b"c"], [b"", b"xyz"]], dtype=object)
    assert bytes_tensor.unpack(serialize_bytes(nested)).tolist() == [b"ab", b"c", b"", b"xyz"]
    with pytest.raises(TypeError, match="must be bytes or str, not int"):
        serialize_bytes([b"a", 5])  # bytes(5) would be five zero bytes, silently
    # The elements as views of the buffer, read in place (v2 images): no copies.
    buf = np.frombuffer(raw, np.uint8)
    views = bytes_tensor.elements(buf, 4)
    assert [bytes(v) for v in views] == back.tolist()
    assert all(v.obj is buf for v in views)


@pytest.mark.parametrize(
    ("raw", "count", "words"),
    [
        (b"\x05\x00\x00\x00abc", None, "runs past the end"),
        (b"\x01\x00\x00", None, "truncated"),
        (serialize_bytes([b"a", b"b"]), 3, "holds 2 elements; its shape needs 3"),
        (serialize_bytes([b"a", b"b", b"c"]), 2, "more than the 2 elements"),
    ],
)
def test_bad_bytes_data(raw: bytes, count: int | None, words: str) -> None:
    """Malformed binary BYTES are a 400 from the codec, checked without unpacking."""
    doc = {"inputs": [_bytes_binary_tensor([1, count or 1], len(raw))]}
    e = err(doc, raw, spec=BYTES_IN)
    assert e.status == 400
    assert words in e.message


def test_bytes_model_input_json_and_binary() -> None:
    r = decode(
        {"inputs": [tensor(datatype="BYTES", shape=[1, 2], data=["hi", "there"])]}, spec=BYTES_IN
    )
    assert _elements(r) == [[b"hi", b"there"]]
    raw = serialize_bytes([b"a", b"bc"])
    r = decode({"inputs": [_bytes_binary_tensor([2, 1], len(raw))]}, raw, spec=BYTES_IN)
    assert _elements(r) == [[b"a"], [b"bc"]]
    assert r.payload.tobytes() == raw  # passed on as it came, not unpacked and packed again
    e = err({"inputs": [tensor(datatype="BYTES", shape=[1, 2], data=[1, 2])]}, spec=BYTES_IN)
    assert "strings" in e.message


def test_images_as_bytes_for_a_model_that_takes_images() -> None:
    """[rows] or [rows, 1] BYTES elements, one image each, passed on as they came with
    the shape [rows]; the bytes are not looked at here (``check_images`` does that)."""
    raw = serialize_bytes([b"\x89PNG-one", b"\xff\xd8\xff-two"])
    for shape in ([2], [2, 1]):
        r = decode({"inputs": [_bytes_binary_tensor(shape, len(raw))]}, raw, spec=IMG, images=True)
        assert (r.images, r.rows, r.bytes_shape) == (True, 2, (2,))
        assert r.payload.tobytes() == raw
    r = decode(
        {"inputs": [_bytes_binary_tensor([1], 5)]}, b"\x01\0\0\0x", spec=IMG, mbs=0, images=True
    )
    assert (r.images, r.rows, r.bytes_shape) == (True, 1, (1,))
    # The declared datatype still works as before.
    x = np.zeros((1, 8, 8), np.float32).tobytes()
    fp32 = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 8, 8]}
    doc = {"inputs": [{**fp32, "parameters": {"binary_data_size": len(x)}}]}
    assert not decode(doc, x, spec=IMG, images=True).images


@pytest.mark.parametrize(
    ("shape", "mbs", "words"),
    [
        ([2, 2], 32, "[rows] or [rows, 1]"),
        ([1, 1, 1], 32, "[rows] or [rows, 1]"),
        ([33], 32, "exceeds max_batch_size 32"),
        ([2], 0, "takes one image, shape [1]"),
    ],
)
def test_images_as_bytes_bad_shapes(shape: list[int], mbs: int, words: str) -> None:
    raw = serialize_bytes([b"x"] * int(np.prod(shape)))
    doc = {"inputs": [_bytes_binary_tensor(shape, len(raw))]}
    e = err(doc, raw, spec=IMG, mbs=mbs, images=True)
    assert e.status == 400 and words in e.message


def test_bytes_for_a_model_without_images_is_a_datatype_mismatch() -> None:
    raw = serialize_bytes([b"x"])
    doc = {"inputs": [_bytes_binary_tensor([1], len(raw))]}
    e = err(doc, raw, spec=IMG)
    assert "BYTES does not match the model's FP32" in e.message
    assert "encoded images" not in e.message
    e = err({"inputs": [tensor(datatype="INT32", shape=[1, 8, 8])]}, spec=IMG, images=True)
    assert "INT32 does not match the model's FP32 (or BYTES: encoded images)" in e.message


# -- responses --------------------------------------------------------------------------


def request(binary: bool, rid: str | None = "r1", classification: int = 0) -> InferRequest:
    return InferRequest(np.zeros(1), 1, rid, (OutputWanted(0, "OUTPUT0", binary, classification),))


def test_json_response() -> None:
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    content, hlen = encode_response("m", request(False), (out,), ("float32",), 32)
    assert hlen is None
    doc = json.loads(content)
    assert doc == {
        "model_name": "m",
        "model_version": "1",
        "id": "r1",
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}
        ],
    }
    content, _ = encode_response("m", request(False, None), (out,), ("float32",), 32)
    assert "id" not in json.loads(content)


def test_binary_response_header_then_raw_bytes() -> None:
    out = np.arange(6, dtype=np.float16).reshape(3, 2)
    content, hlen = encode_response("m", request(True), (out,), ("float16",), 32)
    assert hlen is not None
    doc = json.loads(content[:hlen])
    entry = doc["outputs"][0]
    assert entry["datatype"] == "FP16"
    assert entry["shape"] == [3, 2]
    assert entry["parameters"] == {"binary_data_size": 12}
    assert "data" not in entry
    np.testing.assert_array_equal(np.frombuffer(content[hlen:], np.float16).reshape(3, 2), out)


def test_bytes_response_json_and_binary() -> None:
    out = np.array([[b"a", b"bc"]], dtype=object)
    content, hlen = encode_response("m", request(False), (out,), ("bytes",), 32)
    assert json.loads(content)["outputs"][0]["data"] == ["a", "bc"]
    content, hlen = encode_response("m", request(True), (out,), ("bytes",), 32)
    assert hlen is not None
    assert bytes_tensor.unpack(content[hlen:]).tolist() == [b"a", b"bc"]


def test_classification_is_parsed_per_output() -> None:
    doc = {
        "inputs": [tensor()],
        "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}}],
    }
    assert decode(doc).outputs[0].classification == 2
    assert decode({"inputs": [tensor()]}).outputs[0].classification == 0
    text_out = TensorSpec("OUTPUT0", "bytes", [-1])
    raw, hlen = body(doc)
    header, tail = split_body(raw, header_length(hlen))
    with pytest.raises(HTTPError) as e:
        decode_request(header, tail, [IN], [text_out], 32)
    assert e.value.status == 400 and "has no classes to rank" in e.value.message


def texts(arr: np.ndarray) -> list:
    return [[b.decode() for b in row] for row in arr.tolist()]


def test_classify_top_k_as_triton_formats_it() -> None:
    out = np.array([[0.1, 0.7, 0.2, 0.7], [0.4, 0.3, 0.2, 0.1]], np.float32)
    got = texts(classify(out, 3, ("a", "b", "c", "d")))
    assert got == [
        # highest first; the tie (0.7 at 1 and 3) in index order; 6 decimals, as Triton's
        # std::to_string (it was 9, from a Triton pull request that was never merged)
        ["0.700000:1:b", "0.700000:3:d", "0.200000:2:c"],
        ["0.400000:0:a", "0.300000:1:b", "0.200000:2:c"],
    ]
    # More than the row holds: all of it. Labels short of the classes: "value:index".
    assert texts(classify(out[:1], 9, ("a",))) == [
        ["0.700000:1", "0.700000:3", "0.200000:2", "0.100000:0:a"]
    ]
    # Integers print as integers, unsigned ones sort right; rows of more dims flatten.
    assert texts(classify(np.array([[1, 250, 3]], np.uint8), 2)) == [["250:1", "3:2"]]
    assert texts(classify(np.arange(8, dtype=np.int64).reshape(2, 2, 2), 1)) == [
        ["3:3"],
        ["7:3"],
    ]


def test_classify_compares_integers_in_their_own_type() -> None:
    # Triton ranks "compared using the output tensor's data type": as float64, values
    # past 2**53 tied and came back in index order, the smaller one first.
    big = np.array([[2**64 - 2, 2**64 - 1, 5]], np.uint64)
    assert texts(classify(big, 2)) == [["18446744073709551615:1", "18446744073709551614:0"]]
    low, high = -(2**63), 2**63 - 1
    signed = np.array([[high - 1, low, high]], np.int64)
    assert texts(classify(signed, 3)) == [[f"{high}:2", f"{high - 1}:0", f"{low}:1"]]
    assert texts(classify(np.array([[False, True, True]]), 3)) == [["1:1", "1:2", "0:0"]]


@pytest.mark.parametrize("binary", [False, True])
def test_classification_response(binary: bool) -> None:
    req = InferRequest(np.zeros(1), 2, None, (OutputWanted(0, "OUTPUT0", binary, 2),))
    out = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
    content, hlen = encode_response("m", req, (out,), ("float32",), 32, ("x", "y", "z"))
    head = json.loads(content if hlen is None else content[:hlen])
    entry = head["outputs"][0]
    assert (entry["datatype"], entry["shape"]) == ("BYTES", [2, 2])
    want = ["0.900000:1:y", "0.100000:0:x", "0.500000:0:x", "0.300000:2:z"]
    if binary:
        assert bytes_tensor.unpack(content[hlen:]).tolist() == [w.encode() for w in want]
    else:
        assert entry["data"] == want
    # A model that does not batch: shape [k], as Triton answers.
    one = request(False, None, classification=2)
    content, _ = encode_response("m", one, (out[:1],), ("float32",), 0)
    entry = json.loads(content)["outputs"][0]
    assert (entry["shape"], entry["data"]) == ([2], ["0.900000:1", "0.100000:0"])


def test_nan_output_needs_binary() -> None:
    out = np.array([[np.nan]], np.float32)
    with pytest.raises(HTTPError) as e:
        encode_response("m", request(False), (out,), ("float32",), 32)
    assert "binary_data" in e.value.message
    content, hlen = encode_response("m", request(True), (out,), ("float32",), 32)
    assert np.isnan(np.frombuffer(content[hlen:], np.float32)).all()


# -- several outputs --------------------------------------------------------------------

OUT_A = TensorSpec("OUT_A", "float32", [3])
OUT_B = TensorSpec("OUT_B", "int64", [1])
TWO = (OUT_A, OUT_B)
A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.array([[7], [9]], np.int64)


def two(doc: dict[str, object], outs: Sequence[TensorSpec] = TWO) -> InferRequest:
    return decode({"inputs": [tensor(shape=[2, 3], data=[0] * 6)], **doc}, outs=outs)


def two_answer(req: InferRequest, *outputs: np.ndarray, labels: tuple = ()) -> tuple[dict, bytes]:
    """The response's JSON header, and the binary bytes after it."""
    outputs = outputs or (A, B)
    dtypes = tuple("bytes" if o.dtype.hasobject else o.dtype.name for o in outputs)
    content, hlen = encode_response("m", req, outputs, dtypes, 32, labels)
    if hlen is None:
        return json.loads(content), b""
    return json.loads(content[:hlen]), content[hlen:]


def test_without_outputs_every_output_is_answered_in_declared_order() -> None:
    for doc in ({}, {"outputs": []}):  # an empty list is no list, as in Triton
        req = two(doc)
        assert req.outputs == (OutputWanted(0, "OUT_A", False), OutputWanted(1, "OUT_B", False))
        head, tail = two_answer(req)
        assert tail == b""
        assert head["outputs"] == [
            {"name": "OUT_A", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]},
            {"name": "OUT_B", "datatype": "INT64", "shape": [2, 1], "data": [7, 9]},
        ]


def test_binary_data_output_answers_every_output_binary_in_order() -> None:
    req = two({"parameters": {"binary_data_output": True}})
    assert [o.binary for o in req.outputs] == [True, True]
    content, hlen = encode_response("m", req, (A, B), ("float32", "int64"), 32)
    assert hlen is not None and content[hlen - 1 : hlen] == b"}"
    head = json.loads(content[:hlen])
    sizes = [e["parameters"]["binary_data_size"] for e in head["outputs"]]
    assert [e["name"] for e in head["outputs"]] == ["OUT_A", "OUT_B"] and sizes == [24, 16]
    assert all("data" not in e for e in head["outputs"])
    assert content[hlen:] == A.astype("<f4").tobytes() + B.astype("<i8").tobytes()


def test_raw_binary_request_answers_every_output_binary() -> None:
    req = decode_infer_body(np.zeros(3, np.float32).tobytes(), "0", [IN], TWO, 32)
    assert req.outputs == (OutputWanted(0, "OUT_A", True), OutputWanted(1, "OUT_B", True))


def test_only_the_requested_outputs_are_answered_in_the_requested_order() -> None:
    req = two({"outputs": [{"name": "OUT_B"}]})
    assert req.outputs == (OutputWanted(1, "OUT_B", False),)
    head, _ = two_answer(req)
    assert head["outputs"] == [
        {"name": "OUT_B", "datatype": "INT64", "shape": [2, 1], "data": [7, 9]}
    ]
    req = two({"outputs": [{"name": "OUT_B"}, {"name": "OUT_A"}]})
    assert [(o.index, o.name) for o in req.outputs] == [(1, "OUT_B"), (0, "OUT_A")]
    head, _ = two_answer(req)
    assert [(e["name"], e["data"]) for e in head["outputs"]] == [
        ("OUT_B", [7, 9]),
        ("OUT_A", [0, 1, 2, 3, 4, 5]),
    ]


def test_binary_data_is_per_output() -> None:
    req = two(
        {
            "outputs": [
                {"name": "OUT_B", "parameters": {"binary_data": False}},
                {"name": "OUT_A", "parameters": {"binary_data": True}},
            ]
        }
    )
    head, tail = two_answer(req)
    b, a = head["outputs"]
    assert b == {"name": "OUT_B", "datatype": "INT64", "shape": [2, 1], "data": [7, 9]}
    assert a == {
        "name": "OUT_A",
        "datatype": "FP32",
        "shape": [2, 3],
        "parameters": {"binary_data_size": 24},
    }
    assert tail == A.astype("<f4").tobytes()
    # The request's binary_data_output is the default of each output that says nothing
    req = two(
        {
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "OUT_A"}, {"name": "OUT_B", "parameters": {"binary_data": False}}],
        }
    )
    assert [o.binary for o in req.outputs] == [True, False]
    head, tail = two_answer(req)
    assert "data" in head["outputs"][1] and tail == A.astype("<f4").tobytes()


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ([{"name": "OUT_C"}], "unknown output 'OUT_C': the model's outputs are 'OUT_A', 'OUT_B'"),
        ([{"name": "OUT_A"}, {"name": "OUT_A"}], "output 'OUT_A' is requested 2 times"),
        (
            [{"name": "OUT_B"}, {"name": "OUT_A"}, {"name": "OUT_B"}, {"name": "OUT_B"}],
            "output 'OUT_B' is requested 3 times",
        ),
        ([{"name": "OUT_A"}, "OUT_B"], 'an object with a "name"'),
        (
            [{"name": "OUT_A"}, {"name": "OUT_B", "parameters": {"classification": -1}}],
            '"classification" must be a non-negative integer',
        ),
        (
            [{"name": "OUT_A"}, {"name": "OUT_B", "parameters": {"binary_data": "yes"}}],
            '"binary_data" must be true or false',
        ),
    ],
)
def test_bad_requested_outputs_of_several_are_400(outputs: list, words: str) -> None:
    with pytest.raises(HTTPError) as e:
        two({"outputs": outputs})
    assert e.value.status == 400 and words in e.value.message


def test_classification_of_one_output_of_two_and_labels_are_the_first_outputs() -> None:
    a = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
    req = two(
        {"outputs": [{"name": "OUT_A", "parameters": {"classification": 2}}, {"name": "OUT_B"}]}
    )
    assert [o.classification for o in req.outputs] == [2, 0]
    head, _ = two_answer(req, a, B, labels=("x", "y", "z"))
    assert head["outputs"] == [
        {
            "name": "OUT_A",
            "datatype": "BYTES",
            "shape": [2, 2],
            "data": ["0.900000:1:y", "0.100000:0:x", "0.500000:0:x", "0.300000:2:z"],
        },
        {"name": "OUT_B", "datatype": "INT64", "shape": [2, 1], "data": [7, 9]},
    ]
    # The second output's classes have no labels: the model's labels are its first's
    req = two({"outputs": [{"name": "OUT_B", "parameters": {"classification": 1}}]})
    head, _ = two_answer(req, a, B, labels=("x", "y", "z"))
    assert head["outputs"] == [
        {"name": "OUT_B", "datatype": "BYTES", "shape": [2, 1], "data": ["7:0", "9:0"]}
    ]


def test_a_bytes_second_output() -> None:
    text = TensorSpec("OUT_T", "bytes", [1])
    t = np.array([[b"cat"], [b"dog"]], dtype=object)
    req = two({}, outs=(OUT_A, text))
    head, tail = two_answer(req, A, t)
    assert head["outputs"][1] == {
        "name": "OUT_T",
        "datatype": "BYTES",
        "shape": [2, 1],
        "data": ["cat", "dog"],
    }
    req = two({"parameters": {"binary_data_output": True}}, outs=(OUT_A, text))
    head, tail = two_answer(req, A, t)
    a_size, t_size = (e["parameters"]["binary_data_size"] for e in head["outputs"])
    assert a_size == 24 and t_size == len(tail) - 24
    assert tail[:24] == A.tobytes()
    assert bytes_tensor.unpack(tail[24:]).tolist() == [b"cat", b"dog"]
    with pytest.raises(HTTPError, match="output 'OUT_T' is BYTES: it has no classes") as e:
        two(
            {"outputs": [{"name": "OUT_T", "parameters": {"classification": 1}}]},
            outs=(OUT_A, text),
        )
    assert e.value.status == 400


def test_one_output_of_two_into_shared_memory() -> None:
    memory = bytearray(64)
    read, asked = _regions(memory)
    params = {"shared_memory_region": "o", "shared_memory_byte_size": 16, "shared_memory_offset": 8}
    doc = {
        "inputs": [tensor(shape=[2, 3], data=[0] * 6)],
        "outputs": [{"name": "OUT_A"}, {"name": "OUT_B", "parameters": params}],
    }
    req = decode_request(json.dumps(doc).encode(), memoryview(b""), [IN], TWO, 32, False, read)
    assert asked == [("o", 8, 16)]
    assert req.outputs[0].shm is None and req.outputs[1].shm is not None
    head, tail = two_answer(req)
    assert head["outputs"][1] == {"name": "OUT_B", "datatype": "INT64", "shape": [2, 1]}
    assert head["outputs"][0]["data"] == [0, 1, 2, 3, 4, 5] and tail == b""
    assert np.frombuffer(memory[8:24], "<i8").tolist() == [7, 9]
    bad = {**params, "binary_data": True}
    doc["outputs"] = [{"name": "OUT_A"}, {"name": "OUT_B", "parameters": bad}]
    with pytest.raises(HTTPError, match="'OUT_B' can't set both shared_memory_region and binary"):
        decode_request(json.dumps(doc).encode(), memoryview(b""), [IN], TWO, 32, False, read)


def test_outputs_into_shared_memory_are_written_only_once_every_one_fits() -> None:
    """OUT_B's region is too small: the 400 comes before OUT_A's region is touched, so a
    client reusing its regions never reads half an answer as a whole one."""
    memory = bytearray(64)
    read, _ = _regions(memory)
    fits = {"shared_memory_region": "o", "shared_memory_byte_size": 48, "shared_memory_offset": 0}
    small = {"shared_memory_region": "o", "shared_memory_byte_size": 8, "shared_memory_offset": 48}
    doc = {
        "inputs": [tensor(shape=[2, 3], data=[0] * 6)],
        "outputs": [
            {"name": "OUT_A", "parameters": fits},
            {"name": "OUT_B", "parameters": small},
        ],
    }
    req = decode_request(json.dumps(doc).encode(), memoryview(b""), [IN], TWO, 32, False, read)
    with pytest.raises(HTTPError, match="'OUT_B' needs 16 bytes"):
        two_answer(req)
    assert memory == bytearray(64)


# -- compression ------------------------------------------------------------------------


def test_decompress_gzip_deflate_and_bounds() -> None:
    data = b'{"inputs": []}' * 10
    assert decompress_body(data, None, 1000) == data
    assert decompress_body(data, "identity", 1000) == data
    assert decompress_body(gzip.compress(data), "gzip", 1000) == data
    assert decompress_body(zlib.compress(data), "deflate", 1000) == data
    bomb = gzip.compress(bytes(10_000_000))
    with pytest.raises(HTTPError) as e:
        decompress_body(bomb, "gzip", 1_000_000)
    assert e.value.status == 413
    with pytest.raises(HTTPError) as e:
        decompress_body(gzip.compress(data)[:-12], "gzip", 1000)
    assert e.value.status == 400
    with pytest.raises(HTTPError) as e:
        decompress_body(b"not gzip", "gzip", 1000)
    assert e.value.status == 400
    with pytest.raises(HTTPError) as e:
        decompress_body(data, "br", 1000)
    assert e.value.status == 415
    assert e.value.headers == {"Accept-Encoding": "gzip, deflate"}


def test_decompress_takes_every_gzip_member_and_refuses_what_follows() -> None:
    """Members one after another are one gzip stream (``cat a.gz b.gz``); the members
    after the first, or bytes after a stream, were dropped without a word."""
    a, b = b'{"inputs": [', b"]}"
    assert decompress_body(gzip.compress(a) + gzip.compress(b), "gzip", 1000) == a + b
    with pytest.raises(HTTPError) as e:  # the limit counts every member
        decompress_body(gzip.compress(bytes(600)) * 2, "gzip", 1000)
    assert e.value.status == 413
    for body, enc in ((gzip.compress(a) + b"junk", "gzip"), (zlib.compress(a) + b"x", "deflate")):
        with pytest.raises(HTTPError) as e:
            decompress_body(body, enc, 1000)
        assert e.value.status == 400, enc
    # Zero padding after the end is ignored, as gzip(1) ignores it.
    assert decompress_body(gzip.compress(a) + bytes(100), "gzip", 1000) == a
    # Members are fed in chunks: a large one, then another, inflate whole.
    big = bytes(200_000)
    assert decompress_body(gzip.compress(big) * 2, "gzip", 10**6) == big * 2
    # A body of empty members (each one a fresh inflater, and none counting toward the
    # limit) is refused at a bound: 4 MiB of them held the event loop for 29 s.
    empty = gzip.compress(b"")
    with pytest.raises(HTTPError) as e:
        decompress_body(empty * (4 * 2**20 // len(empty)), "gzip", 8 * 2**20)
    assert e.value.status == 400 and "more than 64 members" in e.value.message
    assert decompress_body(empty * 63 + gzip.compress(a), "gzip", 1000) == a


# -- system shared memory (the region lookup itself is client_shm's) -------------------


def _regions(memory: bytearray):  # type: ignore[no-untyped-def]
    """A ShmReader over one buffer, recording what it was asked for."""
    asked: list[tuple[str, int, int]] = []

    def read(name: str, offset: int, size: int, where: str) -> memoryview:
        asked.append((name, offset, size))
        return memoryview(memory)[offset : offset + size]

    return read, asked


def shm_doc(params: dict[str, object], outputs: list[dict] | None = None) -> dict[str, object]:
    t = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "parameters": params}
    doc: dict[str, object] = {"inputs": [t]}
    if outputs is not None:
        doc["outputs"] = outputs
    return doc


def decode_shm(doc: dict[str, object], read) -> InferRequest:  # type: ignore[no-untyped-def]
    return decode_request(json.dumps(doc).encode(), memoryview(b""), [IN], (OUT,), 32, False, read)


def test_input_from_shared_memory() -> None:
    memory = bytearray(8) + bytearray(np.array([1, 2, 3], "<f4").tobytes())
    read, asked = _regions(memory)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 12}
    req = decode_shm(shm_doc({**params, "shared_memory_offset": 8}), read)
    assert asked == [("r", 8, 12)]
    assert req.payload.tolist() == [[1, 2, 3]] and req.outputs[0].shm is None


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"shared_memory_byte_size": 12}, "shared_memory_region name"),
        ({"shared_memory_region": "r"}, "shared_memory_byte_size must be"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, "non-negative"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": True}, "non-negative"),
        (
            {
                "shared_memory_region": "r",
                "shared_memory_byte_size": 12,
                "shared_memory_offset": "8",
            },
            "shared_memory_offset must be",
        ),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 8}, "shared_memory_byte_size 8"),
        (
            {"shared_memory_region": "r", "shared_memory_byte_size": 12, "binary_data_size": 12},
            "also carries data",
        ),
    ],
)
def test_bad_shared_memory_input_parameters(params: dict[str, object], words: str) -> None:
    read, _ = _regions(bytearray(64))
    with pytest.raises(HTTPError, match=words) as e:
        decode_shm(shm_doc(params), read)
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("extra", "words"),
    [({"classification": 2}, "classification"), ({"binary_data": True}, "binary_data")],
)
def test_output_in_shared_memory_takes_no_classification_or_binary_flag(
    extra: dict[str, object], words: str
) -> None:
    read, _ = _regions(bytearray(64))
    params = {"shared_memory_region": "o", "shared_memory_byte_size": 16, **extra}
    doc = shm_doc(
        {"shared_memory_region": "r", "shared_memory_byte_size": 12},
        [{"name": "OUTPUT0", "parameters": params}],
    )
    with pytest.raises(HTTPError, match=f"both shared_memory_region and {words}") as e:
        decode_shm(doc, read)
    assert e.value.status == 400


def test_shared_memory_without_a_reader_is_refused() -> None:
    doc = shm_doc({"shared_memory_region": "r", "shared_memory_byte_size": 12})
    with pytest.raises(HTTPError, match="--allow-client-shm") as e:
        decode_request(json.dumps(doc).encode(), memoryview(b""), [IN], (OUT,), 32)
    assert e.value.status == 403


def test_output_into_shared_memory() -> None:
    memory = bytearray(32)  # the input at 0 (12 bytes), the output region at 16
    read, asked = _regions(memory)
    out = [
        {
            "name": "OUTPUT0",
            "parameters": {
                "shared_memory_region": "o",
                "shared_memory_byte_size": 16,
                "shared_memory_offset": 16,
            },
        }
    ]
    doc = shm_doc({"shared_memory_region": "r", "shared_memory_byte_size": 12}, out)
    req = decode_shm(doc, read)
    assert asked == [("r", 0, 12), ("o", 16, 16)]  # each region looked up once
    want = req.outputs[0]
    assert want.shm is not None and want.shm[0] == "o" and len(want.shm[1]) == 16
    output = np.array([[4, 5, 6]], np.float32)
    content, header_len = encode_response("m", req, (output,), ("float32",), 32)
    assert header_len is None  # nothing follows the JSON: the data went to the region
    assert json.loads(content)["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 3]}
    ]
    assert np.frombuffer(memory[16:28], "<f4").tolist() == [4, 5, 6]
    small = ("o", memoryview(bytearray(8)))
    req = InferRequest(req.payload, 1, None, (OutputWanted(0, "OUTPUT0", False, shm=small),))
    with pytest.raises(HTTPError, match="needs 12 bytes"):
        encode_response("m", req, (output,), ("float32",), 32)


# -- several inputs ---------------------------------------------------------------------

IDS = TensorSpec("INPUT_IDS", "int64", [-1])
MASK = TensorSpec("MASK", "int64", [-1])
TEXT = (IDS, MASK)
TOKENS = TensorSpec("TOKENS", "bytes", [-1])
IDS_A = np.array([[101, 7592, 102], [101, 2088, 102]], np.int64)
MASK_A = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)  # another width: a mix-up shows


def json_input(name: str, arr: np.ndarray, datatype: str = "INT64") -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": arr.tolist()}


def bin_input(name: str, arr: np.ndarray, datatype: str = "INT64") -> dict[str, object]:
    return {**binary_tensor(arr, datatype), "name": name}


def several(
    inputs: list,
    *binary: bytes,
    inps: Sequence[TensorSpec] = TEXT,
    mbs: int = 32,
    read: ShmReader = shm_off,
) -> InferRequest:
    raw, hlen = body({"inputs": inputs}, *binary)
    header, tail = split_body(raw, header_length(hlen))
    return decode_request(header, tail, inps, (OUT,), mbs, False, read)


def assert_text(r: InferRequest, ids: np.ndarray = IDS_A, mask: np.ndarray = MASK_A) -> None:
    assert isinstance(r.payload, tuple) and len(r.payload) == 2
    got_ids, got_mask = r.payload
    assert isinstance(got_ids, np.ndarray) and isinstance(got_mask, np.ndarray)
    assert got_ids.dtype == got_mask.dtype == np.int64
    assert got_ids.shape == ids.shape and got_mask.shape == mask.shape
    assert got_ids.tolist() == ids.tolist() and got_mask.tolist() == mask.tolist()
    assert r.rows == ids.shape[0]
    assert r.bytes_shape is None and not r.images and not r.nonfinite


def test_several_json_inputs_in_any_order_come_in_declared_order() -> None:
    assert_text(several([json_input("INPUT_IDS", IDS_A), json_input("MASK", MASK_A)]))
    assert_text(several([json_input("MASK", MASK_A), json_input("INPUT_IDS", IDS_A)]))


def test_several_binary_inputs_are_read_in_the_request_order() -> None:
    """Triton lays the binary parts out in the order of the request's inputs, which
    need not be the model's."""
    r = several(
        [bin_input("MASK", MASK_A), bin_input("INPUT_IDS", IDS_A)],
        MASK_A.tobytes(),
        IDS_A.tobytes(),
    )
    assert_text(r)
    r = several(
        [bin_input("INPUT_IDS", IDS_A), bin_input("MASK", MASK_A)],
        IDS_A.tobytes(),
        MASK_A.tobytes(),
    )
    assert_text(r)


def test_several_inputs_one_json_one_binary() -> None:
    assert_text(
        several([json_input("MASK", MASK_A), bin_input("INPUT_IDS", IDS_A)], IDS_A.tobytes())
    )
    assert_text(
        several([bin_input("MASK", MASK_A), json_input("INPUT_IDS", IDS_A)], MASK_A.tobytes())
    )


def test_several_inputs_one_from_shared_memory() -> None:
    memory = bytearray(8) + bytearray(MASK_A.tobytes())
    read, asked = _regions(memory)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": MASK_A.nbytes}
    shm_mask = {**bin_input("MASK", MASK_A), "parameters": {**params, "shared_memory_offset": 8}}
    r = several([shm_mask, bin_input("INPUT_IDS", IDS_A)], IDS_A.tobytes(), read=read)
    assert asked == [("r", 8, MASK_A.nbytes)]
    assert_text(r)


def test_several_inputs_without_a_batch_dimension_each_get_a_leading_one() -> None:
    ids, mask = IDS_A[0], MASK_A[0]
    r = several([json_input("MASK", mask), bin_input("INPUT_IDS", ids)], ids.tobytes(), mbs=0)
    assert_text(r, ids[None], mask[None])


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (
            [json_input("INPUT_IDS", IDS_A)],
            "the model takes 2 inputs ('INPUT_IDS', 'MASK'); missing 'MASK'",
        ),
        ([], "the model takes 2 inputs ('INPUT_IDS', 'MASK'); missing 'INPUT_IDS', 'MASK'"),
        (
            [json_input("INPUT_IDS", IDS_A), json_input("X", MASK_A)],
            "unknown input 'X': the model's inputs are 'INPUT_IDS', 'MASK'",
        ),
        (
            [
                json_input("MASK", MASK_A),
                json_input("INPUT_IDS", IDS_A),
                json_input("MASK", MASK_A),
            ],
            "input 'MASK' is given 2 times",
        ),
        (
            [json_input("INPUT_IDS", IDS_A), json_input("MASK", MASK_A[:1])],
            "inputs disagree on the batch dimension: 'INPUT_IDS' has 2 rows, 'MASK' has 1",
        ),
        ([json_input("INPUT_IDS", IDS_A), "MASK"], "each input must be a JSON object"),
        # each input is checked as a lone one is, and named
        (
            [json_input("INPUT_IDS", IDS_A), json_input("MASK", MASK_A, "INT32")],
            "input 'MASK' datatype INT32 does not match the model's INT64",
        ),
        (
            [json_input("INPUT_IDS", IDS_A), json_input("MASK", MASK_A[None])],
            "input 'MASK' shape [1, 2, 4] has rank 3",
        ),
        (
            [json_input("INPUT_IDS", IDS_A), json_input("MASK", np.ones((33, 4), np.int64))],
            "input 'MASK' batch of 33 rows exceeds max_batch_size 32",
        ),
    ],
)
def test_bad_several_inputs_are_400(inputs: list, words: str) -> None:
    with pytest.raises(HTTPError) as e:
        several(inputs)
    assert e.value.status == 400 and words in e.value.message


def test_one_input_keeps_its_messages() -> None:
    e = err({"inputs": [tensor(), tensor()]})
    assert e.message == "the model takes exactly 1 input ('INPUT0'); got 2"
    e = err({"inputs": [tensor(name="X")]})
    assert e.message == "unknown input 'X': the model's input is 'INPUT0'"


def test_several_binary_inputs_must_claim_every_byte_in_order() -> None:
    inputs = [bin_input("MASK", MASK_A), bin_input("INPUT_IDS", IDS_A)]
    with pytest.raises(HTTPError) as e:
        several(inputs, MASK_A.tobytes(), IDS_A.tobytes()[:-8])
    assert e.value.status == 400 and e.value.message == (
        "input 'INPUT_IDS' binary data is truncated: binary_data_size 48, 40 bytes left "
        "after the JSON header and the 64 bytes of the inputs before it"
    )
    with pytest.raises(HTTPError) as e:
        several(inputs, MASK_A.tobytes(), IDS_A.tobytes(), b"\0" * 3)
    assert "3 bytes after the JSON header are not claimed" in e.value.message


def test_a_raw_binary_request_for_several_inputs_is_400() -> None:
    with pytest.raises(HTTPError) as e:
        decode_infer_body(IDS_A.tobytes(), "0", TEXT, (OUT,), 32)
    assert e.value.status == 400 and e.value.message == (
        "a raw binary request carries one input; the model takes 2 ('INPUT_IDS', 'MASK'): "
        "send the JSON header"
    )


@pytest.mark.parametrize("mbs", [32, 0])
def test_a_bytes_second_input_is_packed_bytes(mbs: int) -> None:
    words = [[b"a", b"bc"], [b"", b"d\xff"]] if mbs else [[b"a", b"bc"]]
    ids = IDS_A[:, :2] if mbs else IDS_A[0, :2]
    packed = serialize_bytes(words)
    shape = [len(words), 2] if mbs else [2]
    full = (len(words), 2)
    tokens = {"name": "TOKENS", "datatype": "BYTES", "shape": shape}
    for t, binary in (
        ({**tokens, "parameters": {"binary_data_size": len(packed)}}, (packed,)),
        ({**tokens, "data": [w.decode("latin-1") for w in np.ravel(words)]}, ()),
    ):
        r = several([t, json_input("INPUT_IDS", ids)], *binary, inps=(IDS, TOKENS), mbs=mbs)
        assert isinstance(r.payload, tuple)
        got_ids, got_tokens = r.payload
        assert (
            isinstance(got_ids, np.ndarray) and got_ids.tolist() == IDS_A[: len(words), :2].tolist()
        )
        assert isinstance(got_tokens, PackedBytes) and got_tokens.shape == full
        assert got_tokens.data.dtype == np.uint8
        back = bytes_tensor.unpack(got_tokens.data).tolist()
        if binary:  # passed on as it came
            assert got_tokens.data.tobytes() == packed
        else:  # JSON strings are UTF-8
            assert back == [w.decode("latin-1").encode() for w in np.ravel(words)]
        assert r.rows == len(words) and r.bytes_shape is None and not r.images


def test_nonfinite_in_the_second_input_marks_the_request() -> None:
    scores = TensorSpec("SCORES", "float32", [-1])
    x = np.array([[1.0, np.nan]], np.float32)
    inputs = [json_input("INPUT_IDS", IDS_A[:1]), bin_input("SCORES", x, "FP32")]
    r = several(inputs, x.tobytes(), inps=(IDS, scores))
    assert r.nonfinite
    assert isinstance(r.payload, tuple) and np.array_equal(r.payload[1], x, equal_nan=True)
    y = np.ones((1, 2), np.float32)
    assert not several(inputs, y.tobytes(), inps=(IDS, scores)).nonfinite


# -- model configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"), [({"labels_file": "/srv/models/imagenet.txt"}, "imagenet.txt"), ({}, "")]
)
def test_config_names_the_labels_file(options: dict, name: str) -> None:
    from ringserve.frontend.catalog import ModelInfo
    from ringserve.frontend.v2 import model_config
    from ringserve.ipc.config import ModelSettings

    spec = {
        "inputs": [{"name": "INPUT0", "dtype": "float32", "shape": [4]}],
        "outputs": [{"name": "OUTPUT0", "dtype": "float32", "shape": [3]}],
    }
    info = ModelInfo(0, ModelSettings(name="m", handler="identity", options=options), spec)
    from types import SimpleNamespace

    catalog = SimpleNamespace(  # the spec is in info already
        workers=lambda index: 2, arena=SimpleNamespace(geometry=SimpleNamespace(slot_bytes=4096))
    )
    config = model_config(catalog, info)  # type: ignore[arg-type]
    assert config["output"][0]["label_filename"] == name
    assert config["instance_group"][0]["count"] == 2


@pytest.mark.parametrize(
    ("device", "workers", "groups"),
    [
        ("cpu", 3, [("KIND_CPU", 3, None)]),
        ("cuda", 2, [("KIND_GPU", 2, [0])]),
        ("cuda:1", 2, [("KIND_GPU", 2, [1])]),
        # Positions take the GPUs in turn: Triton's count is per listed GPU.
        ("cuda:0,cuda:1", 3, [("KIND_GPU", 2, [0]), ("KIND_GPU", 1, [1])]),
        ("cuda:2,cuda:0,cuda:1", 2, [("KIND_GPU", 1, [2]), ("KIND_GPU", 1, [0])]),
        ("cuda:0,cuda:1", 0, [("KIND_GPU", 0, [0])]),  # drained: still names a GPU
    ],
)
def test_config_instance_groups_say_where_the_workers_run(
    device: str, workers: int, groups: list
) -> None:
    from types import SimpleNamespace

    from ringserve.frontend.catalog import ModelInfo
    from ringserve.frontend.v2 import model_config
    from ringserve.ipc.config import ModelSettings

    spec = {
        "inputs": [{"name": "INPUT0", "dtype": "float32", "shape": [4]}],
        "outputs": [{"name": "OUTPUT0", "dtype": "float32", "shape": [4]}],
    }
    info = ModelInfo(0, ModelSettings(name="m", handler="identity", device=device), spec)
    catalog = SimpleNamespace(
        workers=lambda index: workers,
        arena=SimpleNamespace(geometry=SimpleNamespace(slot_bytes=4096)),
    )
    got = model_config(catalog, info)["instance_group"]  # type: ignore[arg-type]
    assert [(g["kind"], g["count"], g.get("gpus")) for g in got] == groups
    assert len({g["name"] for g in got}) == len(got)


@pytest.mark.parametrize(
    ("in_shape", "slot_bytes", "advertised"),
    [
        ([3, 224, 224], 2**20, 1),  # resnet50 rows (602,112 bytes): a 1 MiB slot holds one
        ([3, 224, 224], 20 * 2**20, 32),  # enough for max_batch_size
        ([3, 224, 224], 4096, 1),  # not one row: still 1 (0 would mean no batch dimension)
        ([-1], 2**20, 32),  # input rows of unknown size: the output's 262 rows fit
        ([-1], 4096, 1),  # ...and here the output's one row
    ],
)
def test_config_max_batch_size_is_what_one_request_can_carry(
    in_shape: list[int], slot_bytes: int, advertised: int
) -> None:
    """perf_analyzer -b N and batching Triton clients read max_batch_size from the config:
    it must not promise rows that a request slot cannot hold (every such request was a
    413 while the config said 32)."""
    from types import SimpleNamespace

    from ringserve.frontend.catalog import ModelInfo
    from ringserve.frontend.v2 import model_config
    from ringserve.ipc.config import BatchingSettings, ModelSettings

    spec = {
        "inputs": [{"name": "INPUT0", "dtype": "float32", "shape": in_shape}],
        "outputs": [{"name": "OUTPUT0", "dtype": "float32", "shape": [1000]}],
    }
    settings = ModelSettings(
        name="m", handler="identity", batching=BatchingSettings(max_batch_size=32)
    )
    catalog = SimpleNamespace(
        workers=lambda index: 1,
        arena=SimpleNamespace(geometry=SimpleNamespace(slot_bytes=slot_bytes)),
    )
    config = model_config(catalog, ModelInfo(0, settings, spec))  # type: ignore[arg-type]
    assert config["max_batch_size"] == advertised


@pytest.mark.parametrize(
    ("outputs", "advertised"),
    [
        # The answer is both outputs: 8,000 bytes a row, and the set's table, so 7 rows
        # in 64,000, not 8 (4,000 bytes of the first alone would be 16)
        ([("float32", [1000]), ("float32", [1000])], 7),
        ([("float32", [1000]), ("int8", [4000])], 7),
        # A row of one output of unknown size: the answer's unknown; the input's 16 bytes
        ([("float32", [1000]), ("bytes", [1])], 32),
        ([("float32", [1000]), ("float32", [-1])], 32),
    ],
)
def test_config_max_batch_size_counts_every_output(outputs: list, advertised: int) -> None:
    from types import SimpleNamespace

    from ringserve.frontend.catalog import ModelInfo
    from ringserve.frontend.v2 import model_config, model_metadata
    from ringserve.ipc.config import BatchingSettings, ModelSettings

    spec = {
        "inputs": [{"name": "INPUT0", "dtype": "float32", "shape": [4]}],
        "outputs": [
            {"name": f"OUT{i}", "dtype": dtype, "shape": shape}
            for i, (dtype, shape) in enumerate(outputs)
        ],
    }
    settings = ModelSettings(
        name="m",
        handler="identity",
        batching=BatchingSettings(max_batch_size=32),
        options={"labels_file": "/srv/labels.txt"},
    )
    catalog = SimpleNamespace(
        workers=lambda index: 1,
        arena=SimpleNamespace(geometry=SimpleNamespace(slot_bytes=64_000)),
        not_served_why=lambda info: "",
    )
    info = ModelInfo(0, settings, spec)
    config = model_config(catalog, info)  # type: ignore[arg-type]
    assert config["max_batch_size"] == advertised
    # Every output is listed; the labels are the first one's
    assert [(o["name"], o["label_filename"]) for o in config["output"]] == [
        ("OUT0", "labels.txt"),
        ("OUT1", ""),
    ]
    meta = model_metadata(catalog, info)  # type: ignore[arg-type]
    assert [o["name"] for o in meta["outputs"]] == ["OUT0", "OUT1"]
