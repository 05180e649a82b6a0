"""Loading a model's weights file: a state_dict, with ``weights_only=True`` so a
checkpoint cannot run code.

A file that is not a torch checkpoint, or whose tensors do not fit the model, cannot
fix itself: ``WeightsError``, which stops a start at once (MODEL_CONFIG) instead of
being retried until the start-up timeout. A missing or unreadable file (storage not
mounted yet) stays an ``OSError``: retried (not the EINVAL of a truncated archive).
"""

from __future__ import annotations

import errno

import torch

# torch's own message for a file it cannot unpickle with weights_only=True opens with
# advice that does not apply here (ringserve never loads with weights_only=False) and
# puts the cause at its end, after this marker.
_UNPICKLER_CAUSE = "WeightsUnpickler error:"
_UNPICKLER_TAIL = "Check the documentation of torch.load"  # ...and the advice again
# torch's archive reader ends each of its errors with a paragraph of guesses ("This is an
# internal miniz error. If you are seeing this error, ..."); the cause comes before it.
_MINIZ_TAIL = "This is an internal miniz error"
_TORCHSCRIPT = "TorchScript archive"  # what torch.load says of a torch.jit.save file
MAX_REASON = 240


class WeightsError(ValueError):
    """The weights file is there but is not a checkpoint of this model."""


def load_state_dict(model: torch.nn.Module, path: str) -> None:
    """Load the state_dict at ``path`` into ``model`` (unwrapping a training
    checkpoint's ``state_dict`` or ``model`` entry)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # A seek before the file's start, to where a truncated or corrupt archive's
        # directory says a record is: the file is there, and no retry mends it (it was
        # retried until server.startup_timeout_s, as "OSError: Invalid argument").
        why = f"it is truncated or corrupt (reading it failed: {e.strerror})"
        raise WeightsError(f"weights file {path} is not a torch state_dict: {why}") from e
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        if _TORCHSCRIPT in str(e):  # torch's advice (weights_only=False) is not ours
            why = "it is a TorchScript archive (torch.jit.save): serve it as torchscript:PATH"
        else:
            why = reason(e)
        raise WeightsError(f"weights file {path} is not a torch state_dict: {why}") from e
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        name = type(model).__name__
        raise WeightsError(f"weights file {path} does not fit {name}: {reason(e)}") from e


def reason(error: Exception) -> str:
    """The part of a torch error that says what is wrong, on one line, bounded."""
    text = str(error)
    if _UNPICKLER_CAUSE in text:
        text = text[text.index(_UNPICKLER_CAUSE) + len(_UNPICKLER_CAUSE) :]
        text = text.partition(_UNPICKLER_TAIL)[0]
    text = " ".join(text.partition(_MINIZ_TAIL)[0].split()).removesuffix(".")
    if not text:  # an empty file's EOFError says nothing
        text = f"{type(error).__name__} (an empty or truncated file?)"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
