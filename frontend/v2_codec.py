"""KServe v2 / Open Inference Protocol tensors, with Triton's binary tensor extension.

Pure functions, no HTTP and no shared memory, so every rule is unit-testable:
``decode_request`` turns an infer request body into validated arrays for the model's
inputs (one array for a model of one input), and which of its outputs to answer and how;
``encode_response`` turns the model's outputs into a response body.

Body layout with the binary extension (request and response alike)::

    | JSON header (Inference-Header-Content-Length bytes) | tensor 0 bytes | tensor 1 ... |

Each tensor sent as binary carries ``parameters.binary_data_size`` in the JSON header, and
the binary parts follow in the order of the tensors in the header. Binary tensor data is
little-endian, row-major, unpadded; BOOL is one byte 0/1; BYTES is, per element, a 4-byte
little-endian length followed by that many bytes.

Copies: a binary input becomes a read-only ``np.frombuffer`` view of the body (no copy);
the dispatcher copies it once into the shared-memory slot. A binary output is joined to
its header once. JSON data is parsed and cast like the simple API's (same NaN rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringserve.frontend.call import MAX_REQUEST_ID_CHARS
from ringserve.frontend.errors import HTTPError, bad_request
from ringserve.frontend.images import sniff
from ringserve.frontend.jsonio import dump_json, nonfinite, parse_json, utf8_strings
from ringserve.frontend.tensors import MAX_JSON_DEPTH, cast, exact_integers, json_kind_wanted
from ringserve.ipc import bytes_tensor
from ringserve.ipc.bytes_tensor import pack as serialize_bytes
from ringserve.ipc.slot_fit import over_slot
from ringserve.ipc.tensor_set import PackedBytes

# KServe datatype <-> ringserve dtype name (ringserve.ipc.layout.DTYPES) <-> Triton config.
V2_TO_DTYPE: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "bytes",
}
DTYPE_TO_V2 = {v: k for k, v in V2_TO_DTYPE.items()}
# Triton model-config names (BYTES is TYPE_STRING there).
V2_TO_CONFIG = {k: "TYPE_STRING" if k == "BYTES" else f"TYPE_{k}" for k in V2_TO_DTYPE}

MAX_DIMS = 8  # ringserve.ipc.layout.MAX_NDIM


def v2_datatype(dtype: str) -> str:
    """ringserve/numpy dtype name → KServe datatype ("float32" → "FP32")."""
    try:
        return DTYPE_TO_V2[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no KServe v2 datatype") from None


def model_shape(per_row: list[int], max_batch_size: int) -> list[int]:
    """The v2 metadata shape: the batch dimension (-1) first when the model batches."""
    return [-1, *per_row] if max_batch_size > 0 else list(per_row)


# -- BYTES ------------------------------------------------------------------------------


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """What the model declares for one of its inputs or outputs (from
    Handler.describe())."""

    name: str
    dtype: str  # ringserve dtype name
    shape: list[int]  # per row; -1 is dynamic

    @classmethod
    def from_spec(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), [int(x) for x in d["shape"]])


@dataclass(frozen=True)
class OutputWanted:
    """One output the response carries, and how."""

    index: int  # position in the model's declared outputs
    name: str
    binary: bool  # answer it as binary data
    classification: int = 0  # >0: answer the top-k classes instead of the tensor
    # It goes into this client shared-memory region: (region name, its bytes)
    shm: tuple[str, memoryview] | None = None


@dataclass(frozen=True)
class InferRequest:
    """A validated infer request, ready for the dispatcher."""

    # Shape [rows, *per-row shape]; may be a read-only view of the body. A model of several
    # inputs gets one per input, in declared order (BYTES ones as PackedBytes).
    payload: np.ndarray | tuple[np.ndarray | PackedBytes, ...]
    rows: int
    id: str | None
    # The outputs to answer, in the response's order (the request's, else declared order)
    outputs: tuple[OutputWanted, ...]
    # A lone BYTES input: ``payload`` is the tensor length-prefixed (uint8), this its shape
    bytes_shape: tuple[int, ...] | None = None
    images: bool = False  # BYTES elements are encoded images, one per row (see below)
    timeout_s: float | None = None  # Triton's ``timeout`` parameter (sent in µs), if any
    nonfinite: bool = False  # binary float data holding NaN or Inf: it runs alone


# Reads ``byte_size`` bytes at ``offset`` of a registered client region (client_shm.py)
ShmReader = Callable[[str, int, int, str], memoryview]

SHM_OFF = (
    "client shared memory is off: start ringserve with --allow-client-shm "
    "(server.allow_client_shm) to use Triton's system shared-memory extension"
)


def shm_off(name: str, offset: int, byte_size: int, where: str) -> memoryview:
    """The ShmReader of a server without ``server.allow_client_shm``: always a 403."""
    raise HTTPError(403, SHM_OFF)


def header_length(raw: str | None) -> int | None:
    """The Inference-Header-Content-Length header as a number (None: no header)."""
    if raw is None:
        return None
    digits = raw.strip(" \t")
    # As Content-Length: decimal digits only. int() also takes "+10", "1_0" and digits
    # of other scripts, which a proxy in front of us would read differently or refuse.
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        raise bad_request(
            "Inference-Header-Content-Length must be a non-negative decimal integer, "
            f"got {raw[:40]!r}"
        )
    return int(digits)


def split_body(body: bytes, n: int | None) -> tuple[bytes | memoryview, memoryview]:
    """(JSON header, binary tail) at ``n``, the parsed ``header_length`` (None: all
    JSON; 0 is a raw binary request, which ``decode_infer_body`` takes apart itself)."""
    if n is None:
        return body, memoryview(b"")
    if n == 0:
        raise bad_request("Inference-Header-Content-Length 0 is a raw binary request")
    if n > len(body):
        raise bad_request(
            f"Inference-Header-Content-Length {n} is larger than the body of {len(body)} bytes"
        )
    view = memoryview(body)
    return view[:n], view[n:]


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f'{where} "parameters" must be an object')
    return params


MAX_TIMEOUT_US = 3_600_000_000  # an hour, as X-Request-Timeout-Ms allows


def _timeout_param(raw: Any) -> float | None:
    """Triton's schedule-policy ``timeout`` (what ``tritonclient``'s ``infer(timeout=)``
    sends): microseconds, 0 for none. It is the request's deadline, as the
    ``X-Request-Timeout-Ms`` header is; with both, the shorter wins."""
    if raw is None or raw == 0:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise bad_request('"timeout" must be a non-negative integer of microseconds')
    return min(raw, MAX_TIMEOUT_US) / 1e6  # longer ones, which Triton takes, as an hour


_MAX_DIM = 2**63 - 1  # Triton's dims are int64


def _shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in raw
    ):
        raise bad_request(f'{where} "shape" must be a list of integers')
    if len(raw) > MAX_DIMS:
        raise bad_request(f"{where} has {len(raw)} dimensions; at most {MAX_DIMS} are supported")
    if any(d < 1 for d in raw):
        raise bad_request(f"{where} shape {raw} has a dimension below 1")
    if any(d > _MAX_DIM for d in raw):
        raise bad_request(f"{where} shape has a dimension over {_MAX_DIM}")
    return raw


def _check_shape(shape: list[int], spec: TensorSpec, max_batch_size: int) -> int:
    """Shape against the model's; returns the rows (batch dim, 1 when not batching)."""
    if max_batch_size > 0 and not shape:
        raise bad_request(
            f"input {spec.name!r} shape [] has no batch dimension; the model takes "
            f"{model_shape(spec.shape, max_batch_size)}"
        )
    per_row, rows = (shape[1:], shape[0]) if max_batch_size > 0 else (shape, 1)
    want = model_shape(spec.shape, max_batch_size)
    if len(shape) != len(want):
        raise bad_request(
            f"input {spec.name!r} shape {shape} has rank {len(shape)}; the model takes "
            f"rank {len(want)}: {want}"
        )
    for got, need in zip(per_row, spec.shape, strict=True):
        if need >= 0 and got != need:
            raise bad_request(
                f"input {spec.name!r} shape {shape} does not match the model's {want}"
            )
    if max_batch_size > 0 and rows > max_batch_size:
        raise bad_request(
            f"input {spec.name!r} batch of {rows} rows exceeds max_batch_size {max_batch_size}"
        )
    return rows


