"""Loading a model's weights file: a state_dict, with ``weights_only=True`` so a
checkpoint cannot run code.

A file that is not a torch checkpoint, or whose tensors do not fit the model, cannot
fix itself: ``WeightsError``, which stops a start at once (MODEL_CONFIG) instead of
being retried until the start-up timeout. A missing or unreadable file (storage not
mounted yet) stays an ``OSError``: retried.
"""

from __future__ import annotations

import torch

# torch's own message for a file it cannot unpickle with weights_only=True opens with
# advice that does not apply here (ringserve never loads with weights_only=False) and
# puts the cause at its end, after this marker.
_UNPICKLER_CAUSE = "WeightsUnpickler error:"
_UNPICKLER_TAIL = "Check the documentation of torch.load"  # ...and the advice again
MAX_REASON = 240


class WeightsError(ValueError):
    """The weights file is there but is not a checkpoint of this model."""


def load_state_dict(model: torch.nn.Module, path: str) -> None:
    """Load the state_dict at ``path`` into ``model`` (unwrapping a training
    checkpoint's ``state_dict`` or ``model`` entry)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise WeightsError(f"weights file {path} is not a torch state_dict: {reason(e)}") from e
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
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
