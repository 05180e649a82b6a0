"""A handler's declared input and output, checked once after ``load``.

Frontends validate requests against the declared inputs and describe the model from its specs
(they never import the handler). A missing spec, a dtype name numpy reads but ringserve
does not carry ("fp32"), or an ONNX-style ``None`` dimension used to load fine and then
fail every request with a frontend traceback (or crash the worker): refused here, with
the field named, as a model load error (shown in ``ctl status`` and ``/v1/models``).
"""

from __future__ import annotations

from ringserve.gpu_worker.handlers.base import Handler, TensorSpec
from ringserve.ipc.layout import DTYPES, MAX_NDIM

FORM = 'TensorSpec("NAME", "float32", (per-row dims, -1 for any size))'


class DeclarationError(ValueError):
    """The handler's ``inputs``/``outputs`` cannot be served as declared."""


MAX_TENSORS = 16  # inputs or outputs: a tensor set's table stays small beside its tensors


def check_declaration(handler: Handler) -> None:
    cls = type(handler).__name__
    inputs, outputs = handler.inputs, handler.outputs
    for role, specs in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(specs, tuple | list) or not 1 <= len(specs) <= MAX_TENSORS:
            count = len(specs) if isinstance(specs, tuple | list) else type(specs).__name__
            raise DeclarationError(
                f"{cls}.{role} declares {count}: set {role} = ({FORM},), or up to "
                f"{MAX_TENSORS} of them for a model with several {role}"
            )
        for spec in specs:
            _check_spec(role[:-1], spec)
        names = [s.name for s in specs]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise DeclarationError(f"{cls}.{role} names {twice[0]!r} more than once")
    if len(inputs) > 1 and handler.accepts_images:
        raise DeclarationError(
            f"{cls} takes images, so it declares one input (the image's tensor); it "
            f"declares {len(inputs)}"
        )
    if handler.task == "classification" and len(outputs) > 1:
        raise DeclarationError(
            f"{cls} is a classification model, so it declares one output (the scores); "
            f"it declares {len(outputs)}"
        )
    if handler.task == "classification":
        _check_classes(type(handler).__name__, handler.outputs[0], handler.labels)
    elif handler.task != "tensor":
        raise DeclarationError(
            f"{type(handler).__name__}.task is {handler.task!r}: tensor or classification"
        )


def _check_classes(cls: str, out: TensorSpec, labels: tuple[str, ...]) -> None:
    """A classification answer is one score per class per row: /predict and v2's
    classification extension take the top classes of each row."""
    if len(out.shape) != 1 or out.dtype == "bytes":
        raise DeclarationError(
            f"{cls} is a classification model, so its output is one score per class per "
            f"row (a per-row shape like [classes]); it declares {out.dtype} {list(out.shape)}"
        )
    classes = out.shape[0]
    if labels and classes != -1 and len(labels) != classes:
        raise DeclarationError(f"{cls} declares {classes} classes but {len(labels)} labels")


def _check_spec(role: str, spec: object) -> None:
    if not isinstance(spec, TensorSpec):
        raise DeclarationError(f"{role} must be a {FORM}, not {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise DeclarationError(f"{role} needs a name (a non-empty string), got {spec.name!r}")
    where = f"{role} {spec.name}"
    if spec.dtype not in DTYPES:
        raise DeclarationError(
            f"{where}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)} "
            "(numpy names; v2 metadata shows them as FP32, INT64, ...)"
        )
    if not isinstance(spec.shape, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d >= 1) for d in spec.shape
    ):
        raise DeclarationError(
            f"{where}: shape {spec.shape!r} must list the per-row dimensions as positive "
            "integers, with -1 (not None) for a size that varies"
        )
    if len(spec.shape) >= MAX_NDIM:  # a request or an answer holds the batch dimension too
        raise DeclarationError(
            f"{where}: shape {tuple(spec.shape)!r} has {len(spec.shape)} per-row dimensions; "
            f"a slot header holds {MAX_NDIM} with the batch dimension, so at most "
            f"{MAX_NDIM - 1}"
        )
