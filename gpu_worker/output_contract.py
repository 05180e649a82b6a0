"""What a batch's output must be before it is answered: checked once per batch.

Frontends describe a model to clients from the handler's declared ``outputs[0]`` (v2
metadata, ``/v1/models``), while each answer carries the dtype and shape the handler
actually returned. A handler that returns float64, or the wrong number of columns,
would answer 200 with data its own metadata contradicts; Triton's backends refuse such
an output, and so do we, with a message that names the mismatch. A few microseconds a
batch, not a request.
"""

from __future__ import annotations

import numpy as np

from ringserve.gpu_worker.handlers.base import OutputContractError, TensorSpec
from ringserve.ipc.layout import DTYPES

# TorchServe handlers return labels or dicts from postprocess; ringserve's two ways:
TEXT_HINT = (
    " (for text per row, declare the output dtype 'bytes' and return an object array of "
    "str or bytes; for a label and score per row, set task = 'classification' and labels)"
)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_output(result: object, rows: int, spec: TensorSpec | None) -> np.ndarray:
    """``result`` if it is a numpy array of ``rows`` rows matching ``spec`` (the declared
    per-row dtype and shape, -1 for any size); else raise ``OutputContractError``.
    With no declared output, only the type and the row count are checked."""
    if not isinstance(result, np.ndarray):
        raise OutputContractError(
            f"postprocess returned {type(result).__name__}; it must return a numpy array "
            f"with one row per input row{TEXT_HINT}"
        )
    if result.ndim == 0 or result.shape[0] != rows:
        got = "a scalar" if result.ndim == 0 else f"{result.shape[0]} rows"
        raise OutputContractError(f"handler returned {got} for a batch of {rows}")
    if spec is None:
        return result
    name = spec.name
    if spec.dtype == "bytes":
        if not result.dtype.hasobject:
            raise OutputContractError(
                f"output {name} is {result.dtype.name}; the model declares bytes "
                "(an object array of bytes or str)"
            )
    elif result.dtype != np.dtype(spec.dtype):
        got = "object" if result.dtype.hasobject else result.dtype.name
        hint = TEXT_HINT if result.dtype.kind in "OUS" else ""
        raise OutputContractError(f"output {name} is {got}; the model declares {spec.dtype}{hint}")
    per_row = result.shape[1:]
    if len(per_row) != len(spec.shape) or any(
        d != -1 and d != g for d, g in zip(spec.shape, per_row, strict=True)
    ):
        raise OutputContractError(
            f"output {name} has per-row shape {_shape_text(per_row)}; "
            f"the model declares {_shape_text(spec.shape)}"
        )
    return result


def advertised_output(
    placeholder: TensorSpec, inp: TensorSpec, probe: np.ndarray
) -> TensorSpec | None:
    """What to advertise for an output nobody declared, from one probe row: its dtype,
    and its per-row shape when the input's is fixed (a variable input may change it:
    then as many dimensions, each -1). None when the probe says nothing usable."""
    if probe.dtype.name not in DTYPES or probe.dtype.name == "bytes":
        return None
    per_row = probe.shape[1:]
    shape = per_row if -1 not in inp.shape else tuple(-1 for _ in per_row)
    return TensorSpec(placeholder.name, probe.dtype.name, tuple(int(d) for d in shape))


def check_outputs(
    result: object, rows: int, specs: tuple[TensorSpec, ...]
) -> tuple[np.ndarray, ...]:
    """For a model that declares several outputs: ``result`` (a dict of numpy arrays by
    output name, or a tuple or list of them in declared order) as a tuple in declared
    order, each checked as ``check_output`` checks a lone one; else raise
    ``OutputContractError`` naming what is missing, extra or wrong."""
    names = [s.name for s in specs]
    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        extra = [str(k) for k in result if k not in names]
        if missing or extra:
            said = ", ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"undeclared {', '.join(extra)}" if extra else "",
                )
                if part
            )
            raise OutputContractError(
                f"postprocess returned outputs that are not the declared {', '.join(names)}: {said}"
            )
        values = [result[n] for n in names]
    elif isinstance(result, tuple | list):
        if len(result) != len(specs):
            raise OutputContractError(
                f"postprocess returned {len(result)} outputs; the model declares "
                f"{len(specs)} ({', '.join(names)})"
            )
        values = list(result)
    else:
        raise OutputContractError(
            f"postprocess returned {type(result).__name__}; a model that declares the "
            f"outputs {', '.join(names)} returns a dict of numpy arrays by name (or a tuple "
            "of them in that order), each with one row per input row"
        )
    return tuple(check_output(v, rows, s) for v, s in zip(values, specs, strict=True))
