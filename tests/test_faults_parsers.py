"""The request parsers under Hypothesis, in-process (no server): any input returns or
raises ``HTTPError`` with a 4xx, never another exception (nor a numpy warning, which the
strict warning filter turns into one), and what they return keeps the house rules
(finite floats, values unchanged by the cast, shapes that fit)."""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ringserve.frontend.call import decompress_body
from ringserve.frontend.errors import HTTPError
from ringserve.frontend.images import check_image
from ringserve.frontend.jsonio import parse_json
from ringserve.frontend.tensors import cast, fit_shape, from_json
from ringserve.frontend.v2_codec import TensorSpec, decode_infer_body
from ringserve.ipc.layout import DTYPES

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=30,
)  # fmt: skip
# Rectangular-ish numeric nests reach the casting and shape code more often.
NUMERIC_NESTS = st.integers(1, 4).flatmap(
    lambda depth: st.recursive(
        st.floats(width=64) | st.integers(-(2**65), 2**65) | st.booleans(),
        lambda c: st.lists(c, min_size=1, max_size=4),
        max_leaves=40,
    )
)
DTYPE_NAMES = st.sampled_from(DTYPES)
SHAPES = st.lists(st.integers(-1, 5), max_size=4)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_http_4xx(fn, *args):  # type: ignore[no-untyped-def]
    """Call ``fn``; it may return or raise HTTPError with a 4xx, nothing else."""
    try:
        return fn(*args)
    except HTTPError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        assert e.message
        return None


@PROPERTY
@given(data=JSON_VALUES | NUMERIC_NESTS, dtype=DTYPE_NAMES, shape=SHAPES, rows=st.integers(1, 64))
def test_property_from_json_and_fit_shape(data: object, dtype: str, shape: list, rows: int) -> None:
    arr = only_http_4xx(from_json, data, dtype)
    if arr is None:
        return
    assert isinstance(arr, np.ndarray)
    if arr.dtype.kind == "f":
        assert np.isfinite(arr).all(), "NaN/Inf got through"
    fitted = only_http_4xx(fit_shape, arr, shape, rows)
    if fitted is not None:
        out, n, _ = fitted
        assert out.shape[0] == n and 1 <= n <= rows


@pytest.mark.parametrize(
    ("data", "dtype"),
    [([[1, 2], [3]], "float32"), ([[1, 2], 3], "int64"), ([[[1], [2, 3]]], "float64")],
)
def test_ragged_data_is_refused_in_the_clients_terms(data: object, dtype: str) -> None:
    """numpy's message ("setting an array element with a sequence ... inhomogeneous part")
    went to the client as it was."""
    with pytest.raises(HTTPError) as info:
        from_json(data, dtype)
    assert info.value.status == 422
    assert info.value.message.startswith('"data" is not a rectangular array: its lists differ')
    assert "inhomogeneous" not in info.value.message


@pytest.mark.parametrize(
    ("shape", "spec", "message"),
    [
        ((3,), [8, 8], "input shape [3] does not match the model's: one row [8, 8] or a batch [rows, 8, 8]"),
        ((2, 3), [-1, 4], "input shape [2, 3] does not match the model's: one row [N, 4] or a batch [rows, N, 4]"),
        ((2, 3), [], "input shape [2, 3] does not match the model's: one row [] or a batch [rows]"),
    ],
)  # fmt: skip
def test_a_shape_that_does_not_fit_names_both_forms_plainly(
    shape: tuple[int, ...], spec: list[int], message: str
) -> None:
    """It read "does not match [8, 8] or [rows, *[8, 8]]": Python's unpacking, not a shape."""
    with pytest.raises(HTTPError) as info:
        fit_shape(np.zeros(shape, dtype=np.float32), spec, 32)
    assert (info.value.status, info.value.message) == (422, message)


@pytest.mark.parametrize(
    ("data", "dtype"),
    [([True, False], "float32"), ([[True]], "int64"), (True, "float32"), ([1, 0], "bool")],
)
def test_from_json_takes_booleans_only_for_a_bool_input(data: object, dtype: str) -> None:
    with pytest.raises(HTTPError) as e:
        from_json(data, dtype)
    assert e.value.status == 422
    assert ("booleans" if dtype == "bool" else "numbers") in e.value.message
    assert from_json([True, False], "bool").tolist() == [True, False]


@pytest.mark.parametrize(
    ("data", "body"),
    [([1.5, True], None), ([[0, 2], [3, False]], b'{"data": [[0, 2], [3, false]]}')],
)
def test_from_json_refuses_a_boolean_among_numbers(data: object, body: bytes | None) -> None:
    with pytest.raises(HTTPError, match="numbers, not booleans") as e:
        from_json(data, "float32", body)
    assert e.value.status == 422
    # Given the body, a 0 or 1 with no literal in the text skips the scan.
    assert from_json([0, 1, 2], "float32", b'{"data": [0, 1, 2]}').tolist() == [0, 1, 2]