def _from_json_data(
    data: Any, shape: list[int], dtype: str, where: str, header: bytes | memoryview
) -> np.ndarray:
    count = math.prod(shape)
    if data is None or isinstance(data, dict):
        raise bad_request(f'{where} "data" must be a list of values (or one value)')
    if not isinstance(data, list):
        data = [data]
    depth, level = 0, [data]
    while level:  # bounded nesting before numpy sees it
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f'{where} "data" is nested deeper than {MAX_JSON_DEPTH} levels')
        level = [x for item in level if isinstance(item, list) for x in item if isinstance(x, list)]
    if dtype == "bytes":
        flat = _flatten(data)
        if len(flat) != count:
            raise bad_request(f"{where} has {len(flat)} elements; shape {shape} needs {count}")
        if not all(isinstance(x, str) for x in flat):
            raise bad_request(f'{where} BYTES "data" must hold strings')
        return bytes_tensor.packed(flat)
    try:
        raw = np.array(data)
    except ValueError:  # nested unevenly ([1, [2, 3]]): Triton reads the values in order
        data = _flatten(data)
        raw = np.array(data)
    if raw.size != count:
        raise bad_request(f"{where} has {raw.size} elements; shape {shape} needs {count}")
    if wanted := json_kind_wanted(raw, dtype, data, header):
        raise bad_request(f'{where} "data" must hold {wanted} for {v2_datatype(dtype)}')
    return cast(exact_integers(raw, data, dtype).reshape(shape), dtype)


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _shm_ref(params: dict[str, Any], where: str) -> tuple[str, int, int] | None:
    """(region, offset, byte size) from Triton's shared-memory parameters, if given."""
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if region is None and size is None and "shared_memory_offset" not in params:
        return None
    if not isinstance(region, str) or not region:
        raise bad_request(f"{where} shared memory parameters need a shared_memory_region name")
    for what, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad_request(f"{where} {what} must be a non-negative integer")
    return region, offset, size


