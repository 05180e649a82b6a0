"""A start-up check that a model answers a request the same whatever shares its batch.

A BatchNorm or Dropout left in training mode (a model never put in ``eval()``, or traced
or scripted while in training mode, which ``eval()`` cannot undo afterwards) makes each
answer depend on the other requests of its batch: answers change with load, and one
client's input shows in another client's answer. Nothing fails, so nobody notices; the
worker says so in its log at start.
"""

from __future__ import annotations

import numpy as np

from ringserve.gpu_worker.batch_inputs import Inputs, as_inputs, concat, to_device
from ringserve.gpu_worker.handlers.base import Handler, TensorSpec
from ringserve.gpu_worker.profile import sample_shape
from ringserve.ipc.layout import PayloadKind

# Relative change of a row's answer above which its batchmates decide it. Batched kernels
# differ from each other by far less (about 1e-6 on a CPU, 1e-3 with TF32 on a GPU); a
# BatchNorm in training mode moves an answer by its whole size.
TOLERANCE = 1e-2


def sample_rows(handler: Handler, count: int) -> np.ndarray | dict[str, np.ndarray]:
    """``count`` reproducible random rows of the declared input (values in [0, 1), or
    0 and 1 for integers: valid token ids and pixels alike); of each input, by name, for
    a model with several."""
    rng = np.random.default_rng(0)
    rows = {s.name: _random_rows(s, count, rng) for s in handler.inputs}
    return rows if len(rows) > 1 else rows[handler.inputs[0].name]


def _random_rows(spec: TensorSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    shape = (count, *sample_shape(spec))
    if np.issubdtype(np.dtype(spec.dtype), np.floating):
        return rng.random(shape).astype(spec.dtype)
    return rng.integers(0, 2, shape).astype(spec.dtype)


def preprocessed(handler: Handler, rows: np.ndarray | dict[str, np.ndarray]) -> Inputs:
    """The handler's batch input for sample ``rows``."""
    return as_inputs(handler.preprocess(rows, PayloadKind.TENSOR))


def _row(rows: np.ndarray | dict[str, np.ndarray], i: int) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(rows, dict):
        return {name: r[i : i + 1] for name, r in rows.items()}
    return rows[i : i + 1]


def batchmate_effect(handler: Handler) -> float | None:
    """How far the first row's answer moves when its one batchmate is swapped for
    another, relative to the answer's size. None if the answers are not numbers (or
    not finite). Two batches of two rows each, so the batch size is the same in both."""
    sample = sample_rows(handler, 3)
    rows = [preprocessed(handler, _row(sample, i)) for i in range(3)]
    answers = []
    for mate in rows[1:]:
        batch = to_device(concat([rows[0], mate]), handler.device)
        out = handler.postprocess(handler.infer(batch))
        if isinstance(out, dict):  # several outputs: the first declared one tells
            out = out.get(handler.outputs[0].name)
        elif isinstance(out, tuple | list):
            out = out[0] if out else None
        answers.append(np.asarray(out)[0])
    first, second = answers
    if first.dtype.kind not in "fiub" or first.shape != second.shape:
        return None
    a, b = first.astype(np.float64), second.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    scale = max(float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)), 1e-6)
    return float(np.abs(a - b).max(initial=0)) / scale