def test_from_json_keeps_large_integers_exact() -> None:
    assert from_json([2**64 - 1, 1], "uint64").tolist() == [2**64 - 1, 1]
    assert from_json([[2**62 + 1], [2.0]], "int64").tolist() == [[2**62 + 1], [2]]
    with pytest.raises(HTTPError, match="out of range") as e:
        from_json([-1, 2**64 - 1], "uint64")
    assert e.value.status == 422
    # As the request path reads them: orjson turns -2**63 - 1 into the float -2**63.
    with pytest.raises(HTTPError, match="out of range for int64") as e:
        from_json(parse_json(b"[-9223372036854775809, 1]"), "int64")
    assert e.value.status == 422
    assert from_json(parse_json(b"[-9223372036854775808, 1]"), "int64").tolist() == [-(2**63), 1]


@PROPERTY
@given(
    arr=hnp.arrays(
        hnp.scalar_dtypes().filter(lambda d: d.kind in "biuf"),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    ),
    dtype=st.sampled_from([d for d in DTYPES if d != "bytes"]),
)
def test_property_cast_never_wraps_or_makes_inf(arr: np.ndarray, dtype: str) -> None:
    out = only_http_4xx(cast, arr, dtype)
    if out is None:
        return
    assert out.dtype == np.dtype(dtype)
    if out.dtype.kind == "f":
        assert np.isfinite(out).all()
    if out.dtype.kind in "iu" and arr.dtype.kind in "iuf" and arr.size:
        assert (out.astype(object) == arr.astype(object)).all(), "a value changed in the cast"


IMAGE_PREFIXES = st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]
)


@PROPERTY
@given(prefix=IMAGE_PREFIXES, rest=st.binary(max_size=200), max_pixels=st.integers(0, 10**9))
def test_property_check_image(prefix: bytes, rest: bytes, max_pixels: int) -> None:
    fmt = only_http_4xx(check_image, prefix + rest, max_pixels)
    assert fmt is None or fmt in ("png", "jpeg", "gif", "webp")
    # Read in place, as each image of a v2 BYTES tensor is: the same verdict.
    assert verdict(check_image, memoryview(prefix + rest), max_pixels) == verdict(
        check_image, prefix + rest, max_pixels
    )


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **options: object) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size).save(out, fmt, **options)
    return out.getvalue()


def _gif_on_a_small_screen(size: tuple[int, int]) -> bytes:
    """A GIF whose logical screen says 10x10 and whose one frame is ``size``."""
    gif = bytearray(_encoded(size, "GIF", "P"))
    gif[6:10] = (10).to_bytes(2, "little") * 2
    return bytes(gif)


@pytest.mark.parametrize(
    "make",
    [
        lambda size: _encoded(size, "PNG"),
        lambda size: _encoded(size, "JPEG"),
        lambda size: _encoded(size, "WEBP"),  # lossy: VP8
        lambda size: _encoded(size, "WEBP", lossless=True),  # VP8L
        lambda size: _encoded(size, "WEBP", "RGBA"),  # with alpha: VP8X
        lambda size: _encoded(size, "GIF", "P"),
        _gif_on_a_small_screen,
    ],
    ids=["png", "jpeg", "webp", "webp-lossless", "webp-extended", "gif", "gif-small-screen"],
)
def test_every_format_is_held_to_the_pixel_limit_before_it_is_decoded(make) -> None:  # type: ignore[no-untyped-def]
    """server.max_image_pixels held for PNG and JPEG only: a WebP's size was not read,
    and a GIF's logical screen was taken for its size, though Pillow decodes a larger
    first frame at the frame's size. A 212-byte WebP of 4 M pixels went to the worker."""
    from PIL import Image

    big = make((2000, 2000))
    assert Image.open(io.BytesIO(big)).size == (2000, 2000)  # what a decoder allocates
    with pytest.raises(HTTPError, match="declares 2000x2000 pixels") as e:
        check_image(big, 1_000_000)
    assert e.value.status == 413
    assert check_image(make((120, 90)), 1_000_000) in ("png", "jpeg", "webp", "gif")


def verdict(fn, *args):  # type: ignore[no-untyped-def]
    """What ``fn`` answers: its result, or the status and message of its HTTPError."""
    try:
        return fn(*args)
    except HTTPError as e:
        return e.status, e.message


