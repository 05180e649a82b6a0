"""The gRPC protocol's pieces without a server: our messages are Triton's on the wire
(field for field against tritonclient's own copies), the descriptor we ship is the one
inference.proto compiles to, and a ``ModelInferRequest`` becomes what an HTTP client
would have sent, or a clear refusal."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import REPO
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from ringserve.frontend.errors import HTTPError
from ringserve.frontend.grpc_v2.convert import as_v2_request, final_flag_asked, infer_response
from ringserve.frontend.grpc_v2.messages import FILE, METHODS, pb
from ringserve.frontend.grpc_v2.service import grpc_code
from ringserve.frontend.v2_codec import EncodedOutput, TensorSpec, decode_request
from ringserve.ipc import bytes_tensor


def test_the_shipped_descriptor_is_what_the_proto_compiles_to() -> None:
    gen = REPO / "frontend" / "grpc_v2" / "gen.py"
    out = subprocess.run(
        [sys.executable, str(gen), "--check"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def _triton(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise AssertionError(f"tritonclient has no message {name}")


def _same_fields(ours: Descriptor, theirs: Descriptor) -> None:
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name}: not in Triton's"
        where = f"{ours.full_name}.{field.name}"
        assert (field.number, field.type) == (other.number, other.type), where
        assert field.is_repeated == other.is_repeated, where
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name, where
            _same_fields(field.message_type, other.message_type)
        if field.enum_type is not None:
            ours_values = {v.name: v.number for v in field.enum_type.values}
            theirs_values = {v.name: v.number for v in other.enum_type.values}
            assert ours_values.items() <= theirs_values.items(), where


def test_every_message_is_tritons_on_the_wire() -> None:
    """Each field we declare has Triton's number, type and cardinality, nested messages
    and enums included (we declare a subset of ModelConfig; nothing else is left out)."""
    for name, ours in FILE.message_types_by_name.items():
        _same_fields(ours, _triton(name))
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert set(METHODS) == {m.name for m in theirs.methods}
    for method in theirs.methods:
        request_cls, response_cls, streaming = METHODS[method.name]
        assert request_cls.DESCRIPTOR.full_name == method.input_type.full_name
        assert response_cls.DESCRIPTOR.full_name == method.output_type.full_name
        assert streaming == method.client_streaming == method.server_streaming


def test_a_triton_request_parses_as_ours_and_back() -> None:
    theirs = service_pb2.ModelInferRequest(model_name="m", id="r1")
    tensor = theirs.inputs.add(name="X", datatype="FP32", shape=[1, 2])
    tensor.parameters["shared_memory_offset"].int64_param = 8
    theirs.raw_input_contents.append(b"\0" * 8)
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.inputs[0].parameters["shared_memory_offset"].int64_param == 8
    assert ours.SerializeToString() == theirs.SerializeToString()


def _request(*inputs: tuple[str, str, list[int]], raw: list[bytes] = ()) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.extend(raw)
    return req


def test_raw_contents_become_binary_parts_in_input_order() -> None:
    a, b = np.arange(4, dtype=np.int64), np.ones(4, dtype=np.int64)
    req = _request(
        ("IDS", "INT64", [1, 4]), ("MASK", "INT64", [1, 4]), raw=[a.tobytes(), b.tobytes()]
    )
    req.id = "abc"
    doc, binary = as_v2_request(req)
    assert doc["id"] == "abc"
    assert [i["parameters"]["binary_data_size"] for i in doc["inputs"]] == [32, 32]
    assert doc["parameters"] == {"binary_data_output": True}  # every output binary
    assert bytes(binary) == a.tobytes() + b.tobytes()
    inps = [TensorSpec("IDS", "int64", (-1,)), TensorSpec("MASK", "int64", (-1,))]
    decoded = decode_request(doc, binary, inps, [TensorSpec("OUT", "int64", (1,))], 8)
    assert decoded.rows == 1
    assert all(w.binary for w in decoded.outputs)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1e300, 0.5], np.float64),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT64", "uint64_contents", [2**64 - 1, 0], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ],
)
def test_typed_contents_are_packed_as_their_datatype(
    datatype: str, field: str, values: list, dtype: type
) -> None:
    req = _request(("X", datatype, [1, 2]))
    getattr(req.inputs[0].contents, field).extend(values)
    _, binary = as_v2_request(req)
    assert bytes(binary) == np.array(values, dtype=dtype).tobytes()


def test_bytes_contents_are_length_prefixed() -> None:
    req = _request(("TEXT", "BYTES", [2]))
    req.inputs[0].contents.bytes_contents.extend([b"hi", b"\xff\x00"])
    _, binary = as_v2_request(req)
    assert bytes(binary) == bytes_tensor.pack([b"hi", b"\xff\x00"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda r: r.inputs[0].contents.int_contents.extend([128]), "out of the range of INT8"),
        (
            lambda r: r.inputs[0].contents.fp32_contents.extend([1.0]),
            "takes its data in contents.int_contents",
        ),
        (lambda r: None, "has no data"),
        (lambda r: r.raw_input_contents.extend([b"\0", b"\0"]), "raw_input_contents has 2 entries"),
    ],
)
def test_bad_contents_are_refused_by_name(build, message: str) -> None:
    req = _request(("X", "INT8", [1]))
    build(req)
    with pytest.raises(HTTPError) as e:
        as_v2_request(req)
    assert e.value.status == 400
    assert message in e.value.message
    assert "'X'" in e.value.message or "raw_input_contents" in e.value.message


def test_typed_contents_beside_raw_ones_are_refused() -> None:
    req = _request(("A", "INT32", [1]), ("B", "INT32", [1]), raw=[b"\0" * 4])
    req.inputs[1].contents.int_contents.append(1)
    with pytest.raises(HTTPError, match="typed contents beside raw_input_contents"):
        as_v2_request(req)


def test_bytes_take_bytes_contents_only() -> None:
    req = _request(("TEXT", "BYTES", [1]))
    req.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(HTTPError, match=r"takes its data in contents\.bytes_contents"):
        as_v2_request(req)


def test_half_floats_travel_raw_only() -> None:
    req = _request(("H", "FP16", [1]))
    req.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(HTTPError, match="FP16 has no typed contents"):
        as_v2_request(req)


def test_shared_memory_inputs_take_no_raw_contents_and_parameters_pass_on() -> None:
    req = _request(("A", "FP32", [1, 2]), ("B", "FP32", [1, 2]), raw=[b"\0" * 8])
    params = req.inputs[0].parameters
    params["shared_memory_region"].string_param = "r"
    params["shared_memory_byte_size"].int64_param = 8
    req.parameters["timeout"].int64_param = 5000
    req.parameters["binary_data_output"].bool_param = False  # HTTP only: dropped
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    out = req.outputs.add(name="OUT")
    out.parameters["classification"].int64_param = 2
    doc, binary = as_v2_request(req)
    assert doc["inputs"][0]["parameters"] == {
        "shared_memory_region": "r",
        "shared_memory_byte_size": 8,
    }
    assert doc["inputs"][1]["parameters"] == {"binary_data_size": 8}
    assert doc["parameters"] == {"timeout": 5000}
    assert doc["outputs"] == [
        {"name": "OUT", "parameters": {"classification": 2, "binary_data": True}}
    ]
    assert len(binary) == 8
    assert final_flag_asked(req)


def test_a_parameter_without_a_value_is_refused() -> None:
    req = _request(("X", "INT8", [1]), raw=[b"\0"])
    req.parameters["priority"].CopyFrom(pb.InferParameter())
    with pytest.raises(HTTPError, match="request parameter 'priority' holds no value"):
        as_v2_request(req)


def test_outputs_go_raw_each_at_its_index() -> None:
    """tritonclient finds output i's data at raw_output_contents[i]: one in shared
    memory keeps its place with an empty entry."""
    data = np.arange(3, dtype=np.float32)
    outputs = [
        EncodedOutput("A", "FP32", [3], raw=memoryview(data.tobytes())),
        EncodedOutput("B", "FP32", [3]),  # written to shared memory
        EncodedOutput("C", "INT8", [1], raw=memoryview(b"\x07")),
    ]
    response = infer_response("m", "r", outputs)
    assert [o.name for o in response.outputs] == ["A", "B", "C"]
    assert list(response.raw_output_contents) == [data.tobytes(), b"", b"\x07"]
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r")


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (404, grpc.StatusCode.NOT_FOUND),
        (413, grpc.StatusCode.INVALID_ARGUMENT),
        (499, grpc.StatusCode.CANCELLED),
        (500, grpc.StatusCode.INTERNAL),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (418, grpc.StatusCode.UNKNOWN),
    ],
)
def test_http_statuses_map_to_the_codes_triton_answers(status: int, code: grpc.StatusCode) -> None:
    assert grpc_code(status) == code
