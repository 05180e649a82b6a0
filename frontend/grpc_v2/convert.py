"""A gRPC ``ModelInferRequest`` as the HTTP codec's input, and the codec's outputs as a
``ModelInferResponse``.

One set of rules for both protocols: the request becomes the JSON header (the object,
not its text) and the binary part that an HTTP client would have sent (every tensor as
binary data: raw contents as they are, typed contents packed once), and
``v2_codec.decode_request`` checks it as it checks any. Every output comes back binary, in ``raw_output_contents``, as Triton's
gRPC frontend answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ringserve.frontend.errors import bad_request
from ringserve.frontend.grpc_v2.messages import pb
from ringserve.frontend.v2_codec import EncodedOutput
from ringserve.ipc import bytes_tensor

# Which InferTensorContents field carries each datatype (FP16 and BF16 have none: they
# travel as raw contents only, as in Triton).
CONTENTS_FIELD = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
SHM_REGION = "shared_memory_region"
# HTTP-only: over gRPC every output is binary, and binary input sizes are the lengths of
# raw_input_contents.
HTTP_ONLY = ("binary_data_output", "binary_data", "binary_data_size")
# Asks a stream for a final flag on its responses (perf_analyzer sends it on every
# request): a ringserve model answers each request once, so every response is final.
FINAL_FLAG_ASKED = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"


def parameter_value(p: Any) -> Any:
    """The value an ``InferParameter`` holds (None when it holds none)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _params(params: Any, where: str) -> dict[str, Any]:
    out = {}
    for key, p in params.items():
        if key in HTTP_ONLY or key == FINAL_FLAG_ASKED:
            continue
        value = parameter_value(p)
        if value is None:
            raise bad_request(f"{where} parameter {key!r} holds no value")
        out[key] = value
    return out


def _packed_contents(tensor: Any) -> bytes | None:
    """A tensor's typed ``contents`` as raw bytes of its datatype (None without any)."""
    if not tensor.HasField("contents"):
        return None
    contents = tensor.contents
    given = [f.name for f, _ in contents.ListFields()]
    if not given:
        return None
    field, dtype = CONTENTS_FIELD.get(tensor.datatype, (None, None))
    if tensor.datatype == "BYTES":
        field = "bytes_contents"
    if field is None:
        raise bad_request(
            f"input {tensor.name!r}: {tensor.datatype} has no typed contents; send it in "
            "raw_input_contents"
        )
    if given != [field]:
        raise bad_request(
            f"input {tensor.name!r} of datatype {tensor.datatype} takes its data in "
            f"contents.{field}; got contents.{', '.join(given)}"
        )
    values = getattr(contents, field)
    if dtype is None:  # BYTES
        return bytes_tensor.pack(list(values))
    if np.issubdtype(dtype, np.integer) and values:
        info = np.iinfo(dtype)  # (int_contents carries INT8 as int32: not wrapped)
        if min(values) < info.min or max(values) > info.max:
            raise bad_request(
                f"input {tensor.name!r}: a value is out of the range of {tensor.datatype}"
            )
    return np.asarray(values, dtype=dtype).tobytes()


def _output(out: Any) -> dict[str, Any]:
    """A requested output: binary, unless it goes to a shared-memory region."""
    params = _params(out.parameters, f"output {out.name!r}")
    if SHM_REGION not in params:
        params["binary_data"] = True
    return {"name": out.name, "parameters": params}


def as_v2_request(request: Any) -> tuple[dict[str, Any], memoryview]:
    """The JSON header (as the object it would hold) and the binary part an HTTP client
    would send for ``request``.

    Raw contents go, in order, to the inputs that name no shared-memory region and
    carry no typed contents; their count must match, as in Triton."""
    raws = request.raw_input_contents
    doc: dict[str, Any] = {}
    if request.id:
        doc["id"] = request.id
    doc["parameters"] = _params(request.parameters, "request")
    inputs, parts = [], []
    taking_raw = 0
    for tensor in request.inputs:
        params = _params(tensor.parameters, f"input {tensor.name!r}")
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if SHM_REGION not in params:
            data = _packed_contents(tensor)
            if data is None:
                if taking_raw >= len(raws):
                    raise bad_request(
                        f"input {tensor.name!r} has no data: give it raw_input_contents, "
                        "typed contents or a shared memory region"
                    )
                data = raws[taking_raw]
                taking_raw += 1
            elif raws:
                raise bad_request(
                    f"input {tensor.name!r} has typed contents beside raw_input_contents: "
                    "use one or the other for every input"
                )
            params["binary_data_size"] = len(data)
            parts.append(data)
        entry["parameters"] = params
        inputs.append(entry)
    if taking_raw != len(raws):
        raise bad_request(
            f"raw_input_contents has {len(raws)} entries; {taking_raw} inputs take theirs from it"
        )
    doc["inputs"] = inputs
    if request.outputs:
        doc["outputs"] = [_output(out) for out in request.outputs]
    else:
        doc["parameters"]["binary_data_output"] = True
    binary = parts[0] if len(parts) == 1 else b"".join(parts)
    return doc, memoryview(binary)


def final_flag_asked(request: Any) -> bool:
    p = request.parameters.get(FINAL_FLAG_ASKED)
    return p is not None and parameter_value(p) is True


def infer_response(model_name: str, rid: str, outputs: Sequence[EncodedOutput]) -> Any:
    """The ``ModelInferResponse`` of encoded outputs, each binary or in client shared
    memory. ``raw_output_contents`` holds one entry per output, empty for one in shared
    memory: tritonclient finds an output's data by its index there."""
    response = pb.ModelInferResponse(model_name=model_name, model_version="1", id=rid)
    for one in outputs:
        response.outputs.add(name=one.name, datatype=one.datatype, shape=one.shape)
        response.raw_output_contents.append(b"" if one.raw is None else one.raw.tobytes())
    return response
