"""Model handlers and the registry that turns a ``--model NAME=HANDLER`` string into one."""

from __future__ import annotations

import difflib
import importlib
import logging

from ringserve.gpu_worker.handlers.base import BadInput, Handler, TensorSpec
from ringserve.gpu_worker.stop import StopRequested
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.errors import ConfigError

__all__ = ["BadInput", "Handler", "TensorSpec", "create_handler"]

log = logging.getLogger("ringserve.worker")

_BUILTINS = {
    "identity": "ringserve.gpu_worker.handlers.identity:IdentityHandler",
    "digits": "ringserve.gpu_worker.handlers.digits:DigitsHandler",
    "torchvision": "ringserve.gpu_worker.handlers.vision:TorchvisionHandler",
    "torchscript": "ringserve.gpu_worker.handlers.torchscript:TorchScriptHandler",
}


def _check_options(settings: ModelSettings, cls: type[Handler], kind: str) -> None:
    """A key the handler does not read is a typo (``input_shap``, ``num_clases``): it was
    ignored without a word, and the model served with the default instead."""
    known = cls.known_options
    if known is None:
        return
    for key in sorted(settings.options):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            takes = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"models.{settings.name}.options.{key}: not an option of {kind} "
                f"({hint}it takes: {takes})"
            )


def _import(path: str) -> type:
    module, _, cls = path.partition(":")
    try:
        imported = importlib.import_module(module)
    except StopRequested:
        raise  # SIGTERM while it imported: a stop, not the module's fault
    except SystemExit as e:  # not an Exception: the worker died "error", and was retried
        raise ImportError(f"importing {module} called sys.exit({e.code!r})") from None
    obj = getattr(imported, cls)
    if not (isinstance(obj, type) and issubclass(obj, Handler)):
        raise TypeError(f"{path} is not a ringserve Handler subclass")
    return obj


def create_handler(settings: ModelSettings) -> Handler:
    """Build the handler named by ``settings.handler`` (not loaded yet). A BYTES input
    with the default ``preprocess`` (which makes tensors of numbers) is refused here,
    once, rather than failing every request."""
    kind, _, arg = settings.handler.partition(":")
    cls = _import(arg) if kind == "python" else _import(_BUILTINS[kind])
    _check_options(settings, cls, kind)
    if settings.weights and not cls.takes_weights:
        log.warning(
            "model %s: %s reads no weights file; weights = %s is not used",
            settings.name,
            kind,
            settings.weights,
        )
    handler = cls(settings, "" if kind == "python" else arg)
    inputs = handler.inputs
    # Only a declaration of the expected form: any other is refused, naming the field,
    # by ``check_declaration`` after ``load`` (here it failed "'tuple' object has no
    # attribute 'dtype'").
    if (
        isinstance(inputs, tuple | list)
        and any(isinstance(s, TensorSpec) and s.dtype == "bytes" for s in inputs)
        and (cls.preprocess is Handler.preprocess)
    ):
        which = "its input is" if len(inputs) == 1 else "an input is"
        raise TypeError(
            f"{settings.handler}: {which} BYTES, so it must define preprocess "
            "(an object array of bytes in, a tensor out)"
        )
    return handler