def _from_binary(
    chunk: memoryview, shape: list[int], dtype: str, where: str, size_name: str = "binary_data_size"
) -> np.ndarray:
    count = math.prod(shape)
    if dtype == "bytes":
        try:
            bytes_tensor.check(chunk, count)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return np.frombuffer(chunk, dtype=np.uint8)  # passed on as it came
    dt = np.dtype(dtype).newbyteorder("<")
    if len(chunk) != count * dt.itemsize:
        raise bad_request(
            f"{where} {size_name} {len(chunk)} does not match shape {shape} x "
            f"{dt.itemsize} bytes = {count * dt.itemsize}"
        )
    arr = np.frombuffer(chunk, dtype=dt).reshape(shape)
    if dtype == "bool" and count and arr.view(np.uint8).max() > 1:
        return arr.view(np.uint8) != 0  # any other byte is true, as in Triton (and C)
    # Taken as sent, NaN and Inf included, as Triton does (perf_analyzer's random data
    # holds some): the request then runs alone (``nonfinite``). No copy on a
    # little-endian host.
    return np.ascontiguousarray(arr, dtype=np.dtype(dtype))


def _image_rows(shape: list[int], max_batch_size: int, where: str) -> int:
    """Rows of a BYTES tensor of encoded images: ``[rows]`` or ``[rows, 1]`` when the
    model batches, ``[1]`` when it does not."""
    if max_batch_size > 0:
        if not 1 <= len(shape) <= 2 or shape[1:] not in ([], [1]):
            raise bad_request(
                f"{where} shape {shape}: a BYTES tensor of images is [rows] or [rows, 1], "
                "one encoded image per row"
            )
        if shape[0] > max_batch_size:
            raise bad_request(
                f"{where} batch of {shape[0]} images exceeds max_batch_size {max_batch_size}"
            )
        return shape[0]
    if shape != [1]:
        raise bad_request(f"{where} shape {shape}: this model takes one image, shape [1]")
    return 1