V2_TENSORS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["INPUT0", "x"]) | JSON_SCALARS,
        "datatype": st.sampled_from(["FP32", "INT8", "BOOL", "BYTES", "FP16"]) | JSON_SCALARS,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
        "data": NUMERIC_NESTS | JSON_VALUES,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-1, 64) | JSON_SCALARS}
        )
        | JSON_VALUES,
    },
)
V2_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5) | JSON_SCALARS,
        "inputs": st.lists(V2_TENSORS, max_size=2) | JSON_VALUES,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["OUTPUT0", "y"])}))
        | JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_output", "sequence_id"]), JSON_SCALARS
        )
        | JSON_VALUES,
    },
)


@PROPERTY
@given(
    doc=V2_DOCS | JSON_VALUES,
    binary=st.binary(max_size=64),
    header_length=st.none() | st.integers(-2, 400).map(str) | st.text(max_size=4),
    dtype=st.sampled_from(["float32", "int8", "bool", "float16"]),
    per_row=st.lists(st.integers(-1, 4), max_size=2),
    mbs=st.integers(0, 8),
)
def test_property_v2_decode_request(
    doc: object, binary: bytes, header_length: str | None, dtype: str, per_row: list, mbs: int
) -> None:
    head = json.dumps(doc).encode()
    inp = TensorSpec("INPUT0", dtype, per_row)
    out = TensorSpec("OUTPUT0", dtype, per_row)
    req = only_http_4xx(decode_infer_body, head + binary, header_length, [inp], [out], mbs)
    if req is not None:
        assert req.payload.dtype == np.dtype(dtype)
        assert req.payload.shape[0] >= 1 and req.rows >= 1
        if req.payload.dtype.kind == "f":  # binary NaN is taken, and runs alone
            assert req.nonfinite == (not np.isfinite(req.payload).all())
        assert math.prod(req.payload.shape) * req.payload.itemsize == req.payload.nbytes


TWO_INPUT_DOCS = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            V2_TENSORS
            | st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["A", "B", "C"]),
                    "datatype": st.sampled_from(["FP32", "INT64", "BYTES"]),
                    "shape": st.lists(st.integers(1, 3), min_size=1, max_size=2),
                    "data": NUMERIC_NESTS,
                }
            ),
            max_size=3,
        )
    }
)


@PROPERTY
@given(
    doc=TWO_INPUT_DOCS,
    binary=st.binary(max_size=64),
    header_length=st.none() | st.integers(-2, 200).map(str),
    mbs=st.integers(0, 8),
)
def test_property_v2_decode_request_of_two_inputs(
    doc: object, binary: bytes, header_length: str | None, mbs: int
) -> None:
    """A model of two inputs (one FP32 of any length, one INT64 [2]): whatever comes,
    a 4xx, or every input in declared order with the rows they all share."""
    head = json.dumps(doc).encode()
    inps = [TensorSpec("A", "float32", [-1]), TensorSpec("B", "int64", [2])]
    out = [TensorSpec("OUTPUT0", "float32", [1])]
    req = only_http_4xx(decode_infer_body, head + binary, header_length, inps, out, mbs)
    if req is not None:
        a, b = req.payload
        assert (a.dtype, b.dtype) == (np.dtype("float32"), np.dtype("int64"))
        assert a.shape[0] == b.shape[0] == req.rows >= 1 and b.shape[1:] == (2,)


@PROPERTY
@given(
    body=st.binary(max_size=300) | st.binary(max_size=300).map(zlib.compress),
    encoding=st.sampled_from(["gzip", "deflate", "identity", "", "br", "GZIP", None]),
    limit=st.integers(0, 10_000),
)
def test_property_decompress_body(body: bytes, encoding: str | None, limit: int) -> None:
    out = only_http_4xx(decompress_body, body, encoding, limit)
    assert out is None or len(out) <= max(limit, len(body))


STRING_NESTS = st.integers(1, 3).flatmap(
    lambda depth: st.recursive(
        st.text(max_size=4) | st.integers(0, 3),
        lambda c: st.lists(c, min_size=1, max_size=3),
        max_leaves=20,
    )
)


@PROPERTY
@given(data=STRING_NESTS | JSON_VALUES, shape=SHAPES, rows=st.integers(1, 8))
def test_property_strings_for_a_bytes_input(data: object, shape: list, rows: int) -> None:
    """A BYTES input on the simple API: strings in, UTF-8 bytes out, nothing else."""
    arr = only_http_4xx(from_json, data, "bytes")
    if arr is None:
        return
    assert arr.dtype == object and all(isinstance(x, bytes) for x in arr.ravel().tolist())
    fitted = only_http_4xx(fit_shape, arr, shape, rows)
    if fitted is not None:
        out, n, _ = fitted
        assert out.shape[0] == n and 1 <= n <= rows