def _input_name(tensor: Any) -> str:
    if not isinstance(tensor, dict):
        raise bad_request("each input must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise bad_request('input needs a string "name"')
    return name


def _decode_input(
    tensor: dict[str, Any],
    inp: TensorSpec,
    binary: memoryview,
    offset: int,
    header: bytes | memoryview,
    max_batch_size: int,
    accepts_images: bool,
    shm: ShmReader,
) -> tuple[np.ndarray, tuple[int, ...] | None, int, bool, int]:
    """One input of the request, named as ``inp``: (array, BYTES shape or None, rows,
    images, binary bytes it took at ``offset``). A numeric array gets its leading 1 when
    the model does not batch; a BYTES one stays length-prefixed, its shape beside it."""
    where = f"input {inp.name!r}"
    datatype = tensor.get("datatype")
    if datatype is None:
        raise bad_request(f'{where} needs a "datatype" ({v2_datatype(inp.dtype)})')
    if datatype == "BF16":  # a v2 datatype, but numpy (the slot's format) has no bfloat16
        raise bad_request(
            f"{where} datatype BF16 does not match the model's {v2_datatype(inp.dtype)} "
            "(ringserve takes no BF16 tensors: send FP32 or FP16)"
        )
    if not isinstance(datatype, str) or datatype not in V2_TO_DTYPE:
        raise bad_request(
            f"{where} has invalid datatype {datatype!r}; use one of {', '.join(V2_TO_DTYPE)}"
        )
    takes_images = accepts_images and inp.dtype != "bytes"  # else BYTES is the tensor itself
    images = takes_images and datatype == "BYTES"
    if V2_TO_DTYPE[datatype] != inp.dtype and not images:
        also = " (or BYTES: encoded images)" if takes_images else ""
        raise bad_request(
            f"{where} datatype {datatype} does not match the model's {v2_datatype(inp.dtype)}{also}"
        )
    shape = _shape(tensor.get("shape"), where)
    if images:
        rows = _image_rows(shape, max_batch_size, where)
    else:
        rows = _check_shape(shape, inp, max_batch_size)
    dtype = "bytes" if images else inp.dtype
    tparams = _params(tensor, where)

    consumed = 0
    shm_input = _shm_ref(tparams, where)
    if shm_input is not None:
        if "data" in tensor or "binary_data_size" in tparams:
            raise bad_request(f"{where} names a shared memory region and also carries data")
        arr = _from_binary(shm(*shm_input, where), shape, dtype, where, "shared_memory_byte_size")
    elif "binary_data_size" in tparams:
        size = tparams["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"{where} binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise bad_request(f'{where} has both "data" and binary_data_size')
        left = len(binary) - offset
        if size > left:
            after = "after the JSON header"
            if offset:  # (an input of several, after others' binary data)
                after = f"left {after} and the {offset} bytes of the inputs before it"
            raise bad_request(
                f"{where} binary data is truncated: binary_data_size {size}, {left} bytes {after}"
            )
        arr = _from_binary(binary[offset : offset + size], shape, dtype, where)
        consumed = size
    elif "data" in tensor:
        arr = _from_json_data(tensor["data"], shape, dtype, where, header)
    else:
        raise bad_request(
            f'{where} needs "data", parameters.binary_data_size or parameters.shared_memory_region'
        )

    if images:
        return arr, (rows,), rows, True, consumed
    if dtype == "bytes":
        return arr, tuple(shape) if max_batch_size > 0 else (1, *shape), rows, False, consumed
    return arr if max_batch_size > 0 else arr.reshape(1, *arr.shape), None, rows, False, consumed


def _decode_inputs(
    inputs: list[Any],
    inps: Sequence[TensorSpec],
    binary: memoryview,
    header: bytes | memoryview,
    max_batch_size: int,
    shm: ShmReader,
) -> tuple[tuple[np.ndarray | PackedBytes, ...], int, bool, int]:
    """The inputs of a model of several: (payload in declared order, rows, nonfinite,
    binary bytes taken). The request names each once, in any order; binary parts follow
    the header in the request's order, as Triton lays them out."""
    names = [i.name for i in inps]
    given = []  # declared index of each of the request's inputs
    for tensor in inputs:
        name = _input_name(tensor)
        if name not in names:
            known = ", ".join(repr(n) for n in names)
            raise bad_request(f"unknown input {name!r}: the model's inputs are {known}")
        given.append(names.index(name))
    if len(set(given)) != len(given):
        for i in given:
            if (times := given.count(i)) > 1:
                raise bad_request(f"input {names[i]!r} is given {times} times")
    if missing := [n for i, n in enumerate(names) if i not in given]:
        raise bad_request(
            f"the model takes {len(names)} inputs ({', '.join(repr(n) for n in names)}); "
            f"missing {', '.join(repr(n) for n in missing)}"
        )
    payload: list[Any] = [None] * len(inps)
    rows = [0] * len(inps)
    offset, bad = 0, False
    for tensor, i in zip(inputs, given, strict=True):
        # (Images are one lone input's alternative form: here BYTES is the tensor itself.)
        arr, bytes_shape, rows[i], _, used = _decode_input(
            tensor, inps[i], binary, offset, header, max_batch_size, False, shm
        )
        offset += used
        bad = bad or nonfinite(arr)
        payload[i] = arr if bytes_shape is None else PackedBytes(bytes_shape, arr)
    if (other := next((i for i, r in enumerate(rows) if r != rows[0]), None)) is not None:
        raise bad_request(
            f"inputs disagree on the batch dimension: {names[0]!r} has {rows[0]} rows, "
            f"{names[other]!r} has {rows[other]}"
        )
    return tuple(payload), rows[0], bad, offset


def decode_request(
    header: bytes | memoryview | dict[str, Any],
    binary: memoryview,
    inps: Sequence[TensorSpec],
    outs: Sequence[TensorSpec],
    max_batch_size: int,
    accepts_images: bool = False,
    shm: ShmReader = shm_off,
) -> InferRequest:
    """Validate an infer request against the model's inputs (``inps``) and outputs
    (``outs``), all of them, in declared order.

    As Triton: without ``"outputs"`` (or with an empty list) the response carries every
    output, in declared order, binary when ``binary_data_output`` says so; with it, the
    outputs it names, in its order, each with its own parameters.

    ``shm`` reads client shared memory for inputs and outputs that name a region
    (Triton's system shared-memory extension). ``header`` is the JSON text, or the
    object it holds (gRPC's requests are built as one: no text to write and read back).

    A model that ``accepts_images`` also takes its input as BYTES whatever its declared
    datatype: one encoded image (JPEG, PNG, ...) per row, which the worker decodes and
    preprocesses as it does an ``image/*`` body of the simple API (Triton users send
    images this way to a model with server-side preprocessing). Only a model of one
    input takes images.
    """
    doc = header if isinstance(header, dict) else _parse_header(header, binary)
    if not isinstance(doc, dict):
        raise bad_request("infer request must be a JSON object")
    rid = doc.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_REQUEST_ID_CHARS):
        raise bad_request(f'"id" must be a string of at most {MAX_REQUEST_ID_CHARS} characters')
    params = _params(doc, "request")
    if reserved := [k for k in params if k.startswith("triton_")]:
        raise bad_request(f"parameter {reserved[0]!r}: names starting triton_ are reserved")
    priority = params.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise bad_request('"priority" must be a non-negative integer')
    if params.get("sequence_id") not in (None, 0, ""):
        raise bad_request("sequence_id is not supported: ringserve models are stateless")
    timeout_s = _timeout_param(params.get("timeout"))
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_request('"binary_data_output" must be true or false')

    if "inputs" not in doc:
        raise bad_request('infer request needs "inputs"')
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise bad_request('"inputs" must be a list')
    payload: np.ndarray | tuple[np.ndarray | PackedBytes, ...]
    if len(inps) == 1:  # (the usual case: no names to match up)
        inp = inps[0]
        if len(inputs) != 1:
            raise bad_request(f"the model takes exactly 1 input ({inp.name!r}); got {len(inputs)}")
        tensor = inputs[0]
        name = _input_name(tensor)
        if name != inp.name:
            raise bad_request(f"unknown input {name!r}: the model's input is {inp.name!r}")
        arr, bytes_shape, rows, images, consumed = _decode_input(
            tensor, inp, binary, 0, header, max_batch_size, accepts_images, shm
        )
        payload = arr
        # (JSON data holds none: the house rule refused it in ``cast``)
        bad = nonfinite(arr)
    else:
        payload, rows, bad, consumed = _decode_inputs(
            inputs, inps, binary, header, max_batch_size, shm
        )
        bytes_shape, images = None, False
    if consumed != len(binary):
        raise bad_request(
            f"{len(binary) - consumed} bytes after the JSON header are not claimed by any "
            "input's binary_data_size"
        )

    requested = doc.get("outputs")
    if requested is None or requested == []:
        wanted = _every_output(outs, binary_default)
    else:
        wanted = _outputs_wanted(requested, outs, binary_default, shm)
    return InferRequest(payload, rows, rid, wanted, bytes_shape, images, timeout_s, bad)


def _parse_header(header: bytes | memoryview, binary: memoryview) -> Any:
    try:
        return parse_json(header)
    except HTTPError as e:
        if len(binary) or not isinstance(header, bytes) or header.isascii():
            raise
        raise bad_request(  # most likely binary tensors without their header length
            f"{e.message}; a body with binary tensors needs the Inference-Header-Content-Length "
            "header (the size of its JSON part)"
        ) from None


def _outputs_wanted(
    requested: Any, outs: Sequence[TensorSpec], binary_default: bool, shm: ShmReader
) -> tuple[OutputWanted, ...]:
    """The request's ``"outputs"`` (a non-empty value), validated against the model's."""
    if not isinstance(requested, list):
        raise bad_request('"outputs" must be a list')
    names = [o.name for o in outs]
    for o in requested:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise bad_request('each requested output must be an object with a "name"')
        if o["name"] not in names:
            known = (
                f"the model's output is {names[0]!r}"
                if len(names) == 1
                else "the model's outputs are " + ", ".join(repr(n) for n in names)
            )
            raise bad_request(f"unknown output {o['name']!r}: {known}")
    if len(requested) > 1:
        asked = [o["name"] for o in requested]
        for n in asked:
            if (times := asked.count(n)) > 1:
                raise bad_request(f"output {n!r} is requested {times} times")
    wanted = []
    for o in requested:
        name = o["name"]
        index = names.index(name)
        where = f"output {name!r}"
        oparams = _params(o, where)
        classification = oparams.get("classification", 0)
        if (
            not isinstance(classification, int)
            or isinstance(classification, bool)
            or classification < 0
        ):
            raise bad_request('"classification" must be a non-negative integer')
        if classification and outs[index].dtype == "bytes":
            raise bad_request(f"{where} is BYTES: it has no classes to rank")
        flag = oparams.get("binary_data", binary_default)
        if not isinstance(flag, bool):
            raise bad_request('"binary_data" must be true or false')
        ref = _shm_ref(oparams, where)
        region = None
        if ref is not None:
            if classification or oparams.get("binary_data") is True:
                what = "classification" if classification else "binary_data"
                raise bad_request(f"{where} can't set both shared_memory_region and {what}")
            # looked up once, now: a bad region is refused before the model runs
            region = (ref[0], shm(*ref, where))
        wanted.append(OutputWanted(index, name, flag, classification, region))
    return tuple(wanted)


def _raw_image(body: memoryview, accepts_images: bool, inp: TensorSpec) -> bool:
    """An image-taking model's raw body is one encoded image when it is not the tensor:
    its size does not fit the declared shape and it starts as an image does. A body that
    does both is refused: read as the tensor, a 256-byte PNG was a digit's 64 floats."""
    if not accepts_images or inp.dtype == "bytes":
        return False
    try:
        fmt = sniff(body)
    except HTTPError:
        return False
    per_row = math.prod(d for d in inp.shape if d >= 0) * np.dtype(inp.dtype).itemsize
    if per_row == 0 or inp.shape.count(-1) > 1:
        return True  # no raw body can be this tensor (decode_raw_request says why)
    fits = len(body) % per_row == 0 if -1 in inp.shape else len(body) == per_row
    if fits:
        raise bad_request(
            f"raw binary input {inp.name!r}: the body is a whole tensor's size ({len(body)} "
            f"bytes) and starts as a {fmt.upper()} image does, so it is ambiguous: send an "
            "image as BYTES with a JSON header, or the tensor with a JSON header "
            "(Inference-Header-Content-Length > 0)"
        )
    return True


def _every_output(outs: Sequence[TensorSpec], binary: bool) -> tuple[OutputWanted, ...]:
    """Every output, in declared order (a request that names none; a raw binary
    request's answer, all binary)."""
    if len(outs) == 1:  # (the usual case, without the generator)
        return (OutputWanted(0, outs[0].name, binary),)
    return tuple(OutputWanted(i, o.name, binary) for i, o in enumerate(outs))


def decode_raw_request(
    body: memoryview,
    inps: Sequence[TensorSpec],
    outs: Sequence[TensorSpec],
    max_batch_size: int,
    accepts_images: bool,
) -> InferRequest:
    """Triton's raw binary request (``Inference-Header-Content-Length: 0``): the body is
    the one input's bytes, one row, and every output comes back binary. As Triton
    deduces it: the declared shape, its one variable dimension (at most one) sized by
    the byte count; a BYTES input must be ``[1]``, the body its one element. Beyond
    Triton: a model that takes images also takes one encoded image this way. A model of
    several inputs takes no raw body: it has no names to say which input it is."""
    if len(inps) != 1:
        raise bad_request(
            f"a raw binary request carries one input; the model takes {len(inps)} "
            f"({', '.join(repr(i.name) for i in inps)}): send the JSON header"
        )
    inp = inps[0]
    where = f"raw binary input {inp.name!r}"
    want = model_shape(inp.shape, max_batch_size)
    if not len(body):
        raise bad_request(f"{where}: the body is empty; it must hold the input's bytes")
    images = _raw_image(body, accepts_images, inp)
    if images or inp.dtype == "bytes":
        if not images and inp.shape != [1]:
            raise bad_request(
                f"{where} is BYTES of shape {want}: a raw binary request can only give a "
                "BYTES input of shape [1] (one element); send the JSON header"
            )
        arr = np.frombuffer(bytes_tensor.pack([bytes(body)]), dtype=np.uint8)
        return InferRequest(
            arr, 1, None, _every_output(outs, True), (1,) if images else (1, 1), images
        )
    variable = [i for i, d in enumerate(inp.shape) if d < 0]
    if len(variable) > 1:
        raise bad_request(
            f"{where} of shape {want} has more than one variable dimension, which the "
            "body's size cannot give; send the JSON header with the shape"
        )
    shape = list(inp.shape)
    per_fixed = math.prod(d for d in shape if d >= 0) * np.dtype(inp.dtype).itemsize
    if variable:
        if not per_fixed:  # a fixed dimension of 0: no byte count gives the variable one
            raise bad_request(
                f"{where} of shape {want} holds no bytes whatever its variable dimension; "
                "send the JSON header with the shape"
            )
        if len(body) % per_fixed:
            raise bad_request(
                f"{where}: the body of {len(body)} bytes is not a whole number of "
                f"{per_fixed}-byte steps of shape {want} ({v2_datatype(inp.dtype)})"
            )
        shape[variable[0]] = len(body) // per_fixed
    try:
        arr = _from_binary(body, shape, inp.dtype, where, "body size")
    except HTTPError as e:
        if not accepts_images:
            raise
        # The other form this model takes, which the body is not either.
        raise bad_request(
            f"{e.message}; nor is it a JPEG, PNG, GIF or WebP image, which this model also "
            "takes as a raw body"
        ) from None
    return InferRequest(
        arr.reshape(1, *shape),
        1,
        None,
        _every_output(outs, True),
        nonfinite=nonfinite(arr),
    )


def decode_infer_body(
    body: bytes,
    header_length_raw: str | None,
    inps: Sequence[TensorSpec],
    outs: Sequence[TensorSpec],
    max_batch_size: int,
    accepts_images: bool = False,
    shm: ShmReader = shm_off,
    slot_bytes: int | None = None,
) -> InferRequest:
    """An infer request body, per its Inference-Header-Content-Length: all JSON (no
    header), JSON and binary tensors (a positive length), or raw binary (0).

    Binary input over ``slot_bytes`` is refused before it is parsed: walking the length
    prefixes of 8 MiB of empty BYTES elements held the event loop for 0.6 s, only for
    the request to be refused as over a slot once it had been."""
    n = header_length(header_length_raw)
    raw = n == 0
    header, binary = (b"", memoryview(body)) if raw else split_body(body, n)
    if slot_bytes is not None and len(binary) > slot_bytes:
        raise HTTPError(413, over_slot("binary input", len(binary), slot_bytes))
    if raw:
        return decode_raw_request(binary, inps, outs, max_batch_size, accepts_images)
    return decode_request(header, binary, inps, outs, max_batch_size, accepts_images, shm)


# -- responses --------------------------------------------------------------------------


def _json_data(arr: np.ndarray, dtype: str) -> list[Any] | np.ndarray:
    if dtype == "bytes":
        return utf8_strings(arr).ravel().tolist()
    if nonfinite(arr):
        raise HTTPError(
            500, "the output holds NaN or Inf, which JSON cannot carry: ask for it with binary_data"
        )
    return arr.ravel()  # orjson writes numpy arrays itself (dump_json)


def classify(output: np.ndarray, count: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Triton's classification extension: per row (first dimension), the ``count``
    highest of its values, highest first (ties in index order), each as the string
    "value:index[:label]"; the value printed as Triton prints it (``std::to_string``:
    fixed, 6 decimals, for floating types; an integer as one). Returns an object array
    of UTF-8 ``bytes`` (as a BYTES output of a model), ``[rows, min(count, values per
    row)]``."""
    rows = output.reshape(output.shape[0], -1) if output.ndim else output.reshape(1, 1)
    k = min(count, rows.shape[1])
    # Highest first, stable for ties. Compared in the output's own type, as Triton does:
    # as float64, integers past 2**53 tied. ~x orders integers (signed or not) and
    # booleans backwards without overflow; floats are negated.
    key = -rows.astype(np.float64) if rows.dtype.kind == "f" else ~rows
    top = np.argsort(key, axis=1, kind="stable")[:, :k]
    floating = rows.dtype.kind == "f"
    out = np.empty(top.shape, dtype=object)
    for r, indices in enumerate(top.tolist()):
        for j, i in enumerate(indices):
            v = rows[r, i]
            text = f"{float(v):f}:{i}" if floating else f"{int(v)}:{i}"
            out[r, j] = (f"{text}:{labels[i]}" if i < len(labels) else text).encode()
    return out


def _raw(output: np.ndarray, dtype: str) -> memoryview:
    """The output's bytes as the binary extension lays them out."""
    if dtype == "bytes":
        return memoryview(serialize_bytes(output))
    return np.ascontiguousarray(output, dtype=output.dtype.newbyteorder("<")).data


@dataclass(slots=True)
class EncodedOutput:
    """One output of a response, as either protocol carries it."""

    name: str
    datatype: str  # v2's
    shape: list[int]
    raw: memoryview | None = None  # binary data (the binary extension's layout)
    data: Any = None  # JSON data, when neither binary nor in shared memory


def encode_outputs(
    request: InferRequest,
    outputs: Sequence[np.ndarray],
    out_dtypes: Sequence[str],
    max_batch_size: int,
    labels: Sequence[str] = (),
) -> list[EncodedOutput]:
    """The outputs ``request`` asked for, in its order, each binary, JSON or written to
    its client shared-memory region (``raw`` and ``data`` both None).

    ``outputs`` are all the model's outputs, in declared order (a 1-tuple for a model of
    one), ``out_dtypes`` their ringserve dtype names. ``labels`` name the classes of the
    model's first output for the classification extension (another output's classes are
    numbers only). Shared memory is written only after every output passed its checks:
    a refusal writes nothing."""
    encoded: list[EncodedOutput] = []
    writes: list[tuple[memoryview, memoryview]] = []
    for want in request.outputs:
        output, out_dtype = outputs[want.index], out_dtypes[want.index]
        if want.classification:
            output = classify(output, want.classification, labels if want.index == 0 else ())
            out_dtype = "bytes"
        if max_batch_size <= 0 and output.ndim and output.shape[0] == 1:
            output = output[0]
        one = EncodedOutput(want.name, v2_datatype(out_dtype), list(output.shape))
        if want.shm is not None:
            region, dest = want.shm
            data = _raw(output, out_dtype)
            if data.nbytes > len(dest):
                raise bad_request(
                    f"output {want.name!r} needs {data.nbytes} bytes; shared memory "
                    f"region {region!r} was given shared_memory_byte_size {len(dest)}"
                )
            writes.append((dest, data))
        elif want.binary:
            one.raw = _raw(output, out_dtype)
        else:
            one.data = _json_data(output, out_dtype)
        encoded.append(one)
    for dest, data in writes:
        dest[: data.nbytes] = data.cast("B")
    return encoded


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: Sequence[np.ndarray],
    out_dtypes: Sequence[str],
    max_batch_size: int,
    labels: Sequence[str] = (),
) -> tuple[bytes, int | None]:
    """Response body, and the JSON header's length when binary data follows it
    (``encode_outputs`` says what goes in): the outputs' binary data after the header,
    in the request's order."""
    entries = []
    raws: list[memoryview] = []
    for one in encode_outputs(request, outputs, out_dtypes, max_batch_size, labels):
        entry: dict[str, Any] = {"name": one.name, "datatype": one.datatype, "shape": one.shape}
        if one.raw is not None:
            entry["parameters"] = {"binary_data_size": one.raw.nbytes}
            raws.append(one.raw)
        elif one.data is not None:
            entry["data"] = one.data
        # (in shared memory: no more than name, datatype and shape, as Triton's entry
        # says; its C++ client reads any output "parameters" as binary data that must
        # follow)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request.id:  # Triton leaves an empty id out
        doc["id"] = request.id
    doc["outputs"] = entries
    head = dump_json(doc)
    if not raws:
        return head, None
    return b"".join((head, *raws)), len(head)
